"""The evaluation stage: pure retrieval metrics (`metrics`) and `clipsearch eval`'s runner (`runner`)."""
