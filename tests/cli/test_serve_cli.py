"""`clipsearch serve`: every setting is a flag, flags beat the environment, bad values are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipsearch.commands import serve as serve_cmd  # noqa: F401  (registers the command)
from clipsearch.commands.app import app
from service.settings import ServiceSettings
from tests.conftest import run_cli

runner = CliRunner()


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[ServiceSettings]:
    from service import server

    calls: list[ServiceSettings] = []
    monkeypatch.setattr(server, "run", calls.append)
    return calls


def test_every_setting_is_a_flag() -> None:
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in ServiceSettings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in result.output, flag
        assert f"CLIPSEARCH_{name.upper()}" in result.output


def test_flags_become_settings(captured: list[ServiceSettings], tmp_path: Path) -> None:
    args = ["serve", "--bundles", str(tmp_path), "--port", "9123", "--device", "cpu", "--threads", "3",
            "--admin-key", "a", "--cors-origins", "https://x.example,https://y.example", "--max-k", "50",
            "--batch-max-wait-ms", "0.5", "--no-verify-checksums"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (settings,) = captured
    assert settings.bundles == tmp_path and settings.port == 9123 and settings.threads == 3
    assert settings.cors_origins == ["https://x.example", "https://y.example"]
    assert settings.max_k == 50 and settings.batch_max_wait_ms == 0.5 and settings.verify_checksums is False
    assert settings.admin_key == "a" and settings.host == "127.0.0.1"


def test_environment_fills_what_flags_leave_out(
    captured: list[ServiceSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLIPSEARCH_MAX_K", "7")
    monkeypatch.setenv("CLIPSEARCH_PORT", "9000")
    monkeypatch.setenv("CLIPSEARCH_CORS_ORIGINS", "https://z.example")
    result = runner.invoke(app, ["serve", "--port", "9001"])
    assert result.exit_code == 0, result.output
    assert (
        captured[0].max_k == 7
        and captured[0].port == 9001
        and captured[0].cors_origins == ["https://z.example"]
    )


@pytest.mark.slow
def test_bad_flag_value_is_a_one_line_error() -> None:
    result = run_cli(["serve", "--device", "tpu"])
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: --device")
    assert "Traceback" not in result.stderr
    bad = run_cli(["serve", "--max-k", "0"])
    assert bad.returncode == 1 and "--max-k" in bad.stderr and "Traceback" not in bad.stderr
