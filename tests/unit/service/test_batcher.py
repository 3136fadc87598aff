"""The batcher never answers a non-finite reward: a poisoned embedding fails only its own request."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from r2m.service.batcher import BadReward, Batcher
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


def test_requests_on_cached_rtes_skip_the_queue_behind_backbone_batches(tiny_neox_rm: Path) -> None:
    """Local feedback's /score (every RTE cached) is taken before the backbone work queued ahead of it, in a batch
    of its own, and gets the same rewards as the backbone would."""
    model = build_engine(ServiceSettings(model=str(tiny_neox_rm), policy_dim=8, attn_dim=8, device="cpu"))
    texts = ["one", "two", "three", "four"]
    encoded = [model.backbone.encode("hello", t) for t in texts]
    with torch.inference_mode():
        rte = model.embed(encoded)
    order: list[int] = []
    metrics = ServiceMetrics()

    async def run() -> list:
        batcher = Batcher(model, metrics, max_batch_tokens=4096, max_queue_items=100, batch_wait_ms=0)
        slow = [batcher.submit([PreparedItem(encoded=e, hidden=None, w=1.0)]) for e in encoded]
        cached = batcher.submit([PreparedItem(encoded=e, hidden=None, w=1.0, rte=r) for e, r in zip(encoded, rte)])
        tasks = [asyncio.ensure_future(c) for c in [*slow, cached]]
        for i, t in enumerate(tasks):
            t.add_done_callback(lambda _, i=i: order.append(i))
        await asyncio.sleep(0)  # all five queued before the batcher's loop starts
        batcher.max_batch_tokens = len(encoded[0]) + 1  # one backbone request per batch
        batcher.start()
        try:
            return await asyncio.gather(*tasks)
        finally:
            await batcher.stop()

    results = asyncio.run(run())
    assert order[0] == 4, order  # queued last, answered first
    assert results[4].rewards == pytest.approx([r.rewards[0] for r in results[:4]], abs=1e-5)
    assert metrics.registry.get_sample_value("r2m_batch_requests_count") >= 2
