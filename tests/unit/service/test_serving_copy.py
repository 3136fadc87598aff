"""The float16 serving copy of a head: what replicas fetch on a swap (half the bytes of the float32 master)."""

from __future__ import annotations

import torch

from r2m.service.engine import HeadVersion, ScoringEngine
from r2m.service.headcodec import head_from_bytes, head_to_bytes, serving_bytes
from r2m.service.headstore import MemoryHeadStore
from r2m.service.headsync import HeadSync
from r2m.service.metrics import ServiceMetrics
from r2m.service.model import HeadConfig, R2MHead

P = 16


def _trained_head(seed: int = 0) -> R2MHead:
    torch.manual_seed(seed)
    head = R2MHead(HeadConfig(rm_dim=32, policy_dim=P, attn_dim=64, n_heads=2))
    with torch.no_grad():  # weights no longer on the float16 grid, as after a few AdamW steps
        for p in head.parameters():
            p.add_(1e-4 * torch.randn_like(p))
    return head


def test_serving_copy_is_half_the_bytes_and_scores_like_the_master() -> None:
    head = _trained_head()
    master, serving = head_to_bytes(head), serving_bytes(head)
    assert len(serving) < 0.55 * len(master)
    served = head_from_bytes(serving, head.config)
    assert all(p.dtype == torch.float32 for p in served.parameters())
    # phi is float32 in both: a row without feedback gets the master's reward bit for bit.
    assert torch.equal(served.score.weight, head.score.weight)
    e = torch.randn(8, 32)
    h, mask = torch.randn(8, 20, P), torch.ones(8, 20, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(served(e, torch.ones(8)), head(e, torch.ones(8)))
        got, want = served(e, torch.full((8,), 0.6), h, mask), head(e, torch.full((8,), 0.6), h, mask)
    assert not torch.equal(got, want), "the copy is float16-rounded: this test must see a difference to bound"
    assert torch.allclose(got, want, rtol=0, atol=2e-3 * want.abs().max().item())


def test_replica_loads_the_serving_copy_when_published_and_the_master_otherwise(tiny_llama_rm) -> None:
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

    store.publish(parent=None, weights=head_to_bytes(head), optim=None, meta={"config": config}, batch_ids=[])
    assert sync.load(0)
    master_loaded = model.current.head.attention.w_k.weight.clone()
    assert torch.equal(master_loaded, head.attention.w_k.weight), "no serving copy published: the master is loaded"

    meta = store.publish(
        parent=0,
        weights=head_to_bytes(head),
        optim=None,
        meta={"config": config},
        batch_ids=[],
        serving=serving_bytes(head),
    )
    assert meta["serving_bytes"] < meta["bytes"]
    assert sync.load(1)
    current: HeadVersion = model.current
    assert current.version == 1
    assert torch.equal(current.head.attention.w_k.weight, head.attention.w_k.weight.half().float())

    # A corrupted serving copy is refused like a corrupted master: the replica keeps its head.
    store.publish(
        parent=1,
        weights=head_to_bytes(head),
        optim=None,
        meta={"config": config},
        batch_ids=[],
        serving=b"not a safetensors blob",
    )
    store._versions[2][2]["serving_sha256"] = "0" * 64
    assert not sync.load(2)
    assert model.current.version == 1


def test_a_rollback_to_version_zero_scores_like_the_initial_head() -> None:
    """Version 0 is built in-process by every replica; its attention already sits on the float16 grid, so loading
    its serving copy from the store (after a rollback) changes no reward."""
    from r2m.service.initial import initial_head

    class _Backbone:
        rm_dim = 32
        score_weight = torch.randn(1, 32)
        score_bias = None

        def reference_rte_norm(self) -> float:
            return 137.0  # a decoder RM's scale: the scaled read-out's weights too sit on the float16 grid

    for init in ("scaled", "plain", "zero"):
        config = HeadConfig(rm_dim=32, policy_dim=P, attn_dim=64)
        head = initial_head(_Backbone(), config, seed=3, init=init)  # type: ignore[arg-type]
        loaded = head_from_bytes(serving_bytes(head), head.config)
        assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), loaded.state_dict().values()))
