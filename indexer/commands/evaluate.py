"""`clipsearch evaluate`: not implemented yet."""
