"""Section 4, /score throughput through the real server beside the bare backbone in-process (the ceiling).

The server is `r2m serve` (uvicorn) as a subprocess on loopback. At each concurrency level c, c closed loops post
one (prompt, response) per request with r2m's async client; the server can merge at most c of them into one
backbone batch, so the ceiling at level c is the bare backbone forward in this process on the same texts in
batches of b <= c (`Backbone.embed`, no server, no HTTP, no tokenizing): the best of b = 1, 2, 4, ..., c, since a
bigger batch is not always faster on a CPU (padding to the longest text, activations that leave the cache); the
figure at b = c alone is in the JSON (`backbone_batch_c_seq_per_s`). At each level, windows of the ceiling and of
the server alternate `--rounds` times; the medians are reported, with the CPU the server and the client (this
process) spent per request.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx

from ._common import CpuMeter, drive_score, histogram_delta_mean, row, start_r2m, sync, texts

TARGET_LEVEL = 32


def batch_sizes(c: int) -> list[int]:
    """The batch sizes a server with c requests in flight can run: powers of two below c, and c."""
    return sorted({2**i for i in range(c.bit_length()) if 2**i < c} | {c})


def ceiling(backbone, pairs: list[tuple[str, str]], batch: int, seconds: float) -> float:  # noqa: ANN001
    """Sequences per second of the bare backbone on `pairs` in consecutive batches of `batch`, over `seconds`."""
    enc = [backbone.encode(p, r) for p, r in pairs]
    batches = [enc[i : i + batch] for i in range(0, len(enc), batch)]
    device = str(backbone.device)
    backbone.embed(batches[0])  # warm
    sync(device)
    done, i = 0, 0
    t0 = time.perf_counter()
    while True:
        b = batches[i % len(batches)]
        backbone.embed(b)
        sync(device)
        done += len(b)
        i += 1
        if time.perf_counter() - t0 >= seconds and i >= min(len(batches), 3):
            return done / (time.perf_counter() - t0)


def server_env(opts) -> dict[str, str]:  # noqa: ANN001
    return {
        "R2M_MODEL": opts.model,
        "R2M_DEVICE": opts.device,
        "R2M_POLICY_DIM": str(opts.policy_dim),
        "R2M_EMBEDDED_WORKER": "false",  # nothing but scoring in the server under test
    }


def run(opts) -> dict:  # noqa: ANN001
    from r2m.service.backbone import load_backbone

    levels = opts.levels if not opts.quick else [c for c in opts.levels if c <= 8] or [1]
    rounds = 1 if opts.quick else opts.rounds
    duration = opts.duration if opts.quick else max(2.0, opts.duration / 2)
    ceiling_s = duration if opts.quick else min(duration, 2.0)
    pairs = texts(16 if opts.quick else 512)
    server = start_r2m(Path(opts.tmp), server_env(opts), "serve")
    out: dict = {"model": opts.model, "duration_s": duration, "rounds": rounds, "levels": levels, "rows": []}
    try:
        out["server_info"] = {k: v for k, v in httpx.get(f"{server.url}/info").json().items() if k != "settings"}
        backbone = load_backbone(opts.model, device=opts.device, dtype="auto")
        out["ceiling_dtype"] = str(backbone.dtype).removeprefix("torch.")
        meter = CpuMeter(server.proc.pid)
        for c in levels:
            # Alternate the ceiling's windows and a window of the server, `rounds` times: medians of each.
            ceils, at_c, runs = [], [], []
            for k in range(rounds):
                curve = {b: ceiling(backbone, pairs, b, seconds=ceiling_s) for b in batch_sizes(c)}
                ceils.append(max(curve.values()))
                at_c.append(curve[c])
                before = httpx.get(f"{server.url}/metrics").text
                meter.start()
                served = drive_score(server.url, pairs, c, duration, offset=k * c)
                served.update(meter.stop(int(served["requests"])))
                after = httpx.get(f"{server.url}/metrics").text
                served["requests_per_batch"] = histogram_delta_mean(before, after, "r2m_batch_requests")
                runs.append(served)
            res = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            res["ceiling_seq_per_s"] = statistics.median(ceils)
            res["backbone_batch_c_seq_per_s"] = statistics.median(at_c)
            res["vs_ceiling"] = statistics.median(r["seq_per_s"] / cl for r, cl in zip(runs, ceils))
            res["round_seq_per_s"] = [r["seq_per_s"] for r in runs]
            res["round_ceiling_seq_per_s"] = ceils
            out[f"c{c}"] = res
            print(f"  serve c={c}: {res['seq_per_s']:.1f} seq/s (ceiling {res['ceiling_seq_per_s']:.1f}), "
                  f"p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms", flush=True)
            out["rows"].append(
                row(
                    f"/score c={c} vs in-process backbone (best batch <= {c})",
                    res["seq_per_s"],
                    "seq/s",
                    baseline=res["ceiling_seq_per_s"],
                    ratio=res["vs_ceiling"],
                    target=">= 0.85" if c == TARGET_LEVEL else None,
                )
            )
            out["rows"].append(row(f"/score c={c} latency p50", res["p50_ms"], "ms"))
            out["rows"].append(row(f"/score c={c} latency p99", res["p99_ms"], "ms"))
    finally:
        server.stop()
    return out
