"""What users run around training: the `trl-priority` CLI, the token viewer, offline scores, built-in assets."""
