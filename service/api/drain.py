"""`r2m serve`'s graceful stop: on SIGTERM (or SIGINT) no request that reached the server is lost, and the process
exits within R2M_DRAIN_TIMEOUT_S (T) and a second.

    DrainingServer(uvicorn.Config(app, ..., timeout_graceful_shutdown=T), app.state.r2m).run()

Order, once the signal arrives:
1. `/readyz` answers 503 "draining" at once (load balancers stop routing here), and the listener stops starting
   new handshakes (Linux: a socket filter that drops SYNs), in the signal handler itself: a client that connects
   after the signal is refused after its SYN retry. The handshakes under way complete and the connections in the
   kernel's accept queue are accepted: closing a listener outright resets that queue, and those clients had
   connected, sent a request, and lost it with a ReadError.
2. The listener closes; connections accepted a moment before get ACCEPTED_GRACE_S to deliver their request, since
   uvicorn closes every connection that has none in progress.
3. The requests in progress finish. Those still without an answer ANSWER_MARGIN_S before T are cancelled and
   answered 503 with Retry-After (`Drain.expire`), which r2m's client retries on another replica: a request
   cancelled by uvicorn's own deadline would be answered 500 instead.
4. The app shuts down, its background threads given what is left of T + 1 s.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any

import uvicorn

log = logging.getLogger("r2m.service")

ACCEPTED_GRACE_S = 0.5  # for a connection accepted just before the listener closed to deliver its request
ACCEPT_QUEUE_WAIT_S = 1.0  # at most, for the event loop to accept what the kernel had queued
ANSWER_MARGIN_S = 0.5  # before the drain timeout, what is unanswered gets its 503 (a quarter of short timeouts)
EXIT_GRACE_S = 0.8  # after the drain timeout, for the app's shutdown (background threads are given what is left)

_SO_ATTACH_FILTER = 26  # Linux, asm-generic/socket.h
# Classic BPF over the TCP segment (the filter sees it from the TCP header on; byte 13 holds the flags): drop a
# segment with SYN and without ACK, a new handshake; keep every other, so the handshakes already under way
# complete (their final ACK passes) and reach the accept queue. A child socket inherits its listener's filter,
# and this one lets all of an established connection's segments through.
_LDB_ABS, _JSET_K, _RET_K = 0x30, 0x45, 0x06
_SYN, _ACK = 0x02, 0x10
_PROGRAM = [
    (_LDB_ABS, 0, 0, 13),  # A = TCP flags
    (_JSET_K, 2, 0, _ACK),  # ACK set: keep (to 4)
    (_JSET_K, 0, 1, _SYN),  # SYN set: drop (to 3); else keep (to 4)
    (_RET_K, 0, 0, 0),  # drop
    (_RET_K, 0, 0, 0xFFFFFFFF),  # keep the whole segment
]
_NO_NEW_HANDSHAKES = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *insn) for insn in _PROGRAM))
_TCPI_UNACKED = 24  # offset of tcpi_unacked in struct tcp_info: a listener's accept-queue length


def stop_handshakes(sock: Any) -> bool:
    """Make a listening TCP socket ignore new SYNs (the client retries, then finds the port closed: refused) while
    the handshakes under way complete. False where not supported."""
    if not sys.platform.startswith("linux"):
        return False
    program = struct.pack("HP", len(_PROGRAM), ctypes.addressof(_NO_NEW_HANDSHAKES))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, program)
    except OSError as exc:
        log.warning("could not stop new handshakes before closing the listener: %s", exc)
        return False
    return True


def accept_queue_length(sock: Any) -> int:
    """Connections the kernel has completed for a listening socket that the server has not accepted yet."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:  # not a TCP socket, or no TCP_INFO here: nothing to wait for
        return 0
    return int(struct.unpack_from("I", info, _TCPI_UNACKED)[0])


def between_requests(connection: object) -> bool:
    """A uvicorn HTTP connection with no request in progress: none received yet, or the last one answered."""
    cycle = getattr(connection, "cycle", False)  # False: not an HTTP/1.1 protocol uvicorn knows; nothing to wait for
    return cycle is None or bool(getattr(cycle, "response_complete", False))


@dataclass
class InFlight:
    """One request while it runs: whether its answer has started, and whether the drain cut it short."""

    responded: bool = False
    expired: bool = False


class Drain:
    """The drain's clock and the requests in flight (`RequestGate` enters and leaves each one). `expire` cancels the
    requests with no answer yet; each then answers 503 with Retry-After (`RequestGate`)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.signalled: float | None = None  # time.monotonic() of the signal
        self.expired = False
        self._flights: dict[asyncio.Task[Any], InFlight] = {}

    def enter(self) -> InFlight:
        flight = InFlight()
        task = asyncio.current_task()
        if task is not None:
            self._flights[task] = flight
        return flight

    def leave(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._flights.pop(task, None)

    def seconds_left(self, after: float = 0.0) -> float:
        """Seconds until the drain timeout (plus `after`) from now; the whole timeout before any signal."""
        if self.signalled is None:
            return self.timeout_s + after
        return self.signalled + self.timeout_s + after - time.monotonic()

    def arm(self) -> None:
        """Start the clock (in the event loop, just after the signal): `expire` runs ANSWER_MARGIN_S before T."""
        margin = min(ANSWER_MARGIN_S, self.timeout_s / 4)
        asyncio.get_running_loop().call_later(max(0.0, self.seconds_left() - margin), self.expire)

    def expire(self) -> None:
        self.expired = True
        cut = [(task, f) for task, f in self._flights.items() if not f.responded]
        if cut:
            log.warning("drain timeout near: answering %d unfinished request(s) 503 with Retry-After", len(cut))
        for task, flight in cut:
            flight.expired = True
            task.cancel()


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the stop order of this module's docstring; `state.draining` feeds `/readyz`."""

    def __init__(self, config: uvicorn.Config, state: Any) -> None:
        super().__init__(config)
        self._state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        state.drain = Drain(float(config.timeout_graceful_shutdown or 0.0))
        state.on_fatal = self._fatal
        self.fatal: str | None = None
        self._stopped: list[socket.socket] | None = None  # listeners whose handshakes stopped at the signal

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def _listeners(self) -> list[socket.socket]:
        tcp = (socket.AF_INET, socket.AF_INET6)
        return [s for server in self.servers for s in server.sockets if s.family in tcp]

    def handle_exit(self, sig: int, frame: Any) -> None:
        drain = self._state.drain
        if not self._state.draining:
            log.info("signal %d: draining (at most %.1f s)", sig, drain.timeout_s)
            self._state.draining = True
            drain.signalled = time.monotonic()
            self._stopped = [s for s in self._listeners() if stop_handshakes(s)]  # at once, not at the next tick
            if self._loop is not None:
                self._loop.call_soon_threadsafe(drain.arm)
        super().handle_exit(sig, frame)

    def _fatal(self, message: str) -> None:
        """The app cannot serve (its model did not load): stop at once, `r2m serve` exits non-zero."""
        self.fatal = message
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        drain: Drain = self._state.drain
        if drain.signalled is None:  # stopping for another reason than a signal (a fatal error): the clock starts
            drain.signalled = time.monotonic()
            drain.arm()
        stopped = self._stopped
        if stopped is None:
            stopped = [s for s in self._listeners() if stop_handshakes(s)]
        deadline = loop.time() + min(ACCEPT_QUEUE_WAIT_S, max(0.0, drain.seconds_left() / 4))
        while stopped and loop.time() < deadline and any(accept_queue_length(s) for s in stopped):
            await asyncio.sleep(0.005)
        for server in self.servers:
            server.close()
        deadline = loop.time() + min(ACCEPTED_GRACE_S, max(0.0, drain.seconds_left() / 4))
        while loop.time() < deadline and any(between_requests(c) for c in self.server_state.connections):
            await asyncio.sleep(0.01)
        # uvicorn's own deadline cancels what is left with a 500: it comes after `Drain.expire`'s 503s.
        self.config.timeout_graceful_shutdown = max(0.05, drain.seconds_left())  # type: ignore[assignment]
        await super().shutdown(sockets)
