"""Real r2m processes on loopback: `r2m serve`, `r2m worker` and a private `redis-server`, each started on a free
port with a wait until it is ready, and stopped cleanly. `r2m demo`, the bench, the experiments and the tests all
start their processes here.

    with start_server(log_dir, {"R2M_POLICY_DIM": "64"}) as server:     # waits for /readyz
        httpx.post(f"{server.url}/score", json=...)
    redis = start_redis(tmp, persistent=True)                           # AOF, fsync always; survives kill -9
    worker = start_worker(log_dir, {"R2M_REDIS_URL": redis.url})        # waits for its "consuming" line
    worker.kill()                                                        # kill -9: its batch stays pending
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx
import redis

__all__ = [
    "Process",
    "RedisServer",
    "free_port",
    "http_ready",
    "r2m_command",
    "redis_binary",
    "spawn",
    "start_redis",
    "start_server",
    "start_worker",
    "wait_until",
    "worker_ready",
]


def free_port() -> int:
    """A port that was free on the loopback interface a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def r2m_command(command: str) -> list[str]:
    """`r2m <command>` with this interpreter (works in a venv that is not on PATH)."""
    return [sys.executable, "-m", "r2m.cli", command]


@dataclass
class Process:
    """A child process with its output in `log`; `url` for servers, `consumer` for a worker once it is ready."""

    name: str
    proc: subprocess.Popen
    log: Path
    url: str = ""
    consumer: str | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, chars: int = 3000) -> str:
        return self.output()[-chars:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the process finishes what it holds), then SIGKILL after `timeout` seconds."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()

    def kill(self) -> None:
        """kill -9: no clean-up (a worker's batch stays pending in the stream)."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def spawn(
    name: str, cmd: list[str], log: Path, env: Mapping[str, str] | None = None, *, clean_env: bool = False
) -> Process:
    """Start `cmd` with stdout and stderr to `log`. `env` adds to this process's environment; `clean_env` first
    drops every `R2M_*` variable (a user's own settings: a Redis URL, an 8B model, a key) from it."""
    base = {k: v for k, v in os.environ.items() if not (clean_env and k.startswith("R2M_"))}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env={**base, **(env or {})}, stdout=fh, stderr=subprocess.STDOUT)
    return Process(name, proc, log)


def http_ready(url: str) -> Callable[[], bool]:
    """Ready when GET `url` answers 200."""

    def check() -> bool:
        try:
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    return check


def wait_until(p: Process, ready: Callable[[], bool], timeout: float) -> Process:
    """Poll `ready()` until it is true; if the process exits or `timeout` passes first, stop it and raise
    RuntimeError with the end of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not p.alive():
            raise RuntimeError(f"{p.name} exited with {p.proc.returncode}:\n{p.tail()}")
        if ready():
            return p
        time.sleep(0.1)
    p.stop()
    raise RuntimeError(f"{p.name} was not ready within {timeout:.0f} s:\n{p.tail()}")


def start_server(
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    *,
    timeout: float = 120.0,
    wait: bool = True,
    clean_env: bool = False,
    name: str = "r2m serve",
    log_file: str | None = None,
) -> Process:
    """`r2m serve` on a free loopback port (log level warning unless `env` says otherwise); waits for /readyz
    unless `wait` is False (then `wait_until(p, http_ready(p.url + "/readyz"), ...)`: two servers can load their
    models at the same time). The log goes to `log_dir/log_file` (default: named after `name` and the port)."""
    port = free_port()
    full = {"R2M_HOST": "127.0.0.1", "R2M_PORT": str(port), "R2M_LOG_LEVEL": "warning", **(env or {})}
    log = Path(log_dir) / (log_file or f"{name.replace(' ', '-')}-{port}.log")
    p = spawn(name, r2m_command("serve"), log, full, clean_env=clean_env)
    p.url = f"http://127.0.0.1:{port}"
    return wait_until(p, http_ready(f"{p.url}/readyz"), timeout) if wait else p


_workers = itertools.count()


def start_worker(
    log_dir: Path, env: Mapping[str, str] | None = None, *, timeout: float = 120.0, wait: bool = True
) -> Process:
    """`r2m worker` (log level info: every published version is logged; its metrics server off unless `env` sets
    R2M_WORKER_METRICS_PORT); waits until it has loaded its model and entered its loop."""
    full = {"R2M_HOST": "127.0.0.1", "R2M_LOG_LEVEL": "info", "R2M_WORKER_METRICS_PORT": "0", **(env or {})}
    p = spawn("r2m worker", r2m_command("worker"), Path(log_dir) / f"worker-{next(_workers)}.log", full)
    return wait_until(p, worker_ready(p), timeout) if wait else p


def worker_ready(p: Process) -> Callable[[], bool]:
    """Ready when the worker logged "worker <name> consuming"; sets `p.consumer` to that name."""

    def check() -> bool:
        m = re.search(r"worker (\S+) consuming", p.output())
        if m:
            p.consumer = m.group(1)
        return m is not None

    return check


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError(
            "redis-server is not on PATH: r2m starts its own private Redis here. Install it (Debian/Ubuntu: "
            "`apt-get install redis-server`; macOS: `brew install redis`)."
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


def start_redis(dir: Path, persistent: bool = False) -> RedisServer:
    """A private redis-server on a free port, files in `dir` (no persistence unless `persistent`)."""
    return RedisServer(port=free_port(), dir=Path(dir), persistent=persistent).start()
