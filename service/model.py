"""The trainable part of R2M: feedback cross-attention, the omega(t) schedule, the score head, the GREBT loss.

Notation follows R2M.md: `e` is the reward-token embedding (RTE) from the frozen backbone, `(B, D_rm)`; `h` are the
policy's last-layer hidden states over query + response, `(B, T, D_policy)` padded, with `mask` `(B, T)` True on
real tokens. The reward is `phi(w * e + (1 - w) * a)` with `a` the cross-attention read-out of `h`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FeedbackAttention",
    "GREBTLoss",
    "HeadConfig",
    "R2MHead",
    "bt_loss",
    "grebt_loss",
    "group_reward_entropy",
    "omega",
]


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

    def __post_init__(self) -> None:
        for name in ("rm_dim", "policy_dim", "attn_dim", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"HeadConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.attn_dim % self.n_heads:
            raise ValueError(f"attn_dim={self.attn_dim} must be divisible by n_heads={self.n_heads}")

    def to_dict(self) -> dict[str, int | bool]:
        return asdict(self)


class FeedbackAttention(nn.Module):
    """Sequence-to-token cross-attention (paper Eq. 3): the RTE queries the policy's hidden states.

    The query is a single token, so `softmax(q (h W_k)^T) (h W_v) W_o` is computed as
    `softmax((q W_k^T) h^T) h W_v W_o` per head: `W_k` folds into the query and `W_v` applies after pooling, so `h`
    is read twice and never projected (T x D_policy instead of T x D_policy x d multiply-adds).
    """

    def __init__(self, rm_dim: int, policy_dim: int, attn_dim: int = 2048, n_heads: int = 1) -> None:
        super().__init__()
        assert attn_dim % n_heads == 0, (attn_dim, n_heads)
        self.n_heads = n_heads
        self.head_dim = attn_dim // n_heads
        self.policy_dim = policy_dim
        self.w_q = nn.Linear(rm_dim, attn_dim, bias=False)
        self.w_k = nn.Linear(policy_dim, attn_dim, bias=False)
        self.w_v = nn.Linear(policy_dim, attn_dim, bias=False)
        self.w_o = nn.Linear(attn_dim, rm_dim, bias=False)

    def forward(self, e: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, P = h.shape
        H, dh = self.n_heads, self.head_dim
        assert e.shape[0] == B and mask.shape == (B, T) and self.policy_dim == P, (
            e.shape,
            h.shape,
            mask.shape,
        )
        assert bool(mask.any(dim=1).all()), "every item needs at least one unmasked hidden state"
        h = h.to(self.w_k.weight.dtype)
        q = self.w_q(e).view(B, H, dh)  # (B, H, dh)
        q_k = torch.einsum("bhe,hep->bhp", q, self.w_k.weight.view(H, dh, P)) / math.sqrt(dh)  # (B, H, P)
        scores = torch.einsum("btp,bhp->bht", h, q_k)  # (B, H, T)
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        probs = scores.softmax(dim=-1)  # (B, H, T)
        pooled = torch.einsum("bht,btp->bhp", probs, h)  # (B, H, P)
        v = torch.einsum("bhp,hep->bhe", pooled, self.w_v.weight.view(H, dh, P))  # (B, H, dh)
        return self.w_o(v.reshape(B, H * dh))  # (B, D_rm)

    def forward_reference(self, e: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The textbook form (project keys and values, then attend); slow, for tests."""
        B, T, _ = h.shape
        H, dh = self.n_heads, self.head_dim
        h = h.to(self.w_k.weight.dtype)
        q = self.w_q(e).view(B, H, 1, dh)
        k = self.w_k(h).view(B, T, H, dh).transpose(1, 2)  # (B, H, T, dh)
        v = self.w_v(h).view(B, T, H, dh).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh)  # (B, H, 1, T)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = scores.softmax(dim=-1) @ v  # (B, H, 1, dh)
        return self.w_o(out.reshape(B, H * dh))


class R2MHead(nn.Module):
    """The part R2M trains: the feedback attention and the score layer phi (D_rm -> 1)."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.attention = FeedbackAttention(config.rm_dim, config.policy_dim, config.attn_dim, config.n_heads)
        self.score = nn.Linear(config.rm_dim, 1, bias=config.score_bias)

    def forward(
        self,
        e: torch.Tensor,
        w: torch.Tensor,
        h: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        with_feedback: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards `(B,)` for RTEs `e` `(B, D_rm)` and per-item weights `w` `(B,)`.

        `h` `(N, T, D_policy)` and `mask` `(N, T)` hold the hidden states of the N items selected by the boolean
        `with_feedback` `(B,)` (all items when it is None). Items without feedback, or with `w == 1`, get exactly
        `phi(e)`: the plain reward model's reward.
        """
        e = e.to(self.score.weight.dtype)
        f = e
        if h is not None:
            assert mask is not None, "hidden states need a mask"
            sel = torch.ones(e.shape[0], dtype=torch.bool, device=e.device) if with_feedback is None else with_feedback
            assert int(sel.sum()) == h.shape[0], (int(sel.sum()), h.shape)
            e_sel, w_sel = e[sel], w[sel].to(e.dtype)[:, None]
            a = self.attention(e_sel, h, mask)  # (N, D_rm)
            f = e.clone()
            # w == 1 must give phi(e) bit for bit, so those rows keep e untouched.
            f[sel] = torch.where(w_sel == 1.0, e_sel, w_sel * e_sel + (1.0 - w_sel) * a)
        return self.score(f).squeeze(-1)  # (B,)


@dataclass(frozen=True)
class GREBTLoss:
    total: torch.Tensor
    bt: torch.Tensor
    gre: torch.Tensor


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss -log sigmoid(r_w - r_l), averaged over pairs."""
    return -F.logsigmoid(chosen - rejected).mean()


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
) -> GREBTLoss:
    """L_GREBT = (1 - alpha) L_BT + alpha L_GRE, averaged over groups (R2M.md, "Updating").

    Args:
        groups: recomputed rewards per group, a `(G, K)` tensor or G tensors of shape `(K_i,)`, K_i >= 2.
        alpha: weight of the group reward entropy term (paper: 0.3).
        rank_by: rewards that choose each group's best and worst response; defaults to `groups` itself (the
            recomputed rewards). Pass the scoring-time rewards to rank by those instead.
        eps: added to the standard deviation of each group.

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
    bt = torch.stack(bt_terms).mean()
    gre = torch.stack(gre_terms).mean()
    return GREBTLoss(total=(1.0 - alpha) * bt + alpha * gre, bt=bt, gre=gre)
