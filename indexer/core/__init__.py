"""The read side shared by every stage and the service: image decoding, model dirs and encoding, the
bundle format. It imports nothing else of clipsearch (docs/architecture.md, "Import rules")."""
