"""The results: the markdown table (means and 95% intervals over RL seeds) and the plots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["interval", "markdown_table", "plot_curves", "summarise"]

# Two-sided 95% Student-t quantiles by degrees of freedom (n - 1 seeds).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(xs: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval of the mean); half-width nan with one value."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, _T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def _fmt(xs: Sequence[float], digits: int = 2) -> str:
    mean, half = interval(xs)
    return f"{mean:+.{digits}f}" if math.isnan(half) else f"{mean:+.{digits}f} ± {half:.{digits}f}"


def _calibrated(e: dict, cal: dict) -> float:
    """The frozen proxy's reward in gold units (the affine fit on held-out texts; see the README)."""
    return cal["a"] * e["proxy"] + cal["b"]


def summarise(runs: list[dict], calibration: dict) -> dict[str, dict[str, list[float]]]:
    """Per arm, per measure, one value per seed."""
    arms: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        ev = r["evals"]
        first, last = ev[0], ev[-1]
        gap0 = _calibrated(first, calibration) - first["gold"]
        gap = _calibrated(last, calibration) - last["gold"]
        peak = max(ev, key=lambda e: e["gold"])
        a = arms.setdefault(r["mode"], {})
        for key, value in {
            "final_gold": last["gold"],
            "best_gold": peak["gold"],
            "best_step": peak["step"],
            "drop_from_best": peak["gold"] - last["gold"],
            "final_proxy": _calibrated(last, calibration),
            "proxy_rise_after_best": _calibrated(last, calibration) - _calibrated(peak, calibration),
            "gap_start": gap0,
            "gap_final": gap,
            "gap_widening": gap - gap0,
            "final_kl": last["kl"],
            "acc_before": r["heldout_accuracy"]["before"],
            "acc_after": r["heldout_accuracy"]["after"],
            "reward_final": r["steps"][-1]["reward"],
            "reward_min": min(s["reward"] for s in r["steps"]),
            "reward_max": max(s["reward"] for s in r["steps"]),
            "final_length": last["length"],
            "final_repeats": last["repeats"],
            "wall_s": r["wall_s"],
        }.items():
            a.setdefault(key, []).append(value)
    return arms


def markdown_table(arms: dict[str, dict[str, list[float]]], order: Sequence[str]) -> str:
    """The results table: one row per arm, mean ± 95% interval over seeds."""
    head = (
        "| arm | seeds | final gold | best gold (step) | drop from best | final proxy (gold units) | proxy-gold gap "
        "start → final | final KL | held-out acc before → after | train reward: final (min, max) |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for arm in order:
        a = arms.get(arm)
        if a is None:
            continue
        n = len(a["final_gold"])
        best_step = sum(a["best_step"]) / n
        rows.append(
            f"| {arm} | {n} | {_fmt(a['final_gold'])} | {_fmt(a['best_gold'])} ({best_step:.0f}) "
            f"| {_fmt(a['drop_from_best'])} | {_fmt(a['final_proxy'])} "
            f"| {interval(a['gap_start'])[0]:+.2f} → {_fmt(a['gap_final'])} | {_fmt(a['final_kl'])} "
            f"| {interval(a['acc_before'])[0]:.3f} → {_fmt(a['acc_after'], 3)} "
            f"| {interval(a['reward_final'])[0]:+.2f} ({min(a['reward_min']):+.2f}, {max(a['reward_max']):+.2f}) |"
        )
    return head + "\n".join(rows) + "\n"


def _band(runs: list[dict], key: str, cal: dict | None = None) -> tuple[list[int], list[float], list[float]]:
    steps = [e["step"] for e in runs[0]["evals"]]
    means, halves = [], []
    for i in range(len(steps)):
        xs = [(_calibrated(r["evals"][i], cal) if cal else r["evals"][i][key]) for r in runs]
        m, h = interval(xs)
        means.append(m)
        halves.append(0.0 if math.isnan(h) else h)
    return steps, means, halves


def plot_curves(runs: list[dict], calibration: dict, order: Sequence[str], out_dir: Path) -> list[Path]:
    """gold_vs_step.png (gold and calibrated proxy per arm), gold_vs_kl.png, reward_scale.png; seed bands = 95%
    intervals of the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arm = {arm: [r for r in runs if r["mode"] == arm] for arm in order}
    by_arm = {k: v for k, v in by_arm.items() if v}
    colors = dict(zip(by_arm, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    n = len(by_arm) + 1  # one panel per arm, and one with every arm's gold
    cols = min(n, 3)
    rows = math.ceil(n / cols)

    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False, constrained_layout=True)
    for ax, (arm, rs) in zip(axes.flat, by_arm.items()):
        for key, cal, style, label in (("gold", None, "-", "gold"), ("proxy", calibration, "--", "proxy (gold units)")):
            x, m, h = _band(rs, key, cal)
            ax.plot(x, m, style, color=colors[arm], label=label)
            ax.fill_between(
                x, [a - b for a, b in zip(m, h)], [a + b for a, b in zip(m, h)], color=colors[arm], alpha=0.2
            )
        ax.set(title=f"{arm} ({len(rs)} seeds)", xlabel="RL step", ylabel="reward (256 eval samples)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    ax = axes.flat[n - 1]
    for arm, rs in by_arm.items():
        x, m, h = _band(rs, "gold")
        ax.plot(x, m, color=colors[arm], label=arm)
        ax.fill_between(x, [a - b for a, b in zip(m, h)], [a + b for a, b in zip(m, h)], color=colors[arm], alpha=0.1)
    ax.set(title="gold, every arm", xlabel="RL step", ylabel="gold reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Gold and frozen-proxy reward vs RL step (bands: 95% intervals over seeds)")
    step_png = out_dir / "gold_vs_step.png"
    fig.savefig(step_png, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for arm, rs in by_arm.items():
        _, kl, _ = _band(rs, "kl")
        _, m, h = _band(rs, "gold")
        ax.plot(kl, m, marker=".", color=colors[arm], label=arm)
        ax.fill_between(kl, [a - b for a, b in zip(m, h)], [a + b for a, b in zip(m, h)], color=colors[arm], alpha=0.15)
    ax.set(title="Gold reward vs KL(policy || SFT) (band: 95% interval over seeds)", xlabel="KL (nats)", ylabel="gold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    kl_png = out_dir / "gold_vs_kl.png"
    fig.savefig(kl_png, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for arm, rs in by_arm.items():
        steps = [s["step"] for s in rs[0]["steps"]]
        for i, r in enumerate(rs):
            ax.plot(
                steps, [s["reward"] for s in r["steps"]], color=colors[arm], alpha=0.6, label=arm if i == 0 else None
            )
    ax.set(title="Reward scale: the training reward each arm optimises (batch mean, every seed)", xlabel="RL step")
    ax.set(ylabel="reward from /score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    scale_png = out_dir / "reward_scale.png"
    fig.savefig(scale_png, dpi=100)
    plt.close(fig)
    return [step_png, kl_png, scale_png]


def describe_overoptimization(arm: dict[str, list[float]]) -> str:
    """One line: where gold peaked, how far it fell by the end, and how the proxy moved meanwhile."""
    return (
        f"gold peaked at step {sum(arm['best_step']) / len(arm['best_step']):.0f} on average and fell by "
        f"{_fmt(arm['drop_from_best'])} by the end while the proxy moved by {_fmt(arm['proxy_rise_after_best'])} "
        f"(gold units); the proxy-gold gap widened by {_fmt(arm['gap_widening'])}"
    )


def as_text(value: Any) -> str:
    return _fmt(value) if isinstance(value, list) else str(value)
