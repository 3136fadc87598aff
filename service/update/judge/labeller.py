"""A batch's pairs and their labels: which pairs of the groups the judge is asked about (`choose_pairs`), the update's
labelling with its deadline and figures (`PairLabeller`, `JudgeReport`), and the trainer's own labelling
(`label_pairs`)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...config import ServiceSettings
from ...metrics import WorkerMetrics
from .base import FOREVER, PairJudge
from .build import as_judge
from .verdicts import Verdict

log = logging.getLogger("r2m.judge")



def choose_pairs(
    rewards: Sequence[float], groups: int | Sequence[range], budget: int, generator: torch.Generator
) -> list[tuple[int, int]]:
    """Up to `budget` distinct pairs of indices `(i, j)` into `rewards`, both of one group: first each picked group's
    best- against its worst-scored response (groups picked at random without replacement), then other pairs of the
    same groups at random. `groups`: the index ranges of the groups, or one group size K (groups of K consecutive
    rewards)."""
    if isinstance(groups, int):
        groups = [range(g * groups, (g + 1) * groups) for g in range(len(rewards) // groups)]
    order = torch.randperm(len(groups), generator=generator).tolist()
    chosen: list[tuple[int, int]] = []
    for g in order[:budget]:
        rows = groups[g]
        best = max(rows, key=lambda r: rewards[r])
        worst = min(rows, key=lambda r: rewards[r])
        if best != worst:
            chosen.append((best, worst))
    if len(chosen) < budget:
        taken = {tuple(sorted(p)) for p in chosen}
        rest = [(a, b) for rows in groups for a in rows for b in rows if a < b and (a, b) not in taken]
        for k in torch.randperm(len(rest), generator=generator).tolist()[: budget - len(chosen)]:
            chosen.append(rest[k])
    return chosen


# --- labelling a batch ------------------------------------------------------------------------------------------


@dataclass
class JudgeReport:
    """What the judge made of one preference batch (or, summed, of one update)."""

    asked: int = 0
    labels: int = 0
    abstained: int = 0
    failed: int = 0
    surprises: int = 0  # labels against the head's order: the judge prefers the response the head scored lower
    cached: int = 0
    seconds: float = 0.0

    def add(self, other: JudgeReport) -> None:
        for name in ("asked", "labels", "abstained", "failed", "surprises", "cached"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds = max(self.seconds, other.seconds)

    @property
    def unavailable(self) -> bool:
        """No label, and not because the judge abstained: asking again may get some."""
        return self.asked > 0 and self.labels == 0 and self.failed > 0

    def figures(self) -> dict[str, float]:
        return {
            "asked": self.asked,
            "labels": self.labels,
            "abstained": self.abstained,
            "failed": self.failed,
            "surprise_rate": self.surprises / self.labels if self.labels else 0.0,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class BatchGroups:
    """One preference batch's groups as the update holds them: their id (the pair choice's seed) and row ranges."""

    batch_id: str
    groups: list[range] = field(default_factory=list)


class PairLabeller:
    """Picks each batch's pairs, asks the judge by the update's deadline, and counts what came back. Verdicts are
    kept (`cache_size` pairs), so a batch trained again (a retry, a publish conflict, a split merge) pays once."""

    def __init__(
        self, judge: PairJudge, settings: ServiceSettings, metrics: WorkerMetrics | None = None, cache_size: int = 4096
    ) -> None:
        self.judge = judge
        self.budget = settings.judge_pairs
        self.seed = settings.seed
        self.deadline_s = settings.judge_deadline_s
        self.metrics = metrics
        judge.metrics = metrics
        self._cache: OrderedDict[str, Verdict] = OrderedDict()
        self.cache_size = cache_size

    def generator(self, batch_id: str) -> torch.Generator:
        """Seeded by the batch and R2M_SEED: a retry, another worker or a replay picks the same pairs."""
        digest = hashlib.sha256(f"judge|{batch_id}|{self.seed}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)

    def label(
        self,
        batches: Sequence[BatchGroups],
        prompts: Sequence[str],
        responses: Sequence[str],
        ranking: Sequence[float],
        served: Sequence[float],
    ) -> tuple[list[tuple[int, int]], list[JudgeReport]]:
        """`(chosen row, rejected row)` for every labelled pair of the batches, and one report per batch. Pairs are
        picked by `ranking` (the recomputed rewards, or those the groups carried); `served` are the served head's
        recomputed rewards, against which a label is a surprise."""
        started = time.monotonic()
        picks = [choose_pairs(ranking, b.groups, self.budget, self.generator(b.batch_id)) for b in batches]
        flat = [(i, j) for p in picks for i, j in p]
        triples = [(prompts[i], responses[i], responses[j]) for i, j in flat]
        keys = [_key(*t) for t in triples]
        verdicts: list[Verdict | None] = [self._cache.get(k) for k in keys]
        todo = [n for n, v in enumerate(verdicts) if v is None]
        asked = set(todo)
        if todo:
            fresh = self.judge.judge([triples[n] for n in todo], started + self.deadline_s)
            for n, answer in zip(todo, fresh):
                verdicts[n] = answer
                if not answer.failed:
                    self._remember(keys[n], answer)
        labelled: list[tuple[int, int]] = []
        reports: list[JudgeReport] = []
        n = 0
        for batch_picks in picks:
            report = JudgeReport(asked=len(batch_picks), seconds=time.monotonic() - started)
            for i, j in batch_picks:
                v = verdicts[n]
                assert v is not None
                report.cached += n not in asked
                n += 1
                if v.failed:
                    report.failed += 1
                elif v.label is None:
                    report.abstained += 1
                    if v.disagreed and self.metrics is not None:
                        self.metrics.judge_order_disagreements.inc()
                else:
                    chosen, rejected = (i, j) if v.label else (j, i)
                    labelled.append((chosen, rejected))
                    report.labels += 1
                    report.surprises += served[chosen] < served[rejected]
            reports.append(report)
        self._observe(reports)
        return labelled, reports

    def _remember(self, key: str, verdict: Verdict) -> None:
        self._cache[key] = verdict
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _observe(self, reports: Sequence[JudgeReport]) -> None:
        m = self.metrics
        if m is None:
            return
        total = JudgeReport()
        for r in reports:
            total.add(r)
            m.judge_batch_labels.observe(r.labels)
            m.judge_batch_abstentions.observe(r.abstained)
        m.judge_pairs.labels("labelled").inc(total.labels)
        m.judge_pairs.labels("abstained").inc(total.abstained)
        m.judge_pairs.labels("failed").inc(total.failed)
        m.judge_cached.inc(total.cached)
        m.judge_surprises.inc(total.surprises)
        if total.labels:
            m.judge_surprise_rate.set(total.surprises / total.labels)

    def close(self) -> None:
        self.judge.close()


def _key(prompt: str, a: str, b: str) -> str:
    return hashlib.sha256(json.dumps([prompt, a, b]).encode()).hexdigest()


def label_pairs(
    judge: Any, prompts: Sequence[str], responses: Sequence[str], pairs: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """`[(chosen index, rejected index), ...]` for the pairs the judge labels, in order (the trainer's own judging:
    no deadline; abstentions and failures are left out)."""
    verdicts = as_judge(judge).judge([(prompts[i], responses[i], responses[j]) for i, j in pairs], FOREVER)
    failed = sum(v.failed for v in verdicts)
    if failed:
        log.warning("the judge failed on %d of %d pairs; they get no label", failed, len(pairs))
    return [(i, j) if v.label else (j, i) for (i, j), v in zip(pairs, verdicts) if v.label is not None]
