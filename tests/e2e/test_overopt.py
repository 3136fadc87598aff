"""End to end: the over-optimization benchmark's --quick mode (what CI runs), as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r2m.experiments.overopt.report import compare, gold_at_budget, interval, summarise
from r2m.experiments.overopt.task import EVAL_PROMPTS, PROMPTS, TRAIN_PROMPTS, gold_reward

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def inverted_gold(prompt: str, response: str, finished: bool) -> float:
    """A gold for `rescore` to swap in: the task's, negated."""
    return -gold_reward(prompt, response, finished)


def test_quick_mode_writes_curves_table_and_plots(tmp_path: Path):
    out = tmp_path / "overopt"
    args = [sys.executable, "-m", "experiments.overopt", "--quick", "--out-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    arms = ("r2m-judge-4", "refit-4", "vanilla-b0.01", "vanilla-b0.1")
    assert sorted((r["arm"], r["seed"]) for r in runs) == [(a, 0) for a in arms]
    steps = results["meta"]["settings"]["steps"]
    assert "TRAIN_PROMPTS" in results["meta"]["settings"]["prompt_source"]
    for r in runs:
        assert [s["step"] for s in r["steps"]] == list(range(steps))
        assert [e["step"] for e in r["evals"]] == [0, 3, 6]  # before RL, then every eval_every steps
        for row in [*r["steps"], *r["evals"]]:
            assert all(math.isfinite(row[k]) for k in ("gold", "kl")), row
        assert r["evals"][-1]["kl"] > 0  # the policy moved away from the SFT reference
        saved = json.loads((out / "runs" / f"{r['arm']}-seed0" / "eval_texts.json").read_text())
        assert set(saved["prompts"]) == set(EVAL_PROMPTS) and [e["step"] for e in saved["evals"]] == [0, 3, 6]
        # RL on the training prompts only: every prompt a step sampled is one of them.
        assert all(PROMPTS[i] in TRAIN_PROMPTS for s in r["steps"] for i in s["prompt_ids"])
    by_arm = {r["arm"]: r for r in runs}
    # Same seed, same prompts, same SFT policy and proxy: step 0 is identical; then only the arm differs.
    assert by_arm["vanilla-b0.01"]["evals"][0] == by_arm["refit-4"]["evals"][0] == by_arm["r2m-judge-4"]["evals"][0]
    assert by_arm["vanilla-b0.01"]["settings"]["kl_coef"] == 0.01
    assert by_arm["vanilla-b0.1"]["settings"]["kl_coef"] == 0.1
    assert all(s["head_version"] == 0 for s in by_arm["vanilla-b0.01"]["steps"])
    # refit: the judge's labels each step, the proxy's head refit and served before the next step.
    assert all(1 <= s["judge_labels"] <= 4 for s in by_arm["refit-4"]["steps"])
    assert [s["head_version"] for s in by_arm["refit-4"]["steps"]] == list(range(steps))
    # r2m-judge: the service's judge labels the posted groups; one update per step, served before the next, unless
    # the head guard refused it (at the grid's chosen rates it can: the run records each refusal and goes on).
    judged = by_arm["r2m-judge-4"]
    refused = [r["rl_step"] for r in judged["refused_updates"]]  # "step": the schedule's, min(t, omega_steps)
    assert all(r["reason"].startswith("guard") for r in judged["refused_updates"]), judged["refused_updates"]
    assert judged["final_head_version"] == steps - len(refused) and judged["judge_labels"] >= steps
    served = [s["head_version"] for s in judged["steps"]]
    assert served == [t - sum(r < t for r in refused) for t in range(steps)]
    assert judged["judge_agreement"] > 0.5

    table = (out / "results.md").read_text()
    assert all(f"| {a} | 1 |" in table for a in arms) and "| envelope | 1 |" in table
    assert "| r2m-judge-4 - envelope | 1 |" in table and "| r2m-judge-4 - refit-4 | 1 |" in table
    for name in ("gold_vs_step.png", "gold_vs_kl.png", "acc_on_policy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    art = json.loads((out / "artefacts" / "artefacts.json").read_text())
    assert 0.5 < art["proxy_heldout_gold_accuracy"] <= 1.0

    # Another gold rescores the saved evaluation samples: here the task's own, negated.
    gold = f"{__name__.replace('r2m.', '', 1)}:inverted_gold"
    done = subprocess.run([sys.executable, "-m", "experiments.overopt", "rescore", "--gold", gold, "--out-dir",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rescored = json.loads(next(out.glob("rescored-*/results.json")).read_text())
    for a, b in zip(runs, rescored["runs"]):
        assert [e["gold"] for e in b["evals"]] == pytest.approx([-e["gold"] for e in a["evals"]])


def test_gold_at_a_kl_budget_and_the_envelope():
    evals = [
        {"step": 0, "kl": 0.0, "gold": 1.0}, {"step": 4, "kl": 1.0, "gold": 2.0}, {"step": 8, "kl": 3.0, "gold": 0.0}
    ]  # fmt: skip
    assert gold_at_budget(evals, 2.0) == (pytest.approx(1.0), 2.0, True)  # halfway from (1, 2) to (3, 0)
    assert gold_at_budget(evals, 8.0) == (0.0, 0.0, False)  # never reached: the last evaluation
    assert gold_at_budget(evals, 0.5) == (pytest.approx(1.5), 1.0, True)

    def run(arm: str, seed: int, golds: list[float], kls: list[float]) -> dict:
        ev = [{"step": 4 * i, "kl": k, "gold": g} for i, (g, k) in enumerate(zip(golds, kls))]
        return {"arm": arm, "seed": seed, "evals": ev, "steps": [{"acc_on_policy": None, "acc_on_policy_proxy": None}],
                "heldout_accuracy": {"before": 0.8, "after": 0.8}, "wall_s": 1.0}  # fmt: skip

    runs = [run("v1", 0, [0, 1, 2], [0, 1, 2]), run("v2", 0, [0, 3, 1], [0, 1, 2]),
            run("v1", 1, [0, 2, 2], [0, 1, 2]), run("v2", 1, [0, 1, 1], [0, 1, 2]),
            run("arm", 0, [0, 4, 4], [0, 1, 2]), run("arm", 1, [0, 1, 1], [0, 1, 2])]  # fmt: skip
    summary = summarise(runs, (1.0,), ("v1", "v2"))
    assert summary["arms"]["envelope"]["gold@1"] == [3.0, 2.0]  # per seed, the better vanilla
    assert summary["envelope"]["best_of"]["gold@1"] == ["v2", "v1"]
    c = compare(summary, "arm", "envelope", "gold@1")
    assert c is not None and c["diffs"] == [1.0, -1.0]


def test_gold_reward_terms():
    # Distinct good words and the topic count; repeats, bad words, length past 20 and a missing end cost.
    assert gold_reward("tell me about music", "music is great .") == 2.0
    assert gold_reward("tell me about music", "it is great . it is great .") == 0.5
    assert gold_reward("tell me about music", "it is bad .") == -1.0
    assert gold_reward("tell me about music", "music is great .", finished=False) == 0.0
    long = "music is great . " + "it is . " * 6  # 4 + 18 = 22 words
    assert gold_reward("tell me about music", long) == pytest.approx(2.0 - 0.3 * 2)


def test_interval_is_a_t_interval():
    mean, half = interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-4)
    assert math.isnan(interval([1.0])[1])


def test_r2m_overopt_forwards_to_the_benchmark_and_rejects_bad_flags(tmp_path: Path):
    cli = [sys.executable, "-m", "r2m.cli", "overopt"]
    shown = subprocess.run([*cli, "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--quick" in shown.stdout and "refit-16" in shown.stdout
    out = tmp_path / "never"
    bad = subprocess.run([*cli, "--steps", "0", "--out-dir", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--steps must be >= 1" in bad.stderr
    assert not out.exists()  # refused before anything was built
