"""Entry point of the `clipsearch` console command."""

from __future__ import annotations

# Importing each module registers its subcommand(s) on the shared app.
from indexer.commands import bundles, data, demo, evaluate, index, serve, train  # noqa: F401
from indexer.commands._app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
