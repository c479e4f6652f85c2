"""The `clipsearch` command line: one module per subcommand, each thin (parse -> config -> one call)."""
