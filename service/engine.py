"""The scoring engine: the frozen reward-model backbone plus the current, swappable R2M head version."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from .backbone import Backbone, Encoded, load_backbone
from .config import ServiceSettings
from .headcodec import serving_head
from .initial import initial_head
from .kernels import precision
from .members import attach_members, count_members, members_path
from .model import HeadConfig, R2MHead
from .rtecache import RTECache
from .scoring import AGGREGATIONS, Scores, score_rte

__all__ = ["HeadVersion", "NonFiniteReward", "PreparedItem", "ScoringEngine", "build_engine", "check_ensemble"]


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
        # Version 0 as the serving copy the worker publishes of it holds it: built here, it scores exactly as it does
        # on a replica that loads it from the store.
        head = serving_head(self.initial_head()).to(backbone.device).eval().requires_grad_(False)
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
        """Install `new` as the head for every batch that starts after this call; returns the old one.

        A replica serves the serving form (`R2MHead.serves`); a trainable head given here is converted first, as
        its serving copy would hold it (fused here, on the caller's thread: `HeadSync` loads serving copies)."""
        if not new.head.serves:
            new = replace(new, head=serving_head(new.head))
        new.head.to(self.backbone.device).eval().requires_grad_(False)
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
