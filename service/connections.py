"""Read deadlines and a connection cap on top of uvicorn's HTTP protocol, so slow clients cannot pin
connections (slowloris) and starve real ones.

uvicorn (0.55) has no read timeout: `timeout_keep_alive` runs only between requests and is cancelled by
the first byte of the next one, and nothing runs from connect to the first byte. Its
`limit_concurrency` answers 503 to every new request once that many connections are open, which is the
wrong way round here: the slow connections would keep the real clients out. So each connection is
watched through four phases:

- `headers`: from connect (or the first byte of the next request on a kept-alive connection) until the
  request headers are complete; past `header_timeout_s`, 408 and close (a connection that sent nothing
  is just closed).
- `body`: until the body is complete; past `body_timeout_s`, 408 and close (the handler sees a
  disconnect and its answer is dropped).
- `app`: the handler runs; no deadline here (the batcher's queue bounds it).
- `idle`: between requests; uvicorn's keep-alive timer closes it.

Past `max_connections`, a new connection closes the connection that has waited longest in `headers`
(then `idle`), never one whose request is being read or answered; when there is none it is answered 503
`too_many_connections` and closed. The hooks are uvicorn's own protocol methods (`connection_made`,
`data_received`, `on_response_complete`, `connection_lost`) and the request cycle's `more_body`,
`response_started` and `disconnected`, the same in its h11 and httptools protocols.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from service.metrics import Metrics

HEADERS, BODY, APP, IDLE = "headers", "body", "app", "idle"
TIMED_OUT = "clipsearch.timed_out"  # scope key: the phase whose deadline closed this request
_EVICT_ORDER = {HEADERS: 0, IDLE: 1}


@dataclass
class GuardSettings:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1000
    retry_after_s: int = 1


def _raw_response(proto: Any, status: int, reason: str, code: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [f"HTTP/1.1 {status} {reason}"]
    head += [f"{k.decode('latin-1')}: {v.decode('latin-1')}" for k, v in proto.server_state.default_headers]
    head += ["content-type: application/json", f"content-length: {len(body)}", "connection: close"]
    head += [extra] if extra else []
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class _Watch:
    """The phase and deadline of one connection."""

    def __init__(self, guard: ConnectionGuard, proto: Any) -> None:
        self.guard, self.proto = guard, proto
        self.phase, self.since, self.got_bytes = HEADERS, time.monotonic(), False
        self.cycle_seen: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._arm(guard.settings.header_timeout_s)

    def _set(self, phase: str, timeout: float | None) -> None:
        self.phase, self.since = phase, time.monotonic()
        self._arm(timeout)

    def _arm(self, timeout: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = (
            None if timeout is None else self.proto.loop.call_later(timeout, self._expired, self.phase)
        )

    def before_data(self) -> None:
        if self.phase == IDLE:  # the first byte of the next request on a kept-alive connection
            self._set(HEADERS, self.guard.settings.header_timeout_s)
        self.got_bytes = True

    def after_data(self) -> None:
        cycle = self.proto.cycle
        if self.phase == HEADERS and cycle is not None and cycle is not self.cycle_seen:
            self.cycle_seen = cycle
            if cycle.more_body:
                self._set(BODY, self.guard.settings.body_timeout_s)
            else:
                self._set(APP, None)
        if self.phase == BODY and cycle is not None and not cycle.more_body:
            self._set(APP, None)

    def response_done(self) -> None:
        if self.phase in (BODY, APP):
            self._set(IDLE, None)

    def lost(self) -> None:
        self._arm(None)
        self.guard.forget(self)

    def _expired(self, phase: str) -> None:
        transport = self.proto.transport
        if phase != self.phase or transport is None or transport.is_closing():
            return
        if phase == BODY:
            cycle = self.proto.cycle
            cycle.scope[TIMED_OUT] = BODY
            if cycle.response_started:  # the handler already answered: nothing left to say
                transport.close()
                return
            cycle.disconnected = True  # the handler's receive() now returns http.disconnect
            cycle.message_event.set()
        if phase == HEADERS and not self.got_bytes:
            transport.close()  # never sent a byte: there is no request to answer
        else:
            limit = (
                self.guard.settings.header_timeout_s
                if phase == HEADERS
                else self.guard.settings.body_timeout_s
            )
            message = (
                f"the request {'headers' if phase == HEADERS else 'body'} did not arrive within {limit:g} s"
            )
            transport.write(_raw_response(self.proto, 408, "Request Timeout", "request_timeout", message))
            transport.close()
        self.guard.closed("header_timeout" if phase == HEADERS else "body_timeout")

    def evict(self) -> None:
        self._arm(None)
        self.proto.transport.close()
        self.guard.closed("evicted")


class ConnectionGuard:
    """Every open connection's `_Watch`, the cap, and the counters the metrics read."""

    def __init__(self, settings: GuardSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.watches: set[_Watch] = set()
        self.metrics = metrics

    def admit(self, proto: Any) -> _Watch | None:
        """Watch a new connection; at the cap, make room or refuse it (returns None when refused)."""
        watch = _Watch(self, proto)
        if len(self.watches) >= self.settings.max_connections and not self._evict_one():
            watch.lost()
            message = f"the server is at its limit of {self.settings.max_connections:,} connections; retry"
            retry = f"retry-after: {self.settings.retry_after_s}"
            proto.transport.write(
                _raw_response(proto, 503, "Service Unavailable", "too_many_connections", message, retry)
            )
            proto.transport.close()
            self.closed("refused")
            return None
        self.watches.add(watch)
        self._count()
        return watch

    def _evict_one(self) -> bool:
        waiting = [w for w in self.watches if w.phase in _EVICT_ORDER]
        if not waiting:
            return False
        min(waiting, key=lambda w: (_EVICT_ORDER[w.phase], w.since)).evict()
        return True

    def forget(self, watch: _Watch) -> None:
        self.watches.discard(watch)
        self._count()

    def closed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.connections_closed.labels(reason).inc()

    def _count(self) -> None:
        if self.metrics is not None:
            self.metrics.open_connections.set(len(self.watches))


def guarded_protocol(
    guard: ConnectionGuard, base: type[asyncio.Protocol] = AutoHTTPProtocol
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class `base` (httptools when installed, else h11) watched by `guard`."""

    class Guarded(base):  # type: ignore[valid-type, misc]
        _watch: _Watch | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._watch = guard.admit(self)

        def data_received(self, data: bytes) -> None:
            if self._watch is not None:
                self._watch.before_data()
            super().data_received(data)
            if self._watch is not None and not self.transport.is_closing():
                self._watch.after_data()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._watch is not None:
                self._watch.response_done()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._watch is not None:
                self._watch.lost()
            super().connection_lost(exc)

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded
