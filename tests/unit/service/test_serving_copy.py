"""The serving copy of a head: what a replica multiplies, in the smallest exact form (half precision; the fused
M_h, N_h where they are smaller than the four factors), loaded without fusing anything."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load

from r2m.service.engine import HeadVersion, ScoringEngine
from r2m.service.headcodec import (
    blob_sizes,
    head_to_bytes,
    optimizer_to_bytes,
    serving_bytes,
    serving_from_bytes,
    serving_head,
)
from r2m.service.headstore import MemoryHeadStore
from r2m.service.headsync import HeadSync
from r2m.service.metrics import ServiceMetrics
from r2m.service.model import FeedbackAttention, HeadConfig, R2MHead

P = 16
FUSED = HeadConfig(rm_dim=32, policy_dim=P, attn_dim=64, n_heads=2)  # 2 x 32 x 16 < 64 x 48: M and N are smaller
FACTORS = HeadConfig(rm_dim=32, policy_dim=64, attn_dim=8, n_heads=2, score_bias=True)  # 2 x 32 x 64 > 8 x 96


def _trained_head(config: HeadConfig = FUSED, seed: int = 0) -> R2MHead:
    torch.manual_seed(seed)
    head = R2MHead(config)
    with torch.no_grad():  # weights no longer on the float16 grid, as after a few AdamW steps
        for p in head.parameters():
            p.add_(1e-4 * torch.randn_like(p))
    return head


@pytest.mark.parametrize(("config", "names"), [(FUSED, {"m", "n"}), (FACTORS, {"w_q", "w_k", "w_v", "w_o"})])
def test_serving_copy_holds_only_what_a_replica_multiplies_and_scores_like_the_master(config, names) -> None:  # noqa: ANN001
    head = _trained_head(config)
    master, serving = head_to_bytes(head), serving_bytes(head)
    tensors = st_load(serving)
    assert {k.removeprefix("attention.") for k in tensors if k.startswith("attention.")} == names
    assert all(v.dtype == torch.float16 for k, v in tensors.items() if k.startswith("attention."))
    assert len(serving) < 0.55 * len(master)
    served = serving_from_bytes(serving, config)
    assert served.serves and all(b.dtype == torch.float32 for b in served.buffers())
    # phi is float32 in both: a row without feedback gets the master's reward bit for bit.
    assert torch.equal(served.score.weight, head.score.weight)
    e = torch.randn(8, config.rm_dim)
    h, mask = torch.randn(8, 20, config.policy_dim), torch.ones(8, 20, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(served(e, torch.ones(8)), head(e, torch.ones(8)))
        got, want = served(e, torch.full((8,), 0.6), h, mask), head(e, torch.full((8,), 0.6), h, mask)
    assert not torch.equal(got, want), "the copy is float16-rounded: this test must see a difference to bound"
    assert torch.allclose(got, want, rtol=0, atol=2e-3 * want.abs().max().item())


def test_the_default_widths_serve_the_fused_products_and_8b_widths_the_factors() -> None:
    """Bytes by arithmetic (`blob_sizes`, docs/headstore.md) against real blobs at the default widths: the serving
    copy is M and N, 3.1 MB instead of the factors' 19.9 MB in float16."""
    config = HeadConfig(rm_dim=384, policy_dim=2048, attn_dim=2048)
    head = R2MHead(config)
    opt = torch.optim.AdamW(head.parameters())
    head(torch.randn(2, 384), torch.full((2,), 0.5), torch.randn(2, 3, 2048), torch.ones(2, 3, dtype=torch.bool)).sum(
    ).backward()  # fmt: skip
    opt.step()
    sizes = blob_sizes(config)
    blobs = {"weights": head_to_bytes(head), "serving": serving_bytes(head), "optimizer": optimizer_to_bytes(opt)}
    for part, blob in blobs.items():
        assert 0 < len(blob) - sizes[part] < 2048, (part, len(blob), sizes[part])  # the safetensors header
    assert sizes["serving"] == 2 * 2 * 384 * 2048 + 4 * 384
    eight_b = blob_sizes(HeadConfig(rm_dim=4096, policy_dim=4096, attn_dim=2048))
    assert eight_b["serving"] == 2 * 2 * 2048 * (4096 + 4096) + 4 * 4096  # M, N would be as large: the factors


def test_a_replica_loads_the_serving_copy_without_fusing_and_fuses_a_master_itself(tiny_llama_rm, monkeypatch) -> None:  # noqa: ANN001
    from r2m.service.config import ServiceSettings
    from r2m.service.engine import build_engine

    model: ScoringEngine = build_engine(
        ServiceSettings(model=str(tiny_llama_rm), policy_dim=P, attn_dim=64, device="cpu")
    )
    store = MemoryHeadStore()
    config = model.head_config.to_dict()
    head = R2MHead(model.head_config)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.05)
    sync = HeadSync(model, store, ServiceMetrics(), model_name=str(tiny_llama_rm), poll_s=0.1)
    expected = serving_head(head).state_dict()

    # An older publisher made no serving copy: the replica builds the serving form from the master, once.
    store.publish(parent=None, weights=head_to_bytes(head), optim=None, meta={"config": config}, batch_ids=[])
    assert sync.load(0)
    assert model.current.head.serves
    assert all(torch.equal(v, expected[k]) for k, v in model.current.head.state_dict().items())

    meta = store.publish(
        parent=0,
        weights=head_to_bytes(head),
        optim=None,
        meta={"config": config},
        batch_ids=[],
        serving=serving_bytes(head),
    )
    assert meta["serving_bytes"] < meta["bytes"] / 2

    def no_fusing(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a replica fused weights while loading a serving copy")

    monkeypatch.setattr(FeedbackAttention, "_fuse", no_fusing)
    assert sync.load(1)
    current: HeadVersion = model.current
    assert current.version == 1 and current.head.serves
    assert all(torch.equal(v, expected[k]) for k, v in current.head.state_dict().items())
    assert set(current.swap_ms) == {"notice", "fetch", "hash", "load", "install"}
    monkeypatch.undo()

    # A corrupted serving copy is refused like a corrupted master: the replica keeps its head.
    store.publish(
        parent=1,
        weights=head_to_bytes(head),
        optim=None,
        meta={"config": config},
        batch_ids=[],
        serving=b"not a safetensors blob",
    )
    store._versions[2][1]["serving_sha256"] = "0" * 64
    assert not sync.load(2)
    assert model.current.version == 1


def test_version_zero_built_by_a_replica_is_its_published_serving_copy() -> None:
    """Version 0 is built in-process by every replica and published by the worker; both go through the same fusion
    (float64, then float16), so a replica that built it and one that loaded it (after a rollback) score the same."""
    from r2m.service.initial import initial_head

    class _Backbone:
        rm_dim = 32
        score_weight = torch.randn(1, 32)
        score_bias = None

        def reference_rte_norm(self) -> float:
            return 137.0  # a decoder RM's scale

    for config in (FUSED, HeadConfig(rm_dim=32, policy_dim=64, attn_dim=8)):
        for init in ("scaled", "plain", "zero"):
            head = initial_head(_Backbone(), config, seed=3, init=init)  # type: ignore[arg-type]
            built, loaded = serving_head(head), serving_from_bytes(serving_bytes(head), config)
            assert serving_bytes(built) == serving_bytes(head)
            assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in built.state_dict().items())


def test_a_head_whose_serving_copy_would_not_be_finite_is_not_published(tiny_llama_rm) -> None:  # noqa: ANN001
    """Finite float32 weights whose fused products pass float16's 65504 would give replicas an Inf they refuse, the
    store's newest version then served by none: the worker refuses the update instead."""
    from r2m.service.config import ServiceSettings
    from r2m.service.engine import build_engine
    from r2m.service.update.training import HeadTrainer, UpdateRefused

    head = _trained_head()
    with torch.no_grad():
        head.attention.w_q.weight.fill_(300.0)
        head.attention.w_k.weight.fill_(300.0)
    assert head.is_finite()
    with pytest.raises(ValueError, match="attention.m is not finite in torch.float16"):
        serving_bytes(head)

    settings = ServiceSettings(model=str(tiny_llama_rm), policy_dim=P, attn_dim=64, device="cpu")
    trainer = HeadTrainer(build_engine(settings), settings)
    with torch.no_grad():
        trainer.head.attention.w_q.weight.fill_(300.0)
        trainer.head.attention.w_k.weight.fill_(300.0)
    with pytest.raises(UpdateRefused) as refused:
        trainer.state_bytes()
    assert refused.value.reason == "non_finite_weights"
