"""Section 7, hot swap through Redis: publish-to-served latency, and /score throughput during a stream of swaps.

A private redis-server and one `r2m serve` replica reading heads from it. Latency: this process publishes a new
head version (as the worker does: weights to the store, a pub/sub notice) and polls the replica's
`/heads/current` every few ms until it serves that version. Throughput: closed-loop /score load (no hidden states)
for a while with no swaps and for a while with a version published every `--swap-interval` seconds, in
alternating rounds; the ratio is the median over rounds. The head blobs are serialised before the clock starts,
so the publisher's own CPU cost is the Redis write alone. Where the time goes: the replica's phases of each swap
(notice, fetch, hash, load, fused; `served_swap_ms`), averaged over all swaps and over the slowest 1% (the p99).
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import httpx
import torch

from r2m.service.launch import start_redis

from ._common import drive_score, histogram_delta_mean, percentile, row, start_r2m, texts
from .serve import server_env

POLL_S = 0.005


def run(opts) -> dict:  # noqa: ANN001
    from r2m.service.config import ServiceSettings
    from r2m.service.engine import build_engine
    from r2m.service.headcodec import head_to_bytes, serving_bytes
    from r2m.service.headstore import RedisHeadStore
    from r2m.service.update.training import HeadTrainer

    tmp = Path(opts.tmp)
    n = 4 if opts.quick else opts.swap_versions
    rounds = 1 if opts.quick else opts.rounds
    duration = opts.duration if opts.quick else max(3.0, opts.duration / 2)
    conc = 8
    redis_proc = start_redis(tmp)
    server = None
    try:
        # The head's size is what a swap moves: D_policy = --policy-dim, d = 2048 (quick: 64 and 64, a small head).
        dims = {"policy_dim": 64, "attn_dim": 64} if opts.quick else {"policy_dim": opts.policy_dim}
        env = {**server_env(opts), "R2M_REDIS_URL": redis_proc.url}
        env.update({f"R2M_{k.upper()}": str(v) for k, v in dims.items()})
        server = start_r2m(tmp, env, "swap")
        settings = ServiceSettings(model=opts.model, device="cpu", **dims)
        trainer = HeadTrainer(build_engine(settings), settings)
        blobs = []
        for _ in range(2):
            with torch.no_grad():
                trainer.head.score.weight.add_(0.001)
            # What the worker publishes: the float32 master and the float16 serving copy the replicas fetch.
            blobs.append((head_to_bytes(trainer.head), serving_bytes(trainer.head)))
        store = RedisHeadStore(redis_proc.url)
        meta = {"config": trainer.engine.head_config.to_dict(), "model": opts.model}
        state = {"parent": None, "i": 0}

        def publish() -> int:
            i = state["i"]
            state["i"] += 1
            weights, serving = blobs[i % 2]
            published = store.publish(
                parent=state["parent"],
                weights=weights,
                optim=None,
                meta=meta,
                batch_ids=[f"bench-{i}"],
                serving=serving,
            )
            state["parent"] = published["version"]
            return int(published["version"])

        # --- latency: publish, then poll the replica until it serves the version -------------------------------
        latencies = []
        breakdowns = []  # the replica's own phases of each timed swap (GET /heads/current's served_swap_ms)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            before = client.get("/metrics").text
            for i in range(n + 1):
                t0 = time.perf_counter()
                version = publish()
                while (current := client.get("/heads/current").json())["served_version"] != version:
                    if time.perf_counter() - t0 > 30:
                        raise RuntimeError(f"the replica did not serve version {version} within 30 s")
                    time.sleep(POLL_S)
                if i:  # version 0 is what a fresh replica already serves: no swap to time
                    latencies.append(time.perf_counter() - t0)
                    breakdowns.append(dict(current.get("served_swap_ms") or {}))
            after = client.get("/metrics").text
        timed = list(latencies)  # in publication order, as `breakdowns` (latencies is sorted below)
        order = sorted(range(len(timed)), key=timed.__getitem__)
        slowest = order[-max(1, len(order) // 100) :]  # the swaps at or above the p99

        def where(idx: list[int]) -> dict[str, float]:
            """Mean ms per phase over the swaps `idx`; `rest`: the end-to-end time the replica did not see (the
            publisher's Redis write, this poll's interval and its HTTP round trip)."""
            phases = sorted({k for i in idx for k in breakdowns[i]})
            mean = {k: statistics.fmean(breakdowns[i].get(k, 0.0) for i in idx) for k in phases}
            total = statistics.fmean(1000 * timed[i] for i in idx)
            return {**mean, "rest": total - sum(mean.values()), "end_to_end": total}

        latencies.sort()
        out: dict = {
            "versions": n,
            "head_bytes": len(blobs[0][0]),
            "serving_bytes": len(blobs[0][1]),
            "poll_ms": 1000 * POLL_S,
            "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99),
            "max_ms": 1000 * latencies[-1],
            # The replica's own view: fetch + hash check + build + swap (excludes the notice's trip).
            "server_load_mean_ms": 1000 * histogram_delta_mean(before, after, "r2m_head_swap_duration_seconds"),
            "phases_mean_ms": where(order),
            "phases_p99_ms": where(slowest),
        }
        print("  swap phases, mean: " + ", ".join(f"{k} {v:.1f}" for k, v in out["phases_mean_ms"].items())
              + " ms; slowest 1%: " + ", ".join(f"{k} {v:.1f}" for k, v in out["phases_p99_ms"].items()) + " ms",
              flush=True)  # fmt: skip

        # --- throughput with and without a stream of swaps, alternating rounds ---------------------------------
        pairs = texts(16 if opts.quick else 256)
        per = []
        for k in range(rounds):
            quiet = drive_score(server.url, pairs, conc, duration, offset=k)
            stop = threading.Event()
            swaps = [0]

            def stream() -> None:
                while not stop.wait(opts.swap_interval):
                    publish()
                    swaps[0] += 1

            publisher = threading.Thread(target=stream, daemon=True)
            publisher.start()
            busy = drive_score(server.url, pairs, conc, duration, offset=k)
            stop.set()
            publisher.join()
            per.append(
                {
                    "quiet": quiet["seq_per_s"],
                    "swapping": busy["seq_per_s"],
                    "swaps": swaps[0],
                    "swapping_p99_ms": busy["p99_ms"],
                    "quiet_p99_ms": quiet["p99_ms"],
                }
            )
        out["throughput"] = {
            "concurrency": conc,
            "swap_interval_s": opts.swap_interval,
            "duration_s": duration,
            "rounds": per,
            "quiet_seq_per_s": statistics.median(p["quiet"] for p in per),
            "swapping_seq_per_s": statistics.median(p["swapping"] for p in per),
            "ratio": statistics.median(p["swapping"] / p["quiet"] for p in per),
        }
        print(
            f"  swap: p50 {out['p50_ms']:.0f} ms, p99 {out['p99_ms']:.0f} ms; throughput during swaps "
            f"{out['throughput']['ratio']:.3f} of without",
            flush=True,
        )
        th = out["throughput"]
        out["rows"] = [
            row("swap publish-to-served latency p50", out["p50_ms"], "ms"),
            row("swap publish-to-served latency p99", out["p99_ms"], "ms", target="< 250"),
            row(
                f"/score c={conc} during swaps (1 per {opts.swap_interval:g} s) vs without",
                th["swapping_seq_per_s"],
                "seq/s",
                baseline=th["quiet_seq_per_s"],
                ratio=th["ratio"],
                target=">= 0.95",
            ),
        ]
        return out
    finally:
        if server is not None:
            server.stop()
        redis_proc.stop()
