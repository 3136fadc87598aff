"""End to end: `r2m demo` with a tiny budget, as a newcomer runs it (a subprocess): gold for every arm, a plot, and
closing words that match the curves."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STEPS = 4


def test_demo_shows_gold_for_each_arm_and_says_what_happened(tmp_path: Path):
    out = tmp_path / "demo"
    arms = ["vanilla-b0.01", "r2m-judge-16"]
    args = [sys.executable, "-m", "r2m.cli", "demo", "--steps", str(STEPS), "--arms", *arms, "--out-dir", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "accelerator" not in done.stdout + done.stderr

    png = out / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in done.stdout
    runs = {r["arm"]: r for r in json.loads((out / "demo.json").read_text())["runs"]}
    assert sorted(runs) == sorted(arms)
    for arm, r in runs.items():
        assert [s["step"] for s in r["steps"]] == list(range(1, STEPS + 1))
        assert r["evals"][0]["step"] == 0 and r["evals"][-1]["step"] == STEPS and r["evals"][-1]["kl"] > 0
        # The printed line of every evaluation carries its figures.
        for e in r["evals"]:
            line = re.search(rf"{re.escape(arm)}\s+step\s+{e['step']}/{STEPS}\s+gold ([+-][\d.]+)\s+plain proxy "
                             r"([+-][\d.]+)", done.stdout)  # fmt: skip
            assert line and float(line.group(1)) == round(e["gold"], 2), (arm, e, done.stdout)
        # The closing words are the curves' own figures.
        first, last = r["evals"][0], r["evals"][-1]
        said = re.search(rf"^  {re.escape(arm)}: .* gold ([+-][\d.]+) -> ([+-][\d.]+)", done.stdout, flags=re.M)
        assert said, done.stdout
        assert (float(said.group(1)), float(said.group(2))) == (round(first["gold"], 2), round(last["gold"], 2))
    best = max(runs.values(), key=lambda r: r["evals"][-1]["gold"])
    assert f"Most gold at the end: {best['arm']}" in done.stdout
    assert re.search(r"on this seed R2M (helped|did not help)\.", done.stdout), done.stdout
    assert (out / "artefacts" / "artefacts.json").is_file()  # cached for the next run
