"""The `clipsearch` command line: the one package that imports both `indexer` and `service`.

Nothing imports it (docs/architecture.md, "Import rules"); `clipsearch` and `python -m clipsearch` run
`clipsearch.cli.main`.
"""
