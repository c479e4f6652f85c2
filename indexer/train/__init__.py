"""The training stage: config, model building and tower locks, cached data, the loop, checkpoints."""
