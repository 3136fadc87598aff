"""The results: per-run gold at equal KL, per-arm intervals over RL seeds, the vanilla envelope, paired differences
against it and against the refit baseline, the markdown tables and the plots.

Gold at KL budget k (nats of KL(policy || SFT) per response, measured on the evaluation samples), per run:
- **interpolated**: gold linearly interpolated where the run's KL first reaches k (between the last evaluation
  below k and the next one); a run that never reaches k contributes its last evaluation;
- **last**: gold at the last evaluation whose KL is at most k.
The **vanilla envelope** at k is, per seed, the best gold at k among the vanilla arms (five KL coefficients and a
lower learning rate): the best an RL engineer gets from the plain proxy by tuning its penalty, seed by seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ENVELOPE_NAME",
    "compare",
    "gold_at_budget",
    "interval",
    "markdown_tables",
    "plot_curves",
    "run_measures",
    "summarise",
]

ENVELOPE_NAME = "envelope"

# Two-sided 95% Student-t quantiles by degrees of freedom (n - 1 seeds).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 14: 2.145, 19: 2.093}  # fmt: skip


def interval(xs: Sequence[float | None]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval of the mean); half-width nan with one value."""
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    n = len(vals)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(vals) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in vals) / (n - 1))
    return mean, _T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def _fmt(xs: Sequence[float | None], digits: int = 2) -> str:
    mean, half = interval(xs)
    if math.isnan(mean):
        return "-"
    return f"{mean:+.{digits}f}" if math.isnan(half) else f"{mean:+.{digits}f} ± {half:.{digits}f}"


def gold_at_budget(evals: Sequence[dict], k: float) -> tuple[float, float, bool]:
    """(interpolated gold at KL k, gold at the last evaluation with KL <= k, whether the run reached k)."""
    ev = sorted(evals, key=lambda e: e["step"])
    last = next(e["gold"] for e in reversed(ev) if e["kl"] <= k) if any(e["kl"] <= k for e in ev) else ev[0]["gold"]
    for a, b in zip(ev, ev[1:]):
        if a["kl"] <= k < b["kl"]:
            return a["gold"] + (b["gold"] - a["gold"]) * (k - a["kl"]) / (b["kl"] - a["kl"]), last, True
        if a["kl"] > k:  # crossed between step 0 and the first evaluation (KL starts at 0)
            return a["gold"], last, True
    return ev[-1]["gold"], last, False


def run_measures(r: dict, budgets: Sequence[float]) -> dict[str, float]:
    """A run's figures: gold at each KL budget (interpolated and last), peak, mean and final gold, KL, accuracies."""
    ev = r["evals"]
    out: dict[str, float] = {}
    for k in budgets:
        interp, last, reached = gold_at_budget(ev, k)
        out[f"gold@{k:g}"] = interp
        out[f"gold_last@{k:g}"] = last
        out[f"reached@{k:g}"] = float(reached)
    accs = [s["acc_on_policy"] for s in r["steps"] if s["acc_on_policy"] is not None]
    proxy_accs = [s["acc_on_policy_proxy"] for s in r["steps"] if s["acc_on_policy_proxy"] is not None]
    shares = [e["feedback_share"] for e in ev if "feedback_share" in e]
    out.update(
        {
            "peak_gold": max(e["gold"] for e in ev),
            "mean_gold": sum(e["gold"] for e in ev) / len(ev),
            "final_gold": ev[-1]["gold"],
            "final_kl": ev[-1]["kl"],
            "acc_on_policy": sum(accs) / len(accs) if accs else float("nan"),
            "acc_on_policy_proxy": sum(proxy_accs) / len(proxy_accs) if proxy_accs else float("nan"),
            "feedback_share": sum(shares) / len(shares) if shares else float("nan"),
            "acc_before": r["heldout_accuracy"]["before"],
            "acc_after": r["heldout_accuracy"]["after"],
            "judge_agreement": r["judge_agreement"] if r.get("judge_agreement") is not None else float("nan"),
            "judge_labels": float(r.get("judge_labels") or 0),
            "refused": float(len(r.get("refused_updates") or [])),
            "wall_s": r["wall_s"],
        }
    )
    return out


def summarise(runs: list[dict], budgets: Sequence[float], envelope: Sequence[str]) -> dict[str, Any]:
    """Per arm, per measure, one value per seed (ordered by seed); the vanilla envelope as one more arm, on the seeds
    every envelope arm ran (per seed and measure: the best of them)."""
    arms: dict[str, dict[str, list[float]]] = {}
    seeds: dict[str, list[int]] = {}
    for r in sorted(runs, key=lambda r: (r["arm"], r["seed"])):
        a = arms.setdefault(r["arm"], {})
        seeds.setdefault(r["arm"], []).append(r["seed"])
        for key, value in run_measures(r, budgets).items():
            a.setdefault(key, []).append(value)
    members = [m for m in envelope if m in arms]
    if members:
        common = sorted(set.intersection(*(set(seeds[m]) for m in members)))
        env: dict[str, list[float]] = {}
        best_of: dict[str, list[str]] = {}
        for key in [f"gold@{k:g}" for k in budgets] + [f"gold_last@{k:g}" for k in budgets] + ["peak_gold"]:
            for s in common:
                value, arm = max((arms[m][key][seeds[m].index(s)], m) for m in members)
                env.setdefault(key, []).append(value)
                best_of.setdefault(key, []).append(arm)
        arms[ENVELOPE_NAME] = env
        seeds[ENVELOPE_NAME] = common
        return {"arms": arms, "seeds": seeds, "envelope": {"members": members, "best_of": best_of},
                "budgets": list(budgets)}  # fmt: skip
    return {"arms": arms, "seeds": seeds, "envelope": None, "budgets": list(budgets)}


def compare(summary: dict, arm: str, control: str, key: str) -> dict[str, Any] | None:
    """The paired difference arm - control in `key` over the seeds both ran: mean, 95% interval, and whether the
    interval excludes 0."""
    arms, seeds = summary["arms"], summary["seeds"]
    if arm not in arms or control not in arms or key not in arms[arm] or key not in arms[control]:
        return None
    a = dict(zip(seeds[arm], arms[arm][key]))
    b = dict(zip(seeds[control], arms[control][key]))
    common = sorted(set(a) & set(b))
    if not common:
        return None
    diffs = [a[s] - b[s] for s in common]
    mean, half = interval(diffs)
    excludes = not math.isnan(half) and (mean - half > 0 or mean + half < 0)
    return {"arm": arm, "control": control, "key": key, "seeds": common, "diffs": diffs, "mean": mean,
            "half": half, "excludes_zero": excludes}  # fmt: skip


def _cell(c: dict[str, Any] | None, digits: int = 2) -> str:
    if c is None:
        return "-"
    text = f"{c['mean']:+.{digits}f}" if math.isnan(c["half"]) else f"{c['mean']:+.{digits}f} ± {c['half']:.{digits}f}"
    return f"**{text}**" if c["excludes_zero"] else text


def markdown_tables(summary: dict, order: Sequence[str], comparisons: Sequence[tuple[str, str]]) -> str:
    """The arms table (gold at each KL budget, means ± 95% intervals over seeds), the paired differences, and the
    secondary measures."""
    arms, budgets = summary["arms"], summary["budgets"]
    rows = [a for a in [*order, ENVELOPE_NAME] if a in arms]
    head = "| arm | seeds | " + " | ".join(f"gold @ KL {k:g}" for k in budgets) + " | peak gold |\n"
    head += "|---" * (len(budgets) + 3) + "|\n"
    out = "Gold at equal KL (interpolated where the run's KL first reaches the budget; a run that never reaches it "
    out += "counts its last evaluation, and the share of seeds that reached it is in brackets):\n\n" + head
    for arm in rows:
        a = arms[arm]
        cells = []
        for k in budgets:
            reached = a.get(f"reached@{k:g}")
            partly = reached is not None and sum(reached) < len(reached)
            share = f" [{sum(reached) / len(reached):.0%}]" if partly else ""
            cells.append(_fmt(a[f"gold@{k:g}"]) + share)
        n = len(summary["seeds"][arm])
        out += f"| {arm} | {n} | " + " | ".join(cells) + f" | {_fmt(a['peak_gold'])} |\n"
    out += "\nPaired differences (arm - control, same seeds), 95% t-intervals; **bold**: the interval excludes 0.\n\n"
    keys = [f"gold@{k:g}" for k in budgets] + ["peak_gold"]
    out += "| arm - control | seeds | " + " | ".join(f"gold @ KL {k:g}" for k in budgets) + " | peak gold |\n"
    out += "|---" * (len(keys) + 2) + "|\n"
    for arm, control in comparisons:
        cs = [compare(summary, arm, control, key) for key in keys]
        if all(c is None for c in cs):
            continue
        n = max(len(c["seeds"]) for c in cs if c is not None)
        out += f"| {arm} - {control} | {n} | " + " | ".join(_cell(c) for c in cs) + " |\n"
    out += "\nThe same at the last evaluation whose KL is within the budget:\n\n"
    out += "| arm - control | " + " | ".join(f"gold @ KL <= {k:g}" for k in budgets) + " |\n"
    out += "|---" * (len(budgets) + 1) + "|\n"
    for arm, control in comparisons:
        cs = [compare(summary, arm, control, f"gold_last@{k:g}") for k in budgets]
        if any(c is not None for c in cs):
            out += f"| {arm} - {control} | " + " | ".join(_cell(c) for c in cs) + " |\n"
    out += "\nSecondary measures (means ± 95% intervals over seeds):\n\n"
    out += (
        "| arm | mean gold (all evals) | final gold | final KL | on-policy RM acc | frozen-proxy on-policy acc | "
        "judge agreement with gold | judge labels per run | held-out acc before → after | updates refused |\n"
    )
    out += "|---" * 10 + "|\n"
    for arm in order:
        a = arms.get(arm)
        if a is None:
            continue
        out += (
            f"| {arm} | {_fmt(a['mean_gold'])} | {_fmt(a['final_gold'])} | {_fmt(a['final_kl'], 1)} | "
            f"{_fmt(a['acc_on_policy'], 3)} | {_fmt(a['acc_on_policy_proxy'], 3)} | {_fmt(a['judge_agreement'], 3)} | "
            f"{_fmt(a['judge_labels'], 0)} | {interval(a['acc_before'])[0]:.3f} → {_fmt(a['acc_after'], 3)} | "
            f"{sum(a['refused']):.0f} |\n"
        )
    env = summary.get("envelope")
    if env:
        k4 = f"gold@{4.0:g}"
        picks = env["best_of"].get(k4, [])
        counts = {m: picks.count(m) for m in env["members"] if picks.count(m)}
        out += (
            "\nThe envelope at KL 4 took its best from: "
            + ", ".join(f"{m} ({n} seeds)" for m, n in sorted(counts.items(), key=lambda x: -x[1]))
            + ".\n"
        )
    return out


def plot_curves(runs: list[dict], order: Sequence[str], envelope: Sequence[str], out_dir: Path) -> list[Path]:
    """gold_vs_kl.png (one panel per arm against the vanilla arms), gold_vs_step.png and acc_on_policy.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in order}
    by_arm = {k: v for k, v in by_arm.items() if v}
    cmap = plt.get_cmap("tab20")
    colors = {arm: cmap(i % 20) for i, arm in enumerate(by_arm)}

    def mean_curve(rs: list[dict], key: str) -> tuple[list[float], list[float]]:
        n = min(len(r["evals"]) for r in rs)
        xs = [sum(r["evals"][i]["kl"] for r in rs) / len(rs) for i in range(n)]
        ys = [sum(r["evals"][i][key] for r in rs) / len(rs) for i in range(n)]
        return xs, ys

    paths = []
    others = [a for a in by_arm if a not in envelope]
    vanillas = [a for a in by_arm if a in envelope]
    cols = 3
    rows = max(1, math.ceil((len(others) + 1) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), constrained_layout=True, squeeze=False)
    panels = [("vanilla arms (the envelope)", None), *((a, a) for a in others)]
    for ax, (title, arm) in zip(axes.flat, panels):
        for v in vanillas:
            x, y = mean_curve(by_arm[v], "gold")
            ax.plot(x, y, color="0.6" if arm else colors[v], lw=1, marker=".", label=v if arm is None else None)
        if arm is not None:
            for r in by_arm[arm]:
                ax.plot([e["kl"] for e in r["evals"]], [e["gold"] for e in r["evals"]], color=colors[arm], lw=0.5,
                        alpha=0.35)  # fmt: skip
            x, y = mean_curve(by_arm[arm], "gold")
            ax.plot(x, y, color=colors[arm], lw=2.2, marker="o", label=f"{arm} (mean of {len(by_arm[arm])})")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set(title=title, xlabel="KL(policy || SFT), nats per response", ylabel="gold")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Gold vs KL: each arm (thin: seeds, thick: mean) against the vanilla arms' means (grey)")
    path = out_dir / "gold_vs_kl.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)

    def plot(name: str, title: str, ylabel: str, value: Callable[[dict], tuple[list[float], list[float]]]) -> None:
        fig, ax = plt.subplots(figsize=(9, 5.5), constrained_layout=True)
        for arm, rs in by_arm.items():
            curves = [value(r) for r in rs]
            n = min(len(c[0]) for c in curves)
            x = curves[0][0][:n]
            y = [interval([c[1][i] for c in curves])[0] for i in range(n)]
            ax.plot(x, y, color=colors[arm], label=f"{arm} ({len(rs)})", lw=1.5 if arm in envelope else 2.2,
                    ls="--" if arm in envelope else "-")  # fmt: skip
        ax.set(title=title, xlabel="RL step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        path = out_dir / name
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)

    plot("gold_vs_step.png", "Gold on the held-out prompts vs RL step (means over seeds)", "gold",
         lambda r: ([e["step"] for e in r["evals"]], [e["gold"] for e in r["evals"]]))  # fmt: skip

    def running(r: dict, key: str = "acc_on_policy", window: int = 4) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for i, s in enumerate(r["steps"]):
            win = [x[key] for x in r["steps"][max(0, i - window + 1) : i + 1] if x[key] is not None]
            xs.append(s["step"] + 1)
            ys.append(sum(win) / len(win) if win else float("nan"))
        return xs, ys

    plot("acc_on_policy.png", "On-policy RM accuracy (within-group pairs ordered as gold, running mean of 4 steps)",
         "accuracy", running)  # fmt: skip
    return paths
