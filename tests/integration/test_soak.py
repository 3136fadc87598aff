"""A chaos soak with real processes on loopback (about three minutes): Redis with an fsynced append-only file, two
replicas, two workers, a load generator scoring and posting preference batches throughout, while a driver kill -9s
a worker, restarts Redis, and kill -9s and restarts a replica at seeded random times.

It holds when: every batch a replica accepted (202) is part of exactly one published version; the published
versions form one increasing sequence; no replica ever serves a head whose hash differs from the published one; and
/score on the replica that is never killed answers throughout (Redis restart included). The counts are printed.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from r2m.client import R2MClient, R2MError
from r2m.service.launch import Process, RedisServer, http_ready, start_server, start_worker, wait_until, worker_ready

from .conftest import start_redis

pytestmark = pytest.mark.slow

SEED = 20261201
DURATION_S = 150.0
PREFIX = "soak"
POLICY_DIM = 64
ENV = {
    "R2M_POLICY_DIM": str(POLICY_DIM),
    "R2M_ATTN_DIM": "64",
    "R2M_REDIS_PREFIX": PREFIX,
    "R2M_HEAD_KEEP": "100000",  # nothing pruned: every version's metadata can be checked at the end
    "R2M_HEAD_POLL_S": "0.5",
    "R2M_WORKER_CLAIM_IDLE_MS": "2000",
    "R2M_TRAIN_LR": "1e-4",
    "R2M_TRAIN_STEPS": "1",
    "OMP_NUM_THREADS": "1",  # six processes on this machine's cores
    # The soak's hidden states are noise, on which the guard rightly refuses heads after a while (its rank figure
    # falls); a refused batch is a dead letter, not a version. The guard has its own tests (test_safety.py).
    "R2M_GUARD": "false",
}
PROMPTS = [
    ("How do I boil an egg?", ["Simmer it nine minutes.", "No idea.", "Eggs are food.", "Boil water first."]),
    ("How can I sleep better?", ["Keep a regular schedule.", "Sleep is overrated.", "Try.", "Avoid screens."]),
]


class Load(threading.Thread):
    """Scores on one replica (one request every ~50 ms) or posts a batch (every ~0.5 s), counting what happens."""

    def __init__(self, url: str, kind: str, stop: threading.Event, seed: int) -> None:
        super().__init__(daemon=True)
        self.url, self.kind, self.stop_event = url, kind, stop
        self.rng = np.random.default_rng(seed)
        self.outcomes: Counter[str] = Counter()
        self.accepted: list[str] = []
        self.failures: list[tuple[float, str]] = []
        self.versions: list[int] = []

    def hidden(self, rows: int) -> np.ndarray:
        return self.rng.standard_normal((rows, POLICY_DIM)).astype(np.float32)

    def run(self) -> None:
        retries = 0 if self.kind == "score" else 8  # posts ride out a Redis restart; scores must never need to
        n = 0
        while not self.stop_event.is_set():
            url = self.url  # the driver points it at a restarted replica's new port
            with R2MClient(url, max_retries=retries, max_backoff=2.0, timeout=20) as client:
                while not self.stop_event.is_set() and url == self.url:
                    n += 1
                    self.once(client, n)
                    self.stop_event.wait(0.05 if self.kind == "score" else 0.5)

    def once(self, client: R2MClient, n: int) -> None:
        prompt, responses = PROMPTS[n % len(PROMPTS)]
        hidden = [self.hidden(6 + k) for k in range(len(responses))]
        try:
            if self.kind == "score":
                self.versions.append(client.score(prompt, responses, hidden, step=30, total_steps=60).head_version)
            else:
                batch_id = f"{self.url.rsplit(':', 1)[1]}-{n}"
                groups = [{"prompt": prompt, "responses": responses, "hidden": hidden}]
                client.post_preferences(groups, step=30, total_steps=60, batch_id=batch_id)
                self.accepted.append(batch_id)
            self.outcomes["ok"] += 1
        except R2MError as exc:
            self.outcomes[type(exc).__name__] += 1
            self.failures.append((time.monotonic(), repr(exc)[:200]))


class HashWatch(threading.Thread):
    """Polls every replica's /heads/current: the served version's hash must be the published one's."""

    def __init__(self, replicas: list[Process], r: redis.Redis, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.replicas, self.r, self.stop_event = replicas, r, stop
        self.checked = 0
        self.mismatches: list[str] = []
        self.served: dict[int, list[int]] = {}  # pid -> versions served, in order

    def run(self) -> None:
        while not self.stop_event.wait(0.3):
            for s in list(self.replicas):
                try:
                    head = httpx.get(f"{s.url}/heads/current", timeout=2).json()
                    raw = self.r.get(f"{PREFIX}:head:{head['served_version']}:meta")
                except (httpx.HTTPError, redis.RedisError, ValueError):
                    continue  # a replica being restarted, Redis being restarted
                self.served.setdefault(s.proc.pid, []).append(head["served_version"])
                if head["served_version"] == 0 and head["served_sha256"] is None:
                    continue  # the version 0 a replica built itself before it met the store
                meta = json.loads(raw) if raw else {}
                if head["served_sha256"] != meta.get("serving_sha256", meta.get("sha256")):
                    self.mismatches.append(f"{s.url} serves v{head['served_version']} as {head['served_sha256']}")
                self.checked += 1


@pytest.fixture
def soak_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("soak-redis"), persistent=True)
    yield server
    server.stop(signal.SIGKILL)


def test_chaos_soak(soak_redis: RedisServer, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    env = {**ENV, "R2M_REDIS_URL": soak_redis.url}
    a = start_server(tmp_path, env, name="replica-a", wait=False)
    b = start_server(tmp_path, env, name="replica-b", wait=False)
    workers = [start_worker(tmp_path, env, wait=False), start_worker(tmp_path, env, wait=False)]
    for p in (a, b):
        wait_until(p, http_ready(f"{p.url}/readyz"), 180)
    for w in workers:
        wait_until(w, worker_ready(w), 180)
    r = soak_redis.client()
    stop = threading.Event()
    loads = [Load(a.url, "score", stop, 1), Load(b.url, "score", stop, 2), Load(a.url, "post", stop, 3),
             Load(b.url, "post", stop, 4)]  # fmt: skip
    replicas = [a, b]
    watch = HashWatch(replicas, r, stop)
    events: list[str] = []
    redis_down: list[tuple[float, float]] = []
    everything = [a, b, *workers]
    try:
        for t in (*loads, watch):
            t.start()
        t0 = time.monotonic()
        # The plan: each event at a seeded random time in its own window.
        plan = sorted(
            [
                (rng.uniform(15, 35), "kill -9 worker 0"),
                (rng.uniform(45, 65), "restart redis"),
                (rng.uniform(75, 90), "kill -9 replica b"),
                (rng.uniform(115, 130), "kill -9 worker 1"),
            ]
        )
        for at, what in plan:
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            events.append(f"{time.monotonic() - t0:5.1f} s: {what}")
            if what.startswith("kill -9 worker"):
                k = int(what[-1])
                workers[k].kill()
                time.sleep(rng.uniform(1, 4))
                workers[k] = start_worker(tmp_path, env, wait=False)
                everything.append(workers[k])
            elif what == "restart redis":
                down = time.monotonic()
                soak_redis.stop(signal.SIGKILL)
                time.sleep(rng.uniform(2, 5))
                soak_redis.start()
                redis_down.append((down, time.monotonic()))
            else:
                b.kill()
                replicas.remove(b)
                b = start_server(tmp_path, env, name="replica-b2", timeout=180)
                replicas.append(b)
                everything.append(b)
                loads[1].url = loads[3].url = b.url  # the load carries on against the new process
        time.sleep(max(0.0, t0 + DURATION_S - time.monotonic()))
        stop.set()
        for t in (*loads, watch):
            t.join(timeout=60)
        accepted = [x for load in loads for x in load.accepted]

        def all_trained() -> bool:
            return all(r.smismember(f"{PREFIX}:heads:applied", accepted)) if accepted else True

        deadline = time.monotonic() + 120
        while not all_trained():
            assert time.monotonic() < deadline, "accepted batches were never trained:\n" + "\n".join(
                p.tail(1500) for p in everything
            )
            time.sleep(0.5)
        metas = {}
        for key in r.scan_iter(match=f"{PREFIX}:head:*:meta", count=1000):
            meta = json.loads(r.get(key))
            metas[meta["version"]] = meta
        dead = r.xlen(f"{PREFIX}:preferences:dead")
    finally:
        stop.set()
        for p in everything:
            p.stop(timeout=10)
    versions = sorted(metas)
    per_batch = Counter(bid for m in metas.values() for bid in m["batch_ids"])
    score_a = loads[0]
    report = {
        "seconds": DURATION_S,
        "events": events,
        "scores": {load.url: dict(load.outcomes) for load in loads if load.kind == "score"},
        "posts": {
            "accepted": len(accepted),
            **dict(sum((load.outcomes for load in loads if load.kind == "post"), Counter())),
        },  # fmt: skip
        "versions": len(versions),
        "batches_in_versions": sum(per_batch.values()),
        "dead_letters": dead,
        "hash_checks": watch.checked,
        "hash_mismatches": len(watch.mismatches),
    }
    print("soak:", json.dumps(report, indent=1))
    assert versions == list(range(len(versions))), "versions are one sequence 0..N"
    assert all(metas[v]["parent"] == (v - 1 if v else None) for v in versions), "each version's parent is the last"
    missing = [x for x in accepted if per_batch[x] != 1]
    assert not missing, f"accepted batches not in exactly one version: {[(x, per_batch[x]) for x in missing[:10]]}"
    assert dead == 0, "no batch of this soak should have been given up on"
    assert not watch.mismatches, watch.mismatches[:5]
    assert watch.checked > 100
    for pid, seen in watch.served.items():
        assert seen == sorted(seen), f"replica {pid} went back in versions: {seen}"
    assert score_a.outcomes["ok"] > 500 and not score_a.failures, f"/score on replica a failed: {score_a.failures[:5]}"
    assert score_a.versions == sorted(score_a.versions), "replica a's answers went back in versions"
    assert len(accepted) > 100 and len(versions) > 20
