"""The data stage: image–caption sources, the text corpus, the one decoding loader, the emoji set."""
