"""`r2m serve`'s graceful stop: on SIGTERM (or SIGINT) no request that reached the server is lost.

    DrainingServer(uvicorn.Config(app, ..., timeout_graceful_shutdown=30), app.state.r2m).run()

Order, once the signal arrives:
1. `/readyz` answers 503 "draining" at once (load balancers stop routing here).
2. The listener stops starting new handshakes (Linux: a socket filter that drops SYNs), so a new client is
   refused after its SYN retry instead of connecting; the handshakes under way complete and the connections in
   the kernel's accept queue are accepted. Closing a listener outright resets that queue: those clients had
   connected, sent a request, and lost it with a ReadError.
3. The listener closes; connections accepted a moment before get ACCEPTED_GRACE_S to deliver their request, since
   uvicorn closes every connection that has none in progress.
4. uvicorn lets the requests in progress finish (at most the drain timeout), then the app shuts down.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import socket
import struct
import sys
from typing import Any

import uvicorn

log = logging.getLogger("r2m.service")

ACCEPTED_GRACE_S = 0.5  # for a connection accepted just before the listener closed to deliver its request
ACCEPT_QUEUE_WAIT_S = 1.0  # at most, for the event loop to accept what the kernel had queued

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


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the stop order of this module's docstring; `state.draining` feeds `/readyz`."""

    def __init__(self, config: uvicorn.Config, state: Any) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self._state.draining:
            log.info("signal %d: draining (at most %.0f s)", sig, self.config.timeout_graceful_shutdown)
        self._state.draining = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        tcp = (socket.AF_INET, socket.AF_INET6)
        listeners = [s for server in self.servers for s in server.sockets if s.family in tcp]
        stopped = [s for s in listeners if stop_handshakes(s)]
        deadline = loop.time() + ACCEPT_QUEUE_WAIT_S
        while stopped and loop.time() < deadline and any(accept_queue_length(s) for s in stopped):
            await asyncio.sleep(0.005)
        for server in self.servers:
            server.close()
        deadline = loop.time() + ACCEPTED_GRACE_S
        while loop.time() < deadline and any(between_requests(c) for c in self.server_state.connections):
            await asyncio.sleep(0.01)
        await super().shutdown(sockets)
