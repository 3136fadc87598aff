"""Rewards from reward-token embeddings and a head: the function every path that scores ends in (a replica's
batches, the worker's recomputed rewards, a local-feedback client's rewards finished next to the policy), and the
aggregation of an ensemble's members. torch and the head's module only: importing it loads no model library.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .model import R2MHead

__all__ = ["AGGREGATIONS", "Scores", "aggregate", "pad_hidden", "score_rte"]


AGGREGATIONS = ("mean", "uwo", "min")


def aggregate(members: torch.Tensor, how: str, uwo_lambda: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """An ensemble's reward and uncertainty `(B,)` from its members' rewards `(B, N)`: `mean`, `uwo` (mean - lambda
    x the members' population variance) or `min`; the uncertainty is the members' population std."""
    var, mean = torch.var_mean(members, dim=1, correction=0)
    if how == "mean":
        rewards = mean
    elif how == "uwo":
        rewards = mean - uwo_lambda * var
    elif how == "min":
        rewards = members.min(dim=1).values
    else:
        raise ValueError(f"unknown aggregation {how!r}")
    return rewards, var.sqrt()


@dataclass(frozen=True)
class Scores:
    """One batch's rewards `(N,)`; for an ensemble also each item's uncertainty `(N,)` and the members' `(N, M)`."""

    rewards: torch.Tensor
    uncertainty: torch.Tensor | None = None
    members: torch.Tensor | None = None
    rte: torch.Tensor | None = None  # (N, D_rm) float32: the reward-token embeddings the rewards were computed from

    @classmethod
    def of(cls, out: torch.Tensor, aggregation: str, uwo_lambda: float, rte: torch.Tensor | None = None) -> Scores:
        """From `score_rte`'s finite output: `(N,)` rewards as they are; an ensemble's `(N, M)` aggregated."""
        if out.ndim == 1:
            return cls(out, rte=rte)
        rewards, std = aggregate(out, aggregation, uwo_lambda)
        return cls(rewards, std, out, rte)

    def lists(self) -> tuple[list[float], list[float] | None, list[list[float]] | None]:
        """Rewards, uncertainties and members as Python lists (on the host)."""
        return (
            self.rewards.tolist(),
            self.uncertainty.tolist() if self.uncertainty is not None else None,
            self.members.tolist() if self.members is not None else None,
        )


def score_rte(
    head: R2MHead,
    rte: torch.Tensor,
    hidden: Sequence[torch.Tensor | None],
    weights: Sequence[float],
    prefixes: Sequence[torch.Tensor | None] | None = None,
    readouts: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Rewards `(N,)` from RTEs `(N, D_rm)`; items with hidden states and w < 1 go through the feedback attention.

    `prefixes[i]`, when given and not None, is item i's shared prefix (see `PreparedItem`); items that share one
    pass the same tensor object, and it is read once for all of them. `readouts[i]`, when given and not None, is
    item i's read-out computed next to the policy `(D_rm,)`: mixed in as the attention's would be.
    """
    device = rte.device
    w = torch.tensor(weights, dtype=torch.float32, device=device)
    given = [a is not None and wi < 1.0 for a, wi in zip(readouts or [None] * len(hidden), weights)]
    extra: dict = {}
    if any(given):
        rows = [a for a, g in zip(readouts or (), given) if g and a is not None]
        extra = {"readout": torch.stack(rows).to(device), "with_readout": torch.tensor(given, device=device)}
    use = [h is not None and wi < 1.0 for h, wi in zip(hidden, weights)]
    if not any(use):
        return head(rte, w, **extra)
    selected = [h for h, u in zip(hidden, use) if u and h is not None]
    h_pad, mask = pad_hidden(selected, None, device)
    distinct: dict[int, int] = {}  # id(prefix tensor) -> its index in `shared`
    shared: list[torch.Tensor] = []
    index: list[int] = []
    for p, u in zip(prefixes or [None] * len(hidden), use):
        if not u:
            continue
        if p is None:
            index.append(-1)
            continue
        if id(p) not in distinct:
            distinct[id(p)] = len(shared)
            shared.append(p.to(device, non_blocking=True))
        index.append(distinct[id(p)])
    prefix_index = torch.tensor(index, dtype=torch.long, device=device) if shared else None
    sel = torch.tensor(use, device=device)
    return head(rte, w, h_pad, mask, with_feedback=sel, prefixes=shared, prefix_index=prefix_index, **extra)


def pad_hidden(
    hidden: Sequence[torch.Tensor], dtype: torch.dtype | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack `(T_i, D)` tensors into `(N, T_max, D)` zeros-padded, with a `(N, T_max)` mask of real rows.

    `dtype=None` stacks them in the dtype they share, as sent (bfloat16 stays bfloat16, half the bytes of a float32
    copy: where the CPU lacks native half matmuls the attention widens them a block of rows at a time, see
    `kernels.widen`); tensors of different dtypes, e.g. from two requests merged into one batch, are stacked in
    float32. `T_max` may be 0 when every item's rows are all in its shared prefix.
    """
    if dtype is None:
        dtypes = {h.dtype for h in hidden}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    T = max(h.shape[0] for h in hidden)
    D = hidden[0].shape[1]
    if all(h.shape[0] == T for h in hidden):  # nothing to pad: no zeros to write (one item: a view, no copy at all)
        rows = [h.to(device=device, dtype=dtype) for h in hidden]
        out = rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)
        return out, torch.ones((len(hidden), T), dtype=torch.bool, device=device)
    out = torch.zeros((len(hidden), T, D), dtype=dtype, device=device)
    mask = torch.zeros((len(hidden), T), dtype=torch.bool, device=device)
    for i, h in enumerate(hidden):
        out[i, : h.shape[0]] = h
        mask[i, : h.shape[0]] = True
    return out, mask
