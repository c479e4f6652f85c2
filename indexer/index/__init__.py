"""The indexing stage: scan → embed → cache → FAISS build → publish, under one lock (`runner`)."""
