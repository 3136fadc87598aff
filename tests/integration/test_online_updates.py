"""Online R2M updates end to end: one private Redis, two `r2m serve` replicas and `r2m worker` processes, all real
processes on loopback, driven by the real client and raw HTTP.

The replicas and the first worker start once for the module; tests that need another worker (a slow one to kill,
a fresh one across a Redis restart) replace `cluster.worker`, and the next test gets a fast one back if needed.
Every wait polls with a deadline; a failure message carries the tails of every process log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import redis
from safetensors.torch import load as st_load

from r2m.client import InvalidRequest, R2MClient
from r2m.service.launch import Process, RedisServer, start_server, start_worker, wait_until, worker_ready

pytestmark = pytest.mark.slow

PREFIX = "r2mtest"
POLICY_DIM = 64
STEP, TOTAL = 50, 100  # omega(50/100) = 0.6 < 1: the hidden states matter, in /score and in the update alike
SWAP_BUDGET_S = 2.0

COMMON_ENV = {
    "R2M_POLICY_DIM": str(POLICY_DIM),
    "R2M_ATTN_DIM": "64",
    "R2M_REDIS_PREFIX": PREFIX,
    "R2M_HEAD_KEEP": "200",  # nothing is pruned, so every version's metadata can be counted
    "R2M_MAX_HIDDEN_TOKENS": "2048",
    "R2M_MAX_REQUEST_BYTES": str(64 * 2**20),
    "R2M_BATCH_WAIT_MS": "2",
    # Four torch processes share this machine's cores; one intra-op thread each keeps them from oversubscribing it.
    "OMP_NUM_THREADS": "1",
    # These tests drive the trained margins up by 5 to 25 on purpose (FAST_WORKER_ENV), far past the head guard's
    # bounds; the guard has its own tests (test_safety.py, test_soak.py).
    "R2M_GUARD": "false",
}
FAST_WORKER_ENV = {"R2M_TRAIN_LR": "1e-3", "R2M_TRAIN_STEPS": "20"}

PAIR_TEXTS = [
    (
        "How do I boil an egg?",
        "Put the egg in boiling water for nine minutes, then cool it in cold water.",
        "Eggs are laid by hens.",
    ),
    ("What is the capital of France?", "Paris is the capital of France.", "I don't know. Look it up yourself."),
    (
        "How can I sleep better?",
        "Keep a regular schedule, avoid screens before bed, and keep the bedroom dark and cool.",
        "Sleep is overrated.",
    ),
]
GROUP_TEXTS = [
    (
        "How do I make tea?",
        [
            "Boil water, pour it over a tea bag, steep three to five minutes, then remove the bag.",
            "Tea is a drink.",
            "Boil water.",
            "Coffee is better than tea.",
        ],
    ),
    (
        "What is 2 + 2?",
        ["2 + 2 = 4.", "Five.", "It depends on what you mean by numbers.", "Four, because two plus two is four."],
    ),
]

T = TypeVar("T")


def _hidden(rng: np.random.Generator, rows: int) -> np.ndarray:
    return rng.standard_normal((rows, POLICY_DIM)).astype(np.float32)


def _pairs(seed: int, rows: int = 12) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "prompt": p,
            "chosen": c,
            "rejected": r,
            "chosen_hidden": _hidden(rng, rows),
            "rejected_hidden": _hidden(rng, rows + 3),
        }
        for p, c, r in PAIR_TEXTS
    ]


def _groups(seed: int, rows: int = 10) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"prompt": p, "responses": rs, "hidden": [_hidden(rng, rows + k) for k in range(len(rs))]}
        for p, rs in GROUP_TEXTS
    ]


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<unreadable: {exc}>"


# --- the cluster --------------------------------------------------------------------------------------------------


@dataclass
class Cluster:
    tmp: Path
    redis: RedisServer
    replicas: list[Process]
    worker: Process | None = None
    workers: list[Process] = field(default_factory=list)  # every worker ever started, for the logs

    def __post_init__(self) -> None:
        self.r = self.redis.client()
        self.env = {**COMMON_ENV, "R2M_REDIS_URL": self.redis.url}

    # keys
    stream = f"{PREFIX}:preferences"
    group = f"{PREFIX}-workers"

    def diag(self) -> str:
        parts = [f"--- replica {s.url} ({s.log}) ---\n{_tail(s.log)}" for s in self.replicas]
        parts += [f"--- worker {w.consumer} pid {w.proc.pid} ({w.log}) ---\n{_tail(w.log)}" for w in self.workers]
        parts.append(f"--- redis ({self.redis.log}) ---\n{_tail(self.redis.log, 20)}")
        return "\n".join(parts)

    def wait_for(self, what: str, fn: Callable[[], T], timeout: float, interval: float = 0.02) -> T:
        """Poll `fn` until it returns something truthy; Redis and HTTP errors count as "not yet"."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                value = fn()
                if value:
                    return value
            except (redis.RedisError, httpx.HTTPError) as exc:
                last = exc
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what} (last error: {last!r})\n{self.diag()}")
            time.sleep(interval)

    # workers
    def start_worker(self, env: dict[str, str] | None = None, wait: bool = True) -> Process:
        w = start_worker(self.tmp, {**self.env, **FAST_WORKER_ENV, **(env or {})}, wait=False)
        self.workers.append(w)
        if wait:
            self.ready(w)
        return w

    def ready(self, w: Process) -> Process:
        try:
            return wait_until(w, worker_ready(w), 120)
        except RuntimeError as exc:
            pytest.fail(f"{exc}\n{self.diag()}")

    def ensure_worker(self) -> Process:
        """A live fast worker as `cluster.worker` (a test before may have killed or replaced it)."""
        if self.worker is None or not self.worker.alive():
            self.worker = self.start_worker()
        return self.worker

    # the store, read directly
    def latest(self) -> int | None:
        value = self.r.get(f"{PREFIX}:heads:latest")
        return int(value) if value is not None else None

    def meta(self, version: int) -> dict[str, Any]:
        raw = self.r.get(f"{PREFIX}:head:{version}:meta")
        assert raw is not None, f"no metadata for version {version}\n{self.diag()}"
        return json.loads(raw)

    def metas(self) -> dict[int, dict[str, Any]]:
        """Every version's metadata in Redis (all keys `{p}:head:*:meta`, not only the kept-versions index)."""
        out = {}
        for key in self.r.scan_iter(match=f"{PREFIX}:head:*:meta", count=1000):
            raw = self.r.get(key)
            if raw is not None:  # else pruned since the scan saw it
                meta = json.loads(raw)
                out[int(meta["version"])] = meta
        return dict(sorted(out.items()))

    def batch_counts(self) -> Counter:
        """How many published versions list each batch id."""
        return Counter(b for meta in self.metas().values() for b in meta["batch_ids"])

    def applied(self, batch_ids: list[str]) -> bool:
        return all(self.r.smismember(f"{PREFIX}:heads:applied", batch_ids))

    def version_of(self, batch_id: str) -> int:
        versions = [v for v, m in self.metas().items() if batch_id in m["batch_ids"]]
        assert len(versions) == 1, f"batch {batch_id} is in versions {versions}\n{self.diag()}"
        return versions[0]

    def wait_trained(self, batch_ids: list[str], timeout: float = 60.0) -> dict[str, int]:
        """Wait until every batch id is part of a published version; returns batch id -> version."""
        self.wait_for(f"batches {batch_ids} to be trained", lambda: self.applied(batch_ids), timeout)
        return {b: self.version_of(b) for b in batch_ids}

    def pending(self) -> dict[str, Any]:
        return self.r.xpending(self.stream, self.group)

    # the replicas
    def served(self, replica: Process) -> int:
        r = httpx.get(f"{replica.url}/heads/current", timeout=5)
        assert r.status_code == 200, r.text
        return int(r.json()["served_version"])

    def wait_served(self, version: int, timeout: float = 10.0) -> None:
        self.wait_for(
            f"both replicas to serve head version >= {version}",
            lambda: all(self.served(s) >= version for s in self.replicas),
            timeout,
        )


@pytest.fixture(scope="module")
def cluster(persistent_redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("online")
    env = {**COMMON_ENV, "R2M_REDIS_URL": persistent_redis_server.url}
    # Both replicas start at once, the first worker beside them (it takes no batch before the first test posts one).
    worker = start_worker(tmp, {**env, **FAST_WORKER_ENV}, wait=False)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_server, tmp, env) for _ in range(2)]
    replicas, errors = [], []
    for f in futures:
        try:
            replicas.append(f.result())
        except Exception as exc:  # noqa: BLE001 - stop what did start, then fail with the logs
            errors.append(exc)
    c = Cluster(tmp, persistent_redis_server, replicas, worker=worker, workers=[worker])
    try:
        if errors:
            pytest.fail(f"a replica did not start: {errors}")
        c.ready(worker)
        yield c
    finally:
        with ThreadPoolExecutor(4) as pool:  # each takes a second or two to shut down cleanly
            for w in c.workers:
                pool.submit(w.stop, 10)
            for s in replicas:
                pool.submit(s.stop)
        c.r.close()


# --- scoring in the background ----------------------------------------------------------------------------------


class Scorer(threading.Thread):
    """Scores one fixed request against one replica, again and again, with NO retries: every failure counts."""

    def __init__(self, url: str, seed: int = 7) -> None:
        super().__init__(daemon=True, name=f"scorer-{url}")
        self.url = url
        rng = np.random.default_rng(seed)
        self.prompt, self.responses = PAIR_TEXTS[0][0], [PAIR_TEXTS[0][1], PAIR_TEXTS[0][2], "Boil it."]
        self.hidden = [_hidden(rng, 9 + i) for i in range(len(self.responses))]
        self.records: list[tuple[float, float, int, list[float]]] = []  # (sent, answered, head_version, rewards)
        self.failures: list[tuple[float, str]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        with R2MClient(self.url, max_retries=0, timeout=30) as client:
            while not self._halt.is_set():
                sent = time.time()
                try:
                    res = client.score(self.prompt, self.responses, self.hidden, step=STEP, total_steps=TOTAL)
                except Exception as exc:  # noqa: BLE001 - recorded, asserted on by the test
                    self.failures.append((sent, repr(exc)))
                else:
                    self.records.append((sent, time.time(), res.head_version, res.rewards))
                self._halt.wait(0.005)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=60)
        assert not self.is_alive(), f"the scorer of {self.url} did not stop"


def _margins(client: R2MClient, pairs: list[dict]) -> tuple[list[float], int]:
    """r(chosen) - r(rejected) per pair, with each response's hidden states, at STEP; and the head version."""
    prompts = [p["prompt"] for p in pairs for _ in (0, 1)]
    responses = [x for p in pairs for x in (p["chosen"], p["rejected"])]
    hidden = [x for p in pairs for x in (p["chosen_hidden"], p["rejected_hidden"])]
    res = client.score(prompts, responses, hidden, step=STEP, total_steps=TOTAL)
    assert res.omega == pytest.approx(0.6)
    assert len(set(res.head_versions)) == 1, res.head_versions
    return [res.rewards[2 * i] - res.rewards[2 * i + 1] for i in range(len(pairs))], res.head_version


# --- the tests ----------------------------------------------------------------------------------------------------


def test_posted_preferences_reach_both_replicas_within_2s_and_move_rewards(cluster: Cluster) -> None:
    cluster.ensure_worker()
    r1, r2 = cluster.replicas
    pairs, groups = _pairs(seed=1), _groups(seed=2)
    bid = f"first-{uuid.uuid4().hex[:8]}"
    with R2MClient(r1.url, max_retries=2) as c1, R2MClient(r2.url, max_retries=2) as c2:
        before, v_before = _margins(c1, pairs)
        before2, v_before2 = _margins(c2, pairs)
        assert v_before == v_before2 and before2 == pytest.approx(before, abs=1e-5), "replicas differ at the start"

        posted = c1.post_preferences(groups, pairs, step=STEP, total_steps=TOTAL, batch_id=bid)
        assert posted.batch_ids == [bid] and (posted.groups, posted.pairs) == (len(groups), len(pairs))

        # Poll both replicas (and the store) tightly; a sample's time is taken AFTER its answer, so the measured
        # latency can only be longer than the true one.
        samples: list[tuple[float, int, int]] = []
        target: int | None = None
        deadline = time.monotonic() + 60
        while True:
            s1, s2 = cluster.served(r1), cluster.served(r2)
            samples.append((time.time(), s1, s2))
            if target is None and cluster.applied([bid]):
                target = cluster.version_of(bid)
            if target is not None and min(s1, s2) >= target:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"version with batch {bid} (v{target}) not served by both replicas\n{cluster.diag()}")
            time.sleep(0.01)

        meta = cluster.meta(target)
        assert meta["batch_ids"] == [bid] and meta["pairs"] == len(pairs) and meta["groups"] == len(groups), meta
        created = float(meta["created"])
        latencies = [next(t for t, *served in samples if served[i] >= target) - created for i in (0, 1)]
        print(
            f"\nversion {target}: served by the replicas {latencies[0]:.3f} s / {latencies[1]:.3f} s after publication"
        )
        assert max(latencies) <= SWAP_BUDGET_S, (
            f"replicas served v{target} {latencies} s after it was published (budget {SWAP_BUDGET_S} s)\n"
            + cluster.diag()
        )

        after, v_after = _margins(c1, pairs)
        after2, v_after2 = _margins(c2, pairs)
    assert v_after == v_after2 == target
    assert after2 == pytest.approx(after, abs=1e-5), "both replicas serve the same weights"
    gains = [a - b for a, b in zip(after, before)]
    print(f"margins r(chosen) - r(rejected): before {before}, after {after}")
    assert all(g > 0.05 for g in gains), (
        f"the update should widen every trained pair's margin: before {before}, after {after}\n{cluster.diag()}"
    )


@contextlib.contextmanager
def _killed_at_exit(worker: Process) -> Iterator[None]:
    """Whatever happens, the worker does not outlive the block (a slow one would disturb the next tests)."""
    try:
        yield
    finally:
        worker.kill()


def test_worker_killed_mid_batch_every_batch_trained_exactly_once(cluster: Cluster) -> None:
    r1, r2 = cluster.replicas
    # A slow worker (3000 GREBT steps on 1024-row hidden states: a minute or more) takes the first batch alone.
    if cluster.worker is not None:
        cluster.worker.stop()
    slow = cluster.start_worker({"R2M_TRAIN_STEPS": "3000"})
    cluster.worker = None
    run = uuid.uuid4().hex[:8]
    ids = [f"kill-{run}-{i}" for i in range(5)]
    rng = np.random.default_rng(0)
    big_groups = [
        {"prompt": p, "responses": rs, "hidden": [_hidden(rng, 1024) for _ in rs]} for p, rs in GROUP_TEXTS * 2
    ]
    latest_before = cluster.latest() or 0
    with R2MClient(r1.url, max_retries=2) as c1, R2MClient(r2.url, max_retries=2) as c2, _killed_at_exit(slow):
        c1.post_preferences(big_groups, step=STEP, total_steps=TOTAL, batch_id=ids[0])

        def slow_holds_it() -> bool:
            entries = cluster.r.xpending_range(cluster.stream, cluster.group, min="-", max="+", count=10)
            return any(e["consumer"].decode() == slow.consumer for e in entries)

        cluster.wait_for(f"worker {slow.consumer} to take batch {ids[0]}", slow_holds_it, timeout=30)
        c2.post_preferences(pairs=_pairs(seed=3)[:1], step=STEP, total_steps=TOTAL, batch_id=ids[1])
        c1.post_preferences(groups=_groups(seed=4)[:1], step=STEP, total_steps=TOTAL, batch_id=ids[2])
        time.sleep(1.0)  # well into the update (the whole of it takes tens of seconds), far from its end
        assert slow.alive(), f"the slow worker died on its own\n{cluster.diag()}"
        slow.kill()
        by_slow = {v: m["batch_ids"] for v, m in cluster.metas().items() if m.get("worker") == slow.consumer}
        assert not by_slow and not any(cluster.r.smismember(f"{PREFIX}:heads:applied", ids)), (
            f"the slow worker published {by_slow} before it was killed; make its update slower\n{cluster.diag()}"
        )
        held = cluster.r.xpending_range(cluster.stream, cluster.group, min="-", max="+", count=10)
        assert [e["consumer"].decode() for e in held] == [slow.consumer], (
            f"the killed worker's untrained batch must stay pending (XPENDING: {held})\n{cluster.diag()}"
        )

        # A new worker takes over the dead one's batch once it has been idle for 1 s.
        cluster.worker = cluster.start_worker({"R2M_WORKER_CLAIM_IDLE_MS": "1000"})
        c2.post_preferences(pairs=_pairs(seed=5)[1:], step=STEP, total_steps=TOTAL, batch_id=ids[3])
        c1.post_preferences(groups=_groups(seed=6), step=STEP, total_steps=TOTAL, batch_id=ids[4])
        versions = cluster.wait_trained(ids, timeout=90)

    cluster.wait_for("an empty pending list", lambda: cluster.pending()["pending"] == 0, timeout=10)
    counts = cluster.batch_counts()
    assert {b: counts[b] for b in ids} == dict.fromkeys(ids, 1), f"{counts}\n{cluster.diag()}"
    assert all(n == 1 for n in counts.values()), f"a batch was trained twice: {counts}"
    assert cluster.r.xlen(cluster.stream) == 0, "acknowledged batches are deleted from the stream"
    assert "took over 1 batches left pending by another worker" in cluster.worker.output(), cluster.diag()
    assert all(v > latest_before for v in versions.values()), versions
    cluster.wait_served(max(versions.values()))


class _RecordingTransport(httpx.BaseTransport):
    """The client's real transport, recording (time, status) of every POST /preferences attempt."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.attempts: list[tuple[float, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path == "/preferences":
            self.attempts.append((time.time(), response.status_code))
        return response

    def close(self) -> None:
        self.inner.close()


def test_redis_outage_scoring_continues_and_no_batch_is_lost(cluster: Cluster) -> None:
    r1, r2 = cluster.replicas
    run = uuid.uuid4().hex[:8]
    queued_id, outage_id = f"queued-{run}", f"outage-{run}"
    # No worker while Redis goes down, so that a batch accepted before the outage is still queued across it.
    if cluster.worker is not None:
        cluster.worker.stop()
        cluster.worker = None
    with R2MClient(r1.url, max_retries=2) as c1:
        c1.post_preferences(pairs=_pairs(seed=11), step=STEP, total_steps=TOTAL, batch_id=queued_id)
    queued = [fields[b"batch_id"].decode() for _, fields in cluster.r.xrange(cluster.stream)]
    assert queued_id in queued, queued

    scorers = [Scorer(s.url) for s in cluster.replicas]
    for s in scorers:
        s.start()
    restarter: threading.Thread | None = None
    try:
        cluster.wait_for("the scorers to get answers", lambda: all(len(s.records) >= 3 for s in scorers), 30)

        t_down = time.time()
        cluster.redis.stop(signal.SIGKILL)  # a crash; the append-only file (fsync always) keeps the stream
        worker = cluster.start_worker(wait=False)  # loads its model during the outage, then waits Redis out

        body = {"pairs": [{"prompt": "x", "chosen": "yes", "rejected": "no"}], "step": STEP, "total_steps": TOTAL}
        raw = httpx.post(f"{r2.url}/preferences", json=body, timeout=30)
        assert raw.status_code == 503, raw.text
        assert float(raw.headers.get("Retry-After", "0")) > 0, raw.headers
        assert "unavailable" in raw.json()["detail"], raw.text
        current = httpx.get(f"{r1.url}/heads/current", timeout=30)
        assert current.status_code == 200, current.text  # from the replica's own head while the store is away

        t_up: list[float] = []

        def restart() -> None:
            time.sleep(3.0)
            cluster.redis.start()
            t_up.append(time.time())

        restarter = threading.Thread(target=restart, daemon=True)
        restarter.start()
        transport = _RecordingTransport()
        with R2MClient(r1.url, max_retries=10, backoff=0.5, max_backoff=2.0, transport=transport) as client:
            posted = client.post_preferences(
                _groups(seed=12), _pairs(seed=13), step=STEP, total_steps=TOTAL, batch_id=outage_id
            )
        restarter.join(timeout=30)
        assert posted.batch_ids == [outage_id]
        statuses = [s for _, s in transport.attempts]
        assert statuses[0] == 503 and statuses[-1] == 202 and set(statuses[:-1]) == {503}, statuses
        assert t_up and transport.attempts[-1][0] >= t_up[0], "the batch landed only after Redis came back"

        cluster.worker = cluster.ready(worker)
        versions = cluster.wait_trained([queued_id, outage_id], timeout=60)
        cluster.wait_served(max(versions.values()))
        swap_s = time.time() - float(cluster.meta(max(versions.values()))["created"])
        cluster.wait_for("an empty pending list", lambda: cluster.pending()["pending"] == 0, timeout=10)
        n = [len(s.records) for s in scorers]
        cluster.wait_for(
            "answers from the new head", lambda: all(len(s.records) > k + 2 for s, k in zip(scorers, n)), 10
        )
    finally:
        for s in scorers:
            s.stop()
        if restarter is not None:
            restarter.join(timeout=30)
        if not cluster.redis.running():  # the next tests need it
            cluster.redis.start()

    for s in scorers:
        assert not s.failures, f"/score failed on {s.url}: {s.failures[:5]}\n{cluster.diag()}"
        during = [rec for rec in s.records if t_down < rec[0] and rec[1] < t_up[0]]
        assert len(during) >= 5, f"{s.url} answered only {len(during)} /score requests during the outage"
        assert s.records[-1][2] >= max(versions.values())
    counts = cluster.batch_counts()
    assert counts[queued_id] == counts[outage_id] == 1, counts
    assert all(n == 1 for n in counts.values()), f"a batch was trained twice: {counts}"
    print(
        f"\noutage {t_up[0] - t_down:.1f} s; /preferences attempts {statuses}; trained in versions {versions}, "
        f"served by both replicas <= {swap_s:.2f} s after publication"
    )


def test_hot_swap_under_load(cluster: Cluster) -> None:
    """20 versions from 20 preference batches posted one after another (each waited until trained), while a
    client per replica scores without pause and without retries."""
    cluster.ensure_worker()
    cluster.wait_served(cluster.latest() or 0)
    start = cluster.latest() or 0
    scorers = [Scorer(s.url, seed=21) for s in cluster.replicas]
    for s in scorers:
        s.start()
    run = uuid.uuid4().hex[:8]
    rng = np.random.default_rng(22)
    try:
        cluster.wait_for("the scorers to get answers", lambda: all(s.records for s in scorers), 30)
        with R2MClient(cluster.replicas[0].url) as c1, R2MClient(cluster.replicas[1].url) as c2:
            for i in range(20):
                prompt, chosen, rejected = PAIR_TEXTS[i % len(PAIR_TEXTS)]
                pair = {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_hidden": _hidden(rng, 8),
                    "rejected_hidden": _hidden(rng, 8),
                }
                bid = f"swap-{run}-{i}"
                (c1 if i % 2 else c2).post_preferences(pairs=[pair], step=STEP, total_steps=TOTAL, batch_id=bid)
                cluster.wait_for(f"batch {bid} to be trained", lambda bid=bid: cluster.applied([bid]), timeout=30)
        final = cluster.latest()
        assert final is not None and final >= start + 20, (start, final)
        cluster.wait_served(final)
        n = [len(s.records) for s in scorers]
        cluster.wait_for(
            "a few answers from the final head", lambda: all(len(s.records) > k + 2 for s, k in zip(scorers, n)), 10
        )
    finally:
        for s in scorers:
            s.stop()

    by_version: dict[int, list[float]] = {}
    for s in scorers:
        assert not s.failures, f"/score failed on {s.url}: {s.failures[:5]}\n{cluster.diag()}"
        seen = [v for _, _, v, _ in s.records]
        assert seen == sorted(seen), f"{s.url} went back in head versions: {seen}"
        assert seen[0] == start and seen[-1] == final, (start, final, seen[0], seen[-1])
        distinct = sorted(set(seen))
        print(f"\n{s.url}: {len(seen)} /score answers, {len(distinct)} head versions seen of {final - start + 1}")
        assert len(distinct) >= 5, f"the scorer saw too few swaps: {distinct}"
        for _, _, v, rewards in s.records:  # one version, one set of weights: a torn swap would show here
            assert rewards == pytest.approx(by_version.setdefault(v, rewards), abs=1e-4), v
    for r in cluster.replicas:  # where each replica's last swap spent its time, and the same in its metrics
        current = httpx.get(f"{r.url}/heads/current", timeout=10).json()
        phases = current["served_swap_ms"]
        assert current["served_version"] == final and set(phases) == {"notice", "fetch", "hash", "load", "install"}
        assert all(0 <= ms < 30_000 for ms in phases.values()), phases
        text = httpx.get(f"{r.url}/metrics", timeout=10).text
        assert 'r2m_head_swap_phase_seconds_count{phase="install"}' in text


def test_head_download_and_rollback(cluster: Cluster) -> None:
    cluster.ensure_worker()
    r1, r2 = cluster.replicas
    if cluster.latest() is None:  # run on its own: train one version first
        with R2MClient(r1.url) as c1:
            bid = c1.post_preferences(pairs=_pairs(seed=30), step=STEP, total_steps=TOTAL).batch_ids[0]
        cluster.wait_trained([bid])
    metas = cluster.metas()
    kept = httpx.get(f"{r1.url}/heads/current", timeout=10).json()["kept_versions"]
    assert kept == list(metas), (kept, list(metas))
    for v in kept:
        for s in (r1, r2):
            got = httpx.get(f"{s.url}/heads/{v}", timeout=10)
            assert got.status_code == 200, got.text
            digest = hashlib.sha256(got.content).hexdigest()
            assert digest == metas[v]["sha256"] == got.headers["X-R2M-Head-SHA256"], v
            assert "score.weight" in st_load(got.content)

    pairs = _pairs(seed=31)
    with R2MClient(r1.url, max_retries=2) as c1, R2MClient(r2.url, max_retries=2) as c2:
        a = cluster.latest()
        assert a is not None
        cluster.wait_served(a)
        rewards_a, version = _margins(c1, pairs)
        assert version == a
        bid = f"before-rollback-{uuid.uuid4().hex[:8]}"
        c1.post_preferences(pairs=pairs, step=STEP, total_steps=TOTAL, batch_id=bid)
        b = cluster.wait_trained([bid])[bid]
        cluster.wait_served(b)
        rewards_b, _ = _margins(c1, pairs)
        assert rewards_b != pytest.approx(rewards_a, abs=1e-4), "the update changed nothing; nothing to roll back"

        info = c2.rollback(a)
        c = info["version"]
        assert c > b and info["rollback_of"] == a and info["batch_ids"] == [] and info["parent"] == b, info
        assert info["sha256"] == metas[a]["sha256"]
        rolled = cluster.meta(c)
        assert rolled["sha256"] == metas[a]["sha256"] and rolled["rollback_of"] == a, rolled
        t0 = time.time()
        cluster.wait_served(c)
        assert time.time() - t0 <= SWAP_BUDGET_S + 1, cluster.diag()
        for s in (r1, r2):
            assert hashlib.sha256(httpx.get(f"{s.url}/heads/{c}", timeout=10).content).hexdigest() == metas[a]["sha256"]
        for client in (c1, c2):
            rewards_c, version = _margins(client, pairs)
            assert version == c
            assert rewards_c == pytest.approx(rewards_a, abs=1e-5), "the replicas serve version a's weights again"

        # The worker trains on from the rolled-back head, not from the version it last published.
        bid2 = f"after-rollback-{uuid.uuid4().hex[:8]}"
        c1.post_preferences(pairs=pairs, step=STEP, total_steps=TOTAL, batch_id=bid2)
        d = cluster.wait_trained([bid2])[bid2]
        assert cluster.meta(d)["parent"] == c

        # Versions that are not kept: one pruned by a worker that keeps 3, and one never published.
        cluster.worker.stop()
        cluster.worker = cluster.start_worker({"R2M_HEAD_KEEP": "3"})
        bid3 = f"pruning-{uuid.uuid4().hex[:8]}"
        c2.post_preferences(pairs=pairs, step=STEP, total_steps=TOTAL, batch_id=bid3)
        e = cluster.wait_trained([bid3])[bid3]
        assert (c, d) == (e - 2, e - 1), (a, b, c, d, e)

        def pruned() -> bool:  # the worker prunes just after its publish
            return httpx.get(f"{r1.url}/heads/current", timeout=10).json()["kept_versions"] == [c, d, e]

        cluster.wait_for(f"kept versions to be pruned to {[c, d, e]}", pruned, timeout=10)
        assert set(cluster.metas()) == {c, d, e}
        for gone in (a, e + 1000):
            r = httpx.post(f"{r1.url}/heads/rollback", json={"version": gone}, timeout=10)
            assert r.status_code == 404 and "not kept" in r.json()["detail"], r.text
            with pytest.raises(InvalidRequest) as err:
                c2.rollback(gone)
            assert err.value.status_code == 404
            assert httpx.get(f"{r2.url}/heads/{gone}", timeout=10).status_code == 404
        assert cluster.latest() == e, "a failed rollback publishes nothing"
