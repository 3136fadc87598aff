"""The benchmark's arms, the comparisons it reports, and the dev-seed grids that tune each arm.

Every arm runs the same GRPO on the same SFT policy against the same proxy RM, on the task's training prompts;
they differ in what the r2m service sees (hidden states, noise, or nothing), what it is updated with (in-group
pseudo-labels, a judge's labels of the step's own pairs, nothing), and for the vanilla arms in the KL penalty and
the policy's learning rate. Arm A and arm B on RL seed s share the sampling seed and the feedback attention's
initialisation (the service's R2M_SEED is the RL seed), so every comparison is paired.

The bar an arm must clear is the **vanilla envelope**: at each KL budget, the best of the six vanilla arms on the
same seed (five KL coefficients and one lower learning rate), what an RL engineer would get by tuning the penalty.
The labels' fair use without R2M is **refit**: the proxy's own head refit, each step, on its 500 pairs plus every
judge label so far.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ARMS",
    "CHOSEN",
    "COMPARISONS",
    "ENVELOPE",
    "FOLLOWS",
    "GRIDS",
    "KL_BUDGETS",
    "TUNE_KL",
    "Arm",
    "chosen",
    "grid_points",
    "tuned",
]


@dataclass(frozen=True)
class Arm:
    name: str
    reward_mode: str  # r2m train's --reward-mode: what the trainer sends and posts
    judge: int = 0  # pairs per step the judge labels: the service's judge (R2M_JUDGE_PAIRS), or refit's own
    refit: bool = False  # the proxy's head refit on its pairs and the judge's labels (no R2M)
    kl_coef: float = 0.01
    lr: float = 1.5e-4  # the policy's AdamW learning rate
    grid: str = ""  # GRIDS key: how the arm is tuned on the dev seeds ("" for arms tuned by FOLLOWS or not at all)
    what: str = ""


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("vanilla-b0.01", "vanilla", kl_coef=0.01, what="the plain proxy, KL coefficient 0.01"),
        Arm("vanilla-b0.03", "vanilla", kl_coef=0.03, what="the plain proxy, KL coefficient 0.03"),
        Arm("vanilla-b0.1", "vanilla", kl_coef=0.1, what="the plain proxy, KL coefficient 0.1"),
        Arm("vanilla-b0.3", "vanilla", kl_coef=0.3, what="the plain proxy, KL coefficient 0.3"),
        Arm("vanilla-b1", "vanilla", kl_coef=1.0, what="the plain proxy, KL coefficient 1"),
        Arm("vanilla-lr", "vanilla", kl_coef=0.01, lr=5e-5, what="the plain proxy, KL 0.01, a third of the lr"),
        Arm("r2m", "r2m", grid="hidden", what="hidden states; GREBT on in-group pseudo-labels (the paper's loop)"),
        Arm("r2m-judge-4", "r2m", judge=4, what="hidden states; the service's judge labels 4 pairs per step"),
        Arm("r2m-judge-16", "r2m", judge=16, grid="hidden",
            what="hidden states; the service's judge labels 16 pairs per step"),
        Arm("head-judge-4", "head-only", judge=4, what="the same judge, 4 pairs, no hidden states"),
        Arm("head-judge-16", "head-only", judge=16, grid="phi", what="the same judge, 16 pairs, no hidden states"),
        Arm("noise-judge-16", "r2m-noise", judge=16,
            what="the judge's 16 pairs with noise of the hidden states' shape and statistics in their place"),
        Arm("refit-4", "vanilla", judge=4, refit=True,
            what="no R2M: each step the proxy's head is refit on its 500 pairs + every judge label so far (4/step)"),
        Arm("refit-16", "vanilla", judge=16, refit=True, grid="refit",
            what="no R2M: the same refit with 16 judge labels per step"),
    )
}  # fmt: skip

ENVELOPE = tuple(a for a in ARMS if a.startswith("vanilla-"))  # the vanilla arms the envelope takes the best of
KL_BUDGETS = (1.0, 2.0, 4.0, 8.0)  # nats (KL(policy || SFT) per response on the evaluation samples)
TUNE_KL = 4.0  # the grids choose by gold at KL <= this budget, not by mean gold (which rewards braking)

# (arm, control): the paired differences the reading reports; "envelope" is the vanilla envelope.
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("r2m", "envelope"),
    ("r2m-judge-4", "envelope"),
    ("r2m-judge-16", "envelope"),
    ("head-judge-4", "envelope"),
    ("head-judge-16", "envelope"),
    ("noise-judge-16", "envelope"),
    ("refit-4", "envelope"),
    ("refit-16", "envelope"),
    ("r2m-judge-4", "refit-4"),
    ("r2m-judge-16", "refit-16"),
    ("r2m-judge-4", "head-judge-4"),
    ("r2m-judge-16", "head-judge-16"),
    ("r2m-judge-16", "noise-judge-16"),
    ("r2m", "vanilla-b0.01"),
)

# Every tuned arm gets six points on the dev seeds (vanilla's six are its envelope arms). "hidden": the feedback
# attention's and phi's learning rates and optimizer steps per update; "phi": phi alone (the attention never trains
# without hidden states), up to a rate of 0.1 and four steps, so that the head can move; "refit": the L2 penalty of
# the refit head and the weight of a judge label against one of the proxy's own pairs.
GRIDS: dict[str, tuple[dict[str, Any], ...]] = {
    "hidden": (
        {"service_lr": 1e-5, "service_phi_lr": 1e-4, "service_train_steps": 1},
        {"service_lr": 1e-4, "service_phi_lr": 1e-4, "service_train_steps": 1},
        {"service_lr": 1e-4, "service_phi_lr": 1e-3, "service_train_steps": 1},
        {"service_lr": 1e-3, "service_phi_lr": 1e-3, "service_train_steps": 1},
        {"service_lr": 1e-4, "service_phi_lr": 1e-2, "service_train_steps": 4},
        {"service_lr": 1e-3, "service_phi_lr": 1e-1, "service_train_steps": 4},
    ),
    "phi": (
        {"service_phi_lr": 1e-4, "service_train_steps": 1},
        {"service_phi_lr": 1e-3, "service_train_steps": 1},
        {"service_phi_lr": 1e-2, "service_train_steps": 1},
        {"service_phi_lr": 1e-1, "service_train_steps": 1},
        {"service_phi_lr": 1e-2, "service_train_steps": 4},
        {"service_phi_lr": 1e-1, "service_train_steps": 4},
    ),
    "refit": (
        {"refit_l2": 1e-5, "refit_weight": 1.0},
        {"refit_l2": 1e-5, "refit_weight": 2.0},
        {"refit_l2": 1e-5, "refit_weight": 4.0},
        {"refit_l2": 1e-3, "refit_weight": 1.0},
        {"refit_l2": 1e-3, "refit_weight": 2.0},
        {"refit_l2": 1e-3, "refit_weight": 4.0},
    ),
}
# Arms that take another arm's choice: the 4-pair arms their 16-pair twins' (the same family, the same budget of
# six points, so each 4 vs 16 comparison stays matched), and noise-judge r2m-judge-16's: it is that very update with
# noise in place of the hidden states, so at the same rates the comparison isolates what the hidden states carry.
FOLLOWS: dict[str, str] = {
    "r2m-judge-4": "r2m-judge-16",
    "head-judge-4": "head-judge-16",
    "refit-4": "refit-16",
    "noise-judge-16": "r2m-judge-16",
}
CHOSEN = Path(__file__).with_name("chosen.json")  # what the grids chose, on the dev seeds (committed)


def grid_points(arm: str) -> list[dict[str, Any]]:
    """The points an arm is tuned over on the dev seeds: its grid's, or for vanilla its envelope arms (one point
    each, nothing to set); none for an arm that follows another."""
    a = ARMS[arm]
    return [dict(p) for p in GRIDS[a.grid]] if a.grid else []


def tuned() -> list[str]:
    """The arms with a grid of their own; vanilla is tuned over its envelope arms."""
    return [a for a in ARMS if ARMS[a].grid]


def chosen(arm: str) -> dict[str, Any]:
    """The grid's choice for an arm (empty for the vanilla arms, or before the grid has run)."""
    lead = FOLLOWS.get(arm, arm)
    if not ARMS[lead].grid or not CHOSEN.is_file():
        return {}
    return dict(json.loads(CHOSEN.read_text()).get("chosen", {}).get(lead, {}))
