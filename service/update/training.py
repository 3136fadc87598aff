"""One R2M optimisation phase (docs/method.md, "Updating"): preference batches in, GREBT steps on the feedback attention
and the score head, a candidate head out. The worker loop (`r2m.service.update.worker`) decides what to do with it.

With a judge (`r2m.service.update.judge`), each batch's groups also yield judge-labelled pairs, picked by the rewards
the current head recomputes here; they train as labelled pairs, with the paper's pseudo-labels beside them or not
(R2M_JUDGE_WITH_PSEUDO_LABELS).

The backbone is frozen, so a text's reward-token embedding never changes: `RTECache` keeps them by text hash, and
on a miss the tokens the API already computed (queued beside the batch) go straight to the backbone.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..backbone import Encoded
from ..config import ServiceSettings
from ..engine import ScoringEngine
from ..headcodec import head_from_bytes, head_to_bytes, optimizer_from_bytes, optimizer_to_bytes, serving_bytes
from ..metrics import WorkerMetrics
from ..model import bt_loss, grebt_loss
from ..rtecache import RTECache
from ..schemas import PreferencesRequest
from ..scoring import aggregate, pad_hidden, score_rte
from .batch import Flat, flatten
from .guard import CanaryItem, CanarySet, GuardReport, guard_report
from .judge import BatchGroups, JudgeReport, PairJudge, PairLabeller

__all__ = ["HeadTrainer", "NothingToTrain", "UpdateRefused", "UpdateStats"]

log = logging.getLogger("r2m.worker")


class UpdateRefused(Exception):
    """The update's candidate head must not be published; `reason` is a short label for metrics, `report` the
    guard's figures when the guard refused it."""

    def __init__(self, reason: str, detail: str, report: GuardReport | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.report = report


class NothingToTrain(Exception):
    """The judge abstained on every pair of a batch that has nothing else to train (judge labels only): the batch is
    done, with no new version."""

    def __init__(self, judge: JudgeReport) -> None:
        super().__init__(f"the judge abstained on all {judge.asked} pairs")
        self.judge = judge


@dataclass
class UpdateStats:
    loss: float
    bt: float
    gre: float
    pair_bt: float
    group_reward_std: float
    groups: int
    pairs: int
    seconds: float
    rte_hits: int = 0
    rte_misses: int = 0
    guard: GuardReport | None = None
    judge: JudgeReport | None = None  # the batches' judge figures, summed; None without a judge

    def loss_dict(self) -> dict[str, float]:
        return {"grebt": self.loss, "bt": self.bt, "gre": self.gre, "pair_bt": self.pair_bt}


class HeadTrainer:
    """The trainable head and its optimizer, on top of the frozen backbone of `engine`; with `judge`, the judge that
    labels pairs of the batches' groups (its requests counted in `metrics`)."""

    def __init__(
        self,
        engine: ScoringEngine,
        settings: ServiceSettings,
        judge: PairJudge | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.labeller = PairLabeller(judge, settings, metrics) if judge is not None else None
        device = engine.backbone.device
        self.head = engine.initial_head().to(device).train()
        self.opt = self._optimizer()
        self.version: int | None = None  # the store version the local head equals; None: the unpublished initial
        self.cache = RTECache(settings.rte_cache_mb * 2**20)
        self.canary = CanarySet(settings.guard_canary_size, settings.guard_canary_mb * 2**20, seed=settings.seed)
        self._trained: list[CanaryItem] = []  # the last update's items, for the canary once it is published

    def _lrs(self) -> list[float]:
        """The learning rate of each parameter group: one group, or the attention's and phi's (R2M_TRAIN_LR_SCORE)."""
        s = self.settings
        return [s.train_lr] if s.train_lr_score is None else [s.train_lr, s.train_lr_score]

    def _optimizer(self) -> torch.optim.Optimizer:
        s = self.settings
        if s.train_lr_score is None:
            return torch.optim.AdamW(self.head.parameters(), lr=s.train_lr, weight_decay=s.train_weight_decay)
        groups = [
            {"params": list(self.head.attention.parameters()), "lr": s.train_lr},
            {"params": list(self.head.score.parameters()), "lr": s.train_lr_score},
        ]
        return torch.optim.AdamW(groups, weight_decay=s.train_weight_decay)

    def load(self, version: int, weights: bytes, optim: bytes | None) -> None:
        self.head = head_from_bytes(weights, self.engine.head_config).to(self.engine.backbone.device).train()
        self.opt = self._optimizer()
        if optim is None:  # none stored, or dropped by a rollback (docs/headstore.md)
            log.info("no optimizer state to resume for head version %d (a rollback resets it): AdamW starts afresh",
                     version)  # fmt: skip
        else:
            try:
                optimizer_from_bytes(self.opt, optim)
            except ValueError as exc:  # saved with the other parameter grouping (R2M_TRAIN_LR_SCORE changed)
                log.warning("optimizer state of version %d does not fit (%s); starting it afresh", version, exc)
                self.opt = self._optimizer()
            for group, lr in zip(self.opt.param_groups, self._lrs()):  # settings win over the saved ones
                group["lr"] = lr
                group["weight_decay"] = self.settings.train_weight_decay
        self.version = version

    def state_bytes(self, with_optim: bool = True) -> tuple[bytes, bytes | None, bytes]:
        """(the float32 master, the optimizer state unless not `with_optim`, the serving copy replicas fetch:
        `headcodec`); UpdateRefused (`non_finite_weights`) when the serving copy would not be finite, which no replica
        would swap in."""
        try:
            serving = serving_bytes(self.head)
        except ValueError as exc:
            raise UpdateRefused("non_finite_weights", str(exc)) from exc
        return head_to_bytes(self.head), self.optim_bytes() if with_optim else None, serving

    def optim_bytes(self) -> bytes:
        """The optimizer state alone (what a stopping worker writes when its newest version was published without)."""
        return optimizer_to_bytes(self.opt)

    def _member_loss(
        self,
        rewards: torch.Tensor,
        groups: Sequence[range],
        pairs: Sequence[tuple[int, int]],
        rank_by: list[torch.Tensor] | None,
        group_w: torch.Tensor | None,
        pair_w: torch.Tensor | None,
        device: torch.device,
    ) -> tuple[torch.Tensor, float, float, float]:
        """One member's loss on the batch (GREBT on `groups`, BT on `pairs` of rows, weighted by their counts) and its
        BT, GRE and pair-BT terms."""
        terms: list[torch.Tensor] = []
        counts: list[int] = []
        bt = gre = pair_bt = 0.0
        if groups:
            rows = [rewards[r.start : r.stop] for r in groups]
            g = grebt_loss(rows, alpha=self.settings.grebt_alpha, rank_by=rank_by, weights=group_w)
            terms.append(g.total)
            counts.append(len(groups))
            bt, gre = g.bt.item(), g.gre.item()
        if pairs:
            idx = torch.tensor(pairs, device=device)
            pair = bt_loss(rewards[idx[:, 0]], rewards[idx[:, 1]], pair_w)
            terms.append(pair)
            counts.append(len(pairs))
            pair_bt = pair.item()
        loss = torch.stack([t * n for t, n in zip(terms, counts)]).sum() / sum(counts)
        return loss, bt, gre, pair_bt

    def _bootstrap(
        self, groups: int, pairs: int, requests: Sequence[PreferencesRequest]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each ensemble member's Poisson(1) bootstrap weights of the batch's groups and pairs, seeded by the batch
        (the same on a retry, another worker, a replay) and the member, so that the members stay diverse."""
        key = "|".join(sorted(r.batch_id or "" for r in requests)) + f"|{self.settings.seed}"
        base = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        out = []
        for m in range(self.engine.head_config.members):
            gen = torch.Generator().manual_seed((base + m) % 2**63)
            rate_g, rate_p = torch.ones(groups), torch.ones(pairs)
            out.append((torch.poisson(rate_g, gen), torch.poisson(rate_p, gen)))
        device = self.engine.backbone.device
        return [(g.to(device), p.to(device)) for g, p in out]

    def commit(self) -> None:
        """The last update was published: its items join the guard's canary."""
        self.canary.offer(self._trained)
        self._trained = []

    @torch.no_grad()
    def _rewards(self, items: Sequence[CanaryItem]) -> torch.Tensor:
        """The current head's rewards `(N,)` for canary items, on the CPU."""
        if not items:
            return torch.empty(0)
        device = self.engine.backbone.device
        rte = torch.stack([it.rte for it in items]).to(device)
        out = score_rte(self.head, rte, [it.hidden for it in items], [it.w for it in items]).float()
        if out.ndim == 2:  # an ensemble: the reward as served
            out = aggregate(out, self.engine.aggregation, self.engine.uwo_lambda)[0]
        return out.cpu()

    def rtes(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        use_cache: bool = True,
        encoded: Sequence[Encoded | None] | None = None,
    ) -> torch.Tensor:
        """RTEs `(N, D_rm)`, from the cache where possible; misses go through the backbone in token-budget chunks,
        with their tokens from `encoded` where given (tokenized here otherwise)."""
        keys = [RTECache.key(p, r) for p, r in zip(prompts, responses)]
        out: list[torch.Tensor | None] = [self.cache.get(k) if use_cache else None for k in keys]
        missing = [i for i, v in enumerate(out) if v is None]
        self.cache.hits += len(keys) - len(missing)
        self.cache.misses += len(missing)
        if missing:
            tokens = [
                (encoded[i] if encoded is not None else None) or self.engine.backbone.encode(prompts[i], responses[i])
                for i in missing
            ]
            fresh = self.engine.embed(tokens, self.settings.max_batch_tokens)
            for j, i in enumerate(missing):
                out[i] = fresh[j]
                if use_cache:
                    self.cache.put(keys[i], fresh[j].detach().clone())
        return torch.stack(out)  # type: ignore[arg-type]

    def _judge(
        self,
        flat: Flat,
        batch_ids: Sequence[str],
        forward: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
        rank_given: bool,
    ) -> tuple[list[tuple[int, int]], JudgeReport | None]:
        """The judge's labelled pairs of rows from the batches' groups, picked by the rewards the current head gives
        them (or by the rewards the groups carried, R2M_RANK_BY=given). UpdateRefused(`judge_unavailable`) when a
        batch that has only the judge's labels to train got none because the judge failed (a retry may get some)."""
        if self.labeller is None or not flat.groups:
            return [], None
        with torch.no_grad():
            out = self.head(*forward[:4], with_feedback=forward[4])  # (N,), or (N, M) for an ensemble
            if out.ndim == 2:
                out = aggregate(out, self.engine.aggregation, self.engine.uwo_lambda)[0]
        served = out.float().cpu().tolist()
        ranking = list(served)
        if rank_given:
            for rows, given in zip(flat.groups, flat.given):
                for r, v in zip(rows, given or []):
                    ranking[r] = v
        batches = [BatchGroups(b, groups) for b, groups in zip(batch_ids, flat.by_request)]
        judged, reports = self.labeller.label(batches, flat.prompts, flat.responses, ranking, served)
        total = JudgeReport()
        for report in reports:
            total.add(report)
        if not self.settings.judge_with_pseudo_labels:
            failed = [b.batch_id for b, rep in zip(batches, reports) if rep.unavailable]
            if failed:
                raise UpdateRefused(
                    "judge_unavailable",
                    f"the judge gave no label for batch(es) {', '.join(failed)} ({total.failed} of {total.asked} pairs "
                    "failed: connection, timeout, 429/5xx after retries, or R2M_JUDGE_DEADLINE_S)",
                )
        return judged, total

    def update(
        self,
        requests: Sequence[PreferencesRequest],
        use_cache: bool = True,
        encoded: Sequence[list[Encoded] | None] | None = None,
        batch_ids: Sequence[str] | None = None,
    ) -> UpdateStats:
        """One R2M optimisation phase on the batches' groups (GREBT), labelled pairs (BT) and, with a judge, the
        judge's labelled pairs of the groups (BT; the groups' GREBT only with R2M_JUDGE_WITH_PSEUDO_LABELS).

        `encoded[i]`: the tokens of `requests[i].texts()` as the API computed them (None: tokenize here).
        `batch_ids[i]`: the queue's id of `requests[i]` (default: its own), which seeds the judge's pair choice.

        Raises UpdateRefused when a loss or the updated weights are non-finite, the guard refuses the candidate
        (R2M_GUARD_*), or the judge failed a batch it alone trains (`judge_unavailable`); the head is then left in an
        unknown state, and the caller reloads it from the store before training again. Raises NothingToTrain when the
        judge abstained on everything and nothing else trains. After a publish, `commit()` adds the batch's items to
        the guard's canary.
        """
        started = time.perf_counter()
        hits, misses = self.cache.hits, self.cache.misses
        s = self.settings
        flat = flatten(requests, s.omega_floor, encoded or [None] * len(requests))
        device = self.engine.backbone.device
        rte = self.rtes(flat.prompts, flat.responses, use_cache, flat.encoded).to(device)  # (N, D_rm)
        w = torch.tensor(flat.weights, dtype=torch.float32, device=device)
        use = [h is not None and wi < 1.0 for h, wi in zip(flat.hidden, flat.weights)]
        h_pad = mask = sel = None
        if any(use):
            # dtype None: bf16/fp16 hidden states stay as they came where the device reads them natively.
            h_pad, mask = pad_hidden([h for h, u in zip(flat.hidden, use) if u and h is not None], None, device)
            sel = torch.tensor(use, device=device)
        rank_given = s.rank_by == "given" and all(g is not None for g in flat.given)
        ids = list(batch_ids) if batch_ids is not None else [r.batch_id or str(i) for i, r in enumerate(requests)]
        judged, judge = self._judge(flat, ids, (rte, w, h_pad, mask, sel), rank_given)
        groups = flat.groups if self.labeller is None or s.judge_with_pseudo_labels else []
        pairs = flat.pairs + judged
        if not groups and not pairs:
            assert judge is not None  # a batch holds a group or a pair, so only a judge-only update gets here
            raise NothingToTrain(judge)
        self._trained = [
            CanaryItem(rte[i].detach().cpu(), h, wi) for i, (h, wi) in enumerate(zip(flat.hidden, flat.weights))
        ]
        check = self.canary.items + self._trained if s.guard else []
        served = self._rewards(check)  # the head before this update: the one replicas serve
        members = self.engine.head_config.members
        boot: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [(None, None)]
        if members > 1:
            boot = list(self._bootstrap(len(groups), len(pairs), requests))
        rank_by = [torch.tensor(g, device=device) for g in flat.given] if rank_given and groups else None
        inputs = (rte, w, h_pad, mask, sel)
        first = self._optimize(inputs, flat.groups, groups, pairs, rank_by, boot, device)
        if not self.head.is_finite():
            raise UpdateRefused("non_finite_weights", "the updated head's weights hold NaN or Inf")
        report = None
        if check:
            plain = self.engine.backbone.plain_reward(torch.stack([it.rte for it in check]).to(device)).cpu()
            report = guard_report(self._rewards(check), served, plain, s)
            if report.problem is not None:
                raise UpdateRefused(report.problem, report.detail, report)
        return UpdateStats(
            **first,
            guard=report,
            judge=judge,
            groups=len(groups),
            pairs=len(pairs),
            seconds=time.perf_counter() - started,
            rte_hits=self.cache.hits - hits,
            rte_misses=self.cache.misses - misses,
        )

    def _optimize(
        self,
        inputs: tuple[Any, ...],
        all_groups: list[range],
        groups: list[range],
        pairs: list[tuple[int, int]],
        rank_by: list[torch.Tensor] | None,
        boot: list[tuple[torch.Tensor | None, torch.Tensor | None]],
        device: torch.device,
    ) -> dict[str, float]:
        """R2M_TRAIN_STEPS optimizer steps of the loss on `groups` and `pairs` (each member on its own resample of
        the batch); returns the first step's loss terms and the mean reward std inside `all_groups`."""
        rte, w, h_pad, mask, sel = inputs
        first: dict[str, float] = {}
        for step in range(self.settings.train_steps):
            out = self.head(rte, w, h_pad, mask, with_feedback=sel)  # (N,), or (N, M) for an ensemble
            cols = [out] if out.ndim == 1 else list(out.unbind(1))
            parts = [
                self._member_loss(r, groups, pairs, rank_by, boot[m][0], boot[m][1], device) for m, r in enumerate(cols)
            ]
            loss = torch.stack([p[0] for p in parts]).mean()
            if not math.isfinite(loss.item()):
                raise UpdateRefused("non_finite_loss", f"GREBT loss {loss.item()} at optimizer step {step}")
            if step == 0:
                with torch.no_grad():
                    rewards = out if out.ndim == 1 else out.mean(dim=1)
                    stds = [rewards[r.start : r.stop].std(correction=0).item() for r in all_groups]
                first = {
                    "loss": loss.item(),
                    "bt": sum(p[1] for p in parts) / len(parts),
                    "gre": sum(p[2] for p in parts) / len(parts),
                    "pair_bt": sum(p[3] for p in parts) / len(parts),
                    "group_reward_std": sum(stds) / len(stds) if stds else 0.0,
                }
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.settings.train_max_grad_norm)
            self.opt.step()
        return first
