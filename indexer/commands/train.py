"""`clipsearch train`: not implemented yet."""
