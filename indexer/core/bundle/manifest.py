"""`manifest.json`: what a bundle holds, typed. Imports neither torch, open_clip nor FAISS."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from indexer.core.bundle.layout import MANIFEST
from indexer.core.errors import ClipsearchError, first_error


class BundleError(ClipsearchError, RuntimeError):
    """A bundle that is missing, incomplete or inconsistent; the message says what disagrees."""


class ModelRef(BaseModel):
    """What a model is: enough to describe it in a manifest or `/v1/info` (also `Encoder.info`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), frozen=True)

    name: str
    fingerprint: str = Field(description="sha256 of open_clip_model.safetensors")
    embed_dim: int
    image_size: int
    context_length: int
    preprocess: dict[str, Any] = Field(default_factory=dict)


class IndexSpec(BaseModel):
    """The base's FAISS index of one target; `count` is how many items of it the version serves."""

    model_config = ConfigDict(extra="forbid")

    file: str
    count: int
    factory: str = "Flat"
    metric: Literal["inner_product"] = "inner_product"
    recall_at_10: float | None = Field(None, description="measured vs exact search; None for exact")
    params: dict[str, Any] = Field(default_factory=dict, description="search-time params, e.g. nprobe")
    recall_warning: str | None = Field(
        None, description="set when `--index auto` published below its recall target (--accept-low-recall)"
    )


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str
    size: int


class SegmentSpec(BaseModel):
    """A delta segment (`segments/<name>/`): the ids it owns and the vectors it holds for them."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[0-9]{6}-[0-9a-f]{12}$", description="sequence + sha256 of its files")
    images: int = Field(ge=0, description="image vectors (and rows) it holds")
    texts: int = Field(ge=0, description="text vectors (and rows) it holds")
    replaced: int = Field(ge=0, description="ids it owns: earlier rows and vectors of these are void")


class BundleManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1, 2] = 1  # 2: the version has delta segments
    version: str
    created_at: str
    model: ModelRef
    images: IndexSpec
    texts: IndexSpec
    files: dict[str, FileEntry]
    stats: dict[str, Any] = Field(default_factory=dict)
    segments: list[SegmentSpec] = Field(default_factory=list, description="delta segments, oldest first")

    @model_validator(mode="after")
    def _schema_fits(self) -> BundleManifest:
        if self.segments and self.schema_version < 2:
            raise ValueError("delta segments need schema_version 2")
        return self

    def to_json(self) -> str:
        """The manifest file's text; a version without segments is written exactly as schema 1 was."""
        # `recall_warning` is written only when set, so a bundle without one reads in older versions too
        quiet = {
            t: {"recall_warning"} for t in ("images", "texts") if getattr(self, t).recall_warning is None
        }
        if self.segments:
            return self.model_copy(update={"schema_version": 2}).model_dump_json(indent=2, exclude=quiet)
        return self.model_copy(update={"schema_version": 1}).model_dump_json(
            indent=2,
            exclude={"segments": True, **quiet},
        )


def load_manifest(root: Path) -> BundleManifest:
    """The manifest of the bundle dir `root`; `BundleError` naming the first problem."""
    path = root / MANIFEST
    try:
        return BundleManifest.model_validate_json(path.read_bytes())
    except FileNotFoundError as e:
        raise BundleError(f"{root.name}: {MANIFEST} is missing") from e
    except ValidationError as e:
        where, msg = first_error(e.errors())
        raise BundleError(f"{root.name}: {MANIFEST} is invalid at {where or 'the top'}: {msg}") from e
