"""The feedback cross-attention of R2M (paper Eq. 3) in its two forms: `FeedbackAttention`, the trainable one (the
four factors W_q, W_k, W_v, W_o), and `ServingAttention`, what a replica multiplies (the fused products where they
are smaller). Both read the policy's hidden states the same way (`_ReadOut`); `model.R2MHead` holds either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import widen
from .kernels.precision import compute_dtype

__all__ = ["FeedbackAttention", "ServingAttention", "fuses", "serving_shapes"]


def fuses(rm_dim: int, policy_dim: int, attn_dim: int, n_heads: int) -> bool:
    """Whether the fused serving matrices `M_h` `(D_rm, P)` and `N_h` `(P, D_rm)` of all heads hold fewer numbers
    than the four factors (`H D_rm P < d (D_rm + P)`): e.g. a 384-wide encoder RM with a 2048-wide policy at d = 2048
    (1.6 M numbers instead of 10 M), not an 8B RM with an 8B policy (4096 and 4096 at d = 2048: as many)."""
    return n_heads * rm_dim * policy_dim < attn_dim * (rm_dim + policy_dim)


class _ReadOut(nn.Module):
    """The read of `h` both forms of the feedback attention share (`FeedbackAttention`'s docstring): a folded query
    `u` `(B, H, P)` from `query`, the scores and the pooling over `h`, and `project` back to `(B, D_rm)`."""

    n_heads: int
    head_dim: int
    policy_dim: int

    def query(self, e: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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
        # Scores, softmax and pooled sums in float32 at least, also for half-precision weights.
        u = self.query(e)
        u = u.to(torch.promote_types(u.dtype, torch.float32))  # (B, H, P)
        if prefix_index is None and widen.widens(h):
            pooled = widen.attend_blocks(h, u, mask)  # (B, H, P): each block widened once, read by both matmuls
        else:
            pooled = self._attend_two_passes(h, u, mask, prefixes, prefix_index)
        return self.project(pooled)  # (B, D_rm)

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


def _fold(e: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, n_heads: int) -> torch.Tensor:
    """`(e W_q)_h W_k,h^T / sqrt(dh)`: `(B, D_rm)` -> `(B, H, P)` in the weights' dtype; `w_q` `(d, D_rm)` and `w_k`
    `(d, P)` as `nn.Linear` stores them."""
    d, P = w_k.shape
    dh = d // n_heads
    q = F.linear(e.to(w_q.dtype), w_q).view(-1, n_heads, dh)  # (B, H, dh)
    return torch.einsum("bhe,hep->bhp", q, w_k.view(n_heads, dh, P)) / math.sqrt(dh)


def _unfold(pooled: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """`W_o concat_h(W_v,h pooled_h)`: `(B, H, P)` -> `(B, D_rm)` in the weights' dtype."""
    B, H, P = pooled.shape
    v = torch.einsum("bhp,hep->bhe", pooled.to(w_v.dtype), w_v.view(H, -1, P))  # (B, H, dh)
    return F.linear(v.reshape(B, -1), w_o)


class FeedbackAttention(_ReadOut):
    """Sequence-to-token cross-attention (paper Eq. 3), the trainable form: the RTE queries the policy's hidden states.

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

    A replica serves `ServingAttention`, what `serving_tensors` gives: the fused matrices where they are smaller.
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
        return _fold(e, self.w_q.weight, self.w_k.weight, self.n_heads)

    def _serving_fused(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.fused() if not (self.training or torch.is_grad_enabled()) else None

    def query(self, e: torch.Tensor) -> torch.Tensor:
        """The folded query `(B, H, P)`: through the fused `M_h` in eval without autograd where it is smaller."""
        fused = self._serving_fused()
        if fused is None:
            return self.fold_query(e)
        return torch.einsum("br,hrp->bhp", e.to(fused[0].dtype), fused[0])

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled hidden states `(B, H, P)` -> read-outs `(B, D_rm)`: `W_v` then `W_o`, or the fused `N_h`."""
        fused = self._serving_fused()
        if fused is None:
            return _unfold(pooled, self.w_v.weight, self.w_o.weight)
        return torch.einsum("bhp,hpr->br", pooled.to(fused[1].dtype), fused[1])

    def fused(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For serving (eval, no autograd): `M_h = W_q,h W_k,h^T / sqrt(dh)` `(H, D_rm, P)` and
        `N_h = W_v,h^T W_o,h^T` `(H, P, D_rm)`, so a call reads these two instead of the four matrices. Used only
        where they are smaller (`fuses`: e.g. a 384-wide encoder RM with a 4096-wide policy reads 12 MB instead of
        70 MB per call); rebuilt when a weight changes (tensor version counters)."""
        rm = self.w_q.in_features
        if not fuses(rm, self.policy_dim, self.n_heads * self.head_dim, self.n_heads):
            return None
        weights = (self.w_q.weight, self.w_k.weight, self.w_v.weight, self.w_o.weight)
        # Storage, dtype and in-place edits (inference tensors keep no version counter: built in inference mode, a
        # head is only ever replaced, never edited).
        key = tuple((w.data_ptr(), w.dtype, -1 if w.is_inference() else w._version) for w in weights)
        cached = getattr(self, "_fused_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        m, n = self._fuse(*weights)
        self._fused_cache = (key, (m, n))
        return m, n

    def _fuse(
        self, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`M` `(H, D_rm, P)` and `N` `(H, P, D_rm)` from the four weights, in their dtype and device."""
        H, dh, P = self.n_heads, self.head_dim, self.policy_dim
        rm = w_q.shape[1]
        m = torch.einsum("her,hep->hrp", w_q.view(H, dh, rm), w_k.view(H, dh, P)) / math.sqrt(dh)
        n = torch.einsum("hep,rhe->hpr", w_v.view(H, dh, P), w_o.view(rm, H, dh))
        return m, n

    @torch.no_grad()
    def serving_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """What a replica multiplies, in `dtype`, on the CPU: `m` and `n` where they are smaller than the factors
        (`fuses`), else the factors `w_q`, `w_k`, `w_v`, `w_o` (as `nn.Linear` stores them). The fusion runs in
        float64, so that every process that fuses the same weights rounds the same products to the same `dtype`
        values (a replica's own version 0 and the one the worker published; float32 sums in another order would
        land on the other side of a rounding boundary now and then)."""
        weights = [w.detach().to("cpu", torch.float64) for w in (self.w_q.weight, self.w_k.weight, self.w_v.weight,
                                                                  self.w_o.weight)]  # fmt: skip
        if fuses(weights[0].shape[1], self.policy_dim, self.n_heads * self.head_dim, self.n_heads):
            m, n = self._fuse(*weights)
            return {"m": m.to(dtype).contiguous(), "n": n.to(dtype).contiguous()}
        return {k: w.to(dtype).contiguous() for k, w in zip(ServingAttention.FACTORS, weights)}

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


class ServingAttention(_ReadOut):
    """The feedback attention as a replica multiplies it (eval, no autograd), and nothing else: the fused `m`
    `(H, D_rm, P)` and `n` `(H, P, D_rm)` where they are smaller than the factors (`fuses`), else the four factors
    `w_q` `(d, D_rm)`, `w_k`, `w_v` `(d, P)`, `w_o` `(D_rm, d)`; buffers, built from
    `FeedbackAttention.serving_tensors` (the serving copy of a head version, `headcodec`), never fused here."""

    FUSED = ("m", "n")
    FACTORS = ("w_q", "w_k", "w_v", "w_o")

    def __init__(
        self, tensors: dict[str, torch.Tensor], *, rm_dim: int, policy_dim: int, attn_dim: int, n_heads: int
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = attn_dim // n_heads
        self.policy_dim = policy_dim
        expected = serving_shapes(rm_dim, policy_dim, attn_dim, n_heads)
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != expected:
            raise ValueError(f"serving attention {got} does not fit these widths: expected {expected}")
        self.fused_form = set(expected) == set(self.FUSED)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)

    def query(self, e: torch.Tensor) -> torch.Tensor:
        if self.fused_form:
            m = self.get_buffer("m")
            return torch.einsum("br,hrp->bhp", e.to(m.dtype), m)
        return _fold(e, self.get_buffer("w_q"), self.get_buffer("w_k"), self.n_heads)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.fused_form:
            n = self.get_buffer("n")
            return torch.einsum("bhp,hpr->br", pooled.to(n.dtype), n)
        return _unfold(pooled, self.get_buffer("w_v"), self.get_buffer("w_o"))


def serving_shapes(rm_dim: int, policy_dim: int, attn_dim: int, n_heads: int) -> dict[str, tuple[int, ...]]:
    """The shapes of what `ServingAttention` holds: `m`, `n` where they are smaller, else the factors."""
    H, rm, P, d = n_heads, rm_dim, policy_dim, attn_dim
    if fuses(rm, P, d, H):
        return {"m": (H, rm, P), "n": (H, P, rm)}
    return {"w_q": (d, rm), "w_k": (d, P), "w_v": (d, P), "w_o": (rm, d)}
