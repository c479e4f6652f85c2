"""The micro-batcher: concurrent jobs share batches, a lone job does not wait, several workers overlap."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.batcher import MicroBatcher
from service.errors import ApiError


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def started(process, workers: int = 1, **options):  # type: ignore[no-untyped-def]
    """A running batcher named "t" over `process` in a pool of `workers` threads, stopped on exit."""
    with ThreadPoolExecutor(workers) as pool:
        b: MicroBatcher[int, int] = MicroBatcher("t", process, pool, workers=workers, **options)
        b.start()
        try:
            yield b
        finally:
            await b.stop()


def test_concurrent_jobs_are_batched_and_results_stay_in_order() -> None:
    sizes: list[int] = []
    gate = threading.Event()

    def process(jobs: Sequence[int]) -> list[int]:
        sizes.append(len(jobs))
        gate.wait(5)
        return [j * 10 for j in jobs]

    async def go() -> list[int]:
        async with started(process, max_size=8, max_wait_ms=0, queue_size=64) as b:
            first = asyncio.ensure_future(b.submit(0))  # occupies the worker
            await asyncio.sleep(0.05)
            rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 11)]
            await asyncio.sleep(0.05)
            gate.set()
            out = await asyncio.gather(first, *rest)
            return out

    assert run(go()) == [i * 10 for i in range(11)]
    assert sizes == [1, 8, 2]  # the waiting ten went as a full batch of 8 and then 2


def test_a_failing_job_fails_alone_and_a_crashing_batch_fails_all() -> None:
    def process(jobs: Sequence[int]) -> list[int | BaseException]:
        if 99 in jobs:
            raise RuntimeError("boom")
        return [ValueError("bad") if j < 0 else j for j in jobs]

    async def go() -> None:
        async with started(process, max_size=4, max_wait_ms=1, queue_size=8) as b:
            ok, bad = await asyncio.gather(b.submit(1), b.submit(-1), return_exceptions=True)
            assert ok == 1 and isinstance(bad, ValueError)
            with pytest.raises(RuntimeError):
                await b.submit(99)
            assert await b.submit(2) == 2  # the worker survived

    run(go())


def test_full_queue_raises_overloaded_at_once() -> None:
    gate = threading.Event()

    def process(jobs: Sequence[int]) -> list[int]:
        gate.wait(5)
        return list(jobs)

    async def go() -> None:
        async with started(process, max_size=1, max_wait_ms=0, queue_size=2) as b:
            held = [asyncio.ensure_future(b.submit(0))]
            await asyncio.sleep(0.05)  # job 0 is now in the worker
            held += [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]  # fill the queue of 2
            await asyncio.sleep(0.05)
            with pytest.raises(ApiError) as e:
                await b.submit(3)
            assert e.value.status_code == 503 and e.value.headers["Retry-After"] == "1"
            gate.set()
            assert await asyncio.gather(*held) == [0, 1, 2]

    run(go())


def test_two_workers_run_two_batches_at_once() -> None:
    active, peak = 0, 0
    lock = threading.Lock()

    def process(jobs: Sequence[int]) -> list[int]:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.1)
        with lock:
            active -= 1
        return list(jobs)

    async def go() -> None:
        async with started(process, workers=2, max_size=1, max_wait_ms=0, queue_size=8) as b:
            assert await asyncio.gather(*(b.submit(i) for i in range(4))) == [0, 1, 2, 3]

    run(go())
    assert peak == 2


def test_closed_loop_clients_out_of_phase_come_together_in_one_batch() -> None:
    """Eight clients that each send their next job as soon as the last returns, started as two groups
    of four out of phase: the batcher waits for the concurrency it has seen, so the groups merge into
    batches of eight (a fixed 2 ms wait left them taking turns at half size), and it stops waiting as
    soon as they are all there (a fixed 50 ms wait for a full batch of 32 idled 50 ms a batch)."""
    runs: list[tuple[float, float, int]] = []

    def process(jobs: Sequence[int]) -> list[int]:
        start = time.monotonic()
        time.sleep(0.08)
        runs.append((start, time.monotonic(), len(jobs)))
        return list(jobs)

    async def client(b: MicroBatcher[int, int], delay: float, until: float) -> None:
        await asyncio.sleep(delay)
        while time.monotonic() < until:
            await b.submit(0)
            await asyncio.sleep(0.002)  # the round trip before the next query

    async def go() -> None:
        async with started(process, max_size=32, max_wait_ms=50, queue_size=64) as b:
            until = time.monotonic() + 1.5
            await asyncio.gather(*(client(b, 0.04 * (i % 2), until) for i in range(8)))

    run(go())
    steady = runs[4:-2]  # past the start, before the clients stop
    assert len(steady) >= 5 and all(size == 8 for _, _, size in steady), [r[2] for r in runs]
    gaps = sorted(nxt[0] - prev[1] for prev, nxt in itertools.pairwise(steady))
    assert gaps[len(gaps) // 2] < 0.015, gaps


def test_a_lone_job_after_a_burst_does_not_wait_for_the_burst_to_return() -> None:
    starts: list[float] = []

    def process(jobs: Sequence[int]) -> list[int]:
        starts.append(time.monotonic())
        time.sleep(0.2)  # a batch this long would let the next wait up to 50 ms
        return list(jobs)

    async def go() -> float:
        async with started(process, max_size=32, max_wait_ms=50, queue_size=64) as b:
            await asyncio.gather(*(b.submit(i) for i in range(8)))
            await asyncio.sleep(0.3)  # idle: the burst's clients went away
            sent = time.monotonic()
            await b.submit(99)
            return starts[-1] - sent

    assert run(go()) < 0.025
