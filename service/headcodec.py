"""The bytes of a head and of its optimizer: safetensors (tensors) + JSON metadata, never pickle.

A head travels as its state dict; `serving_bytes` is the copy replicas fetch on a swap, with the attention
matrices in float16. The optimizer's tensors are safetensors too, its scalars and param groups JSON metadata.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .model import HeadConfig, R2MHead

__all__ = [
    "SERVING_DTYPE",
    "head_from_bytes",
    "head_to_bytes",
    "optimizer_from_bytes",
    "optimizer_to_bytes",
    "serving_bytes",
    "sha256",
]


# The attention matrices replicas serve travel in float16: half of the swap's fetch, hash and load time (a 40 MB
# head at d = 2048 becomes 20 MB), at a relative rounding error of ~5e-4 in weights of magnitude ~1/sqrt(d). The score
# layer phi stays float32, so a row without feedback (w = 1) still gets the plain RM's reward bit for bit.
SERVING_DTYPE = torch.float16


def head_to_bytes(head: R2MHead, attention_dtype: torch.dtype = torch.float32) -> bytes:
    """The head's state dict as safetensors; the attention matrices in `attention_dtype`, phi always float32."""
    state = {
        k: v.detach().to(attention_dtype if k.startswith("attention.") else torch.float32).cpu().contiguous()
        for k, v in head.state_dict().items()
    }
    return st_save(state, metadata={"config": json.dumps(head.config.to_dict())})


def serving_bytes(head: R2MHead) -> bytes:
    """The copy replicas fetch on a swap (`SERVING_DTYPE` attention): see `head_to_bytes`."""
    return head_to_bytes(head, SERVING_DTYPE)


def head_from_bytes(blob: bytes, config: HeadConfig) -> R2MHead:
    """Rebuild a float32 head from a master or serving blob; raises ValueError when the blob does not fit `config`
    (another model or width)."""
    state = {k: v if v.dtype == torch.float32 else v.float() for k, v in st_load(blob).items()}
    with torch.device("meta"):  # no random init of weights that are overwritten at once (~100 ms at d = 2048)
        head = R2MHead(config)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise ValueError(f"head weights do not fit this server's head config {config}: {got} vs {expected}")
    head.load_state_dict(state, assign=True)
    return head


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


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]).get("__metadata__") or {}


def optimizer_from_bytes(opt: torch.optim.Optimizer, blob: bytes) -> None:
    meta = _safetensors_metadata(blob)
    state: dict[int, dict[str, Any]] = {}
    for key, value in st_load(blob).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in json.loads(meta.get("scalars", "{}")).items():
        state.setdefault(int(pid), {}).update(values)
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()
