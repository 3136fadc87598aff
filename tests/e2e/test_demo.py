"""End to end: `r2m demo` with a tiny budget, as a newcomer runs it (a subprocess), asserting that things moved."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STEPS = 3


def test_demo_trains_advances_the_head_and_writes_a_plot(tmp_path: Path):
    out = tmp_path / "demo"
    args = [sys.executable, "-m", "r2m.cli", "demo", "--steps", str(STEPS), "--out-dir", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    png = out / "demo.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert str(png.resolve()) in done.stdout

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(STEPS))
    assert metrics[-1]["omega"] < metrics[0]["omega"] == 1.0

    # One printed line per step with its head version, and the head advanced during the run.
    versions = [int(v) for v in re.findall(r"^\s+step\s+\d+/\d+\s.*head v(\d+)", done.stdout, flags=re.M)]
    assert len(versions) == STEPS, done.stdout
    assert versions == [m["head_version"] for m in metrics]
    assert versions[-1] > versions[0]
    assert "time per step" in done.stdout and "R2M post" in done.stdout
    assert (out / "policy" / "config.json").is_file()
    # Beside the optimised reward: the plain RM's reward of the same samples (w = 1) and the guard's figures.
    assert all("rewards/plain_mean" in m for m in metrics)
    plain = [float(x) for x in re.findall(r"^\s+plain RM ([+-][\d.]+)", done.stdout, flags=re.M)]
    assert plain == [round(m["rewards/plain_mean"], 3) for m in metrics]
    assert re.search(r"plain RM on the same samples [+-][\d.]+ -> [+-][\d.]+", done.stdout), done.stdout
    assert "head guard: shift" in done.stdout and "given up on" in done.stdout
    assert any("guard/rank_agreement" in m for m in metrics)
