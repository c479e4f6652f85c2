"""`clipsearch serve`: run the HTTP search service over a bundles directory.

Every `ServiceSettings` field is a flag here (built from the settings model, so the two never drift);
a flag left out falls back to its `CLIPSEARCH_*` environment variable, then to the default.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from clipsearch.commands.app import app, setup_logging, user_errors
from indexer.core.errors import ClipsearchError, first_error


class SettingsError(ClipsearchError, ValueError):
    """A `serve` flag or `CLIPSEARCH_*` variable with a value the service cannot use."""


def _flag_type(annotation: Any) -> Any:
    # Flags are all optional (None = not given); lists are given comma-separated, as in the env var.
    text = str(annotation)
    if "list" in text:
        return str | None
    for kind in (bool, int, float, Path):
        if kind.__name__ in text:
            return kind | None
    return str | None


def _serve_parameters() -> list[inspect.Parameter]:
    from service.settings import ServiceSettings  # light: pydantic only

    params = []
    for name, field in ServiceSettings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = str(default) if isinstance(default, Path) else repr(default)
        help_text = f"{field.description} (env CLIPSEARCH_{name.upper()}, default {shown})"
        option = typer.Option(help=help_text, show_default=False)
        annotation = Annotated[_flag_type(field.annotation), option]  # type: ignore[valid-type]
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        )
    return params


def settings_from_flags(flags: dict[str, Any]) -> Any:
    """`ServiceSettings` from the flags given (None = not given) over the environment."""
    from pydantic import ValidationError

    from service.settings import ServiceSettings

    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return ServiceSettings(**given)
    except ValidationError as e:
        where, msg = first_error(e.errors())
        raise SettingsError(f"--{where.replace('_', '-')}: {msg}") from e


def serve(**flags: Any) -> None:
    """Serve text→image, image→text and image→image search over the bundle CURRENT names (hot reload)."""
    with user_errors():
        settings = settings_from_flags(flags)
        setup_logging()
        from service import server  # heavy (torch, faiss, fastapi): only when serving

        server.run(settings)


serve.__signature__ = inspect.Signature(_serve_parameters(), return_annotation=None)  # type: ignore[attr-defined]
app.command("serve")(serve)
