"""`clipsearch serve`: not implemented yet."""
