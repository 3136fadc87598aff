"""r2m.trainer: a small, readable GRPO/RLOO trainer that gets rewards and R2M updates from the r2m service.

    from r2m.trainer import TrainConfig, train

    train(TrainConfig(policy="my-policy/", steps=100, reward_mode="r2m", server_url="http://127.0.0.1:8000"))

The loop is in `r2m.trainer.grpo` (its docstring lists the phases); `r2m train --help` has every setting.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import ADVANTAGES, REWARD_MODES, TrainConfig, load_prompts

if TYPE_CHECKING:
    from .grpo import GRPOTrainer, Rollout, group_advantages, sequence_forward, train

__all__ = [
    "ADVANTAGES",
    "REWARD_MODES",
    "GRPOTrainer",
    "Rollout",
    "TrainConfig",
    "group_advantages",
    "load_prompts",
    "sequence_forward",
    "train",
]

# The loop imports torch (seconds); the config does not. `r2m --help` builds its flags from the config, so the loop
# loads on first use.
_LAZY = {"GRPOTrainer", "Rollout", "group_advantages", "sequence_forward", "train"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(".grpo", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
