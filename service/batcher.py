"""Micro-batching: concurrent queries wait in a bounded queue and are encoded together in one forward pass.

The worker never waits for company when the server is idle (a lone query starts at once). Under load it
waits for the clients it is serving: the next batch is held until it has as many queries as were in
flight during the last one (the concurrency the server is seeing), for at most `max_wait_ms` and at most
`WAIT_SHARE` of the last batch's run time. Without that, 16 closed-loop clients split into two groups
of 8 that take turns (a batch's clients send their next queries just after the other group's batch
started) and every query paid for half-size batches: at 100k vectors on 2 cores, 57 QPS with batches
of 7.9 (docs/benchmarks.md, "Serving"). A full queue answers 503 with `Retry-After` at once instead of
queueing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

from service.errors import ApiError

log = logging.getLogger(__name__)

_POLL_S = 0.0005
WAIT_SHARE = 0.25  # a batch waits for more queries at most this share of the last batch's run time

JobT = TypeVar("JobT")
ResultT = TypeVar("ResultT")


class MicroBatcher(Generic[JobT, ResultT]):
    """Collects jobs from many requests and runs `process` on them as one batch in `executor`."""

    def __init__(
        self,
        name: str,
        process: Callable[[Sequence[JobT]], Sequence[ResultT | BaseException]],
        executor: Executor,
        *,
        max_size: int,
        max_wait_ms: float,
        queue_size: int,
        retry_after_s: int = 1,
        workers: int = 1,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.name = name
        self._process = process
        self._executor = executor
        self.max_size = max_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.retry_after_s = retry_after_s
        self.workers = workers
        self._queue: asyncio.Queue[tuple[JobT, asyncio.Future[ResultT]]] = asyncio.Queue(queue_size)
        self._on_batch = on_batch
        self._task: asyncio.Task[None] | None = None
        self._in_flight = 0  # submitted, not yet answered
        self._peak = 0  # most in flight since the last batch was collected
        self._running = 0  # jobs in batches now running
        self._last_run_s = 0.0  # how long the last batch took
        self._last_end = float("-inf")  # when it ended (the loop's clock)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(ApiError(503, "shutting_down", "the server is shutting down"))

    async def submit(self, job: JobT) -> ResultT:
        """Queue one job and wait for its result; 503 `overloaded` at once when the queue is full."""
        fut: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((job, fut))
        except asyncio.QueueFull:
            raise ApiError(
                503,
                "overloaded",
                f"the {self.name} queue is full; retry shortly",
                {"Retry-After": str(self.retry_after_s)},
            ) from None
        self._in_flight += 1
        self._peak = max(self._peak, self._in_flight)
        try:
            return await fut
        finally:
            self._in_flight -= 1

    async def _collect(self) -> list[tuple[JobT, asyncio.Future[ResultT]]]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        self._drain(batch)
        wait = min(self.max_wait_s, WAIT_SHARE * self._last_run_s)
        # Busy: a batch is running, or this query came within `wait` of the last one's end (its clients
        # coming back); then aim for the concurrency seen since the last batch, less what other workers
        # run. Otherwise the server was idle and a lone query starts at once.
        busy = self._running > 0 or loop.time() - self._last_end <= wait
        target = min(self.max_size, self._peak - self._running) if busy else 1
        self._peak = self._in_flight
        if len(batch) < target and wait > 0:
            deadline = loop.time() + wait
            # Short sleeps rather than wait_for(queue.get()): on 3.11 a timed-out get can lose an item.
            while len(batch) < target and (left := deadline - loop.time()) > 0:
                await asyncio.sleep(min(left, _POLL_S))
                self._drain(batch)
        return batch

    def _drain(self, batch: list[tuple[JobT, asyncio.Future[ResultT]]]) -> None:
        while len(batch) < self.max_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _run(self) -> None:
        # Collect the next batch only once a worker is free: while all are busy, queries pile up
        # in the queue and the next batch is bigger, which is what makes a busy server efficient.
        running: set[asyncio.Task[None]] = set()
        free = asyncio.Semaphore(self.workers)

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            free.release()

        try:
            while True:
                await free.acquire()
                batch = [(job, fut) for job, fut in await self._collect() if not fut.done()]  # drop abandoned
                if not batch:
                    free.release()
                    continue
                task = asyncio.get_running_loop().create_task(self._run_batch(batch))
                running.add(task)
                task.add_done_callback(finished)
        finally:
            for task in running:
                task.cancel()

    async def _run_batch(self, batch: list[tuple[JobT, asyncio.Future[ResultT]]]) -> None:
        if self._on_batch is not None:
            self._on_batch(len(batch))
        loop = asyncio.get_running_loop()
        self._running += len(batch)
        start = loop.time()
        try:
            results = await loop.run_in_executor(self._executor, self._process, [j for j, _ in batch])
        except Exception as e:  # the whole batch failed: every waiter gets the error
            results = [e] * len(batch)
        finally:
            self._running -= len(batch)
            self._last_end = loop.time()
            self._last_run_s = self._last_end - start
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)
