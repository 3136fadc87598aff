"""The process's life against a real `r2m serve`: a model that cannot load exits at once in one line; a drain past
its deadline answers 503 with Retry-After (never 500) and exits in time; idle keep-alive outlives client pools."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import SMALL_SERVER_ENV, start_server

# --- a model that cannot load ---------------------------------------------------------------------------------------


def _serve_once(tmp_path: Path, model: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "R2M_PORT": "0", "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "r2m.cli", "serve", "--model", model],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip


def _tiny_causal_lm(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("/nonexistent/rm", "no such path"),
        ("some-org/some-reward-model", "HF_HUB_OFFLINE"),
        ("{causal}", "not a sequence-classification reward model"),
        ("{empty}", "neither"),
    ],
)
def test_a_model_that_cannot_load_exits_at_once_in_one_line(tmp_path: Path, model: str, reason: str) -> None:
    if model == "{causal}":
        model = str(tmp_path / "causal-lm")
        _tiny_causal_lm(Path(model))
    elif model == "{empty}":
        model = str(tmp_path / "empty")
        Path(model).mkdir()
    started = time.monotonic()
    result = _serve_once(tmp_path, model)
    took = time.monotonic() - started
    assert result.returncode != 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "R2M_MODEL" in lines[0] and reason in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert took < 30, took  # torch and transformers' imports; no model is read


# --- drain past its deadline ----------------------------------------------------------------------------------------

PROMPTS = ["How do I boil an egg?", "What is the capital of France?", "Name a prime number."]


def test_a_drain_past_its_deadline_answers_503_with_retry_after_never_500_and_exits_in_time(tmp_path: Path) -> None:
    timeout_s = 2.0
    env = {**SMALL_SERVER_ENV, "R2M_EMBEDDED_WORKER": "false", "R2M_DRAIN_TIMEOUT_S": str(timeout_s),
           "R2M_MAX_REQUEST_BYTES": str(32 * 2**20), "R2M_MAX_ITEMS_PER_REQUEST": "1024"}  # fmt: skip
    server = start_server(tmp_path, env)
    outcomes: list[tuple[int | str, str | None]] = []

    async def one(client: httpx.AsyncClient, k: int) -> None:
        body = {"items": [{"prompt": p, "response": f"answer {k} {i} " * 8} for i in range(16) for p in PROMPTS]}
        try:
            r = await client.post(f"{server.url}/score", json=body, timeout=120)
            outcomes.append((r.status_code, r.headers.get("retry-after")))
        except httpx.ConnectError:
            outcomes.append(("refused", None))
        except httpx.HTTPError as exc:
            outcomes.append((f"lost: {exc!r}", None))

    async def burst() -> tuple[float, float]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits) as client:
            tasks = [asyncio.create_task(one(client, k)) for k in range(120)]  # far more than 5 s of scoring
            await asyncio.sleep(3.0)  # long enough for some to finish (200) on a busy machine too
            sent = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            tasks += [asyncio.create_task(one(client, 100 + k)) for k in range(5)]  # after the signal
            await asyncio.gather(*tasks)
            return sent, time.monotonic()

    try:
        signalled, _ = asyncio.run(burst())
        server.proc.wait(timeout=30)
        exited = time.monotonic()
    finally:
        server.stop()
    codes = [c for c, _ in outcomes]
    assert not [c for c in codes if isinstance(c, int) and c >= 500 and c != 503], f"{codes}\n{server.tail()}"
    assert all(c in (200, 503, "refused") for c in codes), f"{codes}\n{server.tail()}"
    assert codes.count(503) > 0, f"nothing was past the deadline: the test does not test it: {codes}"
    assert all(ra is not None for c, ra in outcomes if c == 503), outcomes
    assert codes.count(200) > 0, codes
    took = exited - signalled
    assert took <= timeout_s + 1.0, f"exited {took:.2f} s after SIGTERM (drain timeout {timeout_s} s)"


# --- keep-alive -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with start_server(tmp_path_factory.mktemp("server"), {**SMALL_SERVER_ENV, "R2M_EMBEDDED_WORKER": "false"}) as s:
        yield s


def _get(sock: socket.socket, host: str) -> bytes:
    sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_an_idle_connection_outlives_a_client_pools_five_seconds(plain_server) -> None:  # noqa: ANN001
    host, port = plain_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        assert _get(sock, host).startswith(b"HTTP/1.1 200")
        time.sleep(6.0)  # idle past httpx's expiry (5 s), the old server default
        assert _get(sock, host).startswith(b"HTTP/1.1 200"), "the server closed an idle connection after 5 s"


@pytest.mark.slow
def test_a_pooled_client_with_a_five_second_expiry_sees_no_connection_error_under_load(plain_server) -> None:  # noqa: ANN001
    rounds, per_round = 10, 500
    errors: list[str] = []
    statuses: dict[int, int] = {}

    async def one(client: httpx.AsyncClient, k: int) -> None:
        body = {"items": [{"prompt": PROMPTS[k % 3], "response": f"answer {k}"}]}
        try:
            r = await client.post("/score", json=body)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        except httpx.HTTPError as exc:
            errors.append(repr(exc))

    async def load() -> None:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200, keepalive_expiry=5.0)
        rng = random.Random(0)
        async with httpx.AsyncClient(base_url=plain_server.url, limits=limits, timeout=60) as client:
            for r in range(rounds):
                await asyncio.gather(*(one(client, r * per_round + k) for k in range(per_round)))
                await asyncio.sleep(rng.uniform(4.8, 5.2))  # idle right at the pool's expiry

    asyncio.run(load())
    assert not errors, f"{len(errors)} connection errors in {rounds * per_round} requests: {errors[:5]}"
    assert statuses == {200: rounds * per_round}, statuses
