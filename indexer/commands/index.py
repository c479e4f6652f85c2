"""`clipsearch index`: not implemented yet."""
