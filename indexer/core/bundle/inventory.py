"""What a bundles dir holds: each bundle described from its manifest, or verified as the service would
(`clipsearch bundles list` and `bundles verify`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from indexer.core.bundle.layout import CURRENT
from indexer.core.bundle.leases import leased_versions
from indexer.core.bundle.manifest import BundleError, BundleManifest, load_manifest
from indexer.core.bundle.read import list_versions, open_bundle_dir, read_current


@dataclass(frozen=True)
class BundleInfo:
    version: str
    current: bool
    leased: bool
    manifest: BundleManifest | None
    size_bytes: int
    problem: str | None = None  # set when the manifest cannot be read

    def as_dict(self) -> dict[str, object]:
        m = self.manifest
        return {
            "version": self.version,
            "current": self.current,
            "leased": self.leased,
            "created_at": m.created_at if m else None,
            "images": m.images.count if m else None,
            "texts": m.texts.count if m else None,
            "model": m.model.name if m else None,
            "fingerprint": m.model.fingerprint if m else None,
            "index": m.images.factory if m else None,
            "recall_at_10": m.images.recall_at_10 if m else None,
            "size_bytes": self.size_bytes,
            "problem": self.problem,
        }


def current_version(bundles_dir: Path) -> str | None:
    """What CURRENT says, without checking it (None when it is missing or empty)."""
    try:
        return (Path(bundles_dir) / CURRENT).read_text().strip() or None
    except FileNotFoundError:
        return None


def current_problem(bundles_dir: Path) -> str | None:
    """What is wrong with CURRENT itself (missing while bundles exist, empty, naming no bundle dir), or
    None. Whether the bundle it names verifies is `verify`'s question."""
    bundles_dir = Path(bundles_dir)
    if not (bundles_dir / CURRENT).exists():
        n = len(list_versions(bundles_dir))
        return f"{bundles_dir / CURRENT} is missing, although {n} bundle(s) exist" if n else None
    try:
        name = read_current(bundles_dir)
    except BundleError as e:
        return str(e)
    if not (bundles_dir / name).is_dir():
        return f"{bundles_dir / CURRENT} names {name}, which does not exist (dangling)"
    return None


def _dir_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def describe(bundles_dir: Path) -> list[BundleInfo]:
    """Every published bundle, oldest first, without reading checksums (fast)."""
    current, leased = current_version(bundles_dir), leased_versions(bundles_dir)
    out = []
    for v in list_versions(bundles_dir):
        root = Path(bundles_dir) / v
        try:
            manifest, problem = load_manifest(root), None
        except BundleError as e:
            manifest, problem = None, str(e)
        out.append(BundleInfo(v, v == current, v in leased, manifest, _dir_size(root), problem))
    return out


def verify(bundles_dir: Path, versions: list[str] | None = None) -> dict[str, str | None]:
    """Open each bundle as the service would (checksums, counts, dimensions, fingerprint).

    Returns version -> None when it verifies, else the reason.
    """
    result: dict[str, str | None] = {}
    for v in versions or list_versions(bundles_dir):
        try:
            open_bundle_dir(Path(bundles_dir) / v).close()
            result[v] = None
        except BundleError as e:
            result[v] = str(e)
    return result
