"""`r2m demo`: reward over-optimization, and what r2m does about it, on a task whose true reward is known; about a
minute on 2 CPU cores, no GPU, no Redis, no download.

    .venv/bin/r2m demo                               # writes runs/demo/demo.png and runs/demo/demo.json
    .venv/bin/r2m demo --arms vanilla-b0.01 refit-16 --steps 30

What it does, top to bottom:
  1. the over-optimization benchmark's task at a small size (experiments/overopt/README.md): a tiny word-level
     policy fitted by SFT on templated answers, a proxy reward model (the bundled MiniLM encoder and a head fitted on
     200 noisy gold-labelled pairs) and the gold reward the proxy approximates; built once, cached in
     OUT_DIR/artefacts/;
  2. GRPO against the proxy served by r2m (its real app, embedded), the same seed for every arm, two arms at a time:
     by default vanilla at a small KL penalty (what over-optimization looks like), vanilla at the larger penalty, and
     R2M with a judge's labels (the service's judge labels 16 pairs of every step's groups);
  3. every few steps, one line per arm: gold and the plain proxy on held-out prompts, the reward the arm optimises,
     and KL to the SFT policy;
  4. OUT_DIR/demo.png (per arm: gold, the optimised reward and the plain proxy against the step) and the closing
     lines, which say in words and figures what happened to gold in each arm.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .arms import ARMS, chosen
from .artefacts import QUICK_ARTEFACTS, prepare

__all__ = ["DEFAULT_ARMS", "DemoConfig", "run_demo"]

DEFAULT_ARMS = ("vanilla-b0.01", "vanilla-b0.1", "r2m-judge-16")
ARTEFACTS = QUICK_ARTEFACTS  # 2,000 SFT answers, 60 SFT steps, a proxy of 200 pairs: seconds, not minutes


@dataclass(frozen=True)
class DemoConfig:
    arms: tuple[str, ...] = DEFAULT_ARMS
    steps: int = 20
    out_dir: str = "runs/demo"
    seed: int = 0


def _settings(c: DemoConfig, arm: str) -> Any:
    """The benchmark's settings at the demo's size, with the arm's own (KL penalty, policy lr, judge budget) and its
    tuned service settings where the benchmark chose them (chosen.json)."""
    from .run import RunSettings

    a = ARMS[arm]
    s = RunSettings(
        steps=c.steps, omega_steps=max(1, c.steps // 2), prompts_per_step=8, eval_every=max(1, c.steps // 5),
        eval_samples_per_prompt=4, lr=3e-4,
    )  # fmt: skip
    return replace(s, **chosen(arm), judge_pairs=a.judge, refit=a.refit, kl_coef=a.kl_coef,
                   lr=s.lr * a.lr / ARMS["vanilla-b0.01"].lr)  # fmt: skip


def _run(job: tuple[str, DemoConfig, dict[str, Any]]) -> dict[str, Any]:
    """One arm (a pool worker's task): GRPO against the proxy, evaluated every few steps; prints a line per
    evaluation and returns the arm's curves."""
    import torch

    from r2m.client import R2MClient
    from r2m.data import read_jsonl
    from r2m.trainer import GRPOTrainer

    from .run import ArmSpec, GoldJudge, Refit, SyncedClient, evaluate, serve_proxy, train_config
    from .task import load_gold

    arm, c, art = job
    torch.set_num_threads(1)
    a, s = ARMS[arm], _settings(c, arm)
    folder = Path(c.out_dir) / "artefacts"
    spec = ArmSpec(
        arm, a.reward_mode, c.seed, str(folder / "policy"), str(folder / "proxy"), str(folder / "train_prompts.txt"),
        str(folder / "proxy_pairs.jsonl"), str(folder / "heldout_pairs.jsonl"), str(Path(c.out_dir) / "arms" / arm),
        art["policy_dim"], s,
    )  # fmt: skip
    gold = load_gold(s.gold)
    judge = GoldJudge(c.seed, s.judge_temperature, s.max_new_tokens, gold) if s.judge_pairs else None
    started = time.perf_counter()
    with serve_proxy(spec.proxy, spec.policy_dim, s, c.seed, judge if not s.refit else None) as (url, model):
        client = SyncedClient(R2MClient(url, timeout=120.0))
        trainer = GRPOTrainer(train_config(spec, url, Path(spec.out_dir)), client)
        refit = Refit(model, read_jsonl(spec.train_pairs), judge, s, c.seed) if s.refit and judge else None
        steps, evals = [], []
        try:
            for t in range(-1, s.steps):
                if t >= 0:
                    m = trainer.train_step(t)
                    batch = trainer.batch
                    assert batch is not None
                    if refit is not None:
                        refit.step(t, batch.prompts, batch.responses, m["rewards"])
                    steps.append({"step": t + 1, "reward": m["rewards/mean"]})
                if (t + 1) % s.eval_every == 0 or t + 1 == s.steps:
                    e, _ = evaluate(trainer, model, s, gold)
                    evals.append({"step": t + 1, "gold": e["gold"], "proxy": e["proxy"], "kl": e["kl"]})
                    reward = f"{steps[-1]['reward']:+.2f}" if steps else "   - "
                    print(f"  {arm:>14}  step {t + 1:>2}/{s.steps}  gold {e['gold']:+.2f}  plain proxy "
                          f"{e['proxy']:+.2f}  optimised reward {reward}  KL {e['kl']:5.2f}", flush=True)  # fmt: skip
        finally:
            trainer.close()
    return {"arm": arm, "what": a.what, "settings": asdict(s), "steps": steps, "evals": evals,
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def describe(run: dict[str, Any]) -> str:
    """One sentence of what happened to gold in an arm, from its curves."""
    ev, st = run["evals"], run["steps"]
    peak = max(ev, key=lambda e: e["gold"])
    first, last = ev[0], ev[-1]
    text = (f"{run['arm']}: the reward it optimised went {st[0]['reward']:+.2f} -> {st[-1]['reward']:+.2f}, "
            f"the plain proxy {first['proxy']:+.2f} -> {last['proxy']:+.2f}, gold {first['gold']:+.2f} -> "
            f"{last['gold']:+.2f}")  # fmt: skip
    if peak["step"] < last["step"] and peak["gold"] - last["gold"] > 0.1:
        text += f" (it peaked at {peak['gold']:+.2f} at step {peak['step']} and fell back)"
    return text + f", at KL {last['kl']:.1f} from the SFT policy"


def verdict(runs: list[dict[str, Any]]) -> str:
    """Which arm kept the most gold, at the KL where it ended, against the vanilla arms: in this one seed's words."""
    by = {r["arm"]: r for r in runs}
    best = max(runs, key=lambda r: r["evals"][-1]["gold"])
    vanillas = [r for r in runs if r["arm"].startswith("vanilla")]
    others = [r for r in runs if not r["arm"].startswith("vanilla")]
    lines = [f"Most gold at the end: {best['arm']} ({best['evals'][-1]['gold']:+.2f})."]
    if vanillas and others:
        v = max(vanillas, key=lambda r: r["evals"][-1]["gold"])
        for o in others:
            d = o["evals"][-1]["gold"] - v["evals"][-1]["gold"]
            lines.append(
                f"{o['arm']} ended {abs(d):.2f} gold {'above' if d > 0 else 'below'} the better vanilla arm "
                f"({v['arm']}), at KL {o['evals'][-1]['kl']:.1f} against {by[v['arm']]['evals'][-1]['kl']:.1f}: "
                + ("on this seed R2M helped." if d > 0.05 else "on this seed R2M did not help.")
            )
    lines.append(
        "One seed and a small policy; the benchmark's comparison over seeds at equal KL: experiments/overopt/README.md."
    )
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 4.2), sharey=True, constrained_layout=True)
    for ax, r in zip([axes] if len(runs) == 1 else axes, runs):
        ax.plot([e["step"] for e in r["evals"]], [e["gold"] for e in r["evals"]], "o-", color="tab:green", lw=2.2,
                label="gold (true reward), held-out prompts")  # fmt: skip
        ax.plot([s["step"] for s in r["steps"]], [s["reward"] for s in r["steps"]], "--", color="tab:blue",
                label="reward the arm optimises")  # fmt: skip
        ax.plot([e["step"] for e in r["evals"]], [e["proxy"] for e in r["evals"]], ":", color="tab:gray",
                label="plain proxy RM, held-out prompts")  # fmt: skip
        what = r["what"] if len(r["what"]) <= 48 else r["what"][:47] + "…"
        ax.set(title=f"{r['arm']}\n{what}", xlabel="RL step")
        ax.grid(alpha=0.3)
    first = axes if len(runs) == 1 else axes[0]
    first.set_ylabel("reward")
    first.legend(fontsize=7, loc="lower left")
    fig.suptitle("Gold against the reward each arm optimises (one seed; the same policy, proxy and prompts)")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_demo(c: DemoConfig) -> list[dict[str, Any]]:
    started = time.perf_counter()
    out = Path(c.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    c = replace(c, out_dir=str(out))
    print(f"r2m demo: the benchmark's task at a small size, {len(c.arms)} arms x {c.steps} GRPO steps, seed {c.seed}")
    art = prepare(out, ARTEFACTS, lambda msg: print(msg, flush=True))
    print(f"[2/3] GRPO against the proxy served by r2m, two arms at a time: {', '.join(c.arms)}", flush=True)
    jobs = [(arm, c, art) for arm in c.arms]
    with multiprocessing.get_context("spawn").Pool(min(2, len(jobs)), maxtasksperchild=1) as pool:
        runs = pool.map(_run, jobs, chunksize=1)
    (out / "demo.json").write_text(json.dumps({"config": asdict(c), "runs": runs}, indent=1) + "\n")
    png = out / "demo.png"
    plot(runs, png)
    print("[3/3] what happened")
    for r in runs:
        print("  " + describe(r) + ".")
    print(verdict(runs))
    print(f"wrote {png} and {out / 'demo.json'} in {time.perf_counter() - started:.0f} s")
    return runs
