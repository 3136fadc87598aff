"""The benchmark's shared artefacts, built once per spec and cached in OUT_DIR/artefacts/: the SFT policy, the proxy
RM's noisy gold-labelled pairs and the proxy itself, held-out gold pairs of the evaluation prompts, and the training
prompts RL samples from."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .task import DEFAULT_GOLD

__all__ = ["ARTEFACTS", "QUICK_ARTEFACTS", "prepare"]

# The task's artefacts: an SFT policy, the proxy's noisy training pairs, held-out gold pairs, the proxy RM.
ARTEFACTS = {
    "width": 128,
    "layers": 2,
    "sft_answers": 20000,
    "sft_steps": 600,
    "proxy_pairs": 500,
    "proxy_label_temperature": 1.0,  # BT-sampled labels: about 80% agree with gold
    "proxy_l2": 1e-5,  # fit-rm's default
    "heldout_pairs": 256,
    "seed": 7,  # of the SFT corpus and init, the pair sets and the proxy split (the RL seeds are the arms')
    "prompts": "train/eval split of task.PROMPTS: SFT, proxy pairs and RL on TRAIN_PROMPTS; held-out pairs on EVAL",
    "gold": DEFAULT_GOLD,
}
QUICK_ARTEFACTS = {**ARTEFACTS, "sft_answers": 2000, "sft_steps": 60, "proxy_pairs": 200, "heldout_pairs": 64}


def prepare(out: Path, spec: dict[str, Any], say: Any) -> dict[str, Any]:
    """Build (or reuse, when OUT_DIR/artefacts/artefacts.json has the same spec) the shared artefacts."""
    import torch

    from r2m.data import write_jsonl
    from r2m.service.backbone import load_backbone
    from r2m.service.update.fit import fit_encoder_rm

    from .policy import build_sft_policy
    from .task import EVAL_PROMPTS, TRAIN_PROMPTS, labelled_pairs, load_gold

    art = out / "artefacts"
    manifest = art / "artefacts.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("spec") == spec:
        say(f"[1/3] reusing the SFT policy and proxy RM in {art}")
        return json.loads(manifest.read_text())
    torch.set_num_threads(1)  # the CPU is shared: more threads than free cores spin and crawl
    art.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    gold = load_gold(spec["gold"])
    say(f"[1/3] SFT policy: word-level Llama, width {spec['width']}, {spec['sft_answers']} templated answers")
    policy = build_sft_policy(
        art / "policy",
        width=spec["width"],
        layers=spec["layers"],
        n_answers=spec["sft_answers"],
        sft_steps=spec["sft_steps"],
        seed=spec["seed"],
        say=say,
    )
    say(f"  {policy['params']} parameters, SFT loss {policy['sft_loss']:.3f}, {policy['seconds']} s")
    (art / "train_prompts.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    train = labelled_pairs(spec["proxy_pairs"], spec["seed"] + 1, spec["proxy_label_temperature"], gold, TRAIN_PROMPTS)
    heldout = labelled_pairs(spec["heldout_pairs"], spec["seed"] + 2, None, gold, EVAL_PROMPTS)
    write_jsonl(train, art / "proxy_pairs.jsonl")
    write_jsonl(heldout, art / "heldout_pairs.jsonl")
    say(f"  proxy RM: MiniLM + a linear head fitted by Bradley-Terry on {len(train)} noisy gold-labelled pairs")
    fit = fit_encoder_rm(art / "proxy", data=art / "proxy_pairs.jsonl", seed=spec["seed"], l2=spec["proxy_l2"],
                         device="cpu")  # fmt: skip
    backbone = load_backbone(str(art / "proxy"), device="cpu", dtype="float32")
    texts = [(p["prompt"], p[k]) for p in heldout for k in ("chosen", "rejected")]
    proxy = backbone.plain_reward(backbone.embed([backbone.encode(p, r) for p, r in texts])).tolist()
    plain_acc = sum(proxy[2 * i] > proxy[2 * i + 1] for i in range(len(heldout))) / len(heldout)
    result = {
        "spec": spec,
        "policy": policy,
        "policy_dim": spec["width"],
        "proxy_fit": fit,
        "proxy_label_agreement": sum(r["gold_agrees"] for r in train) / len(train),
        "proxy_heldout_gold_accuracy": plain_acc,
        "seconds": round(time.perf_counter() - started, 1),
    }
    manifest.write_text(json.dumps(result, indent=2) + "\n")
    say(
        f"  proxy: {100 * fit['heldout_accuracy']:.0f}% on its own held-out noisy pairs, "
        f"{100 * plain_acc:.0f}% on {len(heldout)} held-out gold pairs of the evaluation prompts; "
        f"artefacts in {result['seconds']} s"
    )
    return result
