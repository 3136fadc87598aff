"""The head store's footprint in a real Redis, written by the real worker: one optimizer state whatever R2M_HEAD_KEEP
is, bytes that match docs/headstore.md's formula, what a rollback does to the optimizer state, the optimizer state
written every R2M_OPTIMIZER_SAVE_S and by a stopping worker, and a publish that does not fit (Redis at maxmemory with
noeviction) refused whole and dead-lettered with its reason."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from safetensors.torch import load as st_load

from r2m.client.wire import WireTensor, encode_binary, pack_request
from r2m.service.config import ServiceSettings
from r2m.service.engine import ScoringEngine, build_engine
from r2m.service.headcodec import blob_sizes
from r2m.service.headstore import HeadStore, MemoryHeadStore, rollback
from r2m.service.metrics import WorkerMetrics
from r2m.service.queue import MemoryPreferenceQueue
from r2m.service.redisheads import RedisHeadStore, redis_value_bytes
from r2m.service.schemas import PreferencesRequest, as_payload
from r2m.service.update.training import HeadTrainer
from r2m.service.update.worker import Worker

from .conftest import RedisServer

P, D = 1024, 512  # the head's widths: blobs of megabytes (master 4.3 MB, optimizer 8.7 MB), far above Redis's own
VERSIONS = 5


@pytest.fixture(scope="module")
def engine(tiny_llama_rm: Path) -> ScoringEngine:
    return build_engine(_settings(tiny_llama_rm))


def _settings(tiny: Path, **kw: object) -> ServiceSettings:
    base: dict = dict(model=str(tiny), policy_dim=P, attn_dim=D, device="cpu", train_steps=1, guard=False)
    return ServiceSettings(_env_file=None, **{**base, **kw})  # type: ignore[call-arg]


def _request(seed: int) -> PreferencesRequest:
    rng = np.random.default_rng(seed)
    responses = ["the answer is good", "no", "thanks for the question", "you can cook with some water"]
    hidden = [WireTensor.from_array(rng.standard_normal((4 + i, P)).astype(np.float32)) for i in range(4)]
    group = {"prompt": "hello what is the answer", "responses": responses, "hidden": hidden}
    return PreferencesRequest.model_validate({"groups": [group], "step": 50, "total_steps": 100})


def _worker(
    engine: ScoringEngine, tiny: Path, store: HeadStore, save_s: float = 0.0, **kw: object
) -> tuple[Worker, MemoryPreferenceQueue]:
    """A worker on `store`; `save_s`: R2M_OPTIMIZER_SAVE_S (0 here, the optimizer state with every version, unless a
    test is about the interval)."""
    settings = _settings(tiny, optimizer_save_s=save_s)
    queue = MemoryPreferenceQueue()
    worker = Worker(HeadTrainer(engine, settings), queue, store, WorkerMetrics(), block_ms=10, **kw)  # type: ignore[arg-type]
    worker.sync()  # version 0
    return worker, queue


def _body(req: PreferencesRequest) -> bytes:
    return encode_binary(*pack_request(as_payload(req)))


def _train(worker: Worker, queue: MemoryPreferenceQueue, n: int, seed: int = 0) -> None:
    """`n` batches, each trained into a version of its own."""
    for i in range(n):
        queue.add(f"b-{uuid.uuid4().hex[:8]}", _body(_request(seed + i)))
        assert worker.run_once() == 1


@pytest.fixture
def redis_store(redis_server: RedisServer) -> Iterator[RedisHeadStore]:
    prefix = f"hs{uuid.uuid4().hex[:6]}"
    store = RedisHeadStore(redis_server.url, prefix=prefix, keep=5)
    yield store
    keys = list(store.r.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        store.r.delete(*keys)
    store.close()


def _settled_used_memory(r: redis.Redis) -> int:
    """INFO used_memory once Redis has trimmed the writer's query buffer (a blob's size, for a second or two)."""
    last = r.info("memory")["used_memory"]
    for _ in range(40):
        time.sleep(0.25)
        now = r.info("memory")["used_memory"]
        if abs(now - last) < 64 * 1024:
            return now
        last = now
    return last


@pytest.mark.parametrize("keep", [1, 2, 5, 8])
def test_redis_holds_one_optimizer_state_whatever_the_keep(
    engine: ScoringEngine, tiny_llama_rm: Path, redis_server: RedisServer, keep: int
) -> None:
    r = redis_server.client()
    prefix = f"keep{keep}-{uuid.uuid4().hex[:6]}"
    base = _settled_used_memory(r)
    store = RedisHeadStore(redis_server.url, prefix=prefix, keep=keep)
    try:
        worker, queue = _worker(engine, tiny_llama_rm, store)
        _train(worker, queue, VERSIONS - 1)
        latest = store.latest()
        assert latest == VERSIONS - 1 and store.versions() == list(range(VERSIONS))[-keep:]

        # Redis's own figures: MEMORY USAGE of every key of the store, and INFO used_memory.
        usage = {k.decode(): r.memory_usage(k) for k in r.scan_iter(match=f"{prefix}:*", count=1000)}
        optimizer_keys = [k for k in usage if k.endswith(":optim")]
        assert optimizer_keys == [f"{prefix}:heads:optim"], sorted(usage)
        assert int(r.get(f"{prefix}:heads:optim:version")) == latest and store.optim(latest) is not None
        assert all(store.optim(v) is None for v in store.versions() if v != latest)

        sizes = blob_sizes(engine.head_config)
        kept = min(keep, VERSIONS)
        version = redis_value_bytes(sizes["weights"]) + redis_value_bytes(sizes["serving"])
        formula = kept * version + redis_value_bytes(sizes["optimizer"])  # docs/headstore.md
        held = sum(usage.values())
        assert held == pytest.approx(formula, rel=0.10), (held, formula, usage)
        used = _settled_used_memory(r) - base
        assert used == pytest.approx(formula, rel=0.10), (used, formula)
        assert used < formula + 0.5 * sizes["optimizer"], "a second optimizer state would be here"

        # The worker's metric says the same as Redis.
        footprint = store.footprint()
        assert sum(footprint.values()) == pytest.approx(held, rel=0.01)
        for part, n in footprint.items():
            assert worker.metrics.store_bytes.labels(part)._value.get() == n
    finally:
        keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            r.delete(*keys)
        store.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_rollback_resets_the_optimizer_state_unless_it_goes_back_to_the_newest(
    engine: ScoringEngine, tiny_llama_rm: Path, redis_store: RedisHeadStore, kind: str
) -> None:
    store: HeadStore = redis_store if kind == "redis" else MemoryHeadStore(keep=5)
    worker, queue = _worker(engine, tiny_llama_rm, store)
    _train(worker, queue, 2)
    assert store.latest() == 2 and store.optim(2) is not None and store.optim(1) is None

    # Back to an older version: its optimizer state is not kept, so it is reset.
    back = rollback(store, 1)
    assert back["version"] == 3 and back["rollback_of"] == 1 and back["optimizer"] == "reset"
    assert store.optim(3) is None and store.optim(2) is None
    if kind == "redis":
        assert not redis_store.r.exists(f"{redis_store.p}:heads:optim"), "no optimizer state is left behind"
    worker.sync()
    assert worker.trainer.version == 3 and not worker.trainer.opt.state, "AdamW starts afresh from version 1's weights"
    _train(worker, queue, 1, seed=10)
    assert store.latest() == 4 and store.optim(4) is not None

    # Back to the newest version (undoing nothing): its optimizer state is carried over.
    state = store.optim(4)
    again = rollback(store, 4)
    assert again["version"] == 5 and again["optimizer"] == "restored" and store.optim(5) == state
    assert store.meta(5)["sha256"] == store.meta(4)["sha256"]


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_the_optimizer_state_is_written_every_interval_and_by_a_stopping_worker(
    engine: ScoringEngine,
    tiny_llama_rm: Path,
    redis_store: RedisHeadStore,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store: HeadStore = redis_store if kind == "redis" else MemoryHeadStore(keep=5)
    worker, queue = _worker(engine, tiny_llama_rm, store)
    _train(worker, queue, 1)  # version 1, written with its optimizer state (AdamW's moments after a step)
    first = store.optim_state()
    assert first is not None and first[0] == 1
    worker.trainer.settings = worker.trainer.settings.model_copy(update={"optimizer_save_s": 3600.0})
    _train(worker, queue, 2, seed=10)
    kept = store.optim_state()
    assert store.latest() == 3 and kept == first, "within the interval no publish writes it"
    assert store.optim(3) is None and store.optim(1) == first[1]
    if kind == "redis":
        assert [k for k in redis_store.r.scan_iter(match=f"{redis_store.p}:*optim")] == [
            f"{redis_store.p}:heads:optim".encode()
        ]

    # A second worker resumes version 3 from the state taken at version 1: AdamW's moments, not a fresh AdamW.
    with caplog.at_level(logging.INFO, logger="r2m.worker"):
        other, _ = _worker(engine, tiny_llama_rm, store, save_s=3600.0)  # its sync loads the newest version
    assert other.trainer.version == 3 and other.trainer.opt.state, "the stored moments were loaded"
    assert "from the optimizer state taken at version 1" in caplog.text
    assert not other.save_optimizer(), "it trained nothing: nothing newer to write"

    # The first worker stops: its way out writes the state of the newest version, its own.
    stop = threading.Event()
    stop.set()
    worker.run(stop)
    saved = store.optim_state()
    assert saved is not None and saved[0] == 3 and _same_moments(saved[1], worker.trainer.optim_bytes())
    assert not worker.save_optimizer(), "written once"

    # Past the interval, the next publish writes it again.
    at_3 = store.optim(3)
    fast, queue = _worker(engine, tiny_llama_rm, store, save_s=0.05)
    time.sleep(0.1)
    _train(fast, queue, 1, seed=20)
    latest = store.optim_state()
    assert store.latest() == 4 and latest is not None and latest[0] == 4
    assert at_3 is not None and not _same_moments(latest[1], at_3)


def _same_moments(a: bytes, b: bytes) -> bool:
    """Two optimizer states hold the same tensors (their safetensors headers may order the metadata differently)."""
    ta, tb = st_load(a), st_load(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_publish_that_does_not_fit_is_refused_whole_and_dead_lettered(
    engine: ScoringEngine,
    tiny_llama_rm: Path,
    redis_store: RedisHeadStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker, queue = _worker(engine, tiny_llama_rm, redis_store, max_attempts=1)
    _train(worker, queue, 1)
    r, p = redis_store.r, redis_store.p
    before = {k.decode() for k in r.scan_iter(match=f"{p}:*", count=1000)}
    assert redis_store.latest() == 1 and redis_store.optim(1) is not None
    used = _settled_used_memory(r)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", str(used + blob_sizes(engine.head_config)["weights"] // 2))  # less than a version
    try:
        with caplog.at_level(logging.ERROR, logger="r2m.worker"):
            queue.add("too-big", _body(_request(99)))
            assert worker.run_once() == 0
    finally:
        r.config_set("maxmemory", "0")
    assert redis_store.latest() == 1, "nothing was published"
    new = {k.decode() for k in r.scan_iter(match=f"{p}:*", count=1000)} - before
    assert new <= {f"{p}:heads:last_refusal"}, f"half-written: {sorted(new)}"
    assert redis_store.optim(1) is not None, "the newest version keeps its optimizer state"
    [dead] = queue.dead_letters()
    assert dead.batch_id == "too-big" and dead.reason == "store_full", dead
    assert "does not fit in Redis" in dead.detail and "maxmemory" in dead.detail, dead.detail
    assert redis_store.last_refusal()["reason"] == "store_full"
    assert worker.metrics.refused.labels("store_full")._value.get() == 1
    assert worker.metrics.dead_letters.labels("store_full")._value.get() == 1
    logged = " ".join(rec.getMessage() for rec in caplog.records)
    assert "does not fit in Redis" in logged and "R2M_HEAD_KEEP" in logged, logged

    # With room again, the same kind of batch publishes.
    _train(worker, queue, 1, seed=100)
    assert redis_store.latest() == 2

