"""Online updates that cannot hurt the service, with real processes: the one-request outage, updates that go
non-finite, the head guard against a runaway learning rate, dead letters replayed after a settings fix, the
in-flight memory budget, and draining on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from r2m.client import AsyncR2MClient, R2MClient
from r2m.client.wire import BINARY_CONTENT_TYPE, encode_binary, pack_request
from r2m.service.api.app import IDLE_RELEASE_S
from r2m.service.launch import RedisServer, r2m_command, start_server, start_worker
from r2m.service.update.guard import spearman

pytestmark = pytest.mark.slow

POLICY_DIM = 64
PROMPTS = [
    ("How do I boil an egg?", ["Simmer it nine minutes, then cool it in ice water.", "No idea.", "Eggs are food.",
                               "Put the egg in boiling water for nine minutes."]),
    ("How can I sleep better?", ["Keep a regular schedule and a dark, cool bedroom.", "Sleep is overrated.",
                                 "Try.", "Avoid screens and caffeine before bed; get up at the same time."]),
    ("What is the capital of France?", ["Paris.", "I don't know.", "France is in Europe.",
                                        "The capital of France is Paris."]),
]  # fmt: skip


def _wait(what: str, fn: Callable[[], object], timeout: float, diag: Callable[[], str] = lambda: "") -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
            if value:
                return value
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{diag()}")
        time.sleep(0.05)


def _groups(seed: int, rows: int = 8) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"prompt": p, "responses": rs, "hidden": [rng.standard_normal((rows + k, POLICY_DIM)).astype(np.float32)
                                                   for k in range(len(rs))]}
        for p, rs in PROMPTS
    ]  # fmt: skip


def _server_env(**extra: str) -> dict[str, str]:
    env = {
        "R2M_POLICY_DIM": str(POLICY_DIM),
        "R2M_ATTN_DIM": "64",
        "R2M_HEAD_POLL_S": "0.2",
        "R2M_WORKER_CLAIM_IDLE_MS": "300",
        "R2M_MAX_HIDDEN_TOKENS": "4096",
        "OMP_NUM_THREADS": "1",
    }
    return {**env, **extra}


# --- the one request that once took the service down --------------------------------------------------------------


def test_the_near_float32_limit_batch_is_refused_and_a_non_finite_update_ends_a_dead_letter(tmp_path: Path) -> None:
    """The issue's request (one group of 4 responses, every hidden value 3.0e38, step 41 of 60) gets a 422 naming
    the item and the value; a batch that passes validation but whose update still goes non-finite (a runaway
    learning rate) is never published, ends in the dead-letter stream with its reason, and the served head keeps
    scoring normal items finitely."""
    env = _server_env(R2M_TRAIN_LR="1e30", R2M_TRAIN_STEPS="2", R2M_WORKER_MAX_ATTEMPTS="2")
    with start_server(tmp_path, env) as server, R2MClient(server.url, max_retries=0) as client:
        prompt, responses = PROMPTS[0]
        huge = [np.full((6, POLICY_DIM), 3.0e38, dtype=np.float32) for _ in responses]
        r = httpx.post(
            f"{server.url}/preferences",
            content=encode_binary(*pack_request({"groups": [{"prompt": prompt, "responses": responses,
                                                             "hidden": huge}], "step": 41, "total_steps": 60})),
            headers={"content-type": BINARY_CONTENT_TYPE},
        )  # fmt: skip
        assert r.status_code == 422, r.text
        assert "groups[0].hidden[0]: value 3e+38 in row 0, column 0 exceeds R2M_MAX_HIDDEN_ABS" in r.json()["detail"]
        assert httpx.get(f"{server.url}/preferences/dead-letters").json() == {"dead_letters": []}

        client.post_preferences(_groups(0), step=41, total_steps=60, batch_id="runaway")
        dead = _wait(
            "the runaway batch to become a dead letter",
            lambda: httpx.get(f"{server.url}/preferences/dead-letters").json()["dead_letters"],
            60,
            server.tail,
        )
        [letter] = dead  # type: ignore[misc]
        assert (letter["batch_id"], letter["reason"], letter["attempts"]) == ("runaway", "non_finite_loss", 2)
        current = client.current_head()
        assert current["version"] == 0 and current["served_version"] == 0
        assert current["last_refusal"]["reason"] == "non_finite_loss"
        scored = client.score(prompt, responses, _groups(1)[0]["hidden"], step=41, total_steps=60)
        assert scored.head_version == 0 and all(math.isfinite(x) for x in scored.rewards)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'r2m_dead_letters_total{reason="non_finite_loss"} 1.0' in metrics


# --- the guard, dead letters and their replay, with Redis and a real worker ---------------------------------------


def _figures(rewards: list[float], plain: list[float]) -> tuple[float, float, float]:
    import torch

    r, p = np.array(rewards), np.array(plain)
    return (r.mean() - p.mean()) / p.std(), r.std() / p.std(), spearman(torch.tensor(r), torch.tensor(p))


def test_the_guard_stops_a_runaway_head_and_a_replayed_dead_letter_trains_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = _server_env(R2M_REDIS_URL=redis_server.url, R2M_REDIS_PREFIX="guardtest", R2M_GUARD_MIN_ITEMS="8")
    runaway = {"R2M_TRAIN_LR": "3e-2", "R2M_TRAIN_STEPS": "10", "R2M_WORKER_MAX_ATTEMPTS": "1"}
    bounds = {"shift": 3.0, "spread": 4.0, "rank": 0.3}  # the defaults of R2M_GUARD_*
    worker = start_worker(tmp_path, {**env, **runaway})
    try:
        with start_server(tmp_path, env) as server, R2MClient(server.url) as client:
            published: list[dict] = []
            refused = None
            for step in range(1, 30):
                batch_id = f"step-{step}"
                client.post_preferences(_groups(step), step=step, total_steps=60, batch_id=batch_id)

                def settled(batch_id: str = batch_id) -> dict | None:  # part of a version, or a dead letter
                    dead = httpx.get(f"{server.url}/preferences/dead-letters").json()["dead_letters"]
                    if any(d["batch_id"] == batch_id for d in dead):
                        return {"dead": dead}
                    head = client.current_head()
                    return {"head": head} if batch_id in head["batch_ids"] else None

                outcome = _wait(f"batch {batch_id} to settle", settled, 60, worker.tail)
                if "dead" in outcome:  # type: ignore[operator]
                    refused = next(d for d in outcome["dead"] if d["batch_id"] == batch_id)  # type: ignore[index]
                    break
                published.append(outcome["head"])  # type: ignore[index]
            assert refused is not None, "a 3e-2 x 10-step learning rate never drifted far enough to be refused"
            assert refused["reason"].startswith("guard_"), refused
            assert published, "the first updates are within the bounds and get published"
            for head in published:  # every published version carries its figures, each within the bounds
                g = head["guard"]
                assert abs(g["mean_shift"]) <= bounds["shift"] and g["rank_agreement"] >= bounds["rank"], g
            last = published[-1]["version"]
            current = client.current_head()
            assert current["version"] == last and current["last_refusal"]["reason"] == refused["reason"]
            _wait("the replica to serve the last good version", lambda: client.current_head()["served_version"] == last,
                  10)  # fmt: skip
            # The served rewards stay within the guard's bounds of the plain RM, on the items the guard checked it on.
            items, plain_items = [], []
            for step in range(1, len(published) + 1):
                for g in _groups(step):
                    items.append(client.score(g["prompt"], g["responses"], g["hidden"], step=step, total_steps=60))
                    plain_items.append(client.score(g["prompt"], g["responses"]))
            rewards = [r for s in items for r in s.rewards]
            plain = [r for s in plain_items for r in s.rewards]
            shift, spread, rank = _figures(rewards, plain)
            print(
                f"published {len(published)} versions, refused: {refused['detail']}; served head v{last} on "
                f"its {len(rewards)} trained items: shift {shift:+.2f}, spread {spread:.2f}, rank {rank:.2f}"
            )
            assert abs(shift) <= bounds["shift"] and 1 / bounds["spread"] <= spread <= bounds["spread"], (shift, spread)
            assert rank >= bounds["rank"], rank

            # Fix the setting (a sane learning rate), go back to the head the runaway started from, and replay the
            # dead letter with the real CLI: trained once.
            worker.stop()
            last = client.rollback(0)["version"]
            worker = start_worker(tmp_path, {**env, "R2M_TRAIN_LR": "1e-4", "R2M_TRAIN_STEPS": "1"})
            cli_env = {**os.environ, **env}
            listed = subprocess.run([*r2m_command("worker"), "--dead-letters"], env=cli_env, capture_output=True,
                                    text=True, timeout=60)  # fmt: skip
            assert listed.returncode == 0, listed.stderr
            [line] = [json.loads(x) for x in listed.stdout.splitlines()]
            assert line["batch_id"] == refused["batch_id"]
            replayed = subprocess.run([*r2m_command("worker"), "--replay", line["id"]], env=cli_env,
                                      capture_output=True, text=True, timeout=60)  # fmt: skip
            assert replayed.returncode == 0 and refused["batch_id"] in replayed.stdout, replayed.stderr
            head = _wait(
                "the replayed batch to be published",
                lambda: (h := client.current_head()) and refused["batch_id"] in h["batch_ids"] and h,
                60,
                worker.tail,
            )
            assert head["parent"] == last  # type: ignore[index]
            assert httpx.get(f"{server.url}/preferences/dead-letters").json() == {"dead_letters": []}
            # Replaying again (nothing left) and re-posting the same batch id trains nothing twice.
            client.post_preferences(_groups(len(published) + 1), step=1, total_steps=60, batch_id=refused["batch_id"])
            time.sleep(1.5)
            assert client.current_head()["version"] == head["version"]  # type: ignore[index]
    finally:
        worker.stop()


# --- the in-flight memory budget -----------------------------------------------------------------------------------


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _burst_growth(tmp_path: Path, budget: int, held: bool = False) -> tuple[int, int, float, list]:
    """A server whose requests carry one 2048 x 1024 float32 item (8 MiB of hidden states, ~8 MiB of body), hit by
    12 concurrent requests twice: the first burst warms it up (first-call costs), then the server's idle release
    hands the free heap pages back, and the second burst is measured from there. Returns (baseline RSS, peak growth
    in bytes, 503s in the second burst, its results: ScoreResults, or with `held` the responses).

    By default the bursts go through AsyncR2MClient, which encodes each body as its turn comes: a slow machine can
    feed the server one body at a time. `held` sends the 12 bodies with plain httpx (no retries), each held back by
    its last byte until all 12 are in and the server has had a second to read them: all 12 at once, every time."""
    rows, dim = 2048, 1024
    env = {
        "R2M_POLICY_DIM": str(dim),
        "R2M_ATTN_DIM": "64",
        "R2M_MAX_HIDDEN_TOKENS": str(rows),
        "R2M_MAX_REQUEST_BYTES": str(16 * 2**20),
        "R2M_MAX_INFLIGHT_BYTES": str(budget),
        "R2M_INFLIGHT_WAIT_S": "0.2",
        "R2M_EMBEDDED_WORKER": "false",
    }
    hidden = [np.random.default_rng(i).standard_normal((rows, dim)).astype(np.float32) for i in range(12)]
    prompt, response, step, total = "How do I boil an egg?", "Simmer it.", 30, 60
    bodies = [
        encode_binary(*pack_request({"items": [{"prompt": prompt, "response": response, "policy_hidden": h}],
                                     "step": step, "total_steps": total}))
        for h in hidden
    ] if held else []  # fmt: skip
    with start_server(tmp_path, env) as server:
        pid = server.proc.pid

        async def burst() -> list:
            if not held:
                async with AsyncR2MClient(server.url, max_retries=60, max_backoff=0.5, timeout=120) as client:
                    return await asyncio.gather(
                        *(client.score(prompt, [response], [h], step=step, total_steps=total) for h in hidden)
                    )
            waiting, go = [0], asyncio.Event()

            async def stream(body: bytes) -> AsyncIterator[bytes]:
                for i in range(0, len(body) - 1, 2**20):
                    yield body[i : min(i + 2**20, len(body) - 1)]
                waiting[0] += 1
                if waiting[0] == len(bodies):
                    await asyncio.sleep(1.0)
                    go.set()
                await go.wait()
                yield body[-1:]

            async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                return await asyncio.gather(
                    *(http.post("/score", content=stream(b),
                                headers={"Content-Type": BINARY_CONTENT_TYPE, "Content-Length": str(len(b))})
                      for b in bodies)
                )  # fmt: skip

        def rejected() -> float:
            text = httpx.get(f"{server.url}/metrics").text
            return next(
                float(x.split()[-1]) for x in text.splitlines() if x.startswith("r2m_inflight_rejections_total")
            )

        asyncio.run(burst())
        time.sleep(3 * IDLE_RELEASE_S)  # the idle release runs once no request came for IDLE_RELEASE_S
        baseline, before = _rss_kb(pid, "VmRSS"), rejected()
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        results = asyncio.run(burst())
        return baseline * 1024, (_rss_kb(pid, "VmHWM") - baseline) * 1024, rejected() - before, results


def test_requests_over_the_memory_budget_wait_get_503_and_are_all_scored_by_the_client_retries(
    tmp_path: Path,
) -> None:
    budget = 48 * 2**20  # 12 bodies x 8 MiB x 3 = 288 MiB wanted at once
    baseline, grown, rejected, results = _burst_growth(tmp_path, budget)
    assert len(results) == 12 and all(len(r.rewards) == 1 and math.isfinite(r.rewards[0]) for r in results)
    assert rejected > 0, "the burst never met the budget: the test does not test it"
    # The control: the same 12 bodies, all in flight together, at a server without a budget.
    unbounded_baseline, unbounded, _, responses = _burst_growth(tmp_path, 4 * 2**30, held=True)
    print(
        f"budget {budget >> 20} MiB: baseline RSS {baseline >> 20} MiB, peak +{grown >> 20} MiB, {rejected:.0f} 503s "
        f"retried; without a budget: baseline {unbounded_baseline >> 20} MiB, peak +{unbounded >> 20} MiB"
    )
    assert [r.status_code for r in responses] == [200] * 12
    assert grown <= budget, f"peak RSS grew by {grown >> 20} MiB over a {budget >> 20} MiB budget"
    assert unbounded > budget, "without the budget the same burst must need more: else the test shows nothing"


@pytest.mark.slow
@pytest.mark.parametrize("budget", [256 * 2**20, None], ids=["256MiB", "default"])
def test_the_process_stays_in_its_memory_budget_under_json_load_and_shrinks_after(
    tmp_path: Path, budget: int | None
) -> None:
    """40 connections of JSON /score bodies, every other one with a (256, 2048) float32 tensor (2.8 MB of base64):
    the resident peak stays within baseline + budget + 10%, and 10 s after the load RSS is within 20% of the warm
    baseline (bench section 11 runs the same at 200 connections for 150 s)."""
    from bench.memory import measure

    m = measure(budget, connections=40, seconds=15.0, tmp=tmp_path)
    mib = 2**20
    print({k: v // mib if isinstance(v, int) else v for k, v in m.items()})
    assert m["counts"].get("200", 0) > 20, m["counts"]
    assert not [k for k in m["counts"] if k not in ("200", "503")], m["counts"]
    assert m["peak"] <= m["baseline"] + 1.1 * m["budget"], f"peak {m['peak'] // mib} MiB, {m}"
    assert m["idle"] <= 1.2 * m["baseline"], f"RSS stayed at {m['idle'] // mib} MiB after the load, {m}"


# --- draining on SIGTERM --------------------------------------------------------------------------------------------


def test_sigterm_during_a_burst_answers_every_request_the_server_accepted(tmp_path: Path) -> None:
    env = _server_env(
        R2M_EMBEDDED_WORKER="false", R2M_DRAIN_TIMEOUT_S="60", R2M_BATCH_WAIT_MS="20", R2M_LOG_LEVEL="info"
    )
    server = start_server(tmp_path, env)
    items = [(p, r) for p, rs in PROMPTS for r in rs] * 4  # 48 items per request: each batch takes a while
    outcomes: list[tuple[str, float]] = []

    async def one(client: httpx.AsyncClient, k: int) -> None:
        body = {"items": [{"prompt": p, "response": f"{r} {k}"} for p, r in items]}
        try:
            r = await client.post(f"{server.url}/score", json=body, timeout=120)
            outcomes.append((str(r.status_code) if r.status_code != 200 or len(r.json()["rewards"]) == len(items)
                             else "short", time.monotonic()))  # fmt: skip
        except httpx.ConnectError:
            outcomes.append(("refused", time.monotonic()))  # never accepted: the listener was already closed
        except httpx.HTTPError as exc:
            outcomes.append((f"lost: {exc!r}", time.monotonic()))

    async def burst() -> float:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits) as client:
            tasks = [asyncio.create_task(one(client, k)) for k in range(32)]
            await asyncio.sleep(0.5)  # the first requests are being scored, the others queued
            sent = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            for k in range(40):  # after the signal, a connection every 5 ms: across the moment the listener closes
                tasks.append(asyncio.create_task(one(client, 100 + k)))
                await asyncio.sleep(0.005)
            await asyncio.gather(*tasks)
            return sent

    try:
        signalled = asyncio.run(burst())
        server.proc.wait(timeout=90)
    finally:
        server.stop()
    kinds = [k for k, _ in outcomes]
    answered_after = sum(1 for k, t in outcomes if k == "200" and t > signalled)
    assert all(k in ("200", "refused") for k in kinds), f"{kinds}\n{server.tail()}"
    assert answered_after >= 5, f"only {answered_after} requests were answered after SIGTERM: {kinds}"
    assert kinds.count("200") >= 32, kinds  # every request sent before the signal was answered
    # uvicorn re-raises the signal once it has shut down cleanly: exit by SIGTERM after "Finished server process".
    log = server.output()
    assert server.proc.returncode in (0, -signal.SIGTERM) and "draining" in log, log[-2000:]
    assert log.index("draining") < log.index("Application shutdown complete") < log.index("Finished server process")
