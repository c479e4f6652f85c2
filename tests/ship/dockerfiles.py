"""Small static readers for the Dockerfile and .dockerignore (no Docker engine runs in CI)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY...
    args: str  # the rest of the (continuation-joined) line
    line: int  # 1-based line where the instruction starts

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (after any --flags), or None for shell form."""
        text = re.sub(r"^(--\S+\s+)*", "", self.args.strip())
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list), f"line {self.line}: exec form must be a JSON array"
        return [str(v) for v in value]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages of a Dockerfile, in order."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in _instructions(path.read_text()):
        if ins.keyword == "FROM":
            parts = ins.args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif stages:
            stages[-1].instructions.append(ins)
        elif ins.keyword == "ARG":
            key, _, default = ins.args.partition("=")
            global_args[key.strip()] = default.strip().strip('"')
    return global_args, stages


def image_of(stages: list[Stage], stage: Stage | None = None) -> Stage:
    """A stage with its ancestors' instructions in front (`FROM base AS runtime` inherits base's layers)."""
    stage = stage or stages[-1]
    by_name = {s.name: s for s in stages if s.name}
    chain = [stage]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return Stage(chain[0].base, stage.name, [i for s in chain for i in s.instructions])


def _instructions(text: str) -> list[Instruction]:
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue  # comments (also inside continuations, as Docker strips them) and blank lines
        if not buf:
            start = n
        buf.append(line[:-1] if line.endswith("\\") else line)
        if not line.endswith("\\"):
            joined = " ".join(buf).strip()
            keyword, _, args = joined.partition(" ")
            out.append(Instruction(keyword.upper(), args.strip(), start))
            buf = []
    return out


def copy_sources(ins: Instruction) -> list[str]:
    """Source paths of a COPY/ADD (everything but the last argument, flags dropped)."""
    form = ins.exec_form()
    words = form if form is not None else [w for w in shlex.split(ins.args) if not w.startswith("--")]
    return words[:-1]


def is_ignored(rel: str, patterns: list[str]) -> bool:
    """Whether .dockerignore `patterns` exclude the path `rel` (last matching rule wins, `!` re-includes)."""
    ignored = False
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        # A rule on a directory covers everything below it; `**/x` matches x at any depth.
        candidates = [pat, pat.removeprefix("**/")] if pat.startswith("**/") else [pat]
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            ignored = not negate
    return ignored


def dockerignore(path: Path) -> list[str]:
    if not path.is_file():
        return []
    lines = (raw.strip() for raw in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]
