"""Static checks of the Dockerfile and .dockerignore, plus running its healthcheck outside a container."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.ship.dockerfiles import Stage, copy_sources, dockerignore, is_ignored, parse

REPO = Path(__file__).resolve().parents[2]

BUILD_TOOLS = ("build-essential", "gcc", "g++", "make", "cmake", "python3-dev", "libc6-dev")


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    path = REPO / "Dockerfile"
    assert path.is_file(), "Dockerfile is missing"
    return parse(path)


def _final(dockerfile: tuple[dict[str, str], list[Stage]]) -> Stage:
    return dockerfile[1][-1]


def _apt_packages(stage: Stage) -> set[str]:
    words: set[str] = set()
    for run in stage.all("RUN"):
        for cmd in run.args.split("&&"):
            if "apt-get install" in cmd:
                words |= {w for w in cmd.split() if not w.startswith("-") and w not in ("apt-get", "install")}
    return words


def test_every_stage_is_python_311_slim(dockerfile):
    global_args, stages = dockerfile
    names = {s.name for s in stages if s.name}
    for stage in stages:
        base = stage.base
        if base.startswith("${") and base.endswith("}"):
            base = global_args[base[2:-1]]
        assert base in names or base.startswith("python:3.11-slim"), f"stage {stage.name} is based on {base}"


def test_build_tools_stay_in_the_build_stage(dockerfile):
    stages = dockerfile[1]
    final = _final(dockerfile)
    assert len(stages) >= 2, "expected a multi-stage build (build tools must not reach the final image)"
    assert not _apt_packages(final) & set(BUILD_TOOLS), "the final stage installs build tools"
    copies = [c.args for c in final.all("COPY") if c.args.startswith("--from=")]
    assert any("/opt/venv" in c for c in copies), "the final stage should copy the built venv"
    build_runs = " ".join(r.args for s in stages[:-1] for r in s.all("RUN"))
    assert "pip install ." in build_runs, "the project is installed in the build stage"


def test_final_image_has_the_emoji_font(dockerfile):
    assert "fonts-noto-color-emoji" in _apt_packages(_final(dockerfile))


def test_copied_paths_exist_and_are_not_dockerignored(dockerfile):
    patterns = dockerignore(REPO / ".dockerignore")
    copies = [c for s in dockerfile[1] for c in s.all("COPY") + s.all("ADD") if "--from=" not in c.args]
    assert copies, "the Dockerfile copies nothing from the build context"
    for ins in copies:
        for src in copy_sources(ins):
            assert (REPO / src).exists(), f"line {ins.line}: COPY {src}: no such path in the repository"
            assert not is_ignored(src, patterns), f"line {ins.line}: {src} is excluded by .dockerignore"
    # Everything `pip install .` reads must be in the context.
    for needed in ("pyproject.toml", "README.md", "clipsearch/cli.py", "service/__init__.py"):
        assert not is_ignored(needed, patterns), f".dockerignore excludes {needed}"
    for junk in (".git/HEAD", ".venv/bin/python", "demo-work/bundles/CURRENT", "tests/conftest.py"):
        assert is_ignored(junk, patterns), f".dockerignore lets {junk} into the build context"


def test_runs_as_a_non_root_user(dockerfile):
    final = _final(dockerfile)
    users = final.all("USER")
    assert users, "the final stage has no USER"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), "the container runs as root"
    assert any("useradd" in r.args and user in r.args for r in final.all("RUN")), (
        f"user {user} is never created"
    )


@pytest.mark.slow
def test_exposes_8000_and_enters_through_the_clipsearch_script(dockerfile):
    final = _final(dockerfile)
    assert any("8000" in e.args.split() for e in final.all("EXPOSE"))
    entry = final.all("ENTRYPOINT")[-1].exec_form()
    assert entry == ["clipsearch"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "clipsearch" in scripts, "the entrypoint is not a console script of the package"
    module, _, func = scripts["clipsearch"].partition(":")
    ok = subprocess.run(
        [sys.executable, "-c", f"import {module}; assert callable({module}.{func})"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
    )
    assert ok.returncode == 0, ok.stderr.decode()


def test_a_build_argument_selects_cuda_or_cpu_torch(dockerfile):
    stages = dockerfile[1]
    build_args = {a.args.split("=")[0].strip() for s in stages for a in s.all("ARG")}
    assert "TORCH_VARIANT" in build_args
    torch_runs = [r.args for s in stages for r in s.all("RUN") if "torch==" in r.args]
    assert torch_runs, "torch is never installed explicitly"
    assert all("${TORCH_VARIANT}" in r and "cpu)" in r and "cuda)" in r for r in torch_runs)
    assert any("download.pytorch.org/whl/cpu" in r for r in torch_runs)


def _healthcheck_argv(dockerfile) -> list[str]:
    checks = _final(dockerfile).all("HEALTHCHECK")
    assert checks, "no HEALTHCHECK"
    text = re.sub(r"^(--\S+\s+)*", "", checks[-1].args)
    keyword, _, rest = text.partition(" ")
    assert keyword == "CMD" and rest.strip().startswith("["), "HEALTHCHECK should be an exec-form CMD"
    return [str(a) for a in json.loads(rest)]


def test_healthcheck_uses_python_on_readyz(dockerfile):
    argv = _healthcheck_argv(dockerfile)
    assert argv[0] == "python", "the slim image has no curl: probe with python"
    assert "/readyz" in " ".join(argv)


@pytest.mark.slow
def test_healthcheck_passes_only_when_ready(dockerfile, readyz_stub):
    """Run the image's probe against a stand-in /readyz: ready -> exit 0; 503 -> non-zero."""
    argv = [sys.executable if a == "python" else a for a in _healthcheck_argv(dockerfile)]
    env = {**os.environ, "CLIPSEARCH_PORT": str(readyz_stub.port)}
    readyz_stub.status = 200
    assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0
    readyz_stub.status = 503
    assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode != 0
    assert readyz_stub.paths == ["/readyz", "/readyz"]


@pytest.mark.slow
def test_the_copied_context_builds_a_wheel_with_the_page_and_configs(dockerfile, tmp_path: Path):
    """What the build stage does, outside Docker: COPY (minus .dockerignore) then build the project."""
    patterns = dockerignore(REPO / ".dockerignore")
    context = tmp_path / "src"
    for ins in (c for c in dockerfile[1][0].all("COPY") if "--from=" not in c.args):
        for src in copy_sources(ins):
            paths = [REPO / src] if (REPO / src).is_file() else sorted((REPO / src).rglob("*"))
            for path in (p for p in paths if p.is_file()):
                rel = path.relative_to(REPO).as_posix()
                if not is_ignored(rel, patterns):
                    (context / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, context / rel)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", "dist"],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (context / "dist").glob("clipsearch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = [p.relative_to(REPO).as_posix() for p in (REPO / "service" / "static").iterdir()]
    expected += [p.relative_to(REPO).as_posix() for p in (REPO / "indexer" / "configs").glob("*.json")]
    missing = [n for n in expected if n not in names]
    assert not missing, f"the installed package would lack {missing}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "clipsearch = clipsearch.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_default_command_serves_on_all_interfaces_at_the_exposed_port(dockerfile):
    """`CMD ["serve"]` takes its settings from the image's CLIPSEARCH_* variables: they must be real ones."""
    from service.settings import ServiceSettings

    final = _final(dockerfile)
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(e.args for e in final.all("ENV"))))
    settings = {k: v for k, v in env.items() if k.startswith("CLIPSEARCH_")}
    unknown = [
        k for k in settings if k.removeprefix("CLIPSEARCH_").lower() not in ServiceSettings.model_fields
    ]
    assert not unknown, f"not service settings: {unknown}"
    assert settings["CLIPSEARCH_HOST"] == "0.0.0.0"
    assert any(settings["CLIPSEARCH_PORT"] in e.args.split() for e in final.all("EXPOSE"))
    assert settings["CLIPSEARCH_BUNDLES"].startswith("/data/")
    assert final.all("CMD")[-1].exec_form() == ["serve"]
