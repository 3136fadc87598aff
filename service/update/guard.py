"""The head guard: before a candidate head is published, its rewards on a canary set of recently trained items are
compared with the plain reward model's (w = 1: the frozen backbone's own score layer) and with the served head's.

Three figures, each in units the plain RM sets, so that they mean the same on any backbone:
- mean shift: (mean candidate reward - mean plain reward) / std of the plain rewards;
- spread ratio: std of the candidate rewards / std of the plain rewards;
- rank agreement: Spearman's correlation of the candidate rewards with the plain ones.

A candidate whose |mean shift|, spread ratio (or its inverse) exceeds its bound, or whose rank agreement falls below
its floor (R2M_GUARD_*), and that is further out on that figure than the served head, is refused: it is never
published, the served head stays, and the batch goes the way of every failed update (retried, then a dead letter).
R2M re-fits the head on the policy's own samples, so its rewards should move away from the plain RM's, but by a
bounded amount: a head whose scale runs away (a too high learning rate drove one to +52 against a gold reward that
fell to -11) or whose order no longer resembles the RM's it started from is not aligning the RM, it is replacing it.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import torch

from ..config import ServiceSettings

__all__ = ["CanaryItem", "CanarySet", "GuardReport", "guard_report", "spearman"]


@dataclass(frozen=True)
class CanaryItem:
    """One trained item as the guard re-scores it: its RTE `(D_rm,)`, hidden states `(T, D_policy)` and omega."""

    rte: torch.Tensor
    hidden: torch.Tensor | None
    w: float

    @property
    def nbytes(self) -> int:
        h = self.hidden
        return self.rte.numel() * self.rte.element_size() + (h.numel() * h.element_size() if h is not None else 0)


class CanarySet:
    """A uniform reservoir sample of the items trained so far (Vitter's algorithm R), at most `size` items and
    `max_bytes` bytes (hidden states dominate: a 700 x 4096 bf16 response is 5.7 MB)."""

    def __init__(self, size: int, max_bytes: int, seed: int = 0) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.items: list[CanaryItem] = []
        self.seen = 0
        self._bytes = 0
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def offer(self, items: list[CanaryItem]) -> None:
        for item in items:
            self.seen += 1
            if item.nbytes > self.max_bytes:
                continue
            if len(self.items) < self.size:
                self.items.append(item)
                self._bytes += item.nbytes
            else:
                j = self._rng.randrange(self.seen)
                if j >= self.size:
                    continue
                self._bytes += item.nbytes - self.items[j].nbytes
                self.items[j] = item
            while self._bytes > self.max_bytes and self.items:  # keep the byte bound: drop random members
                gone = self.items.pop(self._rng.randrange(len(self.items)))
                self._bytes -= gone.nbytes


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (ties broken by position: rewards are continuous)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else 1.0


@dataclass(frozen=True)
class GuardReport:
    items: int
    mean_shift: float
    spread_ratio: float
    rank_agreement: float
    served_mean_shift: float
    served_spread_ratio: float
    served_rank_agreement: float
    problem: str | None = None  # a short reason label: guard_scale, guard_spread, guard_rank, non_finite_reward
    detail: str = ""

    def figures(self) -> dict[str, float | int]:
        d = asdict(self)
        d.pop("problem")
        d.pop("detail")
        return d


def _figures(rewards: torch.Tensor, plain: torch.Tensor) -> tuple[float, float, float]:
    std = float(plain.std(correction=0))
    if std < 1e-8:  # the plain RM cannot tell the canary apart: scale figures are undefined
        return 0.0, 1.0, 1.0
    shift = float(rewards.mean() - plain.mean()) / std
    return shift, float(rewards.std(correction=0)) / std, spearman(rewards, plain)


def guard_report(
    candidate: torch.Tensor, served: torch.Tensor, plain: torch.Tensor, settings: ServiceSettings
) -> GuardReport:
    """The figures of the candidate and the served head's rewards against the plain RM's on the same items, and the
    first bound the candidate breaks (None: it may be published)."""
    n = int(plain.numel())
    s_shift, s_ratio, s_rank = _figures(served, plain)
    if not bool(torch.isfinite(candidate).all()):
        nan = float("nan")
        return GuardReport(n, nan, nan, nan, s_shift, s_ratio, s_rank, "non_finite_reward", "NaN or Inf on the canary")
    shift, ratio, rank = _figures(candidate, plain)
    report = GuardReport(n, shift, ratio, rank, s_shift, s_ratio, s_rank)
    if n < settings.guard_min_items:
        return report
    s = settings
    was = f"(served head: {s_shift:+.2f}, {s_ratio:.2f}, {s_rank:.2f})"
    # A bound is broken only by a candidate that is also further out than the served head: one that moves back
    # towards the bounds (after the served head came to sit outside them on a grown canary) is let through.
    spread_out = max(ratio, 1 / ratio) if ratio > 0 else math.inf
    served_out = max(s_ratio, 1 / s_ratio) if s_ratio > 0 else math.inf
    if abs(shift) > s.guard_max_mean_shift and abs(shift) > abs(s_shift):
        problem, detail = "guard_scale", f"mean shift {shift:+.2f} plain-RM stds exceeds R2M_GUARD_MAX_MEAN_SHIFT="
        detail += f"{s.guard_max_mean_shift:g} {was}"
    elif spread_out > s.guard_max_spread_ratio and spread_out > served_out:
        problem, detail = "guard_spread", f"spread ratio {ratio:.2f} is outside [1/R2M_GUARD_MAX_SPREAD_RATIO, "
        detail += f"R2M_GUARD_MAX_SPREAD_RATIO={s.guard_max_spread_ratio:g}] {was}"
    elif rank < s.guard_min_rank_agreement and rank < s_rank:
        problem, detail = "guard_rank", f"rank agreement {rank:.2f} with the plain RM is below "
        detail += f"R2M_GUARD_MIN_RANK_AGREEMENT={s.guard_min_rank_agreement:g} {was}"
    else:
        return report
    return GuardReport(n, shift, ratio, rank, s_shift, s_ratio, s_rank, problem, f"{detail}; on {n} canary items")
