"""The trainer's configuration: one dataclass, one help text per field, checked in `__post_init__`.

The `r2m train` flags are generated from these fields, so `--help` and the config never drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from r2m.data import BUNDLED_PROMPTS, load_pairs, load_prompts

__all__ = ["ADVANTAGES", "REWARD_MODES", "TrainConfig", "load_pairs", "load_prompts"]

Advantage = Literal["grpo", "rloo"]
RewardMode = Literal["vanilla", "r2m", "r2m-frozen", "r2m-noise", "head-only", "r2m-pairs", "r2m-judge", "head-judge"]
ADVANTAGES: tuple[str, ...] = typing.get_args(Advantage)
REWARD_MODES: tuple[str, ...] = typing.get_args(RewardMode)

# Fields that may differ between a run and its resumption: where the service is, and the flag itself.
RESUMABLE_CHANGES = frozenset({"server_url", "api_key", "resume", "device", "log_level"})


@dataclass
class TrainConfig:
    """GRPO/RLOO on a Hugging Face causal LM with rewards from the r2m service (docs/method.md: the paper's loop)."""

    policy: str = field(metadata={"help": "Policy to train: a local folder or hub id of a causal LM (with tokenizer)."})
    prompts: str = field(
        default="default",
        metadata={
            "help": 'Prompts: a .jsonl file of {"prompt": ...} lines, a .txt file with one prompt per line, '
            "or the name of a bundled set ('default': 64 short chat prompts)."
        },
    )
    server_url: str = field(default="http://127.0.0.1:8000", metadata={"help": "Base URL of the r2m reward service."})
    api_key: str | None = field(
        default=None,
        metadata={"help": "Bearer key of the service (better: set R2M_API_KEY in the environment, argv is visible)."},
    )
    steps: int = field(default=100, metadata={"help": "Total RL steps T (also the T of the service's omega schedule)."})
    prompts_per_step: int = field(default=8, metadata={"help": "Prompts sampled per RL step (the batch of groups)."})
    group_size: int = field(default=4, metadata={"help": "Responses K sampled per prompt (K >= 2; paper: 4 or 8)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest response, in tokens."})
    max_prompt_tokens: int = field(default=256, metadata={"help": "Prompts are truncated to this many tokens (left)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the rollouts (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold of the rollouts, in (0, 1]."})
    policy_epochs: int = field(
        default=2,
        metadata={
            "help": "Policy epochs k over each step's batch (paper: 2); the last one's forward pass yields "
            "the refreshed hidden states posted to /preferences."
        },
    )
    micro_batch_size: int = field(
        default=0,
        metadata={
            "help": "Sequences per forward/backward pass (gradient accumulation); 0 = the whole step at once. "
            "One optimizer step per epoch either way."
        },
    )
    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip range of the token-level ratio."})
    kl_coef: float = field(default=0.04, metadata={"help": "Weight of the KL penalty to the frozen initial policy."})
    lr: float = field(default=1e-6, metadata={"help": "AdamW learning rate of the policy."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables clipping)."})
    advantage: Advantage = field(
        default="grpo",
        metadata={
            "help": "Advantage estimator: 'grpo' (r - group mean) / (group std + eps), or 'rloo' "
            "(r minus the mean of the other K-1 rewards)."
        },
    )
    reward_mode: RewardMode = field(
        default="r2m",
        metadata={
            "help": "What the service sees: 'vanilla' (no hidden states, no updates), 'r2m' (hidden states "
            "and updates), 'r2m-frozen' (hidden states, no updates: the paper's w/o Train), 'r2m-noise' "
            "(Gaussian noise in place of hidden states, also posted), 'head-only' (no hidden states, groups "
            "posted without them: the paper's Iterative RM_Head), 'r2m-pairs' (ours, not the paper's: hidden states "
            "like 'r2m', but the update gets labelled pairs from --pairs, replayed through the current policy, "
            "instead of in-group pseudo-labels), 'r2m-judge' (ours: hidden states like 'r2m'; the update gets "
            "pairs from the step's own groups labelled by --judge) and 'head-judge' (the same judge pairs, no "
            "hidden states)."
        },
    )
    pairs: str | None = field(
        default=None,
        metadata={
            "help": 'Labelled pairs for --reward-mode r2m-pairs: a .jsonl of {"prompt", "chosen", "rejected"} '
            "lines. Each step posts --pairs-per-step of them with the hidden states of the policy after the "
            "step's update, by teacher forcing over prompt + response + end token."
        },
    )
    pairs_per_step: int = field(default=16, metadata={"help": "Pairs posted per step in r2m-pairs mode."})
    judge: str | None = field(
        default=None,
        metadata={
            "help": "The outside judge of --reward-mode r2m-judge / head-judge: 'service' (post the groups; the "
            "service's judge, R2M_JUDGE, labels them), module:function (a Python callable f(prompt, response_a, "
            "response_b) -> bool or P(a is better)), an http(s) URL, or openai:<base_url> (an OpenAI-compatible "
            "endpoint, configured by the R2M_JUDGE_* variables); all but 'service' judge here (r2m.trainer.judge)."
        },
    )
    judge_pairs_per_step: int = field(
        default=4,
        metadata={
            "help": "Pairs from each step's groups the judge labels: each picked group's best- vs worst-scored "
            "response, groups at random (with --judge service: R2M_JUDGE_PAIRS on the service)."
        },
    )
    judge_with_groups: bool = field(
        default=False,
        metadata={
            "help": "With a judge mode: also post the groups for the in-group pseudo-labels (beside, not instead; "
            "with --judge service the groups are posted anyway and R2M_JUDGE_WITH_PSEUDO_LABELS decides)."
        },
    )
    local_feedback: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "Compute the feedback attention and the rewards next to the policy (r2m.trainer.local: "
            "scoring then moves rm_dim numbers per response instead of T x D_policy hidden states, in one round "
            "trip): on, off, or auto (on when the policy runs on a GPU, off on a CPU, where it would only move the "
            "server's work onto the trainer's cores)."
        },
    )
    omega_steps: int = field(
        default=0,
        metadata={
            "help": "T of the service's omega schedule w(t) = max(0.5 cos(pi t / T) + 0.5, Omega): w falls from 1 "
            "at step 0 to the floor Omega (R2M_OMEGA_FLOOR; reached at about 0.44 T for Omega = 0.6) and stays "
            "there, where the feedback has its full weight 1 - Omega (0: --steps, the paper's choice)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of prompt sampling, rollouts and noise (per step: seed+t)."})
    out_dir: str = field(default="runs/r2m", metadata={"help": "Folder for metrics.jsonl and checkpoints/."})
    save_every: int = field(default=50, metadata={"help": "Checkpoint every this many steps (0: only at the end)."})
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the latest checkpoint in out_dir (its config must match this one)."},
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "Policy weights dtype (hidden states travel in it, bf16 as is)."}
    )
    rollout: Literal["hf", "vllm"] = field(
        default="hf",
        metadata={
            "help": "Rollout engine: 'hf' (Hugging Face generate, CPU or GPU) or 'vllm' (pip install -e '.[vllm]' "
            "in the checkout; CUDA only; a vLLM copy of the policy follows the trained weights each step). Old "
            "log-probs and the hidden states sent to the service come from the trainer's own forward either way."
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "With rollout='vllm': share of the GPU vLLM may take (weights + KV cache)."}
    )
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})
    log_level: Literal["debug", "info", "warning", "error"] = field(
        default="info",
        metadata={"help": "Log level on stderr; httpx's line per request shows at 'debug' only (it breaks the bar)."},
    )
    log_plain_rewards: bool = field(
        default=False,
        metadata={
            "help": "Also score each step's samples with the plain RM (no hidden states: w = 1) and log "
            "rewards/plain_mean and the served head's guard figures: whether a rise is the policy getting better or "
            "the head inflating (one more /score and one /heads/current per step)."
        },
    )

    # derived in __post_init__
    batch_size: int = field(init=False, metadata={"help": "Sequences per step: prompts_per_step * group_size."})
    sends_hidden: bool = field(init=False, metadata={"help": "Whether /score gets hidden states (or noise)."})
    posts_groups: bool = field(init=False, metadata={"help": "Whether groups are posted to /preferences."})
    posts_pairs: bool = field(init=False, metadata={"help": "Whether labelled pairs are posted to /preferences."})
    posts_judged: bool = field(init=False, metadata={"help": "Whether the trainer judges and posts labelled pairs."})
    posts_preferences: bool = field(init=False, metadata={"help": "Whether anything is posted to /preferences."})
    schedule_steps: int = field(init=False, metadata={"help": "T sent to the service for the omega schedule."})

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {msg}")

        need(bool(self.policy), "policy", "give a causal LM folder or hub id")
        for name in (
            "steps",
            "prompts_per_step",
            "max_new_tokens",
            "max_prompt_tokens",
            "policy_epochs",
            "pairs_per_step",
            "judge_pairs_per_step",
        ):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        need(self.group_size >= 2, "group_size", "GRPO/RLOO need K >= 2 responses per prompt")
        need(self.micro_batch_size >= 0, "micro_batch_size", "must be >= 0 (0 = whole batch)")
        need(self.temperature > 0, "temperature", "must be > 0")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.clip_eps > 0, "clip_eps", "must be > 0")
        need(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        need(self.save_every >= 0, "save_every", "must be >= 0 (0: only at the end)")
        need(self.advantage in ADVANTAGES, "advantage", f"choose one of {', '.join(ADVANTAGES)}")
        need(self.reward_mode in REWARD_MODES, "reward_mode", f"choose one of {', '.join(REWARD_MODES)}")
        need(self.dtype in ("float32", "bfloat16", "float16"), "dtype", "choose float32, bfloat16 or float16")
        need(self.rollout in ("hf", "vllm"), "rollout", "choose hf or vllm")
        need(self.local_feedback in ("auto", "on", "off"), "local_feedback", "choose auto, on or off")
        need(self.log_level in ("debug", "info", "warning", "error"), "log_level", "choose debug, info, warning, error")
        need(self.rollout != "vllm" or self.device != "cpu", "rollout", "vLLM rollouts need a CUDA device (device=cpu)")
        need(0 < self.vllm_gpu_memory_utilization < 1, "vllm_gpu_memory_utilization", "must be in (0, 1)")
        need(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            "choose auto, cpu, cuda or cuda:N",
        )
        need(
            self.prompts in BUNDLED_PROMPTS or Path(self.prompts).is_file(),
            "prompts",
            f"not a file nor a bundled set ({', '.join(BUNDLED_PROMPTS)})",
        )
        if self.reward_mode == "r2m-pairs":
            need(
                self.pairs is not None and Path(self.pairs).is_file(),
                "pairs",
                "reward_mode r2m-pairs needs a .jsonl file of labelled pairs (--pairs FILE)",
            )
        judged = self.reward_mode in ("r2m-judge", "head-judge")
        if judged:
            need(bool(self.judge), "judge", f"reward_mode {self.reward_mode} needs --judge module:function or URL")
        need(self.omega_steps >= 0, "omega_steps", "must be >= 0 (0: the run's --steps)")
        self.batch_size = self.prompts_per_step * self.group_size
        self.sends_hidden = self.reward_mode in ("r2m", "r2m-frozen", "r2m-noise", "r2m-pairs", "r2m-judge")
        on_service = judged and self.judge == "service"  # the service's judge labels the posted groups
        self.posts_groups = self.reward_mode in ("r2m", "r2m-noise", "head-only") or (
            judged and (self.judge_with_groups or on_service)
        )
        self.posts_pairs = self.reward_mode == "r2m-pairs"
        self.posts_judged = judged and not on_service
        self.posts_preferences = self.posts_groups or self.posts_pairs or judged
        self.schedule_steps = self.omega_steps or self.steps

    # --- (de)serialisation: a checkpoint carries the config that rebuilds it -------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The init fields (no secrets: api_key is left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init and f.name != "api_key"}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        return cls(**{**json.loads(Path(path).read_text()), **overrides})

    def differences(self, other: TrainConfig) -> list[str]:
        """Names of the settings that differ between two configs and matter for resuming."""
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs.get(k))
