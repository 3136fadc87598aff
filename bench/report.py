"""The results table and plot, generated from a results JSON (never typed by hand).

    .venv/bin/python -m bench.report                        # print the table of bench/results.json
    .venv/bin/python -m bench.report --readme bench/README.md   # also rewrite the README's table and plot

The README keeps the generated part between `<!-- results:start -->` and `<!-- results:end -->`.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
START, END = "<!-- results:start -->", "<!-- results:end -->"
COLUMNS = ("section", "figure", "value", "baseline", "ratio", "target", "met?")
PLOT = "results/throughput.png"  # beside the README it goes in


def _num(x: Any, unit: str = "") -> str:
    if x is None:
        return ""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if math.isnan(x):
        return "nan"
    s = f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return f"{s} {unit}".strip()


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for section, res in results.get("sections", {}).items():
        if not isinstance(res, dict):
            continue
        if res.get("status") in ("unavailable", "error"):
            rows.append([section, f"{res['status']}: {res.get('reason', '')}"[:200], "", "", "", "", ""])
            continue
        for r in res.get("rows") or _rows_from_numbers(res):
            met = "" if r.get("met") is None else ("yes" if r["met"] else "NO")
            unit = r.get("unit", "")
            rows.append(
                [
                    section,
                    r["figure"],
                    _num(r["value"], unit),
                    _num(r.get("baseline"), unit),
                    _num(r.get("ratio")),
                    r.get("target") or "",
                    met,
                ]
            )
    return rows


def _rows_from_numbers(res: dict, prefix: str = "") -> list[dict]:
    """A section without a `rows` list (bench/prefix_bytes.py): one line per number in its result."""
    out = []
    for k, v in res.items():
        if isinstance(v, dict):
            out.extend(_rows_from_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append({"figure": f"{prefix}{k}", "value": v})
    return out


def markdown(results: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in table_rows(results)]
    return "\n".join(lines)


def text_table(results: dict) -> str:
    rows = [list(COLUMNS), *table_rows(results)]
    widths = [min(72, max(len(r[i]) for r in rows)) for i in range(len(COLUMNS))]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(c[:72].ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot(results: dict, path: Path) -> bool:
    """Throughput vs concurrency (served and the in-process ceiling); False when there is nothing to plot."""
    serve = results.get("sections", {}).get("serve", {})
    levels = serve.get("levels") or []
    if not levels or serve.get("status", "ok") != "ok":
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    served = [serve[f"c{c}"]["seq_per_s"] for c in levels]
    ceiling = [serve[f"c{c}"]["ceiling_seq_per_s"] for c in levels]
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
    ax.plot(levels, ceiling, "o--", label="bare backbone in-process (best batch <= c)")
    ax.plot(levels, served, "o-", label="/score through r2m serve")
    over = results.get("sections", {}).get("overhead", {})
    hl = [c for c in levels if isinstance(over.get(f"c{c}"), dict)]
    if hl:
        other = f", run of {over['run']}" if over.get("run") != serve.get("run") else ""
        label = f"/score with 256x2048 bf16 hidden{other}"
        ax.plot(hl, [over[f"c{c}"]["hidden_seq_per_s"] for c in hl], "s:", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent clients (one sequence per request)")
    ax.set_ylabel("sequences / s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"/score throughput, model {serve.get('model', '?')} ({results.get('date', '')[:10]})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def readme_block(results: dict, results_name: str, plotted: bool) -> str:
    m = results.get("machine", {})
    runs = results.get("runs") or [{"date": results.get("date", "?"), "command": results.get("command", "?")}]
    lines = [
        START,
        f"Generated by `python -m bench.report --readme bench/README.md` from `{results_name}`.",
        "",
        *[
            f"- {r['date']}: `{_without_note(r['command'])}`" + (f": {r['note']}" if r.get("note") else "")
            for r in runs
        ],
        f"- machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}, device "
        f"{results.get('device', '?')}"
        + (f", {m.get('threads', '?')} torch threads" if len(runs) == 1 else ""),
    ]
    lines += ["", markdown(results), ""]
    if plotted:
        lines += [f"![/score throughput vs concurrency]({PLOT})", ""]
    lines.append(END)
    return "\n".join(lines)


def _without_note(command: str) -> str:
    """The command as run, less its `--note` (shown after it, unquoted)."""
    words = shlex.split(command)
    out = []
    skip = False
    for w in words:
        if skip:
            skip = False
        elif w == "--note":
            skip = True
        elif not w.startswith("--note="):
            out.append(w)
    return shlex.join(out)


def update_readme(results: dict, readme: Path, results_name: str) -> None:
    plotted = plot(results, readme.parent / PLOT)
    text = readme.read_text() if readme.exists() else f"# bench\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(head + readme_block(results, results_name, plotted) + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", default=str(HERE / "results" / "results.json"), help="a results JSON")
    parser.add_argument("--readme", help="rewrite the generated block (table, plot) of this README")
    args = parser.parse_args(argv)
    path = Path(args.results)
    if not path.is_file():
        parser.error(f"{path}: no such results file; run `python -m bench` first")
    results = json.loads(path.read_text())
    print(text_table(results))
    if args.readme:
        try:
            name = str(path.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            name = str(path)
        update_readme(results, Path(args.readme), name)
        print(f"wrote {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
