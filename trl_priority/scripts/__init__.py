"""Training scripts launched by the `trl-priority` CLI through `accelerate launch`."""
