"""`clipsearch bundles`: not implemented yet."""
