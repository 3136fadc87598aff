"""Section 5, R2M overhead: /score with the policy's hidden states (256 tokens x 2048, bf16) vs without.

One server, one client, one set of texts; the only difference is the hidden-state payload (binary encoding) and the
feedback attention it triggers (a step where omega < 1). Short rounds alternate vanilla and hidden at each
concurrency level; the ratio is vanilla seq/s over hidden seq/s per round, and the median of the rounds is
reported (the machine is shared: a burst of load elsewhere spoils one round, not the figure).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from ._common import CpuMeter, drive_score, row, start_r2m, texts
from .serve import server_env

ROWS = 256


def run(opts) -> dict:  # noqa: ANN001
    levels = [1, 8] if opts.quick else opts.overhead_levels
    rounds = 1 if opts.quick else opts.rounds
    duration = opts.duration if opts.quick else max(2.0, opts.duration / 2)
    pairs = texts(64 if opts.quick else 512)
    torch.manual_seed(0)
    hidden = [torch.randn(ROWS, opts.policy_dim).to(torch.bfloat16) for _ in range(16)]
    server = start_r2m(Path(opts.tmp), server_env(opts), "overhead")
    out: dict = {"hidden_rows": ROWS, "policy_dim": opts.policy_dim, "dtype": "bfloat16", "rounds": rounds,
                 "duration_s": duration, "rows": []}
    meter = CpuMeter(server.proc.pid)
    try:
        for c in levels:
            per: list[dict] = []
            for k in range(rounds):
                meter.start()
                v = drive_score(server.url, pairs, c, duration, offset=k)
                v.update(meter.stop(int(v["requests"])))
                meter.start()
                h = drive_score(server.url, pairs, c, duration, hidden=hidden, offset=k)
                h.update(meter.stop(int(h["requests"])))
                per.append({"vanilla": v, "hidden": h, "ratio": v["seq_per_s"] / h["seq_per_s"]})
            res = {
                "vanilla_seq_per_s": statistics.median(p["vanilla"]["seq_per_s"] for p in per),
                "hidden_seq_per_s": statistics.median(p["hidden"]["seq_per_s"] for p in per),
                "vanilla_p50_ms": statistics.median(p["vanilla"]["p50_ms"] for p in per),
                "hidden_p50_ms": statistics.median(p["hidden"]["p50_ms"] for p in per),
                "ratio": statistics.median(p["ratio"] for p in per),
                "vanilla_server_cpu_ms_per_request": statistics.median(
                    p["vanilla"]["server_cpu_ms_per_request"] for p in per
                ),
                "hidden_server_cpu_ms_per_request": statistics.median(
                    p["hidden"]["server_cpu_ms_per_request"] for p in per
                ),
                "vanilla_client_cpu_ms_per_request": statistics.median(
                    p["vanilla"]["client_cpu_ms_per_request"] for p in per
                ),
                "hidden_client_cpu_ms_per_request": statistics.median(
                    p["hidden"]["client_cpu_ms_per_request"] for p in per
                ),
                "round_ratios": [p["ratio"] for p in per],
            }
            out[f"c{c}"] = res
            print(f"  overhead c={c}: vanilla {res['vanilla_seq_per_s']:.1f} seq/s, hidden "
                  f"{res['hidden_seq_per_s']:.1f} seq/s, ratio {res['ratio']:.3f}", flush=True)
            out["rows"].append(
                row(
                    f"R2M overhead c={c}: hidden (bf16 {ROWS}x{opts.policy_dim}) vs vanilla, time ratio",
                    res["hidden_seq_per_s"],
                    "seq/s",
                    baseline=res["vanilla_seq_per_s"],
                    ratio=res["ratio"],
                    target="<= 1.1",
                )
            )
    finally:
        server.stop()
    return out
