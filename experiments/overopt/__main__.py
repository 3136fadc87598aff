"""`python -m experiments.overopt` (or `r2m overopt`): the offline reward over-optimization benchmark.

    python -m experiments.overopt                       # the full table: 12 arms x 5 paired seeds
    python -m experiments.overopt --grid                # the dev-seed grid that chose the service learning rates
    python -m experiments.overopt --quick --out-dir /tmp/overopt-quick   # CI: 4 arms, 1 seed, a few steps

Writes OUT_DIR/results.json (every curve), OUT_DIR/results.md (the table), OUT_DIR/*.png (plots); the SFT
policy, the proxy RM and the pair files are cached in OUT_DIR/artefacts/ and reused by every arm (and by a rerun
with the same settings). See experiments/overopt/README.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .arms import ARMS, CHOSEN, COMPARISONS, FOLLOWS, GRID, chosen, grid_points, updating
from .report import compare, describe_overoptimization, markdown_tables, plot_curves, summarise
from .run import ArmSpec, RunSettings, run_and_report

REPORTED_SEEDS = (0, 1, 2, 3, 4)
DEV_SEEDS = (100, 101)  # the grid and the schedule were fixed on these; never on the reported ones
QUICK_ARMS = ("vanilla", "r2m", "r2m-judge-4", "ensemble")

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
    "ensemble": 5,  # proxy heads fitted on bootstrap resamples of its pairs (member 0: the proxy itself)
}
QUICK_ARTEFACTS = {**ARTEFACTS, "sft_answers": 2000, "sft_steps": 60, "proxy_pairs": 200, "heldout_pairs": 64}


def prepare(out: Path, spec: dict[str, Any], say: Any) -> dict[str, Any]:
    """Build (or reuse, when OUT_DIR/artefacts/artefacts.json has the same spec) the shared artefacts."""
    import torch

    from r2m.data import write_jsonl
    from r2m.service.backbone import load_backbone
    from r2m.service.update.fit import fit_encoder_rm

    from .policy import build_sft_policy
    from .task import gold_reward, labelled_pairs

    art = out / "artefacts"
    manifest = art / "artefacts.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("spec") == spec:
        say(f"[1/3] reusing the SFT policy and proxy RM in {art}")
        return json.loads(manifest.read_text())
    torch.set_num_threads(1)  # the CPU is shared: more threads than free cores spin and crawl
    art.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
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
    train = labelled_pairs(
        spec["proxy_pairs"], seed=spec["seed"] + 1, noise_temperature=spec["proxy_label_temperature"]
    )
    heldout = labelled_pairs(spec["heldout_pairs"], seed=spec["seed"] + 2, noise_temperature=None)
    write_jsonl(train, art / "proxy_pairs.jsonl")
    write_jsonl(heldout, art / "heldout_pairs.jsonl")
    say(f"  proxy RM: MiniLM + a linear head fitted by Bradley-Terry on {len(train)} noisy gold-labelled pairs")
    fit = fit_encoder_rm(
        art / "proxy",
        data=art / "proxy_pairs.jsonl",
        seed=spec["seed"],
        l2=spec["proxy_l2"],
        device="cpu",
        ensemble=spec["ensemble"],  # the ensemble arms' members: bootstrap resamples of the same 500 pairs
    )

    # Gold units for the proxy: the least-squares affine map proxy -> gold over the held-out pairs' texts.
    backbone = load_backbone(str(art / "proxy"), device="cpu", dtype="float32")
    texts = [(p["prompt"], p[k]) for p in heldout for k in ("chosen", "rejected")]
    proxy = backbone.plain_reward(backbone.embed([backbone.encode(p, r) for p, r in texts])).tolist()
    gold = [gold_reward(p, r) for p, r in texts]
    mp, mg = sum(proxy) / len(proxy), sum(gold) / len(gold)
    a = sum((x - mp) * (y - mg) for x, y in zip(proxy, gold)) / sum((x - mp) ** 2 for x in proxy)
    plain_acc = sum(proxy[2 * i] > proxy[2 * i + 1] for i in range(len(heldout))) / len(heldout)
    result = {
        "spec": spec,
        "policy": policy,
        "policy_dim": spec["width"],
        "proxy_fit": fit,
        "proxy_label_agreement": sum(r["gold_agrees"] for r in train) / len(train),
        "proxy_heldout_gold_accuracy": plain_acc,
        "calibration": {"a": a, "b": mg - a * mp},
        "seconds": round(time.perf_counter() - started, 1),
    }
    manifest.write_text(json.dumps(result, indent=2) + "\n")
    say(
        f"  proxy: {100 * fit['heldout_accuracy']:.0f}% on its own held-out noisy pairs, "
        f"{100 * plain_acc:.0f}% on {len(heldout)} held-out gold pairs; artefacts in {result['seconds']} s"
    )
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="r2m overopt",
        description="Offline reward over-optimization benchmark: GRPO against a MiniLM proxy RM served by r2m, "
        "gold reward measured as RL goes on, per arm and paired seed. See experiments/overopt/README.md.",
    )
    p.add_argument("--out-dir", default="runs/overopt", help="results, plots and cached artefacts [runs/overopt]")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=None, help="arms [all of them]")
    p.add_argument(
        "--seeds", nargs="+", type=int, default=None, help=f"RL seeds [{' '.join(map(str, REPORTED_SEEDS))}]"
    )
    p.add_argument("--steps", type=int, default=None, help=f"RL steps per run [{RunSettings.steps}]")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel, one core each [2]")
    p.add_argument(
        "--quick", action="store_true", help=f"CI: {', '.join(QUICK_ARMS)}; one seed, 6 steps, small artefacts"
    )
    p.add_argument(
        "--grid",
        action="store_true",
        help=f"choose each updating arm's service learning rates on the dev seeds {DEV_SEEDS} (arms.GRID) and "
        f"writes {CHOSEN.name} beside the code and OUT_DIR/grid.json",
    )
    p.add_argument(
        "--grid-inits",
        action="store_true",
        help="with --grid: also run r2m at its choice with the plain and zero feedback-attention inits (4 more runs)",
    )
    return p


def _run_all(specs: list[ArmSpec], workers: int) -> list[dict]:
    if workers == 1:
        return [run_and_report(s) for s in specs]
    with multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:
        return pool.map(run_and_report, specs, chunksize=1)


def _spec(arm: str, seed: int, settings: RunSettings, art: dict, a: Path, out: Path, tag: str = "") -> ArmSpec:
    return ArmSpec(
        arm=arm,
        mode=ARMS[arm].reward_mode,
        seed=seed,
        policy=str(a / "policy"),
        proxy=str(a / "proxy"),
        train_pairs=str(a / "proxy_pairs.jsonl"),
        heldout_pairs=str(a / "heldout_pairs.jsonl"),
        out_dir=str(out / "runs" / f"{arm}{tag}-seed{seed}"),
        policy_dim=art["policy_dim"],
        settings=replace(settings, judge_pairs=ARMS[arm].judge, ensemble=ARMS[arm].ensemble),
    )


def grid(
    out: Path, base: RunSettings, art: dict, workers: int, arms: Sequence[str], say: Any, with_inits: bool = False
) -> dict:
    """Every updating arm (but those in FOLLOWS) on every grid point and dev seed; the choice: the highest mean gold
    (over the curve, the dev seeds' mean). With `with_inits`, then r2m at its choice with each feedback init."""
    a = out / "artefacts"
    points = [dict(g) for g in GRID]
    todo = [a_ for a_ in arms if updating(a_) and a_ not in FOLLOWS]
    specs = [
        _spec(arm, seed, replace(base, **pt), art, a, out, f"-g{GRID.index(pt)}")
        for arm in todo
        for pt in grid_points(arm)
        for seed in DEV_SEEDS
    ]
    # Vanilla on the dev seeds too: the schedule (T, omega_steps, the policy's lr) was checked on
    # vanilla's curve there (its gold must peak and fall within the run while the feedback has its full weight).
    fixed = [a_ for a_ in arms if a_ == "vanilla"]
    specs += [_spec(arm, seed, base, art, a, out, "-ref") for arm in fixed for seed in DEV_SEEDS]
    say(f"[2/3] grid: {len(todo)} updating arms x up to {len(points)} points x {len(DEV_SEEDS)} dev seeds, and "
        f"vanilla: {len(specs)} runs ({', '.join(f'{k} takes {v} choice' for k, v in FOLLOWS.items())})")  # fmt: skip
    runs = _run_all(specs, workers)
    reference = {
        arm: [{"seed": r["seed"], "gold": [(e["step"], round(e["gold"], 3)) for e in r["evals"]]}
              for r in runs if r["arm"] == arm]
        for arm in fixed
    }  # fmt: skip
    table: dict[str, list[dict]] = {}
    for arm in todo:
        for pt in grid_points(arm):
            rs = [r for r in runs if r["arm"] == arm and r["settings"]["service_lr"] == pt["service_lr"]
                  and r["settings"]["service_phi_lr"] == pt["service_phi_lr"]]  # fmt: skip
            mean_gold = [sum(e["gold"] for e in r["evals"]) / len(r["evals"]) for r in rs]
            table.setdefault(arm, []).append({**pt, "mean_gold": sum(mean_gold) / len(mean_gold),
                                              "per_seed": mean_gold})  # fmt: skip
    choice = {arm: {k: v for k, v in max(rows, key=lambda x: x["mean_gold"]).items() if k.startswith("service")}
              for arm, rows in table.items()}  # fmt: skip
    choice.update({arm: dict(choice[lead]) for arm, lead in FOLLOWS.items() if arm in arms and lead in choice})
    inits = {}
    if "r2m" in choice and with_inits:
        init_specs = [
            _spec("r2m", seed, replace(base, **choice["r2m"], attn_init=init), art, a, out, f"-init-{init}")
            for init in ("plain", "zero")  # the grid ran the default (base.attn_init) already
            for seed in DEV_SEEDS
        ]
        best = max(table["r2m"], key=lambda x: x["mean_gold"])
        inits[base.attn_init] = list(best["per_seed"])
        say(f"  feedback inits: {len(init_specs)} runs of r2m at {choice['r2m']}")
        for r in _run_all(init_specs, workers):
            inits.setdefault(r["settings"]["attn_init"], []).append(
                sum(e["gold"] for e in r["evals"]) / len(r["evals"])
            )
    result = {"dev_seeds": list(DEV_SEEDS), "grid": points, "table": table, "chosen": choice, "follows": FOLLOWS,
              "reference": reference,
              "inits": {k: {"mean_gold": sum(v) / len(v), "per_seed": v} for k, v in inits.items()}}  # fmt: skip
    (out / "grid.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        raise SystemExit("r2m overopt: --workers must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise SystemExit("r2m overopt: --steps must be >= 1")
    started = time.perf_counter()
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(msg, flush=True)

    base = RunSettings(steps=6, omega_steps=4, eval_every=3, pairs_per_step=4) if args.quick else RunSettings()
    if args.steps is not None:
        base = replace(base, steps=args.steps)
    arms = args.arms or (QUICK_ARMS if args.quick else tuple(ARMS))
    art = prepare(out, QUICK_ARTEFACTS if args.quick else ARTEFACTS, say)
    if args.grid:
        result = grid(out, base, art, args.workers, arms, say, with_inits=args.grid_inits)
        if not args.quick:
            CHOSEN.write_text(json.dumps(result, indent=2) + "\n")
        say(json.dumps(result["chosen"], indent=1))
        say(f"wrote {out / 'grid.json'}" + ("" if args.quick else f" and {CHOSEN}"))
        say(f"done in {time.perf_counter() - started:.0f} s")
        return 0
    seeds = args.seeds if args.seeds is not None else ((0,) if args.quick else REPORTED_SEEDS)
    specs = [
        _spec(arm, seed, replace(base, **chosen(arm)), art, out / "artefacts", out) for seed in seeds for arm in arms
    ]
    say(
        f"[2/3] {len(specs)} runs ({len(arms)} arms x {len(seeds)} seeds, {base.steps} steps), {args.workers} at a time"
    )
    runs = _run_all(specs, args.workers)

    say("[3/3] report")
    summary = summarise(runs, art["calibration"])
    tables = markdown_tables(summary, list(ARMS), COMPARISONS)
    plots = plot_curves(runs, list(ARMS), out)
    wall = time.perf_counter() - started
    command = "python -m experiments.overopt " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command.strip(),
        "wall_s": round(wall, 1),
        "arms": list(arms),
        "seeds": list(seeds),
        "dev_seeds": list(DEV_SEEDS),
        "settings": asdict(base),
        "chosen": {arm: chosen(arm) for arm in arms if chosen(arm)},
        "artefacts": art,
    }
    comparisons = [c for a_, b_ in COMPARISONS if (c := compare(summary, a_, b_)) is not None]
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "comparisons": comparisons, "runs": runs}) + "\n"
    )
    lines = [
        f"Date: {meta['date']}. Command: `{meta['command']}`. Wall time: {wall / 60:.1f} min "
        f"(artefacts {art['seconds']} s when built).",
        f"RL seeds {', '.join(map(str, seeds))}, paired across arms (sampling and feedback-attention init); "
        "intervals are 95% t-intervals over seeds (one SFT policy and one proxy RM shared by every run).",
        f"Proxy: {100 * art['proxy_heldout_gold_accuracy']:.1f}% agreement with gold on "
        f"{art['spec']['heldout_pairs']} held-out pairs (plain, no policy feedback).",
        "",
        tables,
    ]
    if "vanilla" in summary["arms"]:
        lines.append(f"Vanilla: {describe_overoptimization(summary['arms']['vanilla'])}.\n")
    (out / "results.md").write_text("\n".join(lines))
    say(tables)
    say(f"wrote {out / 'results.json'}, {out / 'results.md'}, " + ", ".join(str(p) for p in plots))
    say(f"done in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
