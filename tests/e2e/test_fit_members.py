"""`r2m fit-rm --backbone RM --data pairs.jsonl --ensemble N`: members for a Hugging Face RM, then served."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import torch

from r2m.service.config import ServiceSettings
from r2m.service.engine import PreparedItem, build_engine

from ..conftest import WORDS


def test_fit_members_for_a_hub_style_rm_and_serve_them(tiny_llama_rm: Path, tmp_path: Path) -> None:
    rng = random.Random(0)
    good, bad = WORDS[:40], WORDS[40:80]
    rows = [
        {"prompt": " ".join(rng.choices(WORDS, k=4)), "chosen": " ".join(rng.choices(good, k=6)),
         "rejected": " ".join(rng.choices(bad, k=6))}
        for _ in range(120)
    ]  # fmt: skip
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "members"
    cmd = [sys.executable, "-m", "r2m.cli", "fit-rm", "--backbone", str(tiny_llama_rm), "--data", str(data),
           "--ensemble", "3", "--out", str(out), "--device", "cpu"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
    assert report["n"] == 3 and len(report["heldout_accuracy"]) == 3
    assert f"R2M_ENSEMBLE=3 R2M_ENSEMBLE_MEMBERS={out}" in done.stdout
    # The fitted members learn the task: each beats the random RM's own layer on held-out pairs.
    assert min(report["heldout_accuracy"][1:]) > report["heldout_accuracy"][0]

    settings = ServiceSettings(_env_file=None, model=str(tiny_llama_rm), policy_dim=8, attn_dim=8, device="cpu",
                               ensemble=3, ensemble_members=str(out), aggregation="mean")  # fmt: skip
    engine = build_engine(settings)
    assert torch.equal(engine.current.head.score.weight[0], engine.backbone.score_weight[0])
    enc = engine.backbone.encode(rows[0]["prompt"], rows[0]["chosen"])
    scores = engine.score_all([PreparedItem(enc, None, 1.0)])
    assert scores.members is not None and scores.members.shape == (1, 3) and float(scores.uncertainty[0]) > 0
    assert float(scores.members[0, 0]) == float(engine.backbone.plain_reward(engine.embed([enc]))[0])
