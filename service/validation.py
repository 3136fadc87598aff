"""Turning validated wire requests into model inputs, with the checks whose limits come from the settings."""

from __future__ import annotations

import torch

from r2m.client._wire import WireTensor

from .backbone import Encoded
from .config import ServiceSettings
from .engine import PreparedItem, R2MModel
from .errors import BadInput
from .model import omega
from .schemas import ScoreRequest

__all__ = ["hidden_to_torch", "prepare_score_items", "encode_checked"]


def hidden_to_torch(t: WireTensor, path: str, settings: ServiceSettings) -> torch.Tensor:
    """A `(T, policy_dim)` tensor of the wire dtype (one copy), or BadInput naming `path` and the limit."""
    if len(t.shape) != 2:
        raise BadInput(f"{path}: expected shape (T, {settings.policy_dim}), got {list(t.shape)}")
    rows, width = t.shape
    if width != settings.policy_dim:
        raise BadInput(
            f"{path}: hidden width {width} does not match the server's policy width R2M_POLICY_DIM="
            f"{settings.policy_dim}"
        )
    if rows < 1:
        raise BadInput(f"{path}: needs at least one hidden-state row, got 0 (omit the field for no feedback)")
    if rows > settings.max_hidden_tokens:
        raise BadInput(f"{path}: {rows} hidden-state rows exceed R2M_MAX_HIDDEN_TOKENS={settings.max_hidden_tokens}")
    h = t.to_torch()
    if not bool(torch.isfinite(h).all()):
        bad = int((~torch.isfinite(h)).any(dim=1).nonzero()[0, 0])
        raise BadInput(f"{path}: non-finite value (NaN or Inf) in row {bad}; hidden states must be finite")
    return h


def encode_checked(model: R2MModel, prompt: str, response: str, path: str, max_tokens: int) -> Encoded:
    encoded = model.backbone.encode(prompt, response)
    if len(encoded) > max_tokens:
        raise BadInput(
            f"{path}: prompt + response is {len(encoded)} reward-model tokens, over the limit of {max_tokens} "
            "(R2M_MAX_TOKENS, capped by the model's context)"
        )
    return encoded


def max_tokens_of(model: R2MModel, settings: ServiceSettings) -> int:
    cap = model.backbone.max_tokens
    return min(cap, settings.max_tokens) if settings.max_tokens else cap


def prepare_score_items(req: ScoreRequest, model: R2MModel, settings: ServiceSettings) -> list[PreparedItem]:
    """Tokenize and check every item of a /score request; raises BadInput on the first bad one."""
    if len(req.items) > settings.max_items_per_request:
        raise BadInput(
            f"items: {len(req.items)} items exceed R2M_MAX_ITEMS_PER_REQUEST={settings.max_items_per_request}",
            status_code=413,
        )
    w = omega(req.step, req.total_steps, settings.omega_floor)
    limit = max_tokens_of(model, settings)
    out = []
    for i, item in enumerate(req.items):
        hidden = None
        if item.policy_hidden is not None:
            hidden = hidden_to_torch(item.policy_hidden, f"items[{i}].policy_hidden", settings)
        encoded = encode_checked(model, item.prompt, item.response, f"items[{i}]", limit)
        out.append(PreparedItem(encoded=encoded, hidden=hidden, w=w if hidden is not None else 1.0))
    return out
