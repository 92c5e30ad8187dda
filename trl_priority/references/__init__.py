"""Where reference statistics come from: sources (a model, an adapter switched off, a callback, columns), the disk
cache, the epoch cache, and the top-k form a cache can hold."""
