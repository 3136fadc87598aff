"""The trainable part of R2M: feedback cross-attention, the omega(t) schedule, the score head, the GREBT loss.

Notation follows docs/method.md: `e` is the reward-token embedding (RTE) from the frozen backbone, `(B, D_rm)`; `h`
are the policy's last-layer hidden states over query + response, `(B, T, D_policy)` padded, with `mask` `(B, T)` True
on real tokens. The reward is `phi(w * e + (1 - w) * a)` with `a` the cross-attention read-out of `h`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import FeedbackAttention, ServingAttention, fuses, serving_shapes

__all__ = [
    "FeedbackAttention",
    "GREBTLoss",
    "HeadConfig",
    "R2MHead",
    "ServingAttention",
    "all_finite",
    "bt_loss",
    "fuses",
    "grebt_loss",
    "group_reward_entropy",
    "omega",
    "serving_shapes",
]


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`. Its min and max are both finite exactly then (both propagate NaN): one pass and no
    tensor of `t`'s size, where `torch.isfinite(t).all()` builds a bool copy of it."""
    return not t.numel() or bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def omega(step: int, total_steps: int, floor: float) -> float:
    """Time-step weight w(t) = max(0.5 cos(pi t / T) + 0.5, floor) (paper Eq. 4): 1 at t = 0, `floor` late."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"step must be in [0, total_steps={total_steps}], got {step}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"the omega floor must be in [0, 1], got {floor}")
    return max(0.5 * math.cos(math.pi * step / total_steps) + 0.5, floor)


@dataclass(frozen=True)
class HeadConfig:
    """Everything needed to rebuild an `R2MHead`; saved beside its weights so loading never guesses."""

    rm_dim: int
    policy_dim: int
    attn_dim: int = 2048
    n_heads: int = 1
    score_bias: bool = False
    members: int = 1  # score layers of an ensemble on one backbone and one feedback attention (R2M_ENSEMBLE)

    def __post_init__(self) -> None:
        for name in ("rm_dim", "policy_dim", "attn_dim", "n_heads", "members"):
            if getattr(self, name) < 1:
                raise ValueError(f"HeadConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.attn_dim % self.n_heads:
            raise ValueError(f"attn_dim={self.attn_dim} must be divisible by n_heads={self.n_heads}")

    def to_dict(self) -> dict[str, int | bool]:
        """The fields; `members` only for an ensemble, so that a single head's config reads as it always has (a
        replica checks a published head's config against its own)."""
        d = asdict(self)
        if self.members == 1:
            del d["members"]
        return d


class R2MHead(nn.Module):
    """The part R2M trains: the feedback attention and the score layer phi (D_rm -> 1), or for an ensemble the
    score layers of its members (D_rm -> N) on the one shared attention read-out.

    With `attention` given (a `ServingAttention`), the head as a replica serves it (`serves`): the same rewards
    from what the serving copy holds; it is not trained."""

    def __init__(self, config: HeadConfig, attention: ServingAttention | None = None) -> None:
        super().__init__()
        self.config = config
        self.attention: FeedbackAttention | ServingAttention = (
            FeedbackAttention(config.rm_dim, config.policy_dim, config.attn_dim, config.n_heads)
            if attention is None
            else attention
        )
        self.score = nn.Linear(config.rm_dim, config.members, bias=config.score_bias)

    @property
    def serves(self) -> bool:
        """True for the serving form (`ServingAttention`), False for the trainable one."""
        return isinstance(self.attention, ServingAttention)

    def forward(
        self,
        e: torch.Tensor,
        w: torch.Tensor,
        h: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        with_feedback: torch.Tensor | None = None,
        prefixes: Sequence[torch.Tensor] = (),
        prefix_index: torch.Tensor | None = None,
        readout: torch.Tensor | None = None,
        with_readout: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards `(B,)` for RTEs `e` `(B, D_rm)` and per-item weights `w` `(B,)`; `(B, N)` for N members.

        `h` `(N, T, D_policy)` and `mask` `(N, T)` hold the hidden states of the N items selected by the boolean
        `with_feedback` `(B,)` (all items when it is None), in any float dtype; `prefixes` and `prefix_index` `(N,)`
        give those items' shared leading rows (see `FeedbackAttention.forward`). `readout` `(M, D_rm)` holds read-outs
        `a` already computed next to the policy for the M items selected by `with_readout` (docs/api.md, local
        feedback), which then skip the attention. Items without feedback, or with `w == 1`, get exactly `phi(e)`:
        the plain reward model's reward.
        """
        e = e.to(self.score.weight.dtype)
        f = e
        for rows, sel in ((h, with_feedback), (readout, with_readout)):
            if rows is None:
                continue
            sel = torch.ones(e.shape[0], dtype=torch.bool, device=e.device) if sel is None else sel
            assert int(sel.sum()) == rows.shape[0], (int(sel.sum()), rows.shape)
            e_sel, w_sel = e[sel], w[sel].to(e.dtype)[:, None]
            if rows is h:
                assert mask is not None, "hidden states need a mask"
                a = self.attention(e_sel, h, mask, prefixes, prefix_index)  # (N, D_rm)
            else:
                a = rows.to(e.dtype)
            f = e.clone() if f is e else f
            # w == 1 must give phi(e) bit for bit, so those rows keep e untouched.
            f[sel] = torch.where(w_sel == 1.0, e_sel, w_sel * e_sel + (1.0 - w_sel) * a)
        out = self.score(f)  # (B, N)
        return out.squeeze(-1) if self.config.members == 1 else out

    def is_finite(self) -> bool:
        """No NaN or Inf in any weight (a replica checks every head it swaps in, the worker every update)."""
        return all(all_finite(p) for p in [*self.parameters(), *self.buffers()])


@dataclass(frozen=True)
class GREBTLoss:
    total: torch.Tensor
    bt: torch.Tensor
    gre: torch.Tensor


def _mean(terms: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return terms.mean()
    return (terms * weights).sum() / weights.sum().clamp(min=1e-12)


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry loss -log sigmoid(r_w - r_l), averaged over pairs (weighted by `weights` when given)."""
    return _mean(-F.logsigmoid(chosen - rejected), weights)


def group_reward_entropy(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Entropy of softmax of the standardised rewards (population std) of each group: `(G, K)` -> `(G,)`."""
    z = (rewards - rewards.mean(dim=-1, keepdim=True)) / (rewards.std(dim=-1, correction=0, keepdim=True) + eps)
    logp = z.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def grebt_loss(
    groups: torch.Tensor | Sequence[torch.Tensor],
    alpha: float = 0.3,
    rank_by: torch.Tensor | Sequence[torch.Tensor] | None = None,
    eps: float = 1e-6,
    weights: torch.Tensor | None = None,
) -> GREBTLoss:
    """L_GREBT = (1 - alpha) L_BT + alpha L_GRE, averaged over groups (docs/method.md, "Updating").

    Args:
        groups: recomputed rewards per group, a `(G, K)` tensor or G tensors of shape `(K_i,)`, K_i >= 2.
        alpha: weight of the group reward entropy term (paper: 0.3).
        rank_by: rewards that choose each group's best and worst response; defaults to `groups` itself (the
            recomputed rewards). Pass the scoring-time rewards to rank by those instead.
        eps: added to the standard deviation of each group.
        weights: `(G,)` weights of the groups in the averages (an ensemble member's bootstrap resample); None: 1.

    Returns:
        `GREBTLoss(total, bt, gre)`, scalars; gradients flow into `groups`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rows = list(groups.unbind(0)) if isinstance(groups, torch.Tensor) else list(groups)
    ranks = rows if rank_by is None else list(rank_by)
    if not rows:
        raise ValueError("grebt_loss needs at least one group")
    if len(ranks) != len(rows):
        raise ValueError(f"rank_by has {len(ranks)} groups, rewards have {len(rows)}")
    bt_terms, gre_terms = [], []
    for r, rank in zip(rows, ranks):
        if r.ndim != 1 or r.numel() < 2 or rank.shape != r.shape:
            raise ValueError(f"each group needs >= 2 rewards and a matching ranking, got {tuple(r.shape)}")
        best, worst = int(rank.argmax()), int(rank.argmin())
        bt_terms.append(-F.logsigmoid(r[best] - r[worst]))
        gre_terms.append(group_reward_entropy(r[None, :], eps)[0])
    bt = _mean(torch.stack(bt_terms), weights)
    gre = _mean(torch.stack(gre_terms), weights)
    return GREBTLoss(total=(1.0 - alpha) * bt + alpha * gre, bt=bt, gre=gre)
