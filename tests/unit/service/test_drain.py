"""The listener tricks of the graceful stop, on real loopback sockets."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from r2m.service.api.drain import accept_queue_length, between_requests, stop_handshakes

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="socket filters and TCP_INFO are Linux")


def _listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


@linux_only
def test_the_accept_queue_length_counts_connections_the_server_has_not_accepted() -> None:
    with _listener() as listener:
        clients = [socket.create_connection(listener.getsockname(), timeout=2) for _ in range(3)]
        time.sleep(0.05)
        assert accept_queue_length(listener) == 3
        listener.accept()[0].close()
        assert accept_queue_length(listener) == 2
        for c in clients:
            c.close()


@linux_only
def test_a_stopped_listener_completes_no_new_handshake_but_keeps_its_queue() -> None:
    with _listener() as listener:
        queued = socket.create_connection(listener.getsockname(), timeout=2)
        queued.sendall(b"GET / HTTP/1.1\r\n\r\n")
        time.sleep(0.05)
        assert stop_handshakes(listener)
        with pytest.raises(TimeoutError):
            socket.create_connection(listener.getsockname(), timeout=0.3)  # the SYN is dropped: no connection
        assert accept_queue_length(listener) == 1
        conn, _ = listener.accept()  # the connection made before the stop is still there, with its request
        assert conn.recv(100).startswith(b"GET /")
        conn.close()
        queued.close()


def test_only_connections_with_no_request_in_progress_are_between_requests() -> None:
    class Cycle:
        def __init__(self, done: bool) -> None:
            self.response_complete = done

    class Conn:
        def __init__(self, cycle: Cycle | None) -> None:
            self.cycle = cycle

    assert between_requests(Conn(None))  # accepted, no request read yet
    assert between_requests(Conn(Cycle(done=True)))  # keep-alive, the last response sent
    assert not between_requests(Conn(Cycle(done=False)))  # a request in progress: uvicorn finishes it anyway
    assert not between_requests(object())  # not an HTTP/1.1 connection uvicorn knows


def test_a_socket_without_tcp_info_has_nothing_queued() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert accept_queue_length(a) == 0
