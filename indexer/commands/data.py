"""`clipsearch data`: not implemented yet."""
