"""The results: per-arm curve-level measures with 95% intervals over RL seeds, paired differences between arms
(each seed against the same seed of the other arm), the markdown tables and the plots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MEASURES",
    "compare",
    "describe_overoptimization",
    "interval",
    "markdown_tables",
    "plot_curves",
    "summarise",
]

# Two-sided 95% Student-t quantiles by degrees of freedom (n - 1 seeds).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}

# The curve-level measures, in the tables' order: (key, label, digits).
MEASURES = (
    ("mean_gold", "mean gold (all evals)", 2),
    ("peak_gold", "peak gold", 2),
    ("gold_at_kl", "gold at matched KL", 2),
    ("final_gold", "final gold", 2),
    ("acc_on_policy", "on-policy RM acc", 3),
    ("final_kl", "final KL", 1),
)


def interval(xs: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval of the mean); half-width nan with one value."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, _T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def _fmt(xs: Sequence[float], digits: int = 2) -> str:
    mean, half = interval(xs)
    if math.isnan(mean):
        return "-"
    return f"{mean:+.{digits}f}" if math.isnan(half) else f"{mean:+.{digits}f} ± {half:.{digits}f}"


def _calibrated(e: dict, cal: dict) -> float:
    """The frozen proxy's reward in gold units (the affine fit on held-out texts; see the README)."""
    return cal["a"] * e["proxy"] + cal["b"]


def matched_kl(runs: list[dict]) -> float:
    """The largest KL every run reaches (at its evaluations): where gold is compared at equal distance from SFT."""
    return min(max(e["kl"] for e in r["evals"]) for r in runs)


def gold_at(run: dict, kl: float) -> float:
    """Gold at KL `kl`, linearly interpolated along the run's evaluations (in step order, first crossing)."""
    ev = run["evals"]
    for a, b in zip(ev, ev[1:]):
        if a["kl"] <= kl <= b["kl"] and b["kl"] > a["kl"]:
            return a["gold"] + (b["gold"] - a["gold"]) * (kl - a["kl"]) / (b["kl"] - a["kl"])
    return min(ev, key=lambda e: abs(e["kl"] - kl))["gold"]


def run_measures(r: dict, kl: float, calibration: dict) -> dict[str, float]:
    ev = r["evals"]
    peak = max(ev, key=lambda e: e["gold"])
    accs = [s["acc_on_policy"] for s in r["steps"] if s["acc_on_policy"] is not None]
    proxy_accs = [s["acc_on_policy_proxy"] for s in r["steps"] if s["acc_on_policy_proxy"] is not None]
    shares = [e["feedback_share"] for e in ev if "feedback_share" in e]
    sim = ev[-1].get("similarity") or {}
    return {
        "mean_gold": sum(e["gold"] for e in ev) / len(ev),
        "peak_gold": peak["gold"],
        "peak_step": peak["step"],
        "gold_at_kl": gold_at(r, kl),
        "final_gold": ev[-1]["gold"],
        "drop_from_peak": peak["gold"] - ev[-1]["gold"],
        "final_kl": ev[-1]["kl"],
        "final_proxy": _calibrated(ev[-1], calibration),
        "proxy_rise_after_peak": _calibrated(ev[-1], calibration) - _calibrated(peak, calibration),
        "acc_on_policy": sum(accs) / len(accs) if accs else float("nan"),
        "acc_on_policy_proxy": sum(proxy_accs) / len(proxy_accs) if proxy_accs else float("nan"),
        "feedback_share": sum(shares) / len(shares) if shares else float("nan"),
        "acc_before": r["heldout_accuracy"]["before"],
        "acc_after": r["heldout_accuracy"]["after"],
        "reward_final": r["steps"][-1]["reward"],
        "sim_within_hacked": sim.get("within_hacked") if sim.get("within_hacked") is not None else float("nan"),
        "sim_within_normal": sim.get("within_normal") if sim.get("within_normal") is not None else float("nan"),
        "sim_across": sim.get("across") if sim.get("across") is not None else float("nan"),
        "refused": float(len(r.get("refused_updates") or [])),
        "wall_s": r["wall_s"],
    }


def summarise(runs: list[dict], calibration: dict) -> dict[str, Any]:
    """Per arm, per measure, one value per seed (ordered by seed); plus the matched KL and the similarity of the
    SFT policy's hidden states (before RL, the same for every arm)."""
    kl = matched_kl(runs)
    arms: dict[str, dict[str, list[float]]] = {}
    seeds: dict[str, list[int]] = {}
    for r in sorted(runs, key=lambda r: (r["arm"], r["seed"])):
        a = arms.setdefault(r["arm"], {})
        seeds.setdefault(r["arm"], []).append(r["seed"])
        for key, value in run_measures(r, kl, calibration).items():
            a.setdefault(key, []).append(value)
    before = [r["evals"][0].get("similarity") for r in runs if r["evals"][0].get("similarity")]
    return {"matched_kl": kl, "arms": arms, "seeds": seeds, "similarity_before": before[0] if before else None}


def compare(summary: dict, arm: str, control: str, key: str = "mean_gold") -> dict[str, Any] | None:
    """The paired difference arm - control in `key` over the seeds both ran: mean, 95% interval, and whether the
    interval excludes 0."""
    if arm not in summary["arms"] or control not in summary["arms"]:
        return None
    a = dict(zip(summary["seeds"][arm], summary["arms"][arm][key]))
    b = dict(zip(summary["seeds"][control], summary["arms"][control][key]))
    common = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in common]
    mean, half = interval(diffs)
    excludes = not math.isnan(half) and (mean - half > 0 or mean + half < 0)
    return {"arm": arm, "control": control, "key": key, "seeds": common, "diffs": diffs, "mean": mean,
            "half": half, "excludes_zero": excludes}  # fmt: skip


def markdown_tables(summary: dict, order: Sequence[str], comparisons: Sequence[tuple[str, str]]) -> str:
    """The arms table (means ± 95% intervals over seeds) and the paired-differences table."""
    arms = summary["arms"]
    head = "| arm | seeds | " + " | ".join(label for _, label, _ in MEASURES)
    head += " | frozen-proxy on-policy acc | feedback share of in-group variance | held-out acc before → after"
    head += " | updates refused by the guard |\n"
    head += "|---" * (len(MEASURES) + 6) + "|\n"
    lines = []
    for arm in order:
        a = arms.get(arm)
        if a is None:
            continue
        cells = [_fmt(a[key], d) for key, _, d in MEASURES]
        extra = [
            _fmt(a["acc_on_policy_proxy"], 3),
            _fmt(a["feedback_share"], 3),
            f"{interval(a['acc_before'])[0]:.3f} → {_fmt(a['acc_after'], 3)}",
            f"{sum(a['refused']):.0f}",
        ]
        lines.append(f"| {arm} | {len(a['mean_gold'])} | " + " | ".join(cells + extra) + " |")
    out = head + "\n".join(lines) + "\n"
    out += (
        f"\nGold at matched KL: interpolated at KL = {summary['matched_kl']:.1f}, the largest KL every run reaches.\n\n"
        "Paired differences (arm - control, same seeds), 95% t-intervals; **bold**: the interval excludes 0.\n\n"
        "| arm - control | seeds | mean gold | peak gold | gold at matched KL | final gold | on-policy RM acc |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    for arm, control in comparisons:
        cells = []
        n = 0
        for key in ("mean_gold", "peak_gold", "gold_at_kl", "final_gold", "acc_on_policy"):
            c = compare(summary, arm, control, key)
            if c is None:
                break
            n = len(c["seeds"])
            d = 3 if key == "acc_on_policy" else 2
            text = f"{c['mean']:+.{d}f} ± {c['half']:.{d}f}" if not math.isnan(c["half"]) else f"{c['mean']:+.{d}f}"
            cells.append(f"**{text}**" if c["excludes_zero"] else text)
        if cells:
            out += f"| {arm} - {control} | {n} | " + " | ".join(cells) + " |\n"
    sim0 = summary.get("similarity_before")
    out += (
        "\nHidden-state similarity (mean cosine of mean-pooled last-layer states; hacked: gold in its bottom quarter "
    )
    out += "and proxy above its median; normal: gold above its median):\n\n"
    out += "| policy | within hacked | within normal | across |\n|---|---|---|---|\n"
    if sim0:
        out += (
            f"| SFT (before RL; {sim0['hacked']} hacked, {sim0['normal']} normal) | "
            + " | ".join(
                "-" if sim0[k] is None else f"{sim0[k]:.3f}" for k in ("within_hacked", "within_normal", "across")
            )
            + " |\n"
        )
    for arm in order:
        a = arms.get(arm)
        if a is not None:
            out += (
                f"| {arm}, after RL | "
                + " | ".join(_fmt(a[k], 3) for k in ("sim_within_hacked", "sim_within_normal", "sim_across"))
                + " |\n"
            )
    return out


def describe_overoptimization(arm: dict[str, list[float]]) -> str:
    """One line: where gold peaked, how far it fell by the end, and how the proxy moved meanwhile."""
    return (
        f"gold peaked at step {sum(arm['peak_step']) / len(arm['peak_step']):.0f} on average and fell by "
        f"{_fmt(arm['drop_from_peak'])} by the end while the proxy moved by {_fmt(arm['proxy_rise_after_peak'])} "
        "(gold units)"
    )


def _band(runs: list[dict], values: Any) -> tuple[list[int], list[float], list[float]]:
    """Across seeds at each evaluation (or step): the steps, means and 95% half-widths of `values(run, i)`."""
    n = min(len(values(r, None)) for r in runs)
    steps = values(runs[0], None)[:n]
    means, halves = [], []
    for i in range(n):
        m, h = interval([values(r, i) for r in runs])
        means.append(m)
        halves.append(0.0 if math.isnan(h) else h)
    return steps, means, halves


def plot_curves(runs: list[dict], order: Sequence[str], out_dir: Path) -> list[Path]:
    """gold_vs_step.png, gold_vs_kl.png, acc_on_policy.png, reward_scale.png; bands: 95% intervals over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in order}
    by_arm = {k: v for k, v in by_arm.items() if v}
    cmap = plt.get_cmap("tab20")
    colors = {arm: cmap(i % 20) for i, arm in enumerate(by_arm)}

    def evals(key: str):  # noqa: ANN202
        return lambda r, i: [e["step"] for e in r["evals"]] if i is None else r["evals"][i][key]

    def steps(key: str, window: int = 4):  # noqa: ANN202 - a running mean over `window` steps
        def value(r: dict, i: int | None) -> Any:
            if i is None:
                return [s["step"] + 1 for s in r["steps"]]
            xs = [s[key] for s in r["steps"][max(0, i - window + 1) : i + 1] if s[key] is not None]
            return sum(xs) / len(xs) if xs else float("nan")

        return value

    paths = []
    for name, title, xlabel, ylabel, getter, xkey in (
        ("gold_vs_step.png", "Gold reward (256 eval samples) vs RL step", "RL step", "gold", evals("gold"), None),
        ("gold_vs_kl.png", "Gold reward vs KL(policy || SFT)", "KL (nats)", "gold", evals("gold"), "kl"),
        ("acc_on_policy.png", "On-policy RM accuracy: within-group pairs ordered as gold (running mean of 4 steps)",
         "RL step", "accuracy", steps("acc_on_policy"), None),
        ("reward_scale.png", "The reward each arm optimises (batch mean, running mean of 4 steps)", "RL step",
         "reward from /score", steps("reward"), None),
    ):  # fmt: skip
        fig, ax = plt.subplots(figsize=(9, 5.5), constrained_layout=True)
        for arm, rs in by_arm.items():
            at_step, m, h = _band(rs, getter)
            x = _band(rs, evals(xkey))[1] if xkey is not None else at_step
            ax.plot(x, m, marker="." if xkey else None, color=colors[arm], label=f"{arm} ({len(rs)})")
            ax.fill_between(x, [a - b for a, b in zip(m, h)], [a + b for a, b in zip(m, h)], color=colors[arm],
                            alpha=0.12)  # fmt: skip
        ax.set(title=title + " (bands: 95% intervals over seeds)", xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
