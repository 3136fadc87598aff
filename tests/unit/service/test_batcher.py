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
