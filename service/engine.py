"""The R2M reward model as served: the frozen backbone plus the current, swappable head version."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .backbone import Backbone, Encoded
from .model import HeadConfig, R2MHead

__all__ = ["HeadVersion", "PreparedItem", "R2MModel", "initial_head"]


@dataclass(frozen=True)
class PreparedItem:
    """One validated /score item: tokens for the backbone, optional hidden states `(T, D_policy)`, its omega."""

    encoded: Encoded
    hidden: torch.Tensor | None
    w: float


@dataclass(frozen=True)
class HeadVersion:
    """An immutable head snapshot. Replacing the reference is the swap; a batch holds one snapshot throughout."""

    version: int
    head: R2MHead
    meta: dict = field(default_factory=dict)


def initial_head(backbone: Backbone, config: HeadConfig, seed: int = 0) -> R2MHead:
    """Version 0: seeded random feedback attention (same on every replica) and the RM's own score layer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = R2MHead(config)
    with torch.no_grad():
        head.score.weight.copy_(backbone.score_weight)
        if head.score.bias is not None:
            head.score.bias.copy_(backbone.score_bias if backbone.score_bias is not None else 0.0)
    return head


class R2MModel:
    def __init__(self, backbone: Backbone, head_config: HeadConfig, seed: int = 0) -> None:
        if head_config.rm_dim != backbone.rm_dim:
            raise ValueError(f"head rm_dim={head_config.rm_dim} but the backbone's width is {backbone.rm_dim}")
        self.backbone = backbone
        self.head_config = head_config
        head = initial_head(backbone, head_config, seed).to(backbone.device).eval().requires_grad_(False)
        self._current = HeadVersion(version=0, head=head, meta={"created": time.time()})
        self._swap_lock = threading.Lock()

    @property
    def current(self) -> HeadVersion:
        return self._current

    def swap(self, new: HeadVersion) -> HeadVersion:
        """Install `new` as the head for every batch that starts after this call; returns the old one."""
        new.head.to(self.backbone.device).eval().requires_grad_(False)
        with self._swap_lock:
            old, self._current = self._current, new
        return old

    @torch.inference_mode()
    def score(
        self, items: Sequence[PreparedItem], head: HeadVersion | None = None, max_batch_tokens: int = 16384
    ) -> torch.Tensor:
        """Rewards `(N,)` float32 for `items`, all scored by one head snapshot."""
        head = head or self._current
        rte = self.embed([it.encoded for it in items], max_batch_tokens)  # (N, D_rm)
        return score_rte(head.head, rte, [it.hidden for it in items], [it.w for it in items])

    def embed(self, encoded: Sequence[Encoded], max_batch_tokens: int = 16384) -> torch.Tensor:
        """RTEs `(N, D_rm)` float32, run through the backbone in length-sorted chunks of <= max_batch_tokens."""
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = torch.empty((len(encoded), self.backbone.rm_dim), dtype=torch.float32, device=self.backbone.device)
        start = 0
        while start < len(order):
            end = start + 1
            # Sorted ascending, so the chunk's padded size is (count) x (length of its last item).
            while end < len(order) and (end - start + 1) * len(encoded[order[end]]) <= max_batch_tokens:
                end += 1
            idx = order[start:end]
            out[idx] = self.backbone.embed([encoded[i] for i in idx])
            start = end
        return out


def score_rte(
    head: R2MHead, rte: torch.Tensor, hidden: Sequence[torch.Tensor | None], weights: Sequence[float]
) -> torch.Tensor:
    """Rewards `(N,)` from RTEs `(N, D_rm)`; items with hidden states and w < 1 go through the feedback attention."""
    device = rte.device
    w = torch.tensor(weights, dtype=torch.float32, device=device)
    use = [h is not None and wi < 1.0 for h, wi in zip(hidden, weights)]
    if not any(use):
        return head(rte, w)
    selected = [h for h, u in zip(hidden, use) if u]
    h_pad, mask = pad_hidden(selected, head.attention.w_k.weight.dtype, device)
    return head(rte, w, h_pad, mask, with_feedback=torch.tensor(use, device=device))


def pad_hidden(
    hidden: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack `(T_i, D)` tensors into `(N, T_max, D)` zeros-padded, with a `(N, T_max)` mask of real rows."""
    T = max(h.shape[0] for h in hidden)
    D = hidden[0].shape[1]
    out = torch.zeros((len(hidden), T, D), dtype=dtype, device=device)
    mask = torch.zeros((len(hidden), T), dtype=torch.bool, device=device)
    for i, h in enumerate(hidden):
        out[i, : h.shape[0]] = h
        mask[i, : h.shape[0]] = True
    return out, mask
