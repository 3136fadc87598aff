"""r2m benchmarks: every figure is measured beside its baseline in the same run (the machine is shared and noisy).

    .venv/bin/python -m bench                          # every section; JSON to bench/results.json, then a table
    .venv/bin/python -m bench --only codec attention   # some sections
    .venv/bin/python -m bench --quick                  # tiny sizes, a few seconds a section (CI runs this)
    .venv/bin/python -m bench --device cuda            # tensors and servers on the GPU
    .venv/bin/python -m bench.report --readme bench/README.md   # README table and plot from the JSON

Sections (numbers as in the performance issue):
    codec      1  binary decode GB/s of 16 x 256 x 2048 bf16/fp16 beside a plain memory copy; JSON base64 decode
    attention  2  feedback attention per item at T=700, D_policy=4096, d=2048 beside one read of h; fp32, bf16 h
    prefix     3  bytes on the wire per response with and without group prompt-prefix sharing (bench/prefix_bytes.py)
    serve      4  /score seq/s through `r2m serve` at concurrency 1, 8, 32 vs the bare backbone in-process; p50/p99
    overhead   5  /score with 256 x 2048 bf16 hidden states vs without, same server and client
    grebt      6  GREBT update on 256 groups with and without the RTE cache
    swap       7  bytes per version in Redis, publish-to-served latency, /score seq/s during a stream of swaps vs
                  without; at the default widths and at 8B widths
    peer       8  OpenRLHF's serve_rm vs r2m's /get_reward on the same model, OpenRLHF's client: seq/s, rewards
    ensemble   9  /score seq/s with R2M_ENSEMBLE=5 vs 1 on the default model; the update time of 5 heads vs 1
    local     10  feedback at the policy vs on the server: body bytes per response at T=256/700, seq/s vs vanilla
    memory    11  peak and idle RSS of `r2m serve` under 200 connections at two in-flight budgets
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SECTIONS = (
    "codec", "attention", "prefix", "serve", "overhead", "grebt", "swap", "peer", "ensemble", "local", "memory"
)


def _run_prefix(opts: argparse.Namespace) -> dict:
    """Section 3 lives in bench/prefix_bytes.py (`run(quick: bool) -> dict`), written separately; its own rows are
    kept as `prefix_rows` and turned into table rows here."""
    from ._common import Unavailable, row

    try:
        module = importlib.import_module("bench.prefix_bytes")
    except Exception as exc:  # noqa: BLE001 - any import failure makes the section unavailable, not the run
        raise Unavailable(f"bench/prefix_bytes.py does not import: {type(exc).__name__}: {exc}") from None
    result = dict(module.run(opts.quick))
    theirs = result.pop("rows", [])
    rows = []
    for r in theirs:
        try:
            line = row(
                f"bytes/response K={r['k']} {r['encoding']}: shared vs full (ratio: prompt part saved)",
                r["bytes_per_response_shared"],
                "B",
                baseline=r["bytes_per_response_full"],
                ratio=r["saving_of_prompt_part"],
                target=f">= {r['target']:.3f}",
            )
        except (KeyError, TypeError):
            return {**result, "prefix_rows": theirs}  # an unknown layout: the report lists its numbers
        line["met"] = bool(r.get("met", line["met"]))  # their verdict: it allows the few bytes of JSON framing
        rows.append(line)
    return {**result, "prefix_rows": theirs, "rows": rows}


def run_section(name: str, opts: argparse.Namespace) -> dict:
    from ._common import Unavailable

    started = time.perf_counter()
    load_before = os.getloadavg()[0]  # 1-minute load: how busy the shared machine was around this section
    try:
        run = _run_prefix if name == "prefix" else importlib.import_module(f"bench.{name}").run
        result = run(opts)
        result = {"status": "ok", **result}
    except Unavailable as exc:
        result = {"status": "unavailable", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others' results
        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = time.perf_counter() - started
    result["loadavg_1min"] = [load_before, os.getloadavg()[0]]
    return result


def _finite(x: Any) -> Any:
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION", help=f"of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and durations: checks that it all runs")
    parser.add_argument("--model", default="default", help="reward model served by serve/overhead/grebt/swap: "
                        "`default` (bundled) or any HF sequence-classification RM id/path [default]")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where tensors and models run [cpu]")
    parser.add_argument("--out", default=str(HERE / "results" / "results.json"),
                        help="results JSON [bench/results/results.json]")
    parser.add_argument("--note", default="", help="a line about the run, kept in the JSON and the README")
    parser.add_argument("--merge", action="store_true", help="replace only the sections run in an existing --out "
                        "JSON, keeping the others (each section records the run it came from)")
    g = parser.add_argument_group("sizes and durations")
    g.add_argument("--duration", type=float, default=None, help="seconds per throughput measurement [10; quick 1]")
    g.add_argument("--rounds", type=int, default=3, help="alternating rounds of side-by-side measurements [3]")
    g.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="/score concurrency levels [1 8 32]")
    g.add_argument("--overhead-levels", type=int, nargs="+", default=[8, 32], help="levels of section 5 [8 32]")
    g.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads of this process and of every "
                   "server it starts (OMP_NUM_THREADS); default: torch's (all cores). On a shared machine 1 avoids "
                   "OpenMP threads spinning against other jobs' threads")
    g.add_argument("--policy-dim", type=int, default=2048, help="D_policy of the served head [2048]")
    g.add_argument("--attn-batch", type=int, default=16, help="items per timed feedback-attention call [16]")
    g.add_argument("--grebt-groups", type=int, default=256, help="groups in the GREBT batch [256]")
    g.add_argument("--grebt-k", type=int, default=4, help="responses per group [4]")
    g.add_argument("--grebt-rows", type=int, default=32, help="hidden-state rows per response [32]")
    g.add_argument("--swap-versions", type=int, default=40, help="head versions published for the latency [40]")
    g.add_argument("--swap-interval", type=float, default=1.0, help="seconds between swaps in the stream [1]")
    g.add_argument("--swap-rounds", type=int, default=9, help="alternating rounds of section 7's throughput windows "
                   "[9]: one round's ratio is too noisy on a small shared machine to decide a 5%% target")
    g.add_argument("--swap-widths", nargs="+", choices=["default", "8b"], default=["default", "8b"],
                   help="head widths of section 7: default (--policy-dim, d=2048, the model's D_rm) and 8b (D_rm and "
                   "D_policy 4096, d 2048, on a random 4096-wide RM) [default 8b]")
    g.add_argument("--peer-samples", type=int, default=256, help="samples sent to each server per round [256]")
    g.add_argument("--peer-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="r2m's dtype in the peer section; serve_rm runs bf16 on CPU [bfloat16]")
    opts = parser.parse_args(argv)
    if opts.duration is None:
        opts.duration = 1.0 if opts.quick else 10.0
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device here")
    for name in ("duration", "rounds", "attn_batch", "grebt_groups", "grebt_k", "grebt_rows", "swap_versions",
                 "swap_interval", "swap_rounds", "peer_samples"):
        if getattr(opts, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if opts.threads is not None and opts.threads < 1:
        parser.error("--threads must be >= 1")
    if opts.grebt_k < 2:
        parser.error("--grebt-k must be >= 2 (a group needs two responses)")
    if min(opts.levels + opts.overhead_levels) < 1:
        parser.error("concurrency levels must be >= 1")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    if opts.threads:
        os.environ["OMP_NUM_THREADS"] = str(opts.threads)  # inherited by every server the sections start
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)

    from .report import text_table

    names = opts.only or list(SECTIONS)
    run = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "sections": names,
        "note": opts.note,
    }
    results: dict[str, Any] = {
        **{k: run[k] for k in ("date", "command")},
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if opts.device == "cuda" else None,
        },
        "device": opts.device,
        "quick": opts.quick,
        "note": opts.note,
        "runs": [run],
        "sections": {},
    }
    out = Path(opts.out)
    if opts.merge and out.is_file():
        # Keep the other sections of an earlier run (and say so): re-measuring one section costs minutes, not all.
        earlier = json.loads(out.read_text())
        if earlier.get("quick") != opts.quick or earlier.get("device") != opts.device:
            raise SystemExit(f"--merge: {out} was written with --quick={earlier.get('quick')} "
                             f"--device={earlier.get('device')}; this run differs")
        results["runs"] = [*earlier.get("runs", []), run]
        results["sections"] = {k: v for k, v in earlier.get("sections", {}).items() if k not in names}
        results["note"] = " / ".join(filter(None, [earlier.get("note"), opts.note]))
    with tempfile.TemporaryDirectory(prefix="r2m-bench-") as tmp:
        opts.tmp = tmp
        for name in names:
            print(f"[{name}]", flush=True)
            results["sections"][name] = {**run_section(name, opts), "run": run["date"]}
            res = results["sections"][name]
            print(f"  {res['status']} in {res['seconds']:.1f} s" + (f": {res['reason']}" if "reason" in res else ""),
                  flush=True)
    results["sections"] = {k: results["sections"][k] for k in SECTIONS if k in results["sections"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(results), indent=2) + "\n")
    print()
    print(text_table(results))
    print(f"\nwrote {out}")
    return 1 if any(r["status"] == "error" for r in results["sections"].values()) else 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
