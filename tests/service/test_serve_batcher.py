"""The micro-batcher: concurrent jobs share batches, a lone job does not wait, several workers overlap."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.batcher import MicroBatcher
from service.errors import ApiError


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_concurrent_jobs_are_batched_and_results_stay_in_order() -> None:
    sizes: list[int] = []
    gate = threading.Event()

    def process(jobs: Sequence[int]) -> list[int]:
        sizes.append(len(jobs))
        gate.wait(5)
        return [j * 10 for j in jobs]

    async def go() -> list[int]:
        with ThreadPoolExecutor(1) as pool:
            b: MicroBatcher[int, int] = MicroBatcher(
                "t", process, pool, max_size=8, max_wait_ms=0, queue_size=64
            )
            b.start()
            first = asyncio.ensure_future(b.submit(0))  # occupies the worker
            await asyncio.sleep(0.05)
            rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 11)]
            await asyncio.sleep(0.05)
            gate.set()
            out = await asyncio.gather(first, *rest)
            await b.stop()
            return out

    assert run(go()) == [i * 10 for i in range(11)]
    assert sizes == [1, 8, 2]  # the waiting ten went as a full batch of 8 and then 2


def test_a_failing_job_fails_alone_and_a_crashing_batch_fails_all() -> None:
    def process(jobs: Sequence[int]) -> list[int | BaseException]:
        if 99 in jobs:
            raise RuntimeError("boom")
        return [ValueError("bad") if j < 0 else j for j in jobs]

    async def go() -> None:
        with ThreadPoolExecutor(1) as pool:
            b: MicroBatcher[int, int] = MicroBatcher(
                "t", process, pool, max_size=4, max_wait_ms=1, queue_size=8
            )
            b.start()
            ok, bad = await asyncio.gather(b.submit(1), b.submit(-1), return_exceptions=True)
            assert ok == 1 and isinstance(bad, ValueError)
            with pytest.raises(RuntimeError):
                await b.submit(99)
            assert await b.submit(2) == 2  # the worker survived
            await b.stop()

    run(go())


def test_full_queue_raises_overloaded_at_once() -> None:
    gate = threading.Event()

    def process(jobs: Sequence[int]) -> list[int]:
        gate.wait(5)
        return list(jobs)

    async def go() -> None:
        with ThreadPoolExecutor(1) as pool:
            b: MicroBatcher[int, int] = MicroBatcher(
                "t", process, pool, max_size=1, max_wait_ms=0, queue_size=2
            )
            b.start()
            held = [asyncio.ensure_future(b.submit(0))]
            await asyncio.sleep(0.05)  # job 0 is now in the worker
            held += [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]  # fill the queue of 2
            await asyncio.sleep(0.05)
            with pytest.raises(ApiError) as e:
                await b.submit(3)
            assert e.value.status_code == 503 and e.value.headers["Retry-After"] == "1"
            gate.set()
            assert await asyncio.gather(*held) == [0, 1, 2]
            await b.stop()

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
        with ThreadPoolExecutor(2) as pool:
            b: MicroBatcher[int, int] = MicroBatcher(
                "t", process, pool, max_size=1, max_wait_ms=0, queue_size=8, workers=2
            )
            b.start()
            assert await asyncio.gather(*(b.submit(i) for i in range(4))) == [0, 1, 2, 3]
            await b.stop()

    run(go())
    assert peak == 2
