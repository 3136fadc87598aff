"""The server's pure ASGI middleware: the request-size limit, the in-flight memory budget, and request metrics.

The budget bounds the memory that concurrent requests can pin on a replica: a request reserves
`BYTES_PER_BODY_BYTE` bytes per byte of its body before the body is read (the body itself, the tensors decoded
from it, and their padded batch), waits up to R2M_INFLIGHT_WAIT_S for room, and otherwise gets 503 with
Retry-After, which r2m's client retries. A request larger than the whole budget runs only when nothing else is in
flight, so that every request the size limit allows is served eventually. A body without a Content-Length
reserves as it streams in.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..batcher import Overloaded
from ..errors import PayloadTooLarge
from .deps import ServiceState

__all__ = ["BYTES_PER_BODY_BYTE", "ByteBudget", "RequestGate"]

BYTES_PER_BODY_BYTE = 3


class ByteBudget:
    """At most `limit` bytes reserved at once; `acquire` waits up to `wait_s` for room."""

    def __init__(self, limit: int, wait_s: float, gauge: Gauge | None = None) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self.in_use = 0
        self._gauge = gauge
        self._cond = asyncio.Condition()

    def _fits(self, n: int) -> bool:
        return self.in_use + n <= self.limit or self.in_use == 0

    async def acquire(self, n: int) -> bool:
        """Reserve `n` bytes; False when there was no room within `wait_s` (nothing is reserved then)."""
        if n <= 0:
            return True
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self._fits(n)), self.wait_s)
            except TimeoutError:
                return False
            self.in_use += n
            self._observe()
        return True

    async def release(self, n: int) -> None:
        if n <= 0:
            return
        async with self._cond:
            self.in_use -= n
            self._observe()
            self._cond.notify_all()

    def _observe(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.in_use)


class RequestGate:
    """Rejects bodies over R2M_MAX_REQUEST_BYTES (413) while they stream, holds each body's bytes against the
    in-flight budget (503 when full), and times every request."""

    def __init__(self, app: ASGIApp, *, state: ServiceState) -> None:
        self.app = app
        self.state = state
        self.budget: ByteBudget | None = None  # made in the server's event loop, on the first request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings, metrics = self.state.settings, self.state.metrics
        if self.budget is None:
            self.budget = ByteBudget(settings.max_inflight_bytes, settings.inflight_wait_s, metrics.inflight_bytes)
        budget = self.budget
        limit = settings.max_request_bytes
        started = time.perf_counter()
        status = {"code": 500}

        drain = self.state.drain
        if drain is not None and drain.expired:  # accepted after the drain's answer deadline: no time to serve it
            await _send_json(send, 503, _DRAINING, {"retry-after": "1", "connection": "close"})
            return
        flight = drain.enter() if drain is not None else None
        self.state.requests += 1
        self.state.in_flight += 1

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if flight is not None:
                    flight.responded = True
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            declared = int(length) if length is not None else None
        except ValueError:
            declared = None
        reserved = 0
        try:
            if declared is not None and declared > limit:
                await _send_json(send_wrapper, 413, PayloadTooLarge(limit).detail)
            elif declared and not await budget.acquire(BYTES_PER_BODY_BYTE * declared):
                metrics.inflight_rejections.inc()
                await _send_json(send_wrapper, 503, _busy(budget), {"retry-after": "1"})
            else:
                reserved = BYTES_PER_BODY_BYTE * (declared or 0)
                received = 0

                async def receive_limited() -> Message:
                    nonlocal received, reserved
                    message = await receive()
                    if message["type"] == "http.request":
                        chunk = len(message.get("body", b""))
                        received += chunk
                        if received > limit:
                            raise PayloadTooLarge(limit)
                        if declared is None:  # chunked: reserve as it comes
                            if not await budget.acquire(BYTES_PER_BODY_BYTE * chunk):
                                metrics.inflight_rejections.inc()
                                raise Overloaded(_busy(budget))
                            reserved += BYTES_PER_BODY_BYTE * chunk
                    return message

                await self.app(scope, receive_limited, send_wrapper)
        except asyncio.CancelledError:
            if flight is None or not flight.expired or flight.responded:
                raise
            await _send_json(send_wrapper, 503, _DRAINING, {"retry-after": "1", "connection": "close"})
        finally:
            self.state.in_flight -= 1
            if drain is not None:
                drain.leave()
            await budget.release(reserved)
            route = scope.get("route")
            path = getattr(route, "path", "other")
            metrics.http_requests.labels(path, scope["method"], str(status["code"])).inc()
            metrics.http_latency.labels(path, scope["method"]).observe(time.perf_counter() - started)


_DRAINING = "this replica is shutting down and could not finish the request in time; retry (another replica)"


def _busy(budget: ByteBudget) -> str:
    return (
        f"the requests in flight hold {budget.in_use} of R2M_MAX_INFLIGHT_BYTES={budget.limit} bytes; retry after "
        "Retry-After seconds (r2m's client does)"
    )


async def _send_json(send: Callable[[Message], Any], code: int, detail: str, headers: dict | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": code, "headers": raw})
    await send({"type": "http.response.body", "body": body})
