"""End to end: the over-optimization benchmark's --quick mode (what CI runs), as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r2m.experiments.overopt.report import interval
from r2m.experiments.overopt.task import gold_reward

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_quick_mode_writes_curves_table_and_plots(tmp_path: Path):
    out = tmp_path / "overopt"
    args = [sys.executable, "-m", "experiments.overopt", "--quick", "--out-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    arms = ("ensemble", "r2m", "r2m-judge-4", "vanilla")
    assert sorted((r["arm"], r["seed"]) for r in runs) == [(a, 0) for a in arms]
    steps = results["meta"]["settings"]["steps"]
    for r in runs:
        assert [s["step"] for s in r["steps"]] == list(range(steps))
        assert [e["step"] for e in r["evals"]] == [0, 3, 6]  # before RL, then every eval_every steps
        for row in [*r["steps"], *r["evals"]]:
            assert all(math.isfinite(row[k]) for k in ("gold", "kl")), row
        assert all(math.isfinite(e["proxy"]) for e in r["evals"])
        assert 0.0 <= r["heldout_accuracy"]["after"] <= 1.0
        assert r["evals"][-1]["kl"] > 0  # the policy moved away from the SFT reference
        assert all(s["acc_on_policy"] is None or 0.0 <= s["acc_on_policy"] <= 1.0 for s in r["steps"])
    by_arm = {r["arm"]: r for r in runs}
    # Same seed, same prompts, same SFT policy and proxy: step 0 is identical; then only the arm differs.
    assert by_arm["vanilla"]["evals"][0] == by_arm["r2m"]["evals"][0] == by_arm["ensemble"]["evals"][0]
    assert by_arm["vanilla"]["steps"][0]["reward"] == by_arm["r2m"]["steps"][0]["reward"]  # w(0) = 1: plain RM
    assert by_arm["ensemble"]["steps"][0]["reward"] != by_arm["vanilla"]["steps"][0]["reward"]  # five heads, uwo
    assert all(s["head_version"] == 0 for s in by_arm["vanilla"]["steps"])
    assert by_arm["r2m"]["final_head_version"] == steps  # one R2M update per step, each served before the next
    assert [s["head_version"] for s in by_arm["r2m"]["steps"]] == list(range(steps))
    assert all(1 <= s["judge_labels"] <= 4 for s in by_arm["r2m-judge-4"]["steps"])
    assert by_arm["r2m-judge-4"]["final_head_version"] == steps and by_arm["r2m-judge-4"]["judge_agreement"] > 0.5
    assert all("feedback_share" in e for e in by_arm["r2m"]["evals"][1:])
    assert by_arm["r2m"]["evals"][0]["similarity"]["normal"] > 0

    table = (out / "results.md").read_text()
    assert all(f"| {a} | 1 |" in table for a in arms)
    assert "| r2m - vanilla | 1 |" in table and "| ensemble - vanilla | 1 |" in table
    for name in ("gold_vs_step.png", "gold_vs_kl.png", "acc_on_policy.png", "reward_scale.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    art = json.loads((out / "artefacts" / "artefacts.json").read_text())
    assert 0.5 < art["proxy_heldout_gold_accuracy"] <= 1.0


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
    assert shown.returncode == 0 and "--quick" in shown.stdout and "r2m-judge-16" in shown.stdout
    out = tmp_path / "never"
    bad = subprocess.run([*cli, "--steps", "0", "--out-dir", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--steps must be >= 1" in bad.stderr
    assert not out.exists()  # refused before anything was built
