"""The trainable part of R2M: feedback cross-attention, the omega(t) schedule, the score head, the GREBT loss.

Notation follows R2M.md: `e` is the reward-token embedding (RTE) from the frozen backbone, `(B, D_rm)`; `h` are the
policy's last-layer hidden states over query + response, `(B, T, D_policy)` padded, with `mask` `(B, T)` True on
real tokens. The reward is `phi(w * e + (1 - w) * a)` with `a` the cross-attention read-out of `h`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .percore import per_core
from .precision import compute_dtype

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
    a time (a CPU without those runs half-precision GEMMs 3-6x slower than float32 ones; `_blocks` says why not in
    one copy), each block read by the scores and the pooling right after its widening, by the thread that widened it
    (`_attend_blocks`). The folded query is cast to that dtype for the scores `h u`, the softmax runs in float32 on
    the small `(B, H, T)` scores, the pooling `p h` runs in that dtype again, and the small pooled vectors go back to
    float32 for `W_v` and `W_o`.

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
            # copy shared by the scores and the pooling costs less memory than blocks kept by each (`_blocks`).
            h = h.to(compute_dtype(h.dtype, h.device))
            prefixes = [p.to(compute_dtype(p.dtype, p.device)) for p in prefixes]
        has_rows = mask.any(dim=1) if prefix_index is None else mask.any(dim=1) | (prefix_index >= 0)
        assert bool(has_rows.all()), "every item needs at least one unmasked hidden state"
        # Scores, softmax and pooled sums in float32 at least, also for a half-precision (serving) copy of the head.
        fused = self._fused() if not (self.training or torch.is_grad_enabled()) else None
        u = self.fold_query(e) if fused is None else torch.einsum("br,hrp->bhp", e.to(fused[0].dtype), fused[0])
        u = u.to(torch.promote_types(u.dtype, torch.float32))  # (B, H, P)
        if prefix_index is None and _widens(h):
            pooled = _attend_blocks(h, u, mask)  # (B, H, P): each block widened once, read by both matmuls
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
        """`softmax(u h^T) h` `(B, H, P)` as scores over every row, then the pooling (`_scores`, `_pool`), over the
        items' shared prefixes too where `prefix_index` names them."""
        B, H = u.shape[:2]
        scores = _scores(h, u).masked_fill(~mask[:, None, :], float("-inf"))  # (B, H, T), u's dtype
        if prefix_index is None:
            return _pool(scores.softmax(dim=-1), h)  # (B, H, P)
        assert prefix_index.shape == (B,), prefix_index.shape
        groups = [(p, (prefix_index == j).nonzero().squeeze(1)) for j, p in enumerate(prefixes)]
        groups = [(p, idx) for p, idx in groups if idx.numel()]
        Tp = max(p.shape[0] for p, _ in groups)
        front = scores.new_full((B, H, Tp), float("-inf"))  # (B, H, Tp): scores over each item's prefix
        for p, idx in groups:
            s = _scores_shared(p, u[idx])  # (n, H, T_j): one matmul for the n items sharing p
            front = front.index_put((idx,), F.pad(s, (0, Tp - p.shape[0]), value=float("-inf")))
        probs = torch.cat([front, scores], dim=-1).softmax(dim=-1)  # one softmax over prefix + own rows
        pooled = _pool(probs[..., Tp:], h)
        for p, idx in groups:
            pooled = pooled.index_add(0, idx, _pool_shared(probs[idx, :, : p.shape[0]], p))
        return pooled

    def _fused(self) -> tuple[torch.Tensor, torch.Tensor] | None:
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


# The four reads of h. Each matmul runs in h's compute dtype (bf16 GEMMs accumulate in float32 inside; torch 2.13
# has no float32-output bf16 matmul on CPU: `mm(..., out_dtype=)` is CUDA-only) and only its small output is
# widened, to the dtype of the folded query `u` (float32, or float64 for float64 weights in tests).

# Half-precision hidden states a CPU does not multiply natively are widened a block at a time, each block at most this
# many bytes of float32 (whole items where they fit, else runs of one item's rows), into one buffer per thread that
# is kept: one float32 copy of a whole batch (183 MB at 16 x 700 x 4096), or a fresh tensor per block, is memory the
# allocator maps anew, and its page faults cost 2-5x the two matmuls (bench section 2). Without prefixes both matmuls
# read a block right after its widening, by the thread that widened it (`_attend_blocks`, `percore`). 4 MB: on an AVX2
# AMD EPYC (512 KB L2 per core) 2 MB blocks were 1.15-1.27x slower per call at 16 x 700 x 4096, 1 MB 1.7x, 8 MB
# 1.05x; the cost per block (a dozen small ops besides the copy and the matmuls) outweighs the L2's size there. On a
# Xeon with 2 MB of L2, before the blocks were shared out, 4 MB measured no faster than 2 MB and 1 MB 5% slower.
# Under autograd (the worker's update) `FeedbackAttention.forward` widens once instead, and no block is ever taken.
UPCAST_BLOCK_BYTES = 4 * 2**20
_scratch = threading.local()


def _scratch_block(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`like` copied into this thread's widening buffer as `dtype` (grown when too small; never an inference
    tensor, so that it can be written inside and outside inference mode)."""
    buf: torch.Tensor | None = getattr(_scratch, "buffer", None)
    if buf is None or buf.numel() < like.numel() or buf.dtype != dtype or buf.device != like.device:
        with torch.inference_mode(False):
            buf = torch.empty(max(like.numel(), UPCAST_BLOCK_BYTES // dtype.itemsize), dtype=dtype, device=like.device)
        _scratch.buffer = buf
    return buf[: like.numel()].view(like.shape).copy_(like)


def _widens(h: torch.Tensor) -> bool:
    """Whether `h` is read in another dtype than its own here (`precision.compute_dtype`): half precision on a CPU
    without native matmuls in it."""
    return h.numel() > 0 and compute_dtype(h.dtype, h.device) != h.dtype


def _block_rows(h: torch.Tensor) -> tuple[torch.dtype, int]:
    """`h`'s compute dtype and the rows of one item a block holds: at most `UPCAST_BLOCK_BYTES`, one at least."""
    dtype = compute_dtype(h.dtype, h.device)
    return dtype, max(1, min(h.shape[1], UPCAST_BLOCK_BYTES // (h.shape[2] * dtype.itemsize)))


def _blocks(h: torch.Tensor) -> tuple[torch.dtype, list[tuple[slice, slice]]]:
    """`h`'s compute dtype and the `(items, rows)` slices covering `h` `(B, T, P)` in blocks of at most
    `UPCAST_BLOCK_BYTES` once widened (one row at least): whole items where they fit, else runs of one item's rows,
    item by item. Autograd off only: a block is widened into the reading thread's buffer (`_scratch_block`), valid
    until its next block."""
    B, T, P = h.shape
    dtype, rows = _block_rows(h)
    items = max(1, UPCAST_BLOCK_BYTES // (T * P * dtype.itemsize)) if rows == T else 1
    assert not torch.is_grad_enabled(), "under autograd, forward widens h once: a kept block would be overwritten"
    blocks = [(slice(b0, b0 + items), slice(t0, t0 + rows)) for b0 in range(0, B, items) for t0 in range(0, T, rows)]
    return dtype, blocks


def _scores(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`(B, T, P)` x `(B, H, P)` -> scores `(B, H, T)` in u's dtype; widened blocks shared out among the workers."""
    if not _widens(h):
        return torch.bmm(u.to(h.dtype), h.transpose(1, 2)).to(u.dtype)
    out = u.new_empty(h.shape[0], u.shape[1], h.shape[1])
    dtype, blocks = _blocks(h)

    def score(blocks: Sequence[tuple[slice, slice]]) -> None:
        for ib, tb in blocks:
            x = _scratch_block(h[ib, tb], dtype)
            out[ib, :, tb] = torch.bmm(u[ib].to(dtype), x.transpose(1, 2)).to(u.dtype)

    per_core(score, blocks)
    return out


def _pool(probs: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """`(B, H, T)` x `(B, T, P)` -> pooled `(B, H, P)` in probs' dtype; widened blocks shared out among the workers,
    each summing its blocks into its own part (the runs of one item may fall to two), the parts added in order."""
    if not _widens(h):
        return torch.bmm(probs.to(h.dtype), h).to(probs.dtype)
    dtype, blocks = _blocks(h)

    def pool(share: Sequence[tuple[slice, slice]]) -> torch.Tensor:
        part = probs.new_zeros(h.shape[0], probs.shape[1], h.shape[2])
        for ib, tb in share:
            x = _scratch_block(h[ib, tb], dtype)
            part[ib] += torch.bmm(probs[ib, :, tb].to(dtype), x).to(probs.dtype)
        return part

    parts = per_core(pool, blocks)
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(dim=0)


def _attend_blocks(h: torch.Tensor, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`softmax(u h^T) h` over the unmasked rows, `(B, H, P)` in u's dtype, for `h` widened a block at a time, in
    one pass: each block is widened once and read by the scores and the pooling while it is still in cache (two
    passes widen `h` twice, and on a CPU without native bf16 the widening is what costs: bench section 2). The
    blocks are shared out among worker threads, one per core (`percore.per_core`), each widened and read by one.
    Blocks of whole items take the softmax as `_scores` and `_pool` do (the same numbers); a longer item is read in
    runs of rows (`_attend_runs`)."""
    B, T, P = h.shape
    dtype, rows = _block_rows(h)
    if rows < T:
        return _attend_runs(h, u, mask, rows, dtype)
    out = u.new_empty(B, u.shape[1], P)
    blocks = _blocks(h)[1]

    def attend(blocks: Sequence[tuple[slice, slice]]) -> None:
        for ib, _ in blocks:  # whole items
            x = _scratch_block(h[ib], dtype)
            s = torch.bmm(u[ib].to(dtype), x.transpose(1, 2)).to(u.dtype).masked_fill_(~mask[ib, None, :], -math.inf)
            out[ib] = torch.bmm(s.softmax(dim=-1).to(dtype), x).to(u.dtype)

    per_core(attend, blocks)
    return out


def _attend_runs(h: torch.Tensor, u: torch.Tensor, mask: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """`softmax(u h^T) h` `(B, H, P)` from `h` `(B, T, P)` read in runs of `rows` rows of one item, each widened once:
    per run the log-sum-exp of its scores and its rows pooled by their softmax within the run, combined at the end
    (a run's weight is the softmax of the runs' log-sum-exps; the online softmax of flash attention, done once).
    Runs of all items are shared out among the workers. A mask of real rows then padding (`pad_hidden`'s) is read as
    a length: the padding is never widened or multiplied; a run of padding only is not read."""
    B, T, P = h.shape
    H = u.shape[1]
    lengths = mask.sum(dim=1)
    prefix_only = (mask == (torch.arange(T, device=mask.device) < lengths[:, None])).all(dim=1)
    runs = []  # (item, run, first row, end row, whether the mask has holes there)
    for b, (n, plain) in enumerate(zip(lengths.tolist(), prefix_only.tolist())):
        for k, t0 in enumerate(range(0, n if plain else T, rows)):
            t1 = min(t0 + rows, n if plain else T)
            if plain or bool(mask[b, t0:t1].any()):
                runs.append((b, k, t0, t1, not plain))
    R = -(-T // rows)
    lse = torch.full((B, R, H), -math.inf, dtype=dtype, device=h.device)  # a run not read: weight 0
    pooled = torch.zeros(B, R, H, P, dtype=dtype, device=h.device)
    q = u.to(dtype)

    def attend(share: Sequence[tuple[int, int, int, int, bool]]) -> None:
        for b, k, t0, t1, holes in share:
            x = _scratch_block(h[b, t0:t1], dtype)
            s = torch.mm(q[b], x.T)  # (H, rows)
            if holes:
                s.masked_fill_(~mask[b, t0:t1], -math.inf)
            torch.logsumexp(s, dim=1, out=lse[b, k])
            torch.mm(s.softmax(dim=1), x, out=pooled[b, k])

    per_core(attend, runs)
    # A run whose real scores all overflowed to -inf has log-sum-exp -inf, so weight 0, and a NaN softmax within it:
    # it adds nothing, as in one softmax over the item.
    pooled.masked_fill_(torch.isneginf(lse)[..., None], 0.0)
    return torch.einsum("brh,brhp->bhp", lse.to(u.dtype).softmax(dim=1), pooled.to(u.dtype))


def _scores_shared(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One prefix `(T_j, P)` against n items' folded queries `(n, H, P)` -> `(n, H, T_j)`: `_scores` of a batch of
    one whose n * H query rows all read the prefix, one matmul (per block)."""
    n, H, P = u.shape
    return _scores(p[None], u.reshape(1, n * H, P)).view(n, H, -1)


def _pool_shared(probs: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """n items' weights over one prefix `(n, H, T_j)` -> their pooled prefix part `(n, H, P)` (`_pool`, likewise)."""
    n, H, T = probs.shape
    return _pool(probs.reshape(1, n * H, T), p[None]).view(n, H, -1)


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
    """L_GREBT = (1 - alpha) L_BT + alpha L_GRE, averaged over groups (R2M.md, "Updating").

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
