"""`clipsearch index` and `clipsearch bundles` from the command line: output contracts and bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from clipsearch import cli
from indexer.core.bundle.layout import ITEMS_DB
from indexer.core.bundle.leases import write_lease
from tests.conftest import run_cli
from tests.index.helpers import make_folder, run_index

SUMMARY_KEYS = ["bundle", "added", "updated", "removed", "unchanged", "skipped", "images", "texts", "seconds"]


def call(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `clipsearch ARGS` in-process through the real entry point (usage errors included)."""
    old = sys.argv
    sys.argv = ["clipsearch", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_json_prints_exactly_one_object_with_the_promised_keys(tiny_model_dir, colour_csv, tmp_path):
    args = [
        "index",
        "--model",
        str(tiny_model_dir),
        "--images",
        str(colour_csv),
        "--bundles",
        str(tmp_path / "b"),
    ]
    proc = run_cli([*args, "--json", "--workers", "1"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert list(summary) == SUMMARY_KEYS
    assert summary["images"] == 8 and summary["texts"] == 8 and summary["added"] == 8
    assert isinstance(summary["seconds"], float)
    assert "img/s" in proc.stderr, "the progress bar shows a rate on stderr"
    assert (tmp_path / "b" / "CURRENT").read_text().strip() == summary["bundle"]


@pytest.fixture
def good(tiny_model_dir: Path, tmp_path: Path) -> list[str]:
    src = make_folder(tmp_path / "p", 2)
    return ["index", "--model", str(tiny_model_dir), "--images", str(src), "--bundles", str(tmp_path / "b")]


def _set(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


@pytest.mark.parametrize(
    ("flag", "value", "code", "needle"),
    [
        ("--batch-size", "abc", 2, "--batch-size"),
        ("--batch-size", "0", 1, "--batch-size"),
        ("--workers", "-1", 1, "--workers"),
        ("--keep", "-2", 1, "--keep"),
        ("--max-pixels", "0", 1, "--max-pixels"),
        ("--max-index-memory", "lots", 1, "--max-index-memory"),
        ("--index", "NotAFactory9", 1, "index_factory"),
        ("--device", "tpu", 1, "device"),
        ("--model", "/nonexistent/model", 1, "model dir"),
        ("--images", "/nonexistent/photos", 1, "does not exist"),
        ("--texts", "/nonexistent/texts.txt", 1, "--texts"),
        ("--image-column", "nope", 1, "columns found"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(good, flag, value, code, needle, capsys, tmp_path):
    args = _set(good, flag, value)
    if flag == "--image-column":
        csv = tmp_path / "list.csv"
        csv.write_text("file,caption\np/img00.png,x\n")
        args = _set(args, "--images", str(csv))
    rc, out, err = call(args, capsys)
    assert rc == code
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (Path(args[args.index("--bundles") + 1]) / "CURRENT").exists()


def test_missing_required_option_and_bundles_file(good, capsys, tmp_path):
    rc, _, err = call(good[:1] + good[3:], capsys)
    assert rc == 2 and err.strip().splitlines() == [
        "error: Missing option '--model'. (see: clipsearch index --help)"
    ]
    (tmp_path / "afile").write_text("x")
    rc, _, err = call(_set(good, "--bundles", str(tmp_path / "afile")), capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "not a directory" in err


def test_bundles_list_verify_gc(tiny_model_dir, tmp_path, capsys):
    src = make_folder(tmp_path / "p", 2)
    bundles = tmp_path / "b"
    names = [run_index(tiny_model_dir, src, bundles, keep=0).bundle for _ in range(4)]
    capsys.readouterr()

    rc, out, _ = call(["bundles", "list", "--bundles", str(bundles), "--json"], capsys)
    listed = json.loads(out)
    assert rc == 0 and [b["version"] for b in listed] == names
    assert [b["current"] for b in listed] == [False, False, False, True]
    assert listed[-1]["images"] == 2 and listed[-1]["texts"] == 2 and listed[-1]["index"] == "Flat"

    with open(bundles / names[1] / ITEMS_DB, "r+b") as f:  # damage an old bundle
        f.seek(200)
        f.write(b"\xff" * 8)
    rc, out, err = call(["bundles", "verify", "--bundles", str(bundles)], capsys)
    assert rc == 1 and f"FAILED  {names[1]}" in out and f"ok      {names[3]}" in out
    assert err.strip().splitlines() == ["error: 1 of 4 bundles failed verification"]
    rc, out, _ = call(["bundles", "verify", "--bundles", str(bundles), "--version", names[3]], capsys)
    assert rc == 0 and out.strip() == f"ok      {names[3]}"

    write_lease(bundles, names[0])  # a server still serves the oldest one
    rc, out, _ = call(["bundles", "gc", "--bundles", str(bundles), "--keep", "1", "--dry-run"], capsys)
    assert rc == 0 and names[1] in out and names[2] in out and names[0] not in out
    assert (bundles / names[1]).is_dir(), "--dry-run removes nothing"
    rc, out, _ = call(["bundles", "gc", "--bundles", str(bundles), "--keep", "1"], capsys)
    left = sorted(p.name for p in bundles.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert rc == 0 and left == [names[0], names[3]]


def test_bundles_bad_input(tmp_path, capsys):
    for args in (
        ["bundles", "list", "--bundles", str(tmp_path / "none")],
        ["bundles", "verify", "--bundles", str(tmp_path)],
        ["bundles", "gc", "--bundles", str(tmp_path), "--keep", "0"],
        ["bundles", "verify", "--bundles", str(tmp_path), "--version", "nope"],
    ):
        rc, _out, err = call(args, capsys)
        assert rc != 0 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), (args, err)


def test_gc_drops_unused_cache(tiny_model_dir, tmp_path, capsys):
    src = make_folder(tmp_path / "p", 3)
    bundles = tmp_path / "b"
    run_index(tiny_model_dir, src, bundles)
    (src / "img00.png").unlink()
    run_index(tiny_model_dir, src, bundles, keep=1)
    rc, _out, _ = call(["bundles", "gc", "--bundles", str(bundles), "--keep", "1"], capsys)
    assert rc == 0
    (src / "img00.png").unlink(missing_ok=True)
    from tests.index.helpers import make_image

    make_image(src / "img00.png", seed=0)  # the same picture again: its vector was pruned
    assert run_index(tiny_model_dir, src, bundles).embedded == 1


@pytest.mark.parametrize(
    ("current", "needle"),
    [("20990101T000000000000Z-ffffff\n", "does not exist"), ("", "is empty"), (None, "is missing")],
)
def test_verify_and_list_report_a_broken_current(tiny_model_dir, tmp_path, capsys, current, needle):
    """Every bundle verifies, but CURRENT names none of them: verify fails naming it, list warns."""
    bundles = tmp_path / "b"
    name = run_index(tiny_model_dir, make_folder(tmp_path / "p", 2), bundles).bundle
    if current is None:
        (bundles / "CURRENT").unlink()
    else:
        (bundles / "CURRENT").write_text(current)
    capsys.readouterr()
    rc, out, err = call(["bundles", "verify", "--bundles", str(bundles)], capsys)
    assert rc == 1 and f"ok      {name}" in out and "FAILED  CURRENT" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0] and "CURRENT" in lines[0]
    rc, out, _ = call(["bundles", "verify", "--bundles", str(bundles), "--version", name], capsys)
    assert rc == 0, "asking for one bundle verifies that bundle only"
    for extra in ([], ["--json"]):
        rc, out, err = call(["bundles", "list", "--bundles", str(bundles), *extra], capsys)
        assert rc == 0 and name in out
        assert err.startswith("warning: ") and needle in err
    rc, _, err = call(["bundles", "gc", "--bundles", str(bundles), "--keep", "1"], capsys)
    assert rc == 1 and "not pruning" in err and (bundles / name).is_dir()


def test_auto_below_the_recall_target_fails_unless_accepted_and_info_shows_it(
    tiny_model_dir, tmp_path, capsys
):
    """A budget that leaves `auto` only a plain 2-byte PQ: one error line and no bundle, or with
    --accept-low-recall a bundle whose manifest, stderr and `/v1/info` carry the warning."""
    from fastapi.testclient import TestClient

    from indexer.core.bundle.read import open_bundle
    from service.app import create_app
    from service.settings import ServiceSettings

    src = make_folder(tmp_path / "p", 40, captions=False)
    bundles = tmp_path / "b"
    args = ["index", "--model", str(tiny_model_dir), "--images", str(src), "--bundles", str(bundles)]
    args += ["--exact-max", "0", "--max-index-memory", "600", "--workers", "0"]
    rc, out, err = call(args, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 1 and out == "" and len(errors) == 1, err
    assert "recall@10" in errors[0] and "--accept-low-recall" in errors[0]
    assert not (bundles / "CURRENT").exists()

    rc, out, err = call([*args, "--accept-low-recall"], capsys)
    assert rc == 0, err
    assert any(line.startswith("warning: images index: no index layout") for line in err.splitlines()), err
    b = open_bundle(bundles)
    warning = b.manifest.images.recall_warning
    assert warning and b.manifest.images.recall_at_10 is not None and b.manifest.images.recall_at_10 < 0.95
    assert b.manifest.texts.recall_warning is None
    b.close()
    settings = ServiceSettings(bundles=bundles, device="cpu", reload_poll_s=0)  # type: ignore[call-arg]
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        info = client.get("/v1/info").json()
    assert info["images"]["recall_warning"] == warning and info["texts"]["recall_warning"] is None
