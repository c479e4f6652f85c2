"""`clipsearch model save`: resolve a model reference (architecture + pretrained tag, checkpoint file or
model dir, or an `hf-hub:` name) into a model dir in open_clip's local-dir layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipsearch.commands.app import app, setup_logging, user_errors

model_app = typer.Typer(help="Write published open_clip models as model dirs.", no_args_is_help=True)
app.add_typer(model_app, name="model")

ModelOption = Annotated[
    str, typer.Option(help="Model dir, open_clip architecture (ViT-B-32), JSON config or hf-hub:ORG/NAME.")
]
PretrainedOption = Annotated[
    str | None,
    typer.Option(
        help="With an architecture: a tag from open_clip.list_pretrained(), a checkpoint file or a model dir."
    ),
]


@model_app.command("save")
def save_command(
    model: ModelOption,
    out: Annotated[Path, typer.Option(help="The model dir to write (must not exist, or be empty).")],
    pretrained: PretrainedOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Write the model dir of MODEL (+ PRETRAINED) to OUT: config, safetensors weights, tokenizer files."""
    setup_logging(verbose)
    with user_errors():
        from indexer.core.modelref import ModelReference, kind_of, save_reference

        ref = ModelReference(model, pretrained)
        if kind_of(ref) == "untrained":
            from indexer.core.modeldir import ModelError

            raise ModelError(f"--model {model} needs --pretrained: a tag, a checkpoint file or a model dir")
        save_reference(ref, out)
    typer.echo(f"saved {ref.label()} to {out}")
