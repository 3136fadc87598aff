"""The trainer's door onto r2m's one judge (`r2m.service.update.judge`, docs/judge.md): `r2m train --judge` picks and
labels pairs with the same code as the service's worker.

Two ways to run a judge with `--reward-mode r2m-judge` (hidden states) or `head-judge` (none):

    r2m train ... --reward-mode r2m-judge --judge service     # the service's judge (R2M_JUDGE on the service)
    r2m train ... --reward-mode r2m-judge --judge my_pkg.judges:compare --judge-pairs-per-step 8
    r2m train ... --reward-mode r2m-judge --judge http://judge-host:9000/judge
    R2M_JUDGE_MODEL=my-model r2m train ... --reward-mode r2m-judge --judge openai:http://vllm-host:8000/v1

With `--judge service` the trainer posts the step's groups (with the last epoch's hidden states in r2m-judge) and
the service's worker picks, judges and trains the pairs: what any trainer that posts groups gets (TRL through
`r2m.trainer.trl`, OpenRLHF, verl). Otherwise the trainer judges here: each step `judge_pairs_per_step` pairs of its
groups (`choose_pairs`: each picked group's best- against its worst-scored response, then others) go to the judge,
and the labelled ones are posted as labelled pairs. An `openai:` judge here reads its R2M_JUDGE_* settings from the
environment, as the service does.
"""

from __future__ import annotations

from r2m.service.update.judge import HTTPJudge, Judge, OpenAIJudge, choose_pairs, label_pairs, load_judge

__all__ = ["SERVICE", "HTTPJudge", "Judge", "OpenAIJudge", "choose_pairs", "label_pairs", "load_judge"]

SERVICE = "service"  # --judge service: the service's judge labels the posted groups
