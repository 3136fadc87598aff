"""TRL's real `GRPOTrainer`, plain and `R2MGRPOTrainer`, in two CPU processes (gloo) against a running r2m service:
run by tests/integration/test_trl.py, each rank writes what it saw to `<out>/rank<r>.json`.

    .venv/bin/python -m torch.distributed.run --nproc_per_node 2 tests/integration/trl_ranks.py \\
        --url http://127.0.0.1:8000 --policy /path/to/tiny-policy --out /tmp/ranks

Two parts. "counts": the policy decoder's forwards (`Forwards`) of plain TRL and of the subclass at num_iterations
1 and 2. "posts": the subclass at num_iterations 1 with groups that straddle the two ranks (3 rows per rank, 2 per
group), a head swap forced between the ranks' scoring of step `RACE_STEP` (rank 1 scores only after a version that
rank 0's first request did not see is served) and rank 1's post of step `FAIL_STEP` failing.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

RACE_STEP, FAIL_STEP, STEPS = 1, 2, 3
PROMPTS = [
    "hello world what is the answer",
    "please help me cook",
    "how do you travel to the new world",
    "what is python code",
    "can you help with math",
    "say thanks to the people",
    "what time is it now",
    "give me a good question",
]


class Forwards:
    """Counts the policy decoder's forwards: `generate` inside `generate()` (sampling), `cached` outside it over
    generation's cache (one new token per row: the subclass's closing step), `full` the others (TRL's and ours over
    whole sequences). `n` is everything outside `generate()`."""

    def __init__(self, trainer: Any) -> None:
        self.full = self.generate = self.cached = 0
        self._generating = False
        model = trainer.accelerator.unwrap_model(trainer.model)
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        core.base_model.register_forward_pre_hook(self._count, with_kwargs=True)
        real = core.generate

        def generate(*a: Any, **k: Any) -> Any:
            self._generating = True
            try:
                return real(*a, **k)
            finally:
                self._generating = False

        core.generate = generate

    def _count(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if self._generating:
            self.generate += 1
        elif kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            self.cached += 1
        else:
            self.full += 1

    @property
    def n(self) -> int:
        return self.full + self.cached

    def counts(self) -> dict[str, int]:
        return {"full": self.full, "generate": self.generate, "cached": self.cached}


def _args(out: Path, config: Any = None, **kw: Any) -> Any:
    from trl import GRPOConfig

    base = dict(output_dir=str(out), per_device_train_batch_size=3, num_generations=2, max_completion_length=8,
                max_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                seed=0, bf16=False)  # fmt: skip
    return (config or GRPOConfig)(**{**base, **kw})


def _dataset() -> Any:
    import datasets

    return datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])


def counts(url: str, policy: Path, out: Path) -> dict[str, Any]:
    """Forwards per rank of plain TRL and the subclasses: GRPO at num_iterations 1 and 2, RLOO at 1 (2 steps each)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer, RLOOConfig, RLOOTrainer

    from r2m.client import R2MClient
    from r2m.trainer.trl import R2MGRPOTrainer, R2MRewardFunction, R2MRLOOTrainer

    def length_reward(prompts: Any, completions: Any, **kw: Any) -> list[float]:
        return [float(len(c[0]["content"])) for c in completions]

    result: dict[str, Any] = {}
    for iterations in (1, 2):
        for name in ("plain", "r2m"):
            model, tok = AutoModelForCausalLM.from_pretrained(policy), AutoTokenizer.from_pretrained(policy)
            args = _args(out / f"{name}-{iterations}", num_iterations=iterations)
            if name == "plain":
                trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=_dataset(),
                                      processing_class=tok)  # fmt: skip
            else:
                reward = R2MRewardFunction(R2MClient(url))
                trainer = R2MGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=_dataset(),
                                         processing_class=tok, r2m_run_id=f"count{iterations}")  # fmt: skip
            forwards = Forwards(trainer)
            trainer.train()
            result[f"{name}-{iterations}"] = forwards.counts()
            if name == "r2m":
                result[f"r2m-{iterations}-posted"] = [p["batch_ids"] for p in trainer.r2m_posted]
                result[f"r2m-{iterations}-scores"] = trainer.r2m_reward.score_log
    for name in ("plain", "r2m"):
        model, tok = AutoModelForCausalLM.from_pretrained(policy), AutoTokenizer.from_pretrained(policy)
        args = _args(out / f"rloo-{name}", RLOOConfig)
        if name == "plain":
            trainer = RLOOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=_dataset(),
                                  processing_class=tok)  # fmt: skip
        else:
            trainer = R2MRLOOTrainer(model=model, reward_funcs=R2MRewardFunction(R2MClient(url)), args=args,
                                     train_dataset=_dataset(), processing_class=tok, r2m_run_id="rloo")  # fmt: skip
        forwards = Forwards(trainer)
        trainer.train()
        result[f"rloo-{name}"] = forwards.counts()
        if name == "r2m":
            result["rloo-posted"] = [p["batch_ids"] for p in trainer.r2m_posted]
            result["rloo-groups"] = [[len(g["responses"]) for g in p["groups"]] for p in trainer.r2m_posted]
            result["rloo-scores"] = trainer.r2m_reward.score_log
    return result


def posts(url: str, policy: Path, out: Path, rank: int) -> dict[str, Any]:
    """The subclass at num_iterations 1 for `STEPS` steps with the forced head swap and the failed post."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r2m.client import R2MClient, ServiceUnavailable
    from r2m.trainer.trl import R2MGRPOTrainer, R2MRewardFunction

    race = out / "race.json"

    class RaceClient(R2MClient):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            self.calls: list[dict[str, Any]] = []
            self.raced = False

        def score(self, prompts, responses, hidden=None, *, step=0, total_steps=1, **kw):  # type: ignore[override]
            first_of_race = step == RACE_STEP and "head_version" not in kw and not self.raced
            if first_of_race and rank == 1:
                deadline = time.monotonic() + 120
                while not race.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                seen = json.loads(race.read_text())["version"]
                self.rollback(self.current_head()["version"])  # republished as a new version: a swap
                while self.current_head()["served_version"] <= seen and time.monotonic() < deadline:
                    time.sleep(0.05)
            result = super().score(prompts, responses, hidden, step=step, total_steps=total_steps, **kw)
            if first_of_race:
                self.raced = True
                if rank == 0:
                    race.write_text(json.dumps({"version": max(result.head_versions)}))
            self.calls.append({"step": step, "pin": kw.get("head_version"), "versions": result.head_versions})
            return result

        def post_preferences(self, groups=None, pairs=None, *, step, total_steps, batch_id=None):  # type: ignore[override]
            if rank == 1 and step == FAIL_STEP:
                raise ServiceUnavailable("simulated: /preferences unreachable from rank 1")
            return super().post_preferences(groups, pairs, step=step, total_steps=total_steps, batch_id=batch_id)

    returned: list[dict[str, Any]] = []

    class Recording(R2MRewardFunction):
        def __call__(self, prompts: Any, completions: Any, completion_ids: Any = None, **kw: Any) -> Any:
            out = super().__call__(prompts, completions, completion_ids, **kw)
            returned.append({"responses": [c[0]["content"] for c in completions], "rewards": out})
            return out

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("r2m.trainer.trl").addHandler(Keep(logging.WARNING))
    client = RaceClient(url)
    trainer = R2MGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy),
        reward_funcs=Recording(client),
        args=_args(out / "posts", num_iterations=1, max_steps=STEPS),
        train_dataset=_dataset(),
        processing_class=AutoTokenizer.from_pretrained(policy),
        r2m_run_id="posts",
    )
    trainer.train()
    posted = [
        {
            "step": p["step"],
            "batch_ids": p["batch_ids"],
            "groups": [
                {
                    "responses": g["responses"],
                    "rewards": g["rewards"],
                    "hidden": [list(h.shape) for h in g["hidden"]],
                }
                for g in p["groups"]
            ],
        }
        for p in trainer.r2m_posted
    ]
    return {"posted": posted, "returned": returned, "scores": trainer.r2m_reward.score_log, "calls": client.calls,
            "logged": records}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--policy", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args()
    from accelerate import PartialState

    rank = PartialState(cpu=True).process_index
    result = {"counts": counts(a.url, a.policy, a.out), "posts": posts(a.url, a.policy, a.out, rank)}
    (a.out / f"rank{rank}.json").write_text(json.dumps(result))
    import torch.distributed as dist

    if dist.is_initialized():  # gloo's threads end before the interpreter's teardown, which can abort them (exit -6)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
