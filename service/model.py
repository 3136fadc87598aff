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

from .kernels import widen
from .kernels.precision import compute_dtype

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


class FeedbackAttention(nn.Module):
    """Sequence-to-token cross-attention (paper Eq. 3): the RTE queries the policy's hidden states.

    The query is a single token, so `softmax(q (h W_k)^T) (h W_v) W_o` is computed as
    `softmax((q W_k^T) h^T) h W_v W_o` per head: `W_k` folds into the query and `W_v` applies after pooling, so `h`
    is read twice and never projected (T x D_policy instead of T x D_policy x d multiply-adds).

    `h` is read in its compute dtype (`precision.compute_dtype`): bfloat16/float16 as it came off the wire where
    the device multiplies it natively (CUDA, a CPU with AVX512-BF16/AMX), else widened to float32 a block of rows at
    a time (a CPU without those runs half-precision GEMMs several times slower than float32 ones; `kernels.widen`
    says why not in one copy), each block read by the scores and the pooling right after its widening, by the thread
    that widened it (`kernels.widen.attend_blocks`). The folded query is cast to that dtype for the scores `h u`, the
    softmax runs in float32 on the small `(B, H, T)` scores, the pooling `p h` runs in that dtype again, and the small
    pooled vectors go back to float32 for `W_v` and `W_o`.

    A sequence may also be split into a shared prefix and its own rows (docs/api.md, prompt-prefix sharing): item
    `b`'s hidden states are `cat(prefixes[prefix_index[b]], h[b][mask[b]])`. The scores and the pooling over a
    prefix are one matmul for all the items that share it (`P @ U`, `U` their folded queries), and one softmax
    runs over both segments, so the result equals the concatenated form without ever building it.
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

    def fold_query(self, e: torch.Tensor) -> torch.Tensor:
        """The query folded through `W_k` and scaled: `(B, D_rm)` -> `(B, H, D_policy)`, in the weights' dtype."""
        H, dh, P = self.n_heads, self.head_dim, self.policy_dim
        q = self.w_q(e.to(self.w_q.weight.dtype)).view(-1, H, dh)  # (B, H, dh)
        return torch.einsum("bhe,hep->bhp", q, self.w_k.weight.view(H, dh, P)) / math.sqrt(dh)

    def forward(
        self,
        e: torch.Tensor,
        h: torch.Tensor,
        mask: torch.Tensor,
        prefixes: Sequence[torch.Tensor] = (),
        prefix_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Read-outs `(B, D_rm)` in the weights' dtype.

        Args:
            e: RTEs `(B, D_rm)`.
            h: each item's own hidden-state rows, `(B, T, D_policy)` padded, any float dtype (read in its compute
                dtype).
            mask: `(B, T)`, True on real rows.
            prefixes: shared leading rows, each `(T_j, D_policy)` in any float dtype.
            prefix_index: `(B,)` long, the prefix item b continues, -1 for none (None: no item has one).
        """
        B, T, P = h.shape
        H = self.n_heads
        assert e.shape[0] == B and mask.shape == (B, T) and self.policy_dim == P, (e.shape, h.shape, mask.shape)
        if prefix_index is None or not prefixes:
            prefixes, prefix_index = (), None
        if torch.is_grad_enabled():
            # Under autograd (the worker's update) both reads keep what they read for the backward pass: one widened
            # copy shared by the scores and the pooling costs less memory than blocks kept by each (`kernels.widen`).
            h = h.to(compute_dtype(h.dtype, h.device))
            prefixes = [p.to(compute_dtype(p.dtype, p.device)) for p in prefixes]
        has_rows = mask.any(dim=1) if prefix_index is None else mask.any(dim=1) | (prefix_index >= 0)
        assert bool(has_rows.all()), "every item needs at least one unmasked hidden state"
        # Scores, softmax and pooled sums in float32 at least, also for a half-precision (serving) copy of the head.
        fused = self.fused() if not (self.training or torch.is_grad_enabled()) else None
        u = self.fold_query(e) if fused is None else torch.einsum("br,hrp->bhp", e.to(fused[0].dtype), fused[0])
        u = u.to(torch.promote_types(u.dtype, torch.float32))  # (B, H, P)
        if prefix_index is None and widen.widens(h):
            pooled = widen.attend_blocks(h, u, mask)  # (B, H, P): each block widened once, read by both matmuls
        else:
            pooled = self._attend_two_passes(h, u, mask, prefixes, prefix_index)
        if fused is not None:
            return torch.einsum("bhp,hpr->br", pooled.to(fused[1].dtype), fused[1])  # (B, D_rm)
        v = torch.einsum("bhp,hep->bhe", pooled.to(self.w_v.weight.dtype), self.w_v.weight.view(H, self.head_dim, P))
        return self.w_o(v.reshape(B, H * self.head_dim))  # (B, D_rm)

    @staticmethod
    def _attend_two_passes(
        h: torch.Tensor,
        u: torch.Tensor,
        mask: torch.Tensor,
        prefixes: Sequence[torch.Tensor],
        prefix_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """`softmax(u h^T) h` `(B, H, P)` as scores over every row, then the pooling (`widen.scores`, `widen.pool`),
        over the items' shared prefixes too where `prefix_index` names them."""
        B, H = u.shape[:2]
        scores = widen.scores(h, u).masked_fill(~mask[:, None, :], float("-inf"))  # (B, H, T), u's dtype
        if prefix_index is None:
            return widen.pool(scores.softmax(dim=-1), h)  # (B, H, P)
        assert prefix_index.shape == (B,), prefix_index.shape
        groups = [(p, (prefix_index == j).nonzero().squeeze(1)) for j, p in enumerate(prefixes)]
        groups = [(p, idx) for p, idx in groups if idx.numel()]
        Tp = max(p.shape[0] for p, _ in groups)
        front = scores.new_full((B, H, Tp), float("-inf"))  # (B, H, Tp): scores over each item's prefix
        for p, idx in groups:
            s = widen.scores_shared(p, u[idx])  # (n, H, T_j): one matmul for the n items sharing p
            front = front.index_put((idx,), F.pad(s, (0, Tp - p.shape[0]), value=float("-inf")))
        probs = torch.cat([front, scores], dim=-1).softmax(dim=-1)  # one softmax over prefix + own rows
        pooled = widen.pool(probs[..., Tp:], h)
        for p, idx in groups:
            pooled = pooled.index_add(0, idx, widen.pool_shared(probs[idx, :, : p.shape[0]], p))
        return pooled

    def fused(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For serving (eval, no autograd): `M_h = W_q,h W_k,h^T / sqrt(dh)` `(H, D_rm, P)` and
        `N_h = W_v,h^T W_o,h^T` `(H, P, D_rm)`, so a call reads these two instead of the four matrices. Used only
        where they are smaller (H * D_rm * P < d * (D_rm + P): e.g. a 384-wide encoder RM with a 4096-wide policy
        reads 12 MB instead of 70 MB per call); rebuilt when a weight changes (tensor version counters)."""
        H, dh, P = self.n_heads, self.head_dim, self.policy_dim
        rm = self.w_q.in_features
        if H * rm * P >= H * dh * (rm + P):
            return None
        weights = (self.w_q.weight, self.w_k.weight, self.w_v.weight, self.w_o.weight)
        # Storage, dtype and in-place edits (inference tensors keep no version counter: built in inference mode, a
        # head is only ever replaced, never edited).
        key = tuple((w.data_ptr(), w.dtype, -1 if w.is_inference() else w._version) for w in weights)
        cached = getattr(self, "_fused_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        wq = self.w_q.weight.view(H, dh, rm)  # (H, dh, D_rm)
        wk = self.w_k.weight.view(H, dh, P)
        wv = self.w_v.weight.view(H, dh, P)
        wo = self.w_o.weight.view(rm, H, dh)  # (D_rm, H, dh)
        m = torch.einsum("her,hep->hrp", wq, wk) / math.sqrt(dh)  # (H, D_rm, P)
        n = torch.einsum("hep,rhe->hpr", wv, wo)  # (H, P, D_rm)
        self._fused_cache = (key, (m, n))
        return m, n

    def forward_reference(self, e: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The textbook form (project keys and values, then attend) in the weights' dtype; slow, for tests."""
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
    """The part R2M trains: the feedback attention and the score layer phi (D_rm -> 1), or for an ensemble the
    score layers of its members (D_rm -> N) on the one shared attention read-out."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.attention = FeedbackAttention(config.rm_dim, config.policy_dim, config.attn_dim, config.n_heads)
        self.score = nn.Linear(config.rm_dim, config.members, bias=config.score_bias)

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
        """No NaN or Inf in any weight. A tensor's min and max are both finite exactly then (both propagate NaN): one
        pass and no tensor of the weight's size, where `torch.isfinite(p).all()` builds a bool copy of each (a
        replica checks every head it swaps in, the worker every update)."""
        return all(bool(torch.isfinite(torch.stack(torch.aminmax(p))).all()) for p in self.parameters() if p.numel())


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
