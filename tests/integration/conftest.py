"""Real processes on loopback: `r2m serve` under uvicorn, `r2m worker`, and a private `redis-server`."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from r2m.trainer.demo import free_port


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def spawn_r2m(command: str, log: Path, env: dict[str, str]) -> subprocess.Popen:
    """`r2m <command>` on loopback as a subprocess, stdout and stderr to `log`; `env` adds to this process's."""
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "r2m.service.cli", command],
            env={**os.environ, "R2M_HOST": "127.0.0.1", **env},
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


def start_server(tmp: Path, env: dict[str, str] | None = None, ready_timeout: float = 120.0) -> ServerProcess:
    port = free_port()
    log = tmp / f"server-{port}.log"
    proc = spawn_r2m("serve", log, {"R2M_PORT": str(port), "R2M_LOG_LEVEL": "warning", **(env or {})})
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


# --- Redis ------------------------------------------------------------------------------------------------------


def redis_binary() -> str:
    """The `redis-server` executable; a missing one fails the test (it is a test requirement, not an option)."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(
            "redis-server is not on PATH: the Redis integration tests start their own Redis server. "
            "Install it (Debian/Ubuntu: `apt-get install redis-server`; macOS: `brew install redis`) and rerun.",
            pytrace=False,
        )
    return path


@dataclass
class RedisServer:
    """A private `redis-server` on a fixed loopback port; `stop()` and `start()` keep the port, so clients of the
    old process reconnect to the new one. `persistent`: append-only file fsynced on every write, so the stream and
    the head store survive a restart (even a kill -9)."""

    port: int
    dir: Path
    persistent: bool = False
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2, **kwargs)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> RedisServer:
        assert not self.running(), "redis-server is already running"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += [*persistence, "--dir", str(self.dir)]
        self.starts += 1
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.output()}")
                try:
                    if client.ping():  # LOADING (replaying the AOF) raises BusyLoadingError, a ConnectionError
                        return self
                except redis.RedisError:
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING within {timeout} s:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server: SIGTERM (clean shutdown) or SIGKILL (a crash); returns once the process is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_redis(tmp: Path, persistent: bool = False) -> RedisServer:
    return RedisServer(port=free_port(), dir=tmp, persistent=persistent).start()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private Redis for the module, in memory only (`--save "" --appendonly no`)."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def persistent_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private Redis whose data survives `stop()`/`start()` (`--appendonly yes --appendfsync always`)."""
    server = start_redis(tmp_path_factory.mktemp("redis"), persistent=True)
    yield server
    server.stop(signal.SIGKILL)


# --- r2m worker -------------------------------------------------------------------------------------------------

_worker_seq = itertools.count()


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    log: Path
    consumer: str | None = field(default=None)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: no clean-up, whatever the worker holds stays pending in the stream."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def wait_worker_ready(worker: WorkerProcess, timeout: float = 120.0) -> WorkerProcess:
    """Wait until the worker has loaded its model and entered its loop (its "worker <name> consuming" line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"worker (\S+) consuming", worker.output())
        if m:
            worker.consumer = m.group(1)
            return worker
        if not worker.alive():
            raise RuntimeError(f"r2m worker exited with {worker.proc.returncode}:\n{worker.output()}")
        time.sleep(0.1)
    stop_worker(worker)
    raise RuntimeError(f"r2m worker was not ready within {timeout} s:\n{worker.output()}")


def start_worker(tmp: Path, env: dict[str, str] | None = None, wait: bool = True) -> WorkerProcess:
    """`r2m worker` as a subprocess logging to a file (at info level, so every published version is logged);
    its metrics server is off unless `env` sets R2M_WORKER_METRICS_PORT."""
    log = tmp / f"worker-{next(_worker_seq)}.log"
    proc = spawn_r2m("worker", log, {"R2M_LOG_LEVEL": "info", "R2M_WORKER_METRICS_PORT": "0", **(env or {})})
    worker = WorkerProcess(proc, log)
    return wait_worker_ready(worker) if wait else worker


def stop_worker(worker: WorkerProcess, timeout: float = 30.0) -> None:
    """SIGTERM: the worker finishes the update in hand, then exits."""
    if worker.alive():
        worker.proc.terminate()
        try:
            worker.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait()
