"""Real server processes on loopback: `r2m serve` under uvicorn, started once per module."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(tmp: Path, env: dict[str, str] | None = None, ready_timeout: float = 120.0) -> ServerProcess:
    port = free_port()
    log = tmp / f"server-{port}.log"
    full_env = {
        **os.environ,
        "R2M_HOST": "127.0.0.1",
        "R2M_PORT": str(port),
        "R2M_LOG_LEVEL": "warning",
        **(env or {}),
    }
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "r2m.service.cli", "serve"],
            env=full_env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"r2m serve exited with {proc.returncode}:\n{server.output()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"r2m serve was not ready within {ready_timeout} s:\n{server.output()}")


def stop_server(server: ServerProcess) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


POLICY_DIM = 64

SMALL_SERVER_ENV = {
    "R2M_POLICY_DIM": str(POLICY_DIM),
    "R2M_ATTN_DIM": "64",
    "R2M_MAX_HIDDEN_TOKENS": "512",
    "R2M_MAX_ITEMS_PER_REQUEST": "256",
    "R2M_MAX_REQUEST_BYTES": str(4 * 2**20),
    "R2M_BATCH_WAIT_MS": "5",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The default model, no auth, small limits so that limit tests stay fast."""
    s = start_server(tmp_path_factory.mktemp("server"), SMALL_SERVER_ENV)
    yield s
    stop_server(s)
