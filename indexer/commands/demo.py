"""`clipsearch demo`: not implemented yet."""
