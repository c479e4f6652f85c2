"""Fault suite: the faults users meet, each with a pass/fail invariant and a figure (docs/reliability.md).

Modelled on how trusted stores test themselves (Qdrant's crasher: SIGKILL at random, restart, check
invariants; Weaviate's chaos pipeline: kill -9 during a long import, the count must match; Milvus
chaos: success rate while components are killed). Every scenario runs the real `clipsearch` command
in child processes, over a tiny random model (`tiny-test`) and generated images:

  index-kill         kill -9 of `clipsearch index` at 25 moments over every stage; CURRENT verifies,
                     the next run succeeds, no item id changes meaning
  serve-kill         kill -9 of `clipsearch serve` under load, restart: time to ready; no wrong answer,
                     only refused (or, for requests in flight at the kill, reset) connections
  reload-under-load  re-index + reload every 5 s under 20 QPS of text and image queries: 0 failed
                     requests, every response from exactly one version
  fuzz               Schemathesis over the whole OpenAPI schema (positive and negative data): 0
                     responses >= 500, 0 responses that break the schema
  slow-flood         500 connections trickling headers or bodies while 8 normal clients search: their
                     p99 within 2x of the unloaded p99, 0 failed
  soak               moderate load for 30 minutes: resident memory drift < 10%, p99 stable, 0 errors
  disk-full          a small tmpfs fills during cache writes / during publish / before the run:
                     one-line error, CURRENT whole, the next run succeeds (needs root to mount)

    python benchmarks/faults.py                          # everything at full size (about 50 minutes)
    python benchmarks/faults.py --quick                  # a few trials each, no soak (about 8 minutes)
    python benchmarks/faults.py --only fuzz --fuzz-examples 200

It prints the table (scenario, trials, passed, figure) and writes a JSON report (`--out`).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import asyncio
import io
import json
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer.core.bundle.read import open_bundle, read_current  # noqa: E402
from indexer.index.stages import PAUSE_DIR_ENV, PAUSE_ENV, RESUME_ENV  # noqa: E402

ADMIN_KEY = "faults-admin"
QUERIES = ["a picture number 3", "red", "a picture", "number 12", "blue square", "a photo of a dog"]


# ------------------------------------------------------------------------------------------ results


@dataclass
class Row:
    scenario: str
    trials: int
    passed: int
    figure: str
    details: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.trials > 0 and self.passed == self.trials


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000 if s else float("nan")


# ------------------------------------------------------------------------------------------ setup


@dataclass
class Work:
    root: Path
    model: Path
    photos: Path


def make_image(path: Path, seed: int, size: int = 48) -> None:
    """A distinct picture per seed (gradient plus noise), with a caption file next to it."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    ramp = np.linspace(0, 1, size)[None, :, None] * rng.integers(-120, 120, size=3)
    arr = np.clip(base + ramp + rng.integers(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    path.with_suffix(".txt").write_text(f"a picture number {seed}\n")


def prepare(root: Path) -> Work:
    """A random `tiny-test` model dir (as the tests build one) and a folder of generated images."""
    import open_clip
    import torch

    from indexer.core.architectures import model_config, register_shipped_configs
    from indexer.core.modeldir import save_model_dir

    root.mkdir(parents=True, exist_ok=True)
    model = root / "model"
    if not (model / "open_clip_config.json").is_file():
        register_shipped_configs()
        torch.manual_seed(0)
        save_model_dir(open_clip.create_model("tiny-test"), model_config("tiny-test"), model)
    return Work(root, model, root / "photos")


def fresh_photos(work: Work, name: str, n: int, first_seed: int = 0) -> Path:
    folder = work.root / name
    shutil.rmtree(folder, ignore_errors=True)
    for i in range(n):
        make_image(folder / f"img{first_seed + i:04d}.png", seed=first_seed + i)
    return folder


def clipsearch(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "clipsearch", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def index_args(work: Work, photos: Path, bundles: Path, *extra: str) -> list[str]:
    return [
        "index",
        "--model",
        str(work.model),
        "--images",
        str(photos),
        "--bundles",
        str(bundles),
        "--workers",
        "0",
        "--keep",
        "0",
        *extra,
    ]


def run_index(work: Work, photos: Path, bundles: Path, *extra: str) -> str:
    proc = clipsearch([*index_args(work, photos, bundles, *extra), "--json"])
    if proc.returncode != 0:
        raise RuntimeError(f"clipsearch index failed: {proc.stderr.strip().splitlines()[-1:]}")
    return str(json.loads(proc.stdout)["bundle"])


def bundle_map(bundles: Path, version: str) -> dict[int, str]:
    """id -> the item's key (image path or text) in one bundle, read straight from items.sqlite."""
    conn = sqlite3.connect(f"file:{bundles / version / 'items.sqlite'}?mode=ro&immutable=1", uri=True)
    try:
        rows = conn.execute("SELECT id, kind, path, text FROM items").fetchall()
    finally:
        conn.close()
    return {int(i): (f"image:{p}" if kind == "image" else f"text:{t}") for i, kind, p, t in rows}


class IdLedger:
    """Every (id, key) any bundle ever published: an id must never name two items."""

    def __init__(self) -> None:
        self.key_of: dict[int, str] = {}
        self.id_of: dict[str, int] = {}
        self.seen: set[str] = set()

    def add(self, bundles: Path, version: str) -> list[str]:
        if version in self.seen:
            return []
        self.seen.add(version)
        problems = []
        for item_id, key in bundle_map(bundles, version).items():
            if self.key_of.setdefault(item_id, key) != key:
                problems.append(f"{version}: id {item_id} was {self.key_of[item_id]}, now {key}")
            if self.id_of.setdefault(key, item_id) != item_id:
                problems.append(f"{version}: {key} had id {self.id_of[key]}, now {item_id}")
        return problems


# ------------------------------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`clipsearch serve` in a child process."""

    def __init__(self, bundles: Path, *flags: str) -> None:
        self.bundles, self.flags, self.port = bundles, flags, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = bundles.parent / f"serve-{self.port}.log"

    def start(self, timeout: float = 120) -> float:
        """Start and wait until /readyz answers 200; returns the seconds that took."""
        t0 = time.monotonic()
        args = [
            "serve",
            "--bundles",
            str(self.bundles),
            "--port",
            str(self.port),
            "--device",
            "cpu",
            "--admin-key",
            ADMIN_KEY,
            "--log-level",
            "warning",
            *self.flags,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "clipsearch", *args], env=env, stdout=log, stderr=log
            )
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"clipsearch serve exited {self.proc.returncode}; see {self.log}")
            with suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            time.sleep(0.05)
        raise RuntimeError("clipsearch serve did not become ready")

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    @contextmanager
    def running(self) -> Iterator[Server]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


def query_png(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(1000 + seed)
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Answer:
    t: float
    kind: str
    query: int
    latency: float
    status: int | None  # None: no HTTP answer
    error: str = ""  # refused, reset, timeout, or the error code
    bundle: str = ""
    header: str = ""
    hits: list[tuple[int, float]] = field(default_factory=list)


def ask(http: httpx.Client, kind: str, q: int, k: int, target: str = "images") -> Answer:
    """One text or image search; never raises."""
    t0 = time.monotonic()
    try:
        if kind == "text":
            r = http.post(
                "/v1/search/text", json={"query": QUERIES[q % len(QUERIES)], "k": k, "target": target}
            )
        else:
            data = {"k": str(k), "target": target}
            r = http.post("/v1/search/image", files={"file": ("q.png", query_png(q % 4))}, data=data)
    except httpx.ConnectError:
        return Answer(t0, kind, q, time.monotonic() - t0, None, "refused")
    except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
        return Answer(t0, kind, q, time.monotonic() - t0, None, "reset")
    except httpx.TimeoutException:
        return Answer(t0, kind, q, time.monotonic() - t0, None, "timeout")
    latency = time.monotonic() - t0
    if r.status_code != 200:
        code = (
            r.json().get("error", {}).get("code", "")
            if r.headers.get("content-type", "").startswith("application/json")
            else ""
        )
        return Answer(t0, kind, q, latency, r.status_code, code or str(r.status_code))
    body = r.json()
    hits = [(int(h["id"]), float(h["score"])) for h in body["results"]]
    return Answer(t0, kind, q, latency, 200, "", body["bundle"], r.headers.get("x-bundle-version", ""), hits)


def closed_loop(
    url: str, clients: int, until: Callable[[], bool], k: int = 10, kinds: tuple[str, ...] = ("text", "image")
) -> list[Answer]:
    """`clients` threads, each sending its next query as soon as the last returned, until `until()`."""
    out: list[Answer] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        n = i
        with httpx.Client(base_url=url, timeout=30) as http:
            while not until():
                a = ask(http, kinds[n % len(kinds)], n, k)
                with lock:
                    out.append(a)
                n += clients
                if a.status is None:
                    time.sleep(0.02)  # the server is down: do not spin

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def deadline(seconds: float) -> Callable[[], bool]:
    end = time.monotonic() + seconds
    return lambda: time.monotonic() >= end


# ------------------------------------------------------------------------------------------ index-kill

# Named moments (indexer.index.stages; `#N` = the N-th time) spread over every stage; the rest of the 25
# are kills at a random time within a run.
MOMENTS = [
    "scan-hashed#1",
    "scan-hashed#7",
    "scanned",
    "cache-write#1",
    "embedded-batch#1",
    "cache-write#2",
    "embedded-batch#3",
    "embedded",
    "built-images",
    "publish-model",
    "publish-indexes",
    "publish-written",
    "publish-renamed",
    "current-tmp",
    "published",
]
QUICK_MOMENTS = ["scan-hashed#2", "cache-write#2", "built-images", "publish-written", "current-tmp"]


def _mutate(photos: Path, trial: int) -> None:
    """New images, a changed one, a removed one, a renamed one: every run has work in every stage."""
    for i in range(10):
        make_image(photos / f"t{trial:02d}-{i}.png", seed=5000 + trial * 16 + i)
    existing = sorted(photos.glob("img*.png"))
    if len(existing) > 3:
        make_image(existing[trial % len(existing)], seed=9000 + trial)  # same path, new content
        gone = existing[(trial + 1) % len(existing)]
        gone.unlink()
        gone.with_suffix(".txt").unlink(missing_ok=True)
        moved = existing[(trial + 2) % len(existing)]
        if moved.exists():
            moved.rename(moved.with_name(f"moved-{trial}-{moved.name}"))
            with suppress(FileNotFoundError):
                moved.with_suffix(".txt").rename(moved.with_name(f"moved-{trial}-{moved.stem}.txt"))


def _kill_run(work: Work, photos: Path, bundles: Path, moment: str | None, after_s: float) -> str:
    """Start `clipsearch index`, kill -9 it at `moment` (or after `after_s`); returns what happened."""
    pause = work.root / "pause"
    shutil.rmtree(pause, ignore_errors=True)
    pause.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), PAUSE_DIR_ENV: str(pause)}
    if moment:
        env[PAUSE_ENV] = moment
    args = [sys.executable, "-m", "clipsearch", *index_args(work, photos, bundles, "--batch-size", "4")]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = pause / f"paused-{moment.split('#')[0]}" if moment else None
    end = time.monotonic() + (120 if moment else after_s)
    while time.monotonic() < end and proc.poll() is None and not (marker and marker.exists()):
        time.sleep(0.01)
    finished = proc.poll() is not None
    with suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if moment and not (marker and marker.exists()):
        return f"never reached {moment} (exit {proc.returncode})"
    return "finished before the kill" if finished else "killed"


def index_kill(work: Work, trials: int) -> Row:
    moments: list[str | None] = list(MOMENTS if trials >= len(MOMENTS) else QUICK_MOMENTS[:trials])
    moments += [None] * max(0, trials - len(moments))
    photos = fresh_photos(work, "ik-photos", 40)
    bundles = work.root / "ik-bundles"
    shutil.rmtree(bundles, ignore_errors=True)
    ledger = IdLedger()
    t0 = time.monotonic()
    first = run_index(work, photos, bundles)
    run_s = time.monotonic() - t0
    problems = ledger.add(bundles, first)
    rows, passed, rng = [], 0, random.Random(0)
    for trial, moment in enumerate(moments):
        _mutate(photos, trial)
        after = rng.uniform(0.5, run_s) if moment is None else 0.0
        what = _kill_run(work, photos, bundles, moment, after)
        checks: dict[str, object] = {"moment": moment or f"t+{after:.2f}s", "kill": what}
        try:
            open_bundle(bundles).close()
            checks["current_verifies"] = True
            checks["ids"] = ledger.add(bundles, read_current(bundles))
        except Exception as e:
            checks["current_verifies"] = f"{type(e).__name__}: {e}"
        t1 = time.monotonic()
        recovery = clipsearch([*index_args(work, photos, bundles, "--batch-size", "4"), "--json"])
        run_s = max(1.0, time.monotonic() - t1)
        checks["next_run"] = recovery.returncode == 0 or recovery.stderr.strip().splitlines()[-1:]
        if recovery.returncode == 0:
            version = json.loads(recovery.stdout)["bundle"]
            checks["ids"] = [*checks.get("ids", []), *ledger.add(bundles, version)]  # type: ignore[misc]
            leftovers = [p.name for p in bundles.glob(".tmp-*")]
            checks["leftovers"] = leftovers
        ok = (
            checks["current_verifies"] is True
            and checks["next_run"] is True
            and not checks.get("ids")
            and not checks.get("leftovers")
            and "never reached" not in what
        )
        passed += ok
        rows.append({**checks, "ok": ok})
        print(
            f"  index-kill {trial + 1}/{len(moments)} {checks['moment']}: {'ok' if ok else checks}",
            flush=True,
        )
    problems += [p for r in rows for p in r.get("ids", [])]  # type: ignore[union-attr]
    verified = sum(r["current_verifies"] is True for r in rows)
    recovered = sum(r["next_run"] is True for r in rows)
    figure = (
        f"CURRENT verifies {verified}/{len(rows)}, next run succeeds {recovered}/{len(rows)}, "
        f"{len(problems)} id changes over {len(ledger.seen)} bundles"
    )
    return Row("index-kill", len(rows), passed, figure, {"trials": rows, "id_problems": problems[:20]})


# ------------------------------------------------------------------------------------------ serve-kill


def _wrong(a: Answer, refs: dict[tuple[str, int, str], list[tuple[int, float]]]) -> bool:
    """An answer is wrong when it mixes versions or its scores differ from the first answer to the same
    query from the same bundle (equal scores in another order are ties, not errors)."""
    if a.status != 200:
        return False
    if a.header != a.bundle:
        return True
    ref = refs.setdefault(
        (a.kind, a.query % 4 if a.kind == "image" else a.query % len(QUERIES), a.bundle), a.hits
    )
    return len(ref) != len(a.hits) or any(
        abs(s - r) > 1e-3 for (_, s), (_, r) in zip(a.hits, ref, strict=True)
    )


def serve_kill(work: Work, trials: int, clients: int = 4, up_s: float = 4.0) -> Row:
    photos = fresh_photos(work, "sk-photos", 60)
    bundles = work.root / "sk-bundles"
    shutil.rmtree(bundles, ignore_errors=True)
    run_index(work, photos, bundles)
    server = Server(bundles)
    server.start()
    readies, answers, stop = [], [], threading.Event()
    load = threading.Thread(target=lambda: answers.extend(closed_loop(server.url, clients, stop.is_set)))
    load.start()
    try:
        for _ in range(trials):
            time.sleep(up_s)
            server.kill9()
            readies.append(server.start())
        time.sleep(up_s)
    finally:
        stop.set()
        load.join()
        server.stop()
    refs: dict[tuple[str, int, str], list[tuple[int, float]]] = {}
    wrong = sum(_wrong(a, refs) for a in answers)
    errors: dict[str, int] = {}
    for a in answers:
        if a.status != 200:
            errors[a.error] = errors.get(a.error, 0) + 1
    bad_errors = {e: n for e, n in errors.items() if e not in ("refused", "reset")}
    ok = wrong == 0 and not bad_errors
    figure = (
        f"ready {min(readies):.1f}-{max(readies):.1f} s after restart; {len(answers)} requests, "
        f"{wrong} wrong, {errors.get('refused', 0)} refused, {errors.get('reset', 0)} reset in flight, "
        f"{sum(bad_errors.values())} other"
    )
    details = {"ready_s": readies, "requests": len(answers), "wrong": wrong, "errors": errors}
    return Row("serve-kill", trials, trials if ok else 0, figure, details)


# ------------------------------------------------------------------------------------------ reload-under-load


def _open_loop(url: str, qps: float, until: Callable[[], bool], k: int) -> list[Answer]:
    """Requests sent at a fixed rate (not waiting for answers), alternating text and image."""
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()

    def one(n: int) -> Answer:
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=url, timeout=30)
        return ask(local.http, ("text", "image")[n % 2], n, k, target=("images", "texts")[(n // 2) % 2])

    futures, n, start = [], 0, time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        while not until():
            futures.append(pool.submit(one, n))
            n += 1
            time.sleep(max(0.0, start + n / qps - time.monotonic()))
    return [f.result() for f in futures]


def reload_under_load(work: Work, duration: float, qps: float = 20.0, every: float = 5.0) -> Row:
    photos = fresh_photos(work, "rl-photos", 40)
    bundles = work.root / "rl-bundles"
    shutil.rmtree(bundles, ignore_errors=True)
    run_index(work, photos, bundles)
    server = Server(bundles, "--reload-poll-s", "0.5")
    answers: list[Answer] = []
    published: list[str] = []
    with server.running():
        stop = time.monotonic() + duration
        load = threading.Thread(
            target=lambda: answers.extend(_open_loop(server.url, qps, lambda: time.monotonic() >= stop, 100))
        )
        load.start()
        n = 0
        while time.monotonic() < stop - 1:
            t = time.monotonic()
            extra = sorted(photos.glob("extra*.png"))
            if extra:  # alternate the collection's size so a count tells which version answered
                for p in extra:
                    p.unlink()
                    p.with_suffix(".txt").unlink()
            else:
                for i in range(8):
                    make_image(photos / f"extra{n:02d}-{i}.png", seed=7000 + n * 8 + i)
            published.append(run_index(work, photos, bundles))
            n += 1
            time.sleep(max(0.0, t + every - time.monotonic()))
        load.join()
    contents = {v: bundle_map(bundles, v) for v in {a.bundle for a in answers if a.bundle}}
    mixed = 0
    for a in answers:
        if a.status == 200:
            kind = (
                "image"
                if all(contents[a.bundle].get(i, "").startswith("image:") for i, _ in a.hits)
                else "text"
            )
            want = {i for i, key in contents[a.bundle].items() if key.startswith(f"{kind}:")}
            mixed += a.header != a.bundle or {i for i, _ in a.hits} != want
    failed = sum(a.status != 200 for a in answers)
    served = len({a.bundle for a in answers if a.bundle})
    ok = failed == 0 and mixed == 0 and served > 1
    figure = (
        f"{len(answers)} requests at {qps:g} QPS over {duration:g} s, {len(published)} re-indexes, "
        f"{served} versions answered, {failed} failed, {mixed} not from exactly one version, "
        f"p99 {pct([a.latency for a in answers], 0.99):.0f} ms"
    )
    details = {"requests": len(answers), "failed": failed, "mixed": mixed, "versions": published}
    return Row("reload-under-load", 1, int(ok), figure, details)


# ------------------------------------------------------------------------------------------ fuzz


def _fuzz_operation(op: Any, mode: Any, url: str, examples: int, seed: int, report: dict[str, Any]) -> None:
    """Up to `examples` generated requests to one operation, every response checked (see `fuzz_api`)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        response_headers_conformance,
        negative_data_rejection,
    ]
    quiet = list(HealthCheck)

    @hseed(seed)
    @given(case=op.as_strategy(mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=quiet,
    )
    def run(case: Any) -> None:
        response = case.call(base_url=url, timeout=30)
        report["requests"] += 1
        report["server_errors"] += response.status_code >= 500
        key = f"{op.label} {response.status_code}"
        report["statuses"][key] = report["statuses"].get(key, 0) + 1
        try:
            case.validate_response(response, checks=checks)
        except (Exception, BaseExceptionGroup) as e:  # every distinct failure is recorded, the run goes on
            text = " ".join(str(e).split())
            entry = report["failures"].setdefault(
                f"{op.label} [{mode.value}] {text[:120]}",
                {
                    "count": 0,
                    "status": response.status_code,
                    "body": response.text[:300],
                    "detail": text[:600],
                },
            )
            entry["count"] += 1

    with suppress(Unsatisfiable):  # an operation without parameters has no invalid data to send
        run()


def fuzz_api(url: str, examples: int, seed: int = 0) -> dict[str, Any]:
    """Schemathesis over every operation of the live server's OpenAPI schema, positive and negative data.

    Checks every response: not a server error, a documented status code and content type, a body and
    headers that match the schema, and invalid data refused with a 4xx.
    """
    import schemathesis
    from schemathesis import GenerationMode

    report: dict[str, Any] = {"requests": 0, "server_errors": 0, "failures": {}, "statuses": {}}
    for result in schemathesis.openapi.from_url(f"{url}/openapi.json").get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_operation(result.ok(), mode, url, examples, seed, report)
    return report


def fuzz(work: Work, examples: int) -> Row:
    photos = fresh_photos(work, "fz-photos", 20)
    bundles = work.root / "fz-bundles"
    shutil.rmtree(bundles, ignore_errors=True)
    run_index(work, photos, bundles)
    with Server(bundles).running() as server:
        report = fuzz_api(server.url, examples)
    failures = report["failures"]
    assert isinstance(failures, dict)
    violations = sum(int(f["count"]) for f in failures.values())
    ok = report["server_errors"] == 0 and violations == 0
    figure = (
        f"{report['requests']} generated requests ({examples} per operation and mode), "
        f"{report['server_errors']} responses >= 500, {violations} that break the schema or accept bad data"
    )
    return Row("fuzz", 1, int(ok), figure, report)


# ------------------------------------------------------------------------------------------ slow-flood


async def _flood(url: str, connections: int, seconds: float) -> dict[str, int]:
    """Keep `connections` sockets open, half trickling headers and half a body, 1 byte per second."""
    host, port = url.removeprefix("http://").split(":")
    stats = {"opened": 0, "408": 0, "closed_other": 0, "refused": 0}
    end = time.monotonic() + seconds

    async def one(i: int) -> None:
        while time.monotonic() < end:
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                stats["refused"] += 1
                await asyncio.sleep(0.5)
                continue
            stats["opened"] += 1
            if i % 2:
                writer.write(
                    b"POST /v1/search/text HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                    b"content-length: 1000\r\n\r\n"
                )
            else:
                writer.write(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n")
            answer = b""
            with suppress(OSError):
                while time.monotonic() < end:
                    writer.write(b"x")  # one more byte of the header line, or of the body
                    await writer.drain()
                    try:
                        answer = await asyncio.wait_for(reader.read(1024), timeout=1.0)
                        break  # the server answered (408) or closed
                    except TimeoutError:
                        continue
            stats["408" if answer.startswith(b"HTTP/1.1 408") else "closed_other"] += time.monotonic() < end
            writer.close()

    await asyncio.gather(*(one(i) for i in range(connections)))
    return stats


def _flood_process(url: str, connections: int, seconds: float) -> subprocess.Popen[str]:
    code = (
        f"import asyncio, json, sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import faults; "
        f"print(json.dumps(asyncio.run(faults._flood({url!r}, {connections}, {seconds}))))"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def slow_flood(work: Work, seconds: float, slow: int = 500, normal: int = 8) -> Row:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * slow + 256)), hard))
    photos = fresh_photos(work, "sf-photos", 40)
    bundles = work.root / "sf-bundles"
    shutil.rmtree(bundles, ignore_errors=True)
    run_index(work, photos, bundles)
    with Server(bundles).running() as server:
        closed_loop(server.url, normal, deadline(2), kinds=("text",))  # warm-up
        before = closed_loop(server.url, normal, deadline(seconds), kinds=("text",))
        flood = _flood_process(server.url, slow, seconds + 5)
        time.sleep(3)  # let the connections open
        during = closed_loop(server.url, normal, deadline(seconds), kinds=("text",))
        flood_stats = json.loads(flood.communicate()[0] or "{}")
        after = closed_loop(server.url, normal, deadline(seconds), kinds=("text",))
        metrics = httpx.get(f"{server.url}/metrics").text
    base = (pct([a.latency for a in before], 0.99) + pct([a.latency for a in after], 0.99)) / 2
    loaded = pct([a.latency for a in during], 0.99)
    failed = sum(a.status != 200 for a in during)
    ratio = loaded / base
    closed = {
        line.split('"')[1]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("clipsearch_connections_closed_total{")
    }
    ok = failed == 0 and ratio <= 2.0
    figure = (
        f"{slow} slow connections: normal p99 {loaded:.1f} ms vs {base:.1f} ms unloaded ({ratio:.2f}x), "
        f"{failed} of {len(during)} failed; {flood_stats.get('408', 0)} slow requests got 408"
    )
    return Row(
        "slow-flood",
        1,
        int(ok),
        figure,
        {
            "p99_ms": {
                "before": pct([a.latency for a in before], 0.99),
                "during": loaded,
                "after": pct([a.latency for a in after], 0.99),
            },
            "flood": flood_stats,
            "server_closed": closed,
            "requests": len(during),
        },
    )


# ------------------------------------------------------------------------------------------ soak


def soak(work: Work, minutes: float, clients: int = 4, window_s: float = 60.0) -> Row:
    photos = fresh_photos(work, "sk-photos", 80)
    bundles = work.root / "soak-bundles"
    shutil.rmtree(bundles, ignore_errors=True)
    run_index(work, photos, bundles)
    window_s = min(window_s, minutes * 60 / 5)
    with Server(bundles).running() as server:
        rss, windows, errors, total = [], [], 0, 0
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            answers = closed_loop(server.url, clients, deadline(window_s), k=20)
            rss.append(server.rss_bytes())
            windows.append(pct([a.latency for a in answers], 0.99))
            errors += sum(a.status != 200 for a in answers)
            total += len(answers)
    warm = max(1, len(rss) // 10)
    drift = (rss[-1] - rss[warm - 1]) / rss[warm - 1]
    # Stable = no trend: the typical p99 of the last quarter against the first quarter after warm-up
    # (one noisy window on a shared host is not instability).
    steady = windows[warm:] or windows
    quarter = max(1, len(steady) // 4)
    trend = float(np.median(steady[-quarter:]) / np.median(steady[:quarter]))
    ok = drift < 0.10 and errors == 0 and trend < 1.5
    figure = (
        f"{minutes:g} min, {total} requests, RSS {rss[warm - 1] / 2**20:.0f} -> {rss[-1] / 2**20:.0f} MiB "
        f"({drift:+.1%}), p99 per window {min(windows):.1f}-{max(windows):.1f} ms (last/first quarter "
        f"{trend:.2f}x), {errors} errors"
    )
    return Row("soak", 1, int(ok), figure, {"rss": rss, "p99_ms": windows, "errors": errors})


# ------------------------------------------------------------------------------------------ disk-full


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise PermissionError(f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(mount: Path, leave: int = 0) -> Path:
    """Fill the filesystem to the last byte but `leave` (as another process writing a log would)."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (1 << 20, 4096, 64):
            with suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def _disk_full_trial(work: Work, mount: Path, moment: str | None, trial: int) -> dict[str, object]:
    bundles = mount / f"b{trial}"
    photos = fresh_photos(work, "df-photos", 8, first_seed=trial * 100)
    first = run_index(work, photos, bundles)
    for i in range(40):
        make_image(photos / f"more{i:02d}.png", seed=trial * 100 + 50 + i, size=64)
    pause = work.root / "df-pause"
    shutil.rmtree(pause, ignore_errors=True)
    pause.mkdir()
    filler = None
    if moment is None:  # too little space from the start (a new bundles dir needs a copy of the model)
        shutil.rmtree(bundles)
        filler = _fill(mount, leave=2 << 20)
        proc = clipsearch(index_args(work, photos, bundles, "--batch-size", "4"))
        first = None
    else:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            PAUSE_ENV: moment,
            PAUSE_DIR_ENV: str(pause),
            RESUME_ENV: "1",
        }
        args = [sys.executable, "-m", "clipsearch", *index_args(work, photos, bundles, "--batch-size", "4")]
        p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        marker = pause / f"paused-{moment.split('#')[0]}"
        end = time.monotonic() + 120
        while not marker.exists() and p.poll() is None and time.monotonic() < end:
            time.sleep(0.02)
        filler = _fill(mount)  # another process fills the disk while the run is under way
        marker.unlink(missing_ok=True)
        out, err = p.communicate(timeout=300)
        proc = subprocess.CompletedProcess(args, p.returncode, out, err)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    result: dict[str, object] = {
        "moment": moment or "before the run",
        "exit": proc.returncode,
        "error": errors,
    }
    try:
        if first is None:  # nothing was published before: nothing may be now
            result["current_whole"] = not (bundles / "CURRENT").exists()
        else:
            result["current_whole"] = read_current(bundles) == first and open_bundle(bundles).close() is None
    except Exception as e:
        result["current_whole"] = f"{type(e).__name__}: {e}"
    result["leftovers"] = [p.name for p in bundles.glob(".tmp-*")]
    result["wal_left"] = [p.name for p in (bundles / ".work").rglob("*-wal")]
    filler.unlink()
    result["next_run"] = clipsearch(index_args(work, photos, bundles)).returncode == 0
    result["ok"] = (
        proc.returncode == 1
        and len(errors) == 1
        and "Traceback" not in proc.stderr
        and f"{mount} (tmpfs" in errors[0]
        and result["current_whole"] is True
        and not result["leftovers"]
        and result["next_run"] is True
    )
    shutil.rmtree(bundles, ignore_errors=True)
    return result


def disk_full(work: Work, trials: int) -> Row:
    moments = [m for _ in range(trials) for m in ("cache-write#2", "publish-model", None)]
    try:
        with tmpfs(work.root / "tmpfs", "64m") as mount:
            rows = [_disk_full_trial(work, mount, m, i) for i, m in enumerate(moments)]
    except PermissionError as e:
        return Row("disk-full", 0, 0, f"not run: {e}")
    for r in rows:
        print(f"  disk-full {r['moment']}: {'ok' if r['ok'] else r}", flush=True)
    passed = sum(bool(r["ok"]) for r in rows)
    sample = {str(r["moment"]): (r["error"] or [""])[0] for r in rows}
    figure = f"one-line error, CURRENT whole, next run succeeds: {passed}/{len(rows)} (cache, publish, start)"
    return Row("disk-full", len(rows), passed, figure, {"trials": rows, "errors": sample})


# ------------------------------------------------------------------------------------------ main


SCENARIOS = ("index-kill", "serve-kill", "reload-under-load", "fuzz", "slow-flood", "soak", "disk-full")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few trials each and no soak")
    ap.add_argument("--only", action="append", choices=SCENARIOS, help="run only these (repeatable)")
    ap.add_argument("--index-kills", type=int, help="default 25 (quick 5)")
    ap.add_argument("--serve-kills", type=int, help="default 5 (quick 2)")
    ap.add_argument("--reload-seconds", type=float, help="default 60 (quick 20)")
    ap.add_argument("--fuzz-examples", type=int, help="per operation and mode; default 150 (quick 10)")
    ap.add_argument("--flood-seconds", type=float, help="each phase; default 30 (quick 10)")
    ap.add_argument("--flood-connections", type=int, default=500)
    ap.add_argument("--soak-minutes", type=float, help="default 30 (quick: not run)")
    ap.add_argument("--disk-trials", type=int, help="default 3 of each moment (quick 1)")
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "faults")
    ap.add_argument("--out", type=Path, help="JSON report (default benchmarks/results/faults[-quick].json)")
    args = ap.parse_args()
    q = args.quick
    only = set(args.only or [s for s in SCENARIOS if not (q and s == "soak" and args.soak_minutes is None)])
    work = prepare(args.work)
    plan: dict[str, Callable[[], Row]] = {
        "index-kill": lambda: index_kill(work, args.index_kills or (5 if q else 25)),
        "serve-kill": lambda: serve_kill(work, args.serve_kills or (2 if q else 5)),
        "reload-under-load": lambda: reload_under_load(work, args.reload_seconds or (20 if q else 60)),
        "fuzz": lambda: fuzz(work, args.fuzz_examples or (10 if q else 150)),
        "slow-flood": lambda: slow_flood(
            work, args.flood_seconds or (10 if q else 30), args.flood_connections
        ),
        "soak": lambda: soak(work, args.soak_minutes or 30),
        "disk-full": lambda: disk_full(work, args.disk_trials or (1 if q else 3)),
    }
    load_before = os.getloadavg()
    rows = []
    for name in SCENARIOS:
        if name in only:
            print(f"{name} ...", flush=True)
            t0 = time.monotonic()
            row = plan[name]()
            row.details["seconds"] = round(time.monotonic() - t0, 1)
            rows.append(row)
            print(f"  {'PASS' if row.ok else 'FAIL'} {row.figure}", flush=True)
    print("\n| scenario | trials | passed | figure |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r.scenario} | {r.trials} | {r.passed} | {r.figure} |")
    print(f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    out = args.out or REPO / "benchmarks" / "results" / ("faults-quick.json" if q else "faults.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "rows": [asdict(r) for r in rows],
    }
    out.write_text(json.dumps(report, indent=2, default=str))
    sys.exit(0 if all(r.ok for r in rows) else 1)


if __name__ == "__main__":
    main()
