"""Real processes on loopback (`r2m serve`, `r2m worker`, a private `redis-server`), started by r2m's own launcher
(`r2m.service.launch`)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from r2m.service import launch
from r2m.service.launch import Process, RedisServer, start_server

__all__ = ["POLICY_DIM", "SMALL_SERVER_ENV", "Process", "RedisServer", "require_redis", "start_redis", "start_server"]

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
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """The default model, no auth, small limits so that limit tests stay fast."""
    with start_server(tmp_path_factory.mktemp("server"), SMALL_SERVER_ENV) as s:
        yield s


# --- Redis ------------------------------------------------------------------------------------------------------


def require_redis() -> None:
    """A missing redis-server fails the test (it is a test requirement, not an option), saying how to install it."""
    try:
        launch.redis_binary()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


def start_redis(tmp: Path, persistent: bool = False) -> RedisServer:
    require_redis()
    return launch.start_redis(tmp, persistent)


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
