"""Outside signal for R2M: a judge that labels a budget of pairs per RL step, drawn from the step's own groups.

R2M's in-group pseudo-labels are the reward model's own: they can sharpen what it prefers, blind spots included. A
judge (an LLM judge, raters, a verifier) brings a label from outside. Each step, `choose_pairs` picks up to
`judge_pairs_per_step` pairs from that step's groups: each chosen group's highest- against its lowest-scored response
(the very pair the pseudo-label loss would train on, so the judge checks the RM where it is most confident), groups
picked uniformly at random without replacement; past one pair per group, further pairs of other responses of the
same groups, at random. The judge says which response is better; the pair is posted to `/preferences` as a labelled
pair, with the hidden states of the policy's last epoch for both responses (`r2m-judge`) or without (`head-judge`).

    r2m train ... --reward-mode r2m-judge --judge my_pkg.judges:compare --judge-pairs-per-step 8
    r2m train ... --reward-mode r2m-judge --judge http://judge-host:9000/judge

A Python judge is `f(prompt, response_a, response_b) -> bool | float`: True (or a probability > 0.5) when
`response_a` is the better one; exactly 0.5 abstains. An HTTP judge receives one POST per step,
`{"pairs": [{"prompt": ..., "response_a": ..., "response_b": ...}, ...]}`, and answers
`{"preferences": [p, ...]}`, one probability (or 0/1, true/false) per pair that `response_a` is better.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import torch

__all__ = ["HTTPJudge", "Judge", "choose_pairs", "label_pairs", "load_judge"]

Judge = Callable[[str, str, str], "bool | float"]


class HTTPJudge:
    """A judge behind an HTTP endpoint (the protocol in the module docstring); one request per batch of pairs."""

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 3) -> None:
        self.url = url
        self.client = httpx.Client(timeout=timeout, transport=httpx.HTTPTransport(retries=retries))

    def batch(self, pairs: Sequence[tuple[str, str, str]]) -> list[float]:
        body = {"pairs": [{"prompt": p, "response_a": a, "response_b": b} for p, a, b in pairs]}
        r = self.client.post(self.url, json=body)
        r.raise_for_status()
        prefs = r.json().get("preferences")
        if not isinstance(prefs, list) or len(prefs) != len(pairs):
            raise ValueError(f"judge {self.url} answered {str(prefs)[:200]!r}: expected {len(pairs)} preferences")
        return [float(x) for x in prefs]

    def __call__(self, prompt: str, a: str, b: str) -> float:
        return self.batch([(prompt, a, b)])[0]

    def close(self) -> None:
        self.client.close()


def load_judge(spec: str) -> Any:
    """`module:function` (a Python judge) or an http(s) URL (an HTTP judge)."""
    if spec.startswith(("http://", "https://")):
        return HTTPJudge(spec)
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"judge={spec!r}: give module:function (a Python callable) or an http(s):// URL")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"judge={spec!r}: {module} has no callable {name!r}")
    return fn


def choose_pairs(
    rewards: Sequence[float], group_size: int, budget: int, generator: torch.Generator
) -> list[tuple[int, int]]:
    """Up to `budget` distinct pairs of batch indices `(i, j)` from the step's groups (module docstring): first each
    picked group's best- against its worst-scored response, then other pairs of the same groups."""
    n_groups = len(rewards) // group_size
    order = torch.randperm(n_groups, generator=generator).tolist()
    chosen: list[tuple[int, int]] = []
    for g in order[:budget]:
        rows = range(g * group_size, (g + 1) * group_size)
        best = max(rows, key=lambda r: rewards[r])
        worst = min(rows, key=lambda r: rewards[r])
        if best != worst:
            chosen.append((best, worst))
    if len(chosen) < budget:
        taken = {tuple(sorted(p)) for p in chosen}
        rest = [
            (g * group_size + a, g * group_size + b)
            for g in range(n_groups)
            for a in range(group_size)
            for b in range(a + 1, group_size)
            if (g * group_size + a, g * group_size + b) not in taken
        ]
        for k in torch.randperm(len(rest), generator=generator).tolist()[: budget - len(chosen)]:
            chosen.append(rest[k])
    return chosen


def label_pairs(judge: Any, prompts: Sequence[str], responses: Sequence[str], pairs: Sequence[tuple[int, int]]):  # noqa: ANN201
    """`[(chosen index, rejected index), ...]` for the pairs the judge does not abstain on, in order."""
    triples = [(prompts[i], responses[i], responses[j]) for i, j in pairs]
    prefs = judge.batch(triples) if hasattr(judge, "batch") else [judge(*t) for t in triples]
    out = []
    for (i, j), p in zip(pairs, prefs):
        p = float(p)
        if p > 0.5:
            out.append((i, j))
        elif p < 0.5:
            out.append((j, i))
    return out
