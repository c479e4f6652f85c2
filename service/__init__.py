"""The consumer: a FastAPI app that serves search over the bundle CURRENT names (docs/api.md)."""
