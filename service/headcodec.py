"""The bytes of a head and of its optimizer: safetensors (tensors) + JSON metadata, never pickle.

A head version travels as two copies (docs/headstore.md has their sizes):
- the master (`head_to_bytes`): the trainable head's state dict in float32, what the worker trains from and what a
  rollback restores;
- the serving copy (`serving_bytes`): what a replica multiplies and nothing else, in half precision: the fused
  `M_h`, `N_h` where they are smaller than the four attention factors (`model.fuses`), else the factors, and the
  score layer phi in float32. A replica widens it to float32 as it loads it (`serving_from_bytes`) and never fuses.

The optimizer's tensors are safetensors too, its scalars and param groups JSON metadata.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .attention import ServingAttention, fuses, serving_shapes
from .model import HeadConfig, R2MHead, all_finite

__all__ = [
    "SERVING_DTYPE",
    "blob_sizes",
    "head_from_bytes",
    "head_to_bytes",
    "optimizer_from_bytes",
    "optimizer_to_bytes",
    "serving_bytes",
    "serving_from_bytes",
    "serving_head",
    "sha256",
]


# The serving copy's attention travels in float16: at a relative rounding error of ~5e-4 in each number (the fused
# products are rounded once, from float64). The score layer phi stays float32, so a row without feedback (w = 1)
# still gets the plain RM's reward bit for bit.
SERVING_DTYPE = torch.float16


def _header(blob: bytes) -> dict[str, Any]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n])


def _metadata(blob: bytes) -> dict[str, str]:
    return _header(blob).get("__metadata__") or {}


def _is_serving(blob: bytes) -> bool:
    """A serving copy names its attention tensors as `ServingAttention` holds them (`attention.m`, `attention.w_q`),
    a master as `nn.Linear` does (`attention.w_q.weight`). (One metadata entry per blob, the config: safetensors
    writes several in no fixed order, and the same head would not always give the same bytes.)"""
    names = _header(blob)
    return any(f"attention.{k}" in names for k in (*ServingAttention.FUSED, *ServingAttention.FACTORS))


def head_to_bytes(head: R2MHead) -> bytes:
    """The master: a trainable head's state dict as float32 safetensors, its config in the metadata."""
    if head.serves:
        raise ValueError("a serving head holds no master weights (the fused products cannot be factored back)")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
    return st_save(state, metadata={"config": json.dumps(head.config.to_dict())})


def head_from_bytes(blob: bytes, config: HeadConfig) -> R2MHead:
    """Rebuild a trainable float32 head from a master blob; raises ValueError when the blob does not fit `config`
    (another model or width) or is a serving copy."""
    if _is_serving(blob):
        raise ValueError("this is a serving copy, not a master: load it with serving_from_bytes")
    state = {k: v if v.dtype == torch.float32 else v.float() for k, v in st_load(blob).items()}
    with torch.device("meta"):  # no random init of weights that are overwritten at once (~100 ms at d = 2048)
        head = R2MHead(config)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise ValueError(f"head weights do not fit this server's head config {config}: {got} vs {expected}")
    head.load_state_dict(state, assign=True)
    return head


def _serving_state(head: R2MHead) -> dict[str, torch.Tensor]:
    """The serving copy's tensors: `attention.*` in `SERVING_DTYPE` (`FeedbackAttention.serving_tensors`, or what a
    serving head already holds), `score.*` in float32; on the CPU."""
    attention = head.attention
    if isinstance(attention, ServingAttention):
        parts = {k: v.detach().to("cpu", SERVING_DTYPE) for k, v in attention.named_buffers()}
    else:
        parts = attention.serving_tensors(SERVING_DTYPE)
    for name, v in parts.items():  # finite float32 weights can still round to an Inf in float16 (|x| > 65504)
        if not all_finite(v):
            raise ValueError(f"the serving copy's attention.{name} is not finite in {SERVING_DTYPE} (|x| > 65504)")
    state = {f"attention.{k}": v.contiguous() for k, v in parts.items()}
    score = head.score.state_dict()
    state |= {f"score.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in score.items()}
    return state


def _serving_from_state(state: dict[str, torch.Tensor], config: HeadConfig) -> R2MHead:
    """A serving head from the serving copy's tensors, the attention widened to float32; ValueError when they do not
    fit `config`."""
    attention = {k.removeprefix("attention."): v.float() for k, v in state.items() if k.startswith("attention.")}
    score = {k.removeprefix("score."): v.float() for k, v in state.items() if k.startswith("score.")}
    if len(attention) + len(score) != len(state):
        raise ValueError(f"unexpected tensors in a serving copy: {sorted(state)}")
    with torch.device("meta"):  # only the score layer is new here; its weights come from the copy
        widths = {k: getattr(config, k) for k in ("rm_dim", "policy_dim", "attn_dim", "n_heads")}
        head = R2MHead(config, ServingAttention(attention, **widths))
    expected = {k: tuple(v.shape) for k, v in head.score.state_dict().items()}
    if {k: tuple(v.shape) for k, v in score.items()} != expected:
        raise ValueError(f"score layer {sorted(score)} does not fit head config {config}: expected {expected}")
    head.score.load_state_dict(score, assign=True)
    return head


def serving_bytes(head: R2MHead) -> bytes:
    """The serving copy of a trainable or a serving head (module docstring): what replicas fetch on a swap."""
    return st_save(_serving_state(head), metadata={"config": json.dumps(head.config.to_dict())})


def serving_head(head: R2MHead) -> R2MHead:
    """`head` as replicas serve it: exactly what loading `serving_bytes(head)` gives, without the bytes."""
    return _serving_from_state(_serving_state(head), head.config)


def serving_from_bytes(blob: bytes, config: HeadConfig) -> R2MHead:
    """A serving head from a serving copy, or from a master (fused here: a publisher that made no serving copy);
    raises ValueError when the blob does not fit `config`."""
    if not _is_serving(blob):
        return serving_head(head_from_bytes(blob, config))
    try:
        return _serving_from_state(st_load(blob), config)
    except ValueError as exc:
        raise ValueError(f"head weights do not fit this server's head config {config}: {exc}") from None


def blob_sizes(config: HeadConfig) -> dict[str, int]:
    """The tensor bytes of a version's blobs, by arithmetic (docs/headstore.md): `weights` (the float32 master),
    `serving` (the serving copy) and `optimizer` (AdamW: two float32 moments per weight and a step per tensor). Each
    blob adds a safetensors header of a few hundred bytes to these."""
    rm, P, d, H, n = config.rm_dim, config.policy_dim, config.attn_dim, config.n_heads, config.members
    score = n * rm + (n if config.score_bias else 0)
    attention = 2 * d * (rm + P)
    shapes = serving_shapes(rm, P, d, H)
    serving = sum(int(torch.Size(s).numel()) for s in shapes.values())
    assert fuses(rm, P, d, H) == ("m" in shapes)
    tensors = 4 + (2 if config.score_bias else 1)  # the four factors and phi's weight (and bias)
    return {
        "weights": 4 * (attention + score),
        "serving": SERVING_DTYPE.itemsize * serving + 4 * score,
        "optimizer": 2 * 4 * (attention + score) + 4 * tensors,
    }


def optimizer_to_bytes(opt: torch.optim.Optimizer) -> bytes:
    """The optimizer state as safetensors (tensors) + JSON metadata (scalars and param groups); no pickle."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    return st_save(tensors, metadata=meta)


def optimizer_from_bytes(opt: torch.optim.Optimizer, blob: bytes) -> None:
    meta = _metadata(blob)
    state: dict[int, dict[str, Any]] = {}
    for key, value in st_load(blob).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in json.loads(meta.get("scalars", "{}")).items():
        state.setdefault(int(pid), {}).update(values)
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()
