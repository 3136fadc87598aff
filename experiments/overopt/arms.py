"""The benchmark's arms, the comparisons it reports, and the dev-seed grid that chooses each updating arm's
service hyper-parameters.

Every arm runs the same GRPO on the same SFT policy against the same proxy RM; they differ in what the r2m service
sees (hidden states or not), what it is updated with (in-group pseudo-labels, labelled pairs, judge pairs, nothing)
and how many score heads it has. Arm A and arm B on RL seed s share the sampling seed and the feedback attention's
initialisation (the service's R2M_SEED is the RL seed), so every comparison is paired.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

__all__ = [
    "ARMS",
    "CHOSEN",
    "COMPARISONS",
    "FOLLOWS",
    "GRID",
    "Arm",
    "GridPoint",
    "chosen",
    "grid_points",
    "sends_hidden",
    "updating",
]


@dataclass(frozen=True)
class Arm:
    name: str
    reward_mode: str  # r2m train's --reward-mode
    judge: int = 0  # judge-labelled pairs per step (r2m-judge, head-judge)
    ensemble: int = 1  # score heads on the proxy's backbone (R2M_ENSEMBLE)
    what: str = ""


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("vanilla", "vanilla", what="the plain proxy: no hidden states, no updates"),
        Arm("r2m", "r2m", what="hidden states; GREBT on in-group best-vs-worst pseudo-labels after every step"),
        Arm("r2m-frozen", "r2m-frozen", what="hidden states, no updates (the paper's w/o Train)"),
        Arm("r2m-noise", "r2m-noise", what="noise with the hidden states' mean and std in their place, updates on"),
        Arm("head-only", "head-only", what="no hidden states, the same GREBT updates (the paper's Iterative RM_Head)"),
        Arm("r2m-pairs", "r2m-pairs", what="ours: hidden states; 16 of the proxy's own noisy gold pairs per step"),
        Arm("r2m-judge-4", "r2m-judge", judge=4, what="ours: hidden states; 4 judge-labelled pairs per step"),
        Arm("head-judge-4", "head-judge", judge=4, what="the same 4 judge pairs, no hidden states"),
        Arm("r2m-judge-16", "r2m-judge", judge=16, what="ours: hidden states; 16 judge-labelled pairs per step"),
        Arm("head-judge-16", "head-judge", judge=16, what="the same 16 judge pairs, no hidden states"),
        Arm("ensemble", "vanilla", ensemble=5, what="5 proxy heads (bootstrap fits), uncertainty-weighted, no updates"),
        Arm("r2m-ensemble", "r2m", ensemble=5, what="the 5-head ensemble with hidden states and R2M updates"),
    )
}

# (arm, its control): the paired differences the reading reports.
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("r2m", "vanilla"),
    ("r2m", "r2m-frozen"),
    ("r2m", "head-only"),
    ("r2m-noise", "r2m"),
    ("r2m-pairs", "vanilla"),
    ("r2m-judge-4", "head-judge-4"),
    ("r2m-judge-16", "head-judge-16"),
    ("r2m-judge-4", "vanilla"),
    ("r2m-judge-16", "vanilla"),
    ("head-judge-16", "vanilla"),
    ("ensemble", "vanilla"),
    ("ensemble", "r2m"),
    ("r2m-ensemble", "vanilla"),
    ("r2m-ensemble", "r2m"),
)


class GridPoint(TypedDict):
    """One point of GRID: the RunSettings it sets."""

    service_lr: float
    service_phi_lr: float


# The same small grid for every updating arm: the service learning rate of the feedback attention and of the score
# head phi (its own AdamW group), one optimizer step per RL step. The head-only arms train phi alone.
GRID: tuple[GridPoint, ...] = (
    {"service_lr": 1e-5, "service_phi_lr": 1e-4},
    {"service_lr": 1e-4, "service_phi_lr": 1e-4},
    {"service_lr": 1e-4, "service_phi_lr": 1e-3},
    {"service_lr": 1e-3, "service_phi_lr": 1e-3},
)
# Arms that take another arm's choice instead of a grid of their own (so that the grid and the table fit one
# session on two cores): r2m-noise and r2m-ensemble are ablations of r2m's very update (noise for h; five heads),
# so they run at r2m's learning rates; r2m-pairs gets 16 labelled pairs per step as r2m-judge-16 does and takes its
# rates; the 4-pair judge arms take their 16-pair twins' rates (r2m-judge-4 and head-judge-4 alike, so their
# comparison stays matched). The grid is then 26 runs.
FOLLOWS: dict[str, str] = {
    "r2m-noise": "r2m",
    "r2m-ensemble": "r2m",
    "r2m-pairs": "r2m-judge-16",
    "r2m-judge-4": "r2m-judge-16",
    "head-judge-4": "head-judge-16",
}
CHOSEN = Path(__file__).with_name("chosen.json")  # what the grid chose, on the dev seeds (committed)


def sends_hidden(arm: str) -> bool:
    return ARMS[arm].reward_mode not in ("vanilla", "head-only", "head-judge")


def grid_points(arm: str) -> list[GridPoint]:
    """GRID for an arm; for the arms without hidden states the feedback attention never trains, so the points that
    differ only in its learning rate are one point (run once)."""
    if sends_hidden(arm):
        return [g.copy() for g in GRID]
    seen: dict[float, GridPoint] = {}
    for g in GRID:
        seen.setdefault(g["service_phi_lr"], g.copy())
    return list(seen.values())


def updating(arm: str) -> bool:
    return ARMS[arm].reward_mode not in ("vanilla", "r2m-frozen")


def chosen(arm: str) -> dict[str, Any]:
    """The grid's choice for an updating arm (empty for the others, or before the grid has run)."""
    if not updating(arm) or not CHOSEN.is_file():
        return {}
    return json.loads(CHOSEN.read_text()).get("chosen", {}).get(FOLLOWS.get(arm, arm), {})
