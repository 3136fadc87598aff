"""Feedback attention over half-precision hidden states on a CPU without native half matmuls: each block of rows is
widened to float32 once, into a buffer the thread keeps, and read by the scores and the pooling right after.

`h` is `(B, T, P)` (items, rows, D_policy), `u` the folded queries `(B, H, P)`, `mask` `(B, T)` True on real rows.
Where `h` needs no widening (`widens(h)` is False) every function is one plain batched matmul.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

from .percore import per_core
from .precision import compute_dtype

__all__ = ["UPCAST_BLOCK_BYTES", "attend_blocks", "pool", "pool_shared", "scores", "scores_shared", "widens"]

# The four reads of h. Each matmul runs in h's compute dtype (bf16 GEMMs accumulate in float32 inside; torch 2.13
# has no float32-output bf16 matmul on CPU: `mm(..., out_dtype=)` is CUDA-only) and only its small output is
# widened, to the dtype of the folded query `u` (float32, or float64 for float64 weights in tests).

# Half-precision hidden states a CPU does not multiply natively are widened a block at a time, each block at most this
# many bytes of float32 (whole items where they fit, else runs of one item's rows), into one buffer per thread that
# is kept: a float32 copy of a whole batch, or a fresh tensor per block, is memory the allocator maps anew, and its
# page faults cost more than the two matmuls. Both matmuls read a block right after its widening, by the thread that
# widened it (`attend_blocks`, `percore`). The size trades cache fit against the dozen small ops each block costs
# besides the copy and the matmuls; bench/README.md (section 2) has the block sizes measured. Under autograd (the
# worker's update) `FeedbackAttention.forward` widens once instead, and no block is ever taken.
UPCAST_BLOCK_BYTES = 4 * 2**20
_scratch = threading.local()


def scratch_block(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`like` copied into this thread's widening buffer as `dtype` (grown when too small; never an inference
    tensor, so that it can be written inside and outside inference mode)."""
    buf: torch.Tensor | None = getattr(_scratch, "buffer", None)
    if buf is None or buf.numel() < like.numel() or buf.dtype != dtype or buf.device != like.device:
        with torch.inference_mode(False):
            buf = torch.empty(max(like.numel(), UPCAST_BLOCK_BYTES // dtype.itemsize), dtype=dtype, device=like.device)
        _scratch.buffer = buf
    return buf[: like.numel()].view(like.shape).copy_(like)


def widens(h: torch.Tensor) -> bool:
    """Whether `h` is read in another dtype than its own here (`precision.compute_dtype`): half precision on a CPU
    without native matmuls in it."""
    return h.numel() > 0 and compute_dtype(h.dtype, h.device) != h.dtype


def block_rows(h: torch.Tensor) -> tuple[torch.dtype, int]:
    """`h`'s compute dtype and the rows of one item a block holds: at most `UPCAST_BLOCK_BYTES`, one at least."""
    dtype = compute_dtype(h.dtype, h.device)
    return dtype, max(1, min(h.shape[1], UPCAST_BLOCK_BYTES // (h.shape[2] * dtype.itemsize)))


def block_slices(h: torch.Tensor) -> tuple[torch.dtype, list[tuple[slice, slice]]]:
    """`h`'s compute dtype and the `(items, rows)` slices covering `h` `(B, T, P)` in blocks of at most
    `UPCAST_BLOCK_BYTES` once widened (one row at least): whole items where they fit, else runs of one item's rows,
    item by item. Autograd off only: a block is widened into the reading thread's buffer (`scratch_block`), valid
    until its next block."""
    B, T, P = h.shape
    dtype, rows = block_rows(h)
    items = max(1, UPCAST_BLOCK_BYTES // (T * P * dtype.itemsize)) if rows == T else 1
    assert not torch.is_grad_enabled(), "under autograd, forward widens h once: a kept block would be overwritten"
    blocks = [(slice(b0, b0 + items), slice(t0, t0 + rows)) for b0 in range(0, B, items) for t0 in range(0, T, rows)]
    return dtype, blocks


def scores(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`(B, T, P)` x `(B, H, P)` -> scores `(B, H, T)` in u's dtype; widened blocks shared out among the workers."""
    if not widens(h):
        return torch.bmm(u.to(h.dtype), h.transpose(1, 2)).to(u.dtype)
    out = u.new_empty(h.shape[0], u.shape[1], h.shape[1])
    dtype, blocks = block_slices(h)

    def score(blocks: Sequence[tuple[slice, slice]]) -> None:
        for ib, tb in blocks:
            x = scratch_block(h[ib, tb], dtype)
            out[ib, :, tb] = torch.bmm(u[ib].to(dtype), x.transpose(1, 2)).to(u.dtype)

    per_core(score, blocks)
    return out


def pool(probs: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """`(B, H, T)` x `(B, T, P)` -> pooled `(B, H, P)` in probs' dtype; widened blocks shared out among the workers,
    each summing its blocks into its own part (the runs of one item may fall to two), the parts added in order."""
    if not widens(h):
        return torch.bmm(probs.to(h.dtype), h).to(probs.dtype)
    dtype, blocks = block_slices(h)

    def pool_share(share: Sequence[tuple[slice, slice]]) -> torch.Tensor:
        part = probs.new_zeros(h.shape[0], probs.shape[1], h.shape[2])
        for ib, tb in share:
            x = scratch_block(h[ib, tb], dtype)
            part[ib] += torch.bmm(probs[ib, :, tb].to(dtype), x).to(probs.dtype)
        return part

    parts = per_core(pool_share, blocks)
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(dim=0)


def attend_blocks(h: torch.Tensor, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`softmax(u h^T) h` over the unmasked rows, `(B, H, P)` in u's dtype, for `h` widened a block at a time, in
    one pass: each block is widened once and read by the scores and the pooling while it is still in cache (two
    passes widen `h` twice, and on a CPU without native bf16 the widening is what costs: bench section 2). The
    blocks are shared out among worker threads, one per core (`percore.per_core`), each widened and read by one.
    Blocks of whole items take the softmax as `_scores` and `_pool` do (the same numbers); a longer item is read in
    runs of rows (`attend_runs`)."""
    B, T, P = h.shape
    dtype, rows = block_rows(h)
    if rows < T:
        return attend_runs(h, u, mask, rows, dtype)
    out = u.new_empty(B, u.shape[1], P)
    blocks = block_slices(h)[1]

    def attend(blocks: Sequence[tuple[slice, slice]]) -> None:
        for ib, _ in blocks:  # whole items
            x = scratch_block(h[ib], dtype)
            s = torch.bmm(u[ib].to(dtype), x.transpose(1, 2)).to(u.dtype).masked_fill_(~mask[ib, None, :], -math.inf)
            out[ib] = torch.bmm(s.softmax(dim=-1).to(dtype), x).to(u.dtype)

    per_core(attend, blocks)
    return out


def attend_runs(h: torch.Tensor, u: torch.Tensor, mask: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
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
            x = scratch_block(h[b, t0:t1], dtype)
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


def scores_shared(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One prefix `(T_j, P)` against n items' folded queries `(n, H, P)` -> `(n, H, T_j)`: `_scores` of a batch of
    one whose n * H query rows all read the prefix, one matmul (per block)."""
    n, H, P = u.shape
    return scores(p[None], u.reshape(1, n * H, P)).view(n, H, -1)


def pool_shared(probs: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """n items' weights over one prefix `(n, H, T_j)` -> their pooled prefix part `(n, H, P)` (`_pool`, likewise)."""
    n, H, T = probs.shape
    return pool(probs.reshape(1, n * H, T), p[None]).view(n, H, -1)
