"""One module per subcommand, each thin: parse -> config -> one call into `indexer` or `service`."""
