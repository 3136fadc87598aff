"""An update's preference batches as one flat list of responses, with the index ranges of their groups and pairs and
each response's hidden states (converted once) and omega weight."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..backbone import Encoded
from ..model import omega
from ..schemas import PreferencesRequest

__all__ = ["Flat", "flatten"]


@dataclass
class Flat:
    """Every response of a batch in one list, with the index ranges that make up its groups and pairs."""

    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    encoded: list[Encoded | None] = field(default_factory=list)  # the API's tokens; None: tokenize here
    hidden: list[torch.Tensor | None] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    groups: list[range] = field(default_factory=list)
    given: list[list[float] | None] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)
    by_request: list[list[range]] = field(default_factory=list)  # each request's groups


def flatten(
    requests: Sequence[PreferencesRequest], omega_floor: float, encoded: Sequence[list[Encoded] | None]
) -> Flat:
    """The batches in `PreferencesRequest.texts()` order; each hidden-state tensor is converted here, once."""
    flat = Flat()
    for req, tokens in zip(requests, encoded):
        w = omega(req.step, req.total_steps, omega_floor)
        texts = req.texts()
        assert tokens is None or len(tokens) == len(texts), (len(tokens), len(texts))
        base = len(flat.prompts)
        hidden: list[torch.Tensor | None] = []
        flat.by_request.append([])
        for g in req.groups:
            start = base + len(hidden)
            hidden += [t.to_torch() for t in g.hidden] if g.hidden is not None else [None] * len(g.responses)
            flat.groups.append(range(start, base + len(hidden)))
            flat.by_request[-1].append(flat.groups[-1])
            flat.given.append(list(g.rewards) if g.rewards is not None else None)
        for p in req.pairs:
            n = base + len(hidden)
            hidden += [t.to_torch() if t is not None else None for t in (p.chosen_hidden, p.rejected_hidden)]
            flat.pairs.append((n, n + 1))
        flat.prompts += [p for p, _ in texts]
        flat.responses += [r for _, r in texts]
        flat.encoded += tokens if tokens is not None else [None] * len(texts)
        flat.hidden += hidden
        flat.weights += [w] * len(texts)
    return flat
