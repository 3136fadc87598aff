"""The scoring engine: the frozen reward-model backbone plus the current, swappable R2M head version."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import precision
from .backbone import Backbone, Encoded, attach_members, count_members, load_backbone, members_path
from .config import ServiceSettings
from .headcodec import SERVING_DTYPE
from .model import HeadConfig, R2MHead
from .rtecache import RTECache

__all__ = [
    "HeadVersion",
    "NonFiniteReward",
    "PreparedItem",
    "Scores",
    "aggregate",
    "check_ensemble",
    "ScoringEngine",
    "build_engine",
    "head_is_finite",
    "initial_head",
    "readout_gain",
    "pad_hidden",
    "score_rte",
]


@dataclass(frozen=True)
class PreparedItem:
    """One validated /score item: tokens for the backbone, optional hidden states `(T, D_policy)`, its omega.

    With prompt-prefix sharing, `prefix` holds the group's shared leading rows `(T_p, D_policy)` (the same tensor
    object for every item of the request that uses it, never a copy) and `hidden` only the rows after it (possibly
    zero of them); the item's hidden states are `cat(prefix, hidden)`, which is never built.
    """

    encoded: Encoded
    hidden: torch.Tensor | None
    w: float
    prefix: torch.Tensor | None = None
    readout: torch.Tensor | None = None  # (D_rm,) float32: a read-out computed next to the policy (local feedback)
    rte: torch.Tensor | None = None  # (D_rm,) float32 from the replica's RTE cache: the backbone is skipped
    cache_key: bytes | None = None  # put the item's RTE into the replica's RTE cache under this key (/embed)


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


@dataclass(frozen=True)
class HeadVersion:
    """An immutable head snapshot. Replacing the reference is the swap; a batch holds one snapshot throughout."""

    version: int
    head: R2MHead
    meta: dict = field(default_factory=dict)
    swap_ms: dict[str, float] = field(default_factory=dict)  # how its swap went: HeadSync.load's phases


class NonFiniteReward(Exception):
    """A batch produced a NaN or an Inf reward; never answered as a reward.

    `from_backbone`: the reward model's own embedding of those items was non-finite (the head is not to blame);
    otherwise the head version that scored the batch produced it on finite inputs and is reverted.
    """

    def __init__(self, version: int, items: list[int], from_backbone: bool) -> None:
        where = "the reward model's embedding" if from_backbone else f"head version {version}"
        super().__init__(f"{where} produced a non-finite reward for {len(items)} item(s) of the batch")
        self.version = version
        self.items = items
        self.from_backbone = from_backbone


def head_is_finite(head: R2MHead) -> bool:
    """No NaN or Inf in any weight. A tensor's min and max are both finite exactly then (both propagate NaN): one
    pass and no tensor of the weight's size, where `torch.isfinite(p).all()` builds a bool copy of each (29 ms
    against 2 ms per check of a d = 2048 head: a replica checks every head it swaps in, the worker every update)."""
    return all(bool(torch.isfinite(torch.stack(torch.aminmax(p))).all()) for p in head.parameters() if p.numel())


# How the read-out starts (R2M_ATTN_INIT). The paper gives no initialisation and its untrained module behaves like
# noise ("w/o Train" scores below vanilla RL); what matters is the read-out's size against the RTE's, which differs by
# two orders of magnitude between an L2-normalised encoder (norm 1) and a decoder RM's last-token state (hundreds).
ATTN_INITS = ("scaled", "plain", "zero")


def readout_gain(head: R2MHead, n: int = 64, seed: int = 0) -> float:
    """Mean norm of the read-out `W_o W_v x` for pooled hidden states x of unit RMS per dimension (what a policy's
    final RMSNorm/LayerNorm emits with a gain near 1): the read-out's size per unit of hidden-state RMS."""
    attn = head.attention
    x = torch.randn(n, attn.policy_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float(attn.w_o(attn.w_v(x)).norm(dim=1).mean())


def initial_head(
    backbone: Backbone, config: HeadConfig, seed: int = 0, init: str = "scaled", init_scale: float = 0.1
) -> R2MHead:
    """Version 0: seeded random feedback attention (same on every replica) and the RM's own score layer.

    `init`: "scaled" (W_o scaled so that for unit-RMS hidden states the read-out's norm is `init_scale` times the
    RTE's typical norm, measured on the backbone), "plain" (PyTorch's default init, as the paper presumably used),
    "zero" (W_o = 0: the untrained reward is w * phi(e), the plain RM's order and GRPO advantages exactly).
    """
    if init not in ATTN_INITS:
        raise ValueError(f"unknown attention init {init!r}; choose one of {', '.join(ATTN_INITS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = R2MHead(config)
    with torch.no_grad():
        if init == "zero":
            head.attention.w_o.weight.zero_()
        elif init == "scaled":
            # Two significant digits: replicas on other devices or dtypes measure the same factor.
            factor = float(f"{init_scale * backbone.reference_rte_norm() / readout_gain(head):.2g}")
            head.attention.w_o.weight.mul_(factor)
        # Start from weights the float16 serving copy holds exactly, so version 0 scores the same on a replica
        # that built it and on one that loaded it from the store (service/heads.py, SERVING_DTYPE).
        for p in head.attention.parameters():
            p.copy_(p.to(SERVING_DTYPE))
        n = config.members
        if n > 1 and (backbone.members_weight is None or backbone.members_weight.shape[0] < n):
            have = 0 if backbone.members_weight is None else backbone.members_weight.shape[0]
            raise ValueError(f"an ensemble of {n} needs {n} fitted members; this reward model has {have}")
        weight = backbone.score_weight if n == 1 else backbone.members_weight[:n]  # type: ignore[index]
        head.score.weight.copy_(weight)
        if head.score.bias is not None:
            bias = backbone.score_bias if n == 1 else backbone.members_bias
            if bias is not None:
                head.score.bias.copy_(bias.reshape(-1)[:n])
            else:
                head.score.bias.zero_()
    return head


class ScoringEngine:
    def __init__(
        self,
        backbone: Backbone,
        head_config: HeadConfig,
        seed: int = 0,
        init: str = "scaled",
        init_scale: float = 0.1,
        aggregation: str = "uwo",
        uwo_lambda: float = 1.0,
        rte_cache_bytes: int = 64 * 2**20,
    ) -> None:
        if head_config.rm_dim != backbone.rm_dim:
            raise ValueError(f"head rm_dim={head_config.rm_dim} but the backbone's width is {backbone.rm_dim}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
        self.backbone = backbone
        self.head_config = head_config
        self.aggregation = aggregation
        self.uwo_lambda = uwo_lambda
        self.rte_cache = RTECache(rte_cache_bytes)  # /embed's RTEs, for the /score with read-outs that follows
        self._init = (seed, init, init_scale)
        head = self.initial_head().to(backbone.device).eval().requires_grad_(False)
        with torch.no_grad():
            head.attention._fused()
        self._current = HeadVersion(version=0, head=head, meta={"created": time.time()})
        self._previous: HeadVersion | None = None  # what served before the last swap: the revert target
        self.bad_versions: set[int] = set()  # versions this replica refuses to serve (never swapped in again)
        self._swap_lock = threading.Lock()

    def initial_head(self) -> R2MHead:
        """A fresh copy of version 0 (the worker trains from it when the store is empty)."""
        seed, init, scale = self._init
        return initial_head(self.backbone, self.head_config, seed, init, scale)

    @property
    def current(self) -> HeadVersion:
        return self._current

    def swap(self, new: HeadVersion) -> HeadVersion:
        """Install `new` as the head for every batch that starts after this call; returns the old one."""
        new.head.to(self.backbone.device).eval().requires_grad_(False)
        with torch.no_grad():
            new.head.attention._fused()  # built here (the swap thread), not by the first batch that the head scores
        with self._swap_lock:
            old, self._current = self._current, new
            self._previous = old
        return old

    def revert(self, version: int) -> HeadVersion | None:
        """Stop serving `version` (it produced a non-finite reward): go back to the head that served before it.
        Returns the head now served, or None when there is nothing to go back to."""
        with self._swap_lock:
            self.bad_versions.add(version)
            if self._current.version != version:
                return self._current  # already moved on
            if self._previous is None or self._previous.version in self.bad_versions:
                return None
            self._current, self._previous = self._previous, None
            return self._current

    @torch.inference_mode()
    def score(
        self, items: Sequence[PreparedItem], head: HeadVersion | None = None, max_batch_tokens: int = 16384
    ) -> torch.Tensor:
        """Rewards `(N,)` float32 for `items` (an ensemble's aggregated), all scored by one head snapshot;
        NonFiniteReward instead of a NaN or an Inf."""
        return self.score_all(items, head, max_batch_tokens).rewards

    @torch.inference_mode()
    def score_all(
        self, items: Sequence[PreparedItem], head: HeadVersion | None = None, max_batch_tokens: int = 16384
    ) -> Scores:
        """`score`, with an ensemble's uncertainty and members' rewards."""
        head = head or self._current
        rte = self.rtes(items, max_batch_tokens)  # (N, D_rm)
        out = score_rte(
            head.head,
            rte,
            [it.hidden for it in items],
            [it.w for it in items],
            [it.prefix for it in items],
            [it.readout for it in items],
        )
        finite = torch.isfinite(out) if out.ndim == 1 else torch.isfinite(out).all(dim=1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().squeeze(1)
            # The head is to blame unless every bad item's embedding was already non-finite.
            from_backbone = not bool(torch.isfinite(rte[bad]).all(dim=1).any())
            raise NonFiniteReward(head.version, bad.tolist(), from_backbone)
        return Scores.of(out, self.aggregation, self.uwo_lambda, rte)

    def rtes(self, items: Sequence[PreparedItem], max_batch_tokens: int = 16384) -> torch.Tensor:
        """RTEs `(N, D_rm)` float32: an item's cached one where it carries it, the backbone's for the others (which
        go into the RTE cache when they carry a `cache_key`)."""
        missing = [i for i, it in enumerate(items) if it.rte is None]
        if len(missing) == len(items):
            rte = self.embed([it.encoded for it in items], max_batch_tokens)
        else:
            rte = torch.empty((len(items), self.backbone.rm_dim), dtype=torch.float32, device=self.backbone.device)
            for i, it in enumerate(items):
                if it.rte is not None:
                    rte[i] = it.rte
            if missing:
                rte[missing] = self.embed([items[i].encoded for i in missing], max_batch_tokens)
        for i in missing:
            key = items[i].cache_key
            if key is not None:
                self.rte_cache.put(key, rte[i].clone())
        return rte

    def embed(self, encoded: Sequence[Encoded], max_batch_tokens: int = 16384) -> torch.Tensor:
        """RTEs `(N, D_rm)` float32, run through the backbone in length-sorted chunks of <= max_batch_tokens padded
        tokens, a chunk also ending where padding would exceed its share (`_MIN_FILL`): on a CPU the forward is
        compute-bound, so every padded token costs as much as a real one."""
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = torch.empty((len(encoded), self.backbone.rm_dim), dtype=torch.float32, device=self.backbone.device)
        min_fill = _MIN_FILL.get(self.backbone.device.type, _MIN_FILL["cpu"])
        start = 0
        while start < len(order):
            end, real = start + 1, len(encoded[order[start]])
            # Sorted ascending, so the chunk's padded size is (count) x (length of its last item).
            while end < len(order):
                n, longest = end - start + 1, len(encoded[order[end]])
                if n * longest > max_batch_tokens or real + longest < min_fill * n * longest:
                    break
                real += longest
                end += 1
            idx = order[start:end]
            out[idx] = self.backbone.embed([encoded[i] for i in idx])
            start = end
        return out


# Least share of real (not padding) tokens in a backbone chunk. A GPU runs a wider, emptier batch at little extra
# cost; a CPU pays for every position.
_MIN_FILL = {"cpu": 0.8, "cuda": 0.5}


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
    `model._blocks`); tensors of different dtypes, e.g. from two requests merged into one batch, are stacked in
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


def check_ensemble(settings: ServiceSettings) -> None:
    """ValueError naming the setting when R2M_ENSEMBLE > 1 cannot be served: no members file, or too few members.
    Reads file headers only, so `r2m serve` fails at once, before the model loads."""
    n = settings.ensemble
    if n == 1:
        return
    path = members_path(settings.model, settings.ensemble_members)
    if path is None:
        raise ValueError(
            f"R2M_ENSEMBLE={n}: the reward model {settings.model!r} has no fitted members here; fit them with "
            f"`r2m fit-rm --backbone {settings.model} --data pairs.jsonl --ensemble {n} --out DIR` and set "
            "R2M_ENSEMBLE_MEMBERS=DIR"
        )
    have = count_members(path)
    if have < n:
        raise ValueError(
            f"R2M_ENSEMBLE={n}: {path} holds {have} fitted members"
            + ("" if have else " (no such file)")
            + f"; fit {n} with `r2m fit-rm ... --ensemble {n}` (R2M_ENSEMBLE_MEMBERS names the file)"
        )


def build_engine(settings: ServiceSettings) -> ScoringEngine:
    """Load the backbone named by the settings (and its ensemble members) and put the initial head on it."""
    check_ensemble(settings)
    precision.configure(settings.cpu_half_hidden)
    backbone = load_backbone(settings.model, device=settings.device, dtype=settings.dtype)
    if settings.ensemble > 1:
        attach_members(backbone, members_path(settings.model, settings.ensemble_members))  # type: ignore[arg-type]
    config = HeadConfig(
        rm_dim=backbone.rm_dim,
        policy_dim=settings.policy_dim,
        attn_dim=settings.attn_dim,
        n_heads=settings.attn_heads,
        score_bias=backbone.score_bias is not None,
        members=settings.ensemble,
    )
    return ScoringEngine(
        backbone,
        config,
        settings.seed,
        settings.attn_init,
        settings.attn_init_scale,
        settings.aggregation,
        settings.uwo_lambda,
        settings.embed_cache_mb * 2**20,
    )
