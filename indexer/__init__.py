"""The producer side of clipsearch, one sub-package per stage (see docs/architecture.md).

`core` is the read side every stage and the service share; `data`, `train`, `eval` and `index` are the
stages. Nothing is imported from here directly.
"""
