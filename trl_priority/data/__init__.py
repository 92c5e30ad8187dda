"""The data path's first steps: columns that travel with the tokens, and weights users bring in their data."""
