"""Service configuration: each setting is a `CLIPSEARCH_*` environment variable and a `serve` flag."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from indexer.core.precision import PrecisionError, parse_precision

MiB = 1024 * 1024


class ServiceSettings(BaseSettings):
    """What `clipsearch serve` runs with. The model comes from the bundle's manifest, never from here."""

    model_config = SettingsConfigDict(env_prefix="CLIPSEARCH_", frozen=True, extra="ignore")

    bundles: Path = Field(default=Path("bundles"), description="Bundles directory (the one holding CURRENT).")
    host: str = Field(default="127.0.0.1", description="Interface to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on.")
    device: str = Field(default="auto", description="auto, cpu or cuda[:N] for the query encoder.")
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch CPU threads, encoder and exact search (default: torch's choice).",
    )
    precision: str = Field(
        default="auto",
        description="Query encoder autocast: auto (bf16 on a GPU that supports it, else fp16; fp32 on "
        "the CPU), bf16, fp16, fp32 (off).",
    )
    admin_key: str | None = Field(
        default=None, description="Bearer key for /v1/admin/*; unset = admin disabled."
    )
    api_key: str | None = Field(
        default=None, description="Bearer key required on query routes; unset = open."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Allowed CORS origins, comma-separated; empty = no CORS."
    )
    max_k: int = Field(default=100, ge=1, description="Largest `k` a search may ask for.")
    max_offset: int = Field(default=1000, ge=0, description="Largest `offset` a search may ask for.")
    max_query_chars: int = Field(default=1000, ge=1, description="Longest text query, in characters.")
    max_embed_texts: int = Field(default=64, ge=1, description="Most texts one /v1/embed/text call may send.")
    max_body_bytes: int = Field(
        default=10 * MiB, ge=1024, description="Largest request body, checked while reading."
    )
    max_pixels: int = Field(
        default=50_000_000, ge=1, description="Largest image canvas (width*height) accepted."
    )
    batch_max_size: int = Field(
        default=32, ge=1, description="Most queries encoded together in one forward pass."
    )
    batch_max_wait_ms: float = Field(
        default=50.0,
        ge=0,
        description="Most a busy server's batch waits to hold as many queries as were in flight "
        "during the last one (and at most a quarter of that batch's run time); 0 = never wait.",
    )
    batch_workers: int = Field(
        default=1, ge=1, description="Batches encoded at once; >1 with threads=1 suits busy CPU-only hosts."
    )
    queue_size: int = Field(default=256, ge=1, description="Queries waiting per encoder queue before 503.")
    reload_poll_s: float = Field(default=0.5, ge=0, description="How often CURRENT is checked; 0 = never.")
    reload_retry_s: float = Field(
        default=30.0, ge=0, description="How soon a bundle that failed to load is retried."
    )
    verify_checksums: bool = Field(default=True, description="sha256 every bundle file before serving it.")
    mmap_indexes: bool = Field(
        default=False,
        description="Memory-map the base FAISS indexes instead of reading them: replicas on one host share "
        "the page cache and start without loading the vectors.",
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After seconds sent with 503 answers.")
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a client has to send a request's headers (from connect, or from the first "
        "byte on a kept-alive connection); then 408 and the connection closes.",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a client has, once the headers are in, to send the whole body; then 408 and "
        "the connection closes.",
    )
    max_connections: int = Field(
        default=1000,
        ge=1,
        description="Open connections at most; past it a new one closes the oldest still sending its "
        "headers (or idle), else gets 503 too_many_connections.",
    )
    keep_alive_s: float = Field(
        default=30.0, gt=0, description="Seconds an idle kept-alive connection stays open."
    )
    log_level: str = Field(default="info", description="Log level of the service and uvicorn.")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value not in ("auto", "cpu") and not value.startswith("cuda"):
            raise ValueError("device must be auto, cpu or cuda[:N]")
        return value

    @field_validator("precision")
    @classmethod
    def _check_precision(cls, value: str) -> str:
        try:
            return parse_precision(value)
        except PrecisionError as e:
            raise ValueError(str(e)) from None
