"""`python -m experiments.overopt` (or `r2m overopt`): the offline reward over-optimization benchmark.

    python -m experiments.overopt --grid                # tune every arm on the dev seeds; writes chosen.json
    python -m experiments.overopt                       # the table: every arm x ten paired seeds
    python -m experiments.overopt rescore --gold my_pkg.gold:reward   # every finished run, scored by another gold
    python -m experiments.overopt --quick --out-dir /tmp/overopt-quick   # CI size: a few arms, one seed, 6 steps

Writes OUT_DIR/results.json (every curve), OUT_DIR/results.md (the tables), OUT_DIR/*.png (plots); each run's
evaluation samples stay in OUT_DIR/runs/<arm>-seed<s>/eval_texts.json for `rescore`. The SFT policy, the proxy RM
and the pair files are cached in OUT_DIR/artefacts/ and reused by every arm (and by a rerun with the same settings).
See experiments/overopt/README.md.
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

from .arms import ARMS, CHOSEN, COMPARISONS, ENVELOPE, FOLLOWS, KL_BUDGETS, TUNE_KL, chosen, grid_points, tuned
from .artefacts import ARTEFACTS, QUICK_ARTEFACTS, prepare
from .report import gold_at_budget, markdown_tables, plot_curves, summarise
from .run import ArmSpec, RunSettings, run_and_report
from .task import DEFAULT_GOLD

REPORTED_SEEDS = tuple(range(10))
DEV_SEEDS = (100, 101)  # the grids and the schedule were fixed on these; never on the reported ones
QUICK_ARMS = ("vanilla-b0.01", "vanilla-b0.1", "r2m-judge-4", "refit-4")

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="r2m overopt",
        description="Offline reward over-optimization benchmark: GRPO on the task's training prompts against a "
        "MiniLM proxy RM served by r2m, gold measured on held-out prompts as RL goes on, per arm and paired seed; "
        "gold at equal KL against the best vanilla. See experiments/overopt/README.md. `r2m overopt rescore --help`: "
        "score finished runs with another gold.",
    )
    p.add_argument("--out-dir", default="runs/overopt", help="results, plots and cached artefacts [runs/overopt]")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=None, help="arms [all of them]")
    p.add_argument(
        "--seeds", nargs="+", type=int, default=None, help=f"RL seeds [{' '.join(map(str, REPORTED_SEEDS))}]"
    )
    p.add_argument("--steps", type=int, default=None, help=f"RL steps per run [{RunSettings.steps}]")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel, one core each [2]")
    p.add_argument("--gold", default=DEFAULT_GOLD, help=f"the gold reward, module:function [{DEFAULT_GOLD}]")
    p.add_argument(
        "--quick", action="store_true", help=f"CI: {', '.join(QUICK_ARMS)}; one seed, 6 steps, small artefacts"
    )
    p.add_argument(
        "--grid",
        action="store_true",
        help=f"tune every arm on the dev seeds {DEV_SEEDS} (six points each, chosen by gold at KL <= {TUNE_KL:g}); "
        f"writes {CHOSEN.name} beside the code and OUT_DIR/grid.json",
    )
    return p


def _run_all(specs: list[ArmSpec], workers: int) -> list[dict]:
    if workers == 1:
        return [run_and_report(s) for s in specs]
    with multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:
        return pool.map(run_and_report, specs, chunksize=1)


def _spec(arm: str, seed: int, settings: RunSettings, art: dict, out: Path, tag: str = "") -> ArmSpec:
    a = out / "artefacts"
    spec = ARMS[arm]
    return ArmSpec(
        arm=arm,
        mode=spec.reward_mode,
        seed=seed,
        policy=str(a / "policy"),
        proxy=str(a / "proxy"),
        prompts=str(a / "train_prompts.txt"),
        train_pairs=str(a / "proxy_pairs.jsonl"),
        heldout_pairs=str(a / "heldout_pairs.jsonl"),
        out_dir=str(out / "runs" / f"{arm}{tag}-seed{seed}"),
        policy_dim=art["policy_dim"],
        settings=replace(settings, judge_pairs=spec.judge, refit=spec.refit, kl_coef=spec.kl_coef, lr=spec.lr),
    )


def _tune_score(run: dict) -> float:
    """What the grids maximise: gold at the last evaluation whose KL is within TUNE_KL (not mean gold, which rewards
    a run that barely moves)."""
    return gold_at_budget(run["evals"], TUNE_KL)[1]


def grid(out: Path, base: RunSettings, art: dict, workers: int, arms: Sequence[str], say: Any) -> dict:
    """Every tuned arm on its six points and the dev seeds, and vanilla's six arms there too (its grid); each
    choice is the point with the best mean over the dev seeds of gold at KL <= TUNE_KL."""
    todo = [a for a in arms if a in tuned()]
    specs = [
        _spec(arm, seed, replace(base, **pt), art, out, f"-g{i}")
        for arm in todo
        for i, pt in enumerate(grid_points(arm))
        for seed in DEV_SEEDS
    ]
    vanillas = [a for a in arms if a in ENVELOPE]
    specs += [_spec(arm, seed, base, art, out) for arm in vanillas for seed in DEV_SEEDS]
    say(f"[2/3] grid: {len(todo)} arms x 6 points and {len(vanillas)} vanilla arms, x {len(DEV_SEEDS)} dev seeds: "
        f"{len(specs)} runs ({', '.join(f'{k} takes {v} choice' for k, v in FOLLOWS.items())})")  # fmt: skip
    runs = _run_all(specs, workers)
    table: dict[str, list[dict[str, Any]]] = {}
    for arm in todo:
        for pt in grid_points(arm):
            rs = [r for r in runs if r["arm"] == arm and all(r["settings"][k] == v for k, v in pt.items())]
            per_seed = [_tune_score(r) for r in rs]
            table.setdefault(arm, []).append({**pt, "score": sum(per_seed) / len(per_seed), "per_seed": per_seed})
    vanilla_rows: list[dict[str, Any]] = []
    for arm in vanillas:
        per_seed = [_tune_score(r) for r in runs if r["arm"] == arm]
        vanilla_rows.append({"arm": arm, "score": sum(per_seed) / len(per_seed), "per_seed": per_seed})
    choice = {arm: {k: v for k, v in max(rows, key=lambda x: x["score"]).items() if k not in ("score", "per_seed")}
              for arm, rows in table.items()}  # fmt: skip
    result = {
        "dev_seeds": list(DEV_SEEDS),
        "tune_by": f"gold at the last evaluation with KL <= {TUNE_KL:g}, mean of the dev seeds",
        "table": table,
        "vanilla": vanilla_rows,
        "vanilla_tuned": max(vanilla_rows, key=lambda x: x["score"])["arm"] if vanilla_rows else None,
        "chosen": choice,
        "follows": FOLLOWS,
    }
    (out / "grid.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(runs: list[dict], arms: Sequence[str], out: Path, meta: dict, say: Any) -> str:
    """results.json, results.md and the plots from finished runs; returns the tables."""
    summary = summarise(runs, KL_BUDGETS, ENVELOPE)
    tables = markdown_tables(summary, list(arms), COMPARISONS)
    plots = plot_curves(runs, list(arms), ENVELOPE, out)
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}) + "\n")
    lines = [
        f"Date: {meta['date']}. Command: `{meta['command']}`. Wall time: {meta['wall_s'] / 60:.1f} min.",
        f"RL seeds {', '.join(map(str, meta['seeds']))}, paired across arms (sampling and feedback-attention init); "
        "intervals are 95% t-intervals over seeds (one SFT policy and one proxy RM shared by every run). RL on "
        f"{meta['settings']['prompt_source']}; gold {meta['settings']['gold']}.",
        "",
        tables,
    ]
    (out / "results.md").write_text("\n".join(lines))
    say(f"wrote {out / 'results.json'}, {out / 'results.md'}, " + ", ".join(str(p) for p in plots))
    return tables


def rescore(argv: Sequence[str]) -> int:
    """`r2m overopt rescore --gold module:function`: every finished run's evaluations scored by another gold, and the
    report written again under OUT_DIR/rescored-<name>/."""
    p = argparse.ArgumentParser(prog="r2m overopt rescore", description=rescore.__doc__)
    p.add_argument("--out-dir", default="runs/overopt", help="the benchmark's folder [runs/overopt]")
    p.add_argument("--gold", required=True, help="module:function (prompt, response, finished) -> float")
    args = p.parse_args(argv)
    from .task import load_gold

    gold = load_gold(args.gold)
    out = Path(args.out_dir).resolve()
    results = json.loads((out / "results.json").read_text())
    runs = []
    for r in results["runs"]:
        path = out / "runs" / f"{r['arm']}-seed{r['seed']}" / "eval_texts.json"
        saved = json.loads(path.read_text())
        r = json.loads(json.dumps(r))
        by_step = {e["step"]: e for e in saved["evals"]}
        for e in r["evals"]:
            texts = by_step[e["step"]]
            golds = [gold(p, t, f) for p, t, f in zip(saved["prompts"], texts["texts"], texts["finished"])]
            e["gold"] = sum(golds) / len(golds)
        runs.append(r)
    target = out / f"rescored-{args.gold.replace(':', '.').replace('/', '_')}"
    target.mkdir(exist_ok=True)
    settings = {**results["meta"]["settings"], "gold": args.gold}
    meta = {**results["meta"], "rescored_with": args.gold, "settings": settings}
    report(runs, results["meta"]["arms"], target, meta, print)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["rescore"]:
        return rescore(argv[1:])
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

    base = RunSettings(steps=6, omega_steps=4, eval_every=3, eval_samples_per_prompt=4) if args.quick else RunSettings()
    base = replace(base, gold=args.gold, **({"steps": args.steps} if args.steps is not None else {}))
    arms = args.arms or (QUICK_ARMS if args.quick else tuple(ARMS))
    art = prepare(out, {**(QUICK_ARTEFACTS if args.quick else ARTEFACTS), "gold": args.gold}, say)
    if args.grid:
        result = grid(out, base, art, args.workers, arms, say)
        if not args.quick:  # a grid of some arms keeps the others' earlier choices
            earlier = json.loads(CHOSEN.read_text()) if CHOSEN.is_file() else {}
            if earlier.get("tune_by") == result["tune_by"]:
                for key in ("table", "chosen"):
                    result[key] = {**earlier.get(key, {}), **result[key]}
                fresh = {r["arm"] for r in result["vanilla"]}
                result["vanilla"] = [r for r in earlier.get("vanilla", []) if r["arm"] not in fresh] + result["vanilla"]
                if result["vanilla"]:
                    result["vanilla_tuned"] = max(result["vanilla"], key=lambda x: x["score"])["arm"]
            CHOSEN.write_text(json.dumps(result, indent=2) + "\n")
        say(json.dumps(result["chosen"], indent=1))
        say(f"wrote {out / 'grid.json'}" + ("" if args.quick else f" and {CHOSEN}"))
        say(f"done in {time.perf_counter() - started:.0f} s")
        return 0
    seeds = args.seeds if args.seeds is not None else ((0,) if args.quick else REPORTED_SEEDS)
    specs = [_spec(arm, seed, replace(base, **chosen(arm)), art, out) for seed in seeds for arm in arms]
    say(f"[2/3] {len(specs)} runs ({len(arms)} arms x {len(seeds)} seeds, {base.steps} steps), "
        f"{args.workers} at a time")
    runs = _run_all(specs, args.workers)
    say("[3/3] report")
    command = "python -m experiments.overopt " + shlex.join(argv)
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command.strip(),
        "wall_s": round(time.perf_counter() - started, 1),
        "arms": list(arms),
        "seeds": list(seeds),
        "dev_seeds": list(DEV_SEEDS),
        "settings": asdict(base),
        "chosen": {arm: chosen(arm) for arm in arms if chosen(arm)},
        "artefacts": art,
    }
    say(report(runs, arms, out, meta, say))
    say(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
