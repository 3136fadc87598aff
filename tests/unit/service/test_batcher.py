"""The batcher never answers a non-finite reward: a poisoned embedding fails only its own request."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from r2m.service.batcher import BadReward, Batcher, Overloaded
from r2m.service.config import ServiceSettings
from r2m.service.engine import PreparedItem, build_engine
from r2m.service.metrics import ServiceMetrics


def test_a_non_finite_embedding_fails_its_own_request_and_no_other(
    tiny_neox_rm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_engine(ServiceSettings(model=str(tiny_neox_rm), policy_dim=8, attn_dim=8, device="cpu"))
    poison = model.backbone.encode("hello", "poison")
    real_embed = model.backbone.embed

    def embed(encoded):  # noqa: ANN001, ANN202 - a backbone that overflows on one text (fp16 RMs do)
        out = real_embed(encoded)
        for i, e in enumerate(encoded):
            if e is poison:
                out[i] = float("inf")
        return out

    monkeypatch.setattr(model.backbone, "embed", embed)

    def item(text: str) -> PreparedItem:
        return PreparedItem(
            encoded=poison if text == "poison" else model.backbone.encode("hello", text), hidden=None, w=1.0
        )

    metrics = ServiceMetrics()

    async def run() -> list:
        batcher = Batcher(model, metrics, max_batch_tokens=4096, max_queue_items=100, batch_wait_ms=20)
        batcher.start()
        try:
            return await asyncio.gather(
                batcher.submit([item("yes"), item("no")]),
                batcher.submit([item("thanks"), item("poison")]),
                batcher.submit([item("help")]),
                return_exceptions=True,
            )
        finally:
            await batcher.stop()

    first, poisoned, third = asyncio.run(run())
    assert isinstance(poisoned, BadReward) and not poisoned.retry
    assert "items [1] is non-finite" in poisoned.detail
    with torch.inference_mode():
        expected = model.score([item("yes"), item("no"), item("help")]).tolist()
    assert first.rewards + third.rewards == pytest.approx(expected, abs=1e-5)
    assert model.current.version == 0 and not model.bad_versions, "the head is not to blame"
    # All three were one batch; the two clean requests then ran again as one batch of their own.
    assert metrics.registry.get_sample_value("r2m_batch_requests_count") == 1
    assert metrics.registry.get_sample_value("r2m_batch_requests_sum") == 2
    assert metrics.registry.get_sample_value("r2m_non_finite_rewards_total") == 1


def test_requests_on_cached_rtes_are_batched_apart_with_the_backbones_rewards(
    tiny_neox_rm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local feedback's /score (every RTE cached) is never merged into the backbone's batches queued beside it and
    gets the same rewards as the backbone would."""
    model = build_engine(ServiceSettings(model=str(tiny_neox_rm), policy_dim=8, attn_dim=8, device="cpu"))
    texts = ["one", "two", "three", "four"]
    encoded = [model.backbone.encode("hello", t) for t in texts]
    with torch.inference_mode():
        rte = model.embed(encoded)
    metrics = ServiceMetrics()
    batches: list[list[bool]] = []  # per scored batch: which items carried a cached RTE
    score_all = model.score_all

    def spy(items, *args):  # noqa: ANN001, ANN202
        batches.append([it.rte is not None for it in items])
        return score_all(items, *args)

    monkeypatch.setattr(model, "score_all", spy)

    async def run() -> list:
        batcher = Batcher(model, metrics, max_batch_tokens=4096, max_queue_items=100, batch_wait_ms=0)
        slow = [batcher.submit([PreparedItem(encoded=e, hidden=None, w=1.0)]) for e in encoded]
        cached = batcher.submit([PreparedItem(encoded=e, hidden=None, w=1.0, rte=r) for e, r in zip(encoded, rte)])
        tasks = [asyncio.ensure_future(c) for c in [*slow, cached]]
        await asyncio.sleep(0)  # all five queued before the batcher's loop starts
        batcher.max_batch_tokens = len(encoded[0]) + 1  # one backbone request per batch
        batcher.start()
        try:
            return await asyncio.gather(*tasks)
        finally:
            await batcher.stop()

    results = asyncio.run(run())
    assert results[4].rewards == pytest.approx([r.rewards[0] for r in results[:4]], abs=1e-5)
    assert [True] * 4 in batches, "the cached request's four items were one batch"
    assert all(all(b) or not any(b) for b in batches), batches  # never mixed with backbone work


def _hold_backbone(model, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:  # noqa: ANN001
    """From now on the engine's backbone batches run until `release` is set; `entered` says one has started."""
    entered, release = threading.Event(), threading.Event()
    real_embed = model.backbone.embed

    def embed(batch):  # noqa: ANN001, ANN202
        entered.set()
        release.wait(timeout=30)
        return real_embed(batch)

    monkeypatch.setattr(model.backbone, "embed", embed)
    return entered, release


def test_a_request_on_cached_rtes_is_answered_while_a_backbone_batch_runs(
    tiny_neox_rm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached lane has its own thread: a read-out request does not wait for the running backbone batch."""
    model = build_engine(ServiceSettings(model=str(tiny_neox_rm), policy_dim=8, attn_dim=8, device="cpu"))
    encoded = model.backbone.encode("hello", "one")
    with torch.inference_mode():
        rte = model.embed([encoded])[0]
    entered, release = _hold_backbone(model, monkeypatch)

    async def run() -> tuple:
        batcher = Batcher(model, ServiceMetrics(), max_batch_tokens=4096, max_queue_items=100, batch_wait_ms=0)
        batcher.start()
        try:
            slow = asyncio.ensure_future(batcher.submit([PreparedItem(encoded=encoded, hidden=None, w=1.0)]))
            while not entered.is_set():
                await asyncio.sleep(0.005)
            cached = await asyncio.wait_for(
                batcher.submit([PreparedItem(encoded=encoded, hidden=None, w=1.0, rte=rte)]), timeout=10
            )
            still_running = not slow.done()
            release.set()
            return cached, await slow, still_running
        finally:
            release.set()
            await batcher.stop()

    cached, slow, still_running = asyncio.run(run())
    assert still_running, "the cached request was answered while the backbone batch was still running"
    assert cached.rewards == pytest.approx(slow.rewards, abs=1e-5)


def test_stopping_answers_the_requests_of_the_batch_being_scored(
    tiny_neox_rm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shutdown while a backbone batch runs: its requests hear Overloaded (503) at once instead of hanging."""
    model = build_engine(ServiceSettings(model=str(tiny_neox_rm), policy_dim=8, attn_dim=8, device="cpu"))
    encoded = model.backbone.encode("hello", "one")
    entered, release = _hold_backbone(model, monkeypatch)

    async def run() -> tuple:
        batcher = Batcher(model, ServiceMetrics(), max_batch_tokens=4096, max_queue_items=100, batch_wait_ms=0)
        batcher.start()
        try:
            running = asyncio.ensure_future(batcher.submit([PreparedItem(encoded=encoded, hidden=None, w=1.0)]))
            while not entered.is_set():
                await asyncio.sleep(0.005)
            queued = asyncio.ensure_future(batcher.submit([PreparedItem(encoded=encoded, hidden=None, w=1.0)]))
            await asyncio.sleep(0)
            await batcher.stop()
            done, _ = await asyncio.wait([running, queued], timeout=5)
            return running, queued, done
        finally:
            release.set()

    running, queued, done = asyncio.run(run())
    assert running in done and queued in done, "both requests were answered"
    assert isinstance(running.exception(), Overloaded) and isinstance(queued.exception(), Overloaded)
