"""Section 7, hot swap through Redis: bytes per version, publish-to-served latency, and /score throughput during a
stream of swaps; at the default widths and at an 8B reward model's widths (`--swap-widths`).

Per width set, a private redis-server and one `r2m serve` replica reading heads from it. This process publishes
head versions as the worker does (`RedisHeadStore.publish`: the float32 master and the serving copy in one
transaction, the announcement, then the optimizer state) and, for the latency, polls the replica's `/readyz` every
few ms from the publish call on until it serves that version. The blobs are the worker's own encoding
(`HeadTrainer.state_bytes`: master, AdamW state after one step, serving copy) of a random head, serialised and
hashed before the clock starts, so the publisher's cost on the clock is the Redis write alone. Where the time goes:
the publisher's round trips before the version's timestamp (publish) and the replica's phases of each swap (notice,
fetch, hash, load, install; `served_swap_ms`), averaged over all swaps and over the slowest 1% (the p99). Bytes:
what Redis holds per kept version and for the one optimizer state (its own MEMORY USAGE of the keys), beside the
formula of docs/headstore.md. Throughput: closed-loop /score load (no hidden states) for a while with no swaps,
for a while with a version published every `--swap-interval` seconds as the worker publishes on its defaults (the
optimizer state every R2M_OPTIMIZER_SAVE_S), and for a while with the optimizer state written with every version
(R2M_OPTIMIZER_SAVE_S=0), in `--swap-rounds` alternating rounds; the ratios are medians over rounds. The latency's
publishes write the optimizer state with every version (the most a publish writes).

The 8B set (D_rm 4096, D_policy 4096, d 2048) serves a seeded random one-layer Llama RM 4096 wide: a swap moves the
head, whose size is set by the widths, not by the backbone's depth.
"""

from __future__ import annotations

import gc
import re
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
WIDTHS = ("default", "8b")
EIGHT_B = {"policy_dim": 4096, "attn_dim": 2048}  # and D_rm 4096, the backbone's (`wide_rm`)


def wide_rm(path: Path, width: int = 4096, seed: int = 0) -> Path:
    """A seeded random one-layer Llama sequence-classification RM `width` wide (grouped-query attention as in
    Llama-3-8B) with a word-level tokenizer over the bench's texts, saved to `path`."""
    from transformers import LlamaForSequenceClassification

    from r2m.trainer.tiny import llama_config, word_tokenizer

    words = sorted({w for p, r in texts(512) for w in re.findall(r"\w+|[^\w\s]", f"{p} {r}")})
    tok = word_tokenizer(words)
    config = llama_config(tok, width=width, layers=1, heads=32, kv_heads=8, intermediate=1024, max_positions=1024,
                          num_labels=1)  # fmt: skip
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).to(torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run(opts) -> dict:  # noqa: ANN001
    sets = ["quick"] if opts.quick else list(dict.fromkeys(opts.swap_widths))
    out: dict = {"rows": []}
    for name in sets:
        result = run_widths(opts, name)
        out["rows"] += result.pop("rows")
        if name == sets[0]:
            out |= result  # the first set's figures at the top (the default widths unless --swap-widths says)
        else:
            out[f"widths_{name}"] = result
    return out


def run_widths(opts, name: str) -> dict:  # noqa: ANN001
    from r2m.service.config import ServiceSettings
    from r2m.service.engine import build_engine
    from r2m.service.headcodec import blob_sizes, sha256
    from r2m.service.redisheads import RedisHeadStore, redis_value_bytes
    from r2m.service.update.training import HeadTrainer

    tmp = Path(opts.tmp) / f"swap-{name}"
    tmp.mkdir(parents=True, exist_ok=True)
    n = 4 if opts.quick else opts.swap_versions
    rounds = 1 if opts.quick else opts.swap_rounds
    duration = opts.duration if opts.quick else max(3.0, opts.duration / 2)
    conc = 8
    model = opts.model
    if name == "quick":
        dims = {"policy_dim": 64, "attn_dim": 64}
    elif name == "8b":
        dims = dict(EIGHT_B)
        model = str(wide_rm(tmp / "wide-rm"))
    else:
        dims = {"policy_dim": opts.policy_dim}  # d: the default 2048
    label = "" if name in ("default", "quick") else f" [{name} widths]"
    redis_proc = start_redis(tmp)
    server = None
    try:
        env = {**server_env(opts), "R2M_MODEL": model, "R2M_REDIS_URL": redis_proc.url}
        env.update({f"R2M_{k.upper()}": str(v) for k, v in dims.items()})
        server = start_r2m(tmp, env, f"swap-{name}")
        settings = ServiceSettings(model=model, device="cpu", **dims)
        trainer = HeadTrainer(build_engine(settings), settings)
        config = trainer.engine.head_config
        head = trainer.head
        e = torch.randn(2, config.rm_dim)
        h, mask = torch.randn(2, 3, config.policy_dim), torch.ones(2, 3, dtype=torch.bool)
        head(e, torch.full((2,), 0.5), h, mask).sum().backward()
        trainer.opt.step()  # AdamW's moments exist from the first step on: the optimizer state at its full size
        blobs = []
        for _ in range(2):
            with torch.no_grad():
                head.score.weight.add_(0.001)
            weights, optim, serving = trainer.state_bytes()  # what the worker publishes
            blobs.append((weights, optim, serving, (sha256(weights), sha256(serving))))
        del trainer, head
        # This process is the publisher, the poller and the load: a full collection over the ~0.5 M objects of the
        # engine built above takes ~200 ms here, and landed in the timed windows as 200 ms swaps.
        gc.collect()
        gc.freeze()
        store = RedisHeadStore(redis_proc.url)
        meta = {"config": config.to_dict(), "model": model}
        state: dict = {"parent": None, "i": 0, "optim_at": float("-inf")}
        publish_s: list[float] = []

        def publish(save_s: float = 0.0) -> int:
            """A version as the worker publishes it with R2M_OPTIMIZER_SAVE_S = `save_s`: the optimizer state when
            `save_s` has passed since it was last written (0: every version), the stored one kept otherwise."""
            i = state["i"]
            state["i"] += 1
            weights, optim, serving, digests = blobs[i % 2]
            due = save_s == 0 or time.monotonic() - state["optim_at"] >= save_s
            t = time.perf_counter()
            published = store.publish(parent=state["parent"], weights=weights, optim=optim if due else None,
                                      meta=meta, batch_ids=[f"bench-{i}"], serving=serving, digests=digests,
                                      keep_optim=True)  # fmt: skip
            if due:
                state["optim_at"] = time.monotonic()
            publish_s.append(time.perf_counter() - t)
            state["parent"] = published["version"]
            return int(published["version"])

        # --- latency: publish (on a thread: the optimizer state is written after the announcement, as the worker
        # does) and poll the replica's /readyz (no store reads) from the same instant until it serves the version ---
        latencies = []
        breakdowns = []  # the replica's own phases of each timed swap (GET /heads/current's served_swap_ms)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            before = client.get("/metrics").text
            for i in range(n + 1):
                version = 0 if state["parent"] is None else state["parent"] + 1
                t0, wall0 = time.perf_counter(), time.time()
                writer = threading.Thread(target=publish)
                writer.start()
                while client.get("/readyz").json()["head_version"] != version:
                    if time.perf_counter() - t0 > 60:
                        raise RuntimeError(f"the replica did not serve version {version} within 60 s")
                    time.sleep(POLL_S)
                served = time.perf_counter() - t0
                writer.join()
                current = client.get("/heads/current").json()
                for _ in range(200):  # the install's own time is written just after the install
                    if "install" in (current.get("served_swap_ms") or {}) or not i:
                        break
                    time.sleep(POLL_S)
                    current = client.get("/heads/current").json()
                assert current["served_version"] == version == state["parent"], (current, version, state)
                if i:  # version 0 is what a fresh replica already serves: no swap to time
                    latencies.append(served)
                    # publish: from the call to the version's timestamp (the publisher's round trips before it)
                    phases = {"publish": 1000 * (float(current["created"]) - wall0)}
                    breakdowns.append(phases | dict(current.get("served_swap_ms") or {}))
            after = client.get("/metrics").text
        timed = list(latencies)  # in publication order, as `breakdowns` (latencies is sorted below)
        order = sorted(range(len(timed)), key=timed.__getitem__)
        slowest = order[-max(1, len(order) // 100) :]  # the swaps at or above the p99

        def where(idx: list[int]) -> dict[str, float]:
            """Mean ms per phase over the swaps `idx`; `rest`: the end-to-end time neither the publisher nor the
            replica saw (this poll's interval and its HTTP round trip)."""
            phases = sorted({k for i in idx for k in breakdowns[i]})
            mean = {k: statistics.fmean(breakdowns[i].get(k, 0.0) for i in idx) for k in phases}
            total = statistics.fmean(1000 * timed[i] for i in idx)
            return {**mean, "rest": total - sum(mean.values()), "end_to_end": total}

        # --- bytes: Redis's own figures for what it holds, beside the formula -----------------------------------
        time.sleep(2.5)  # Redis trims the publisher's query buffer (a blob's size) within a second or two
        kept = store.versions()
        held = store.footprint()
        formula = blob_sizes(config)
        per_version = (held["weights"] + held["serving"] + held["meta"]) / len(kept)
        per_version_formula = redis_value_bytes(formula["weights"]) + redis_value_bytes(formula["serving"])
        info = store.r.info("memory")
        sizes = {
            "kept_versions": len(kept),
            "blob_bytes": {"weights": len(blobs[0][0]), "serving": len(blobs[0][2]), "optimizer": len(blobs[0][1])},
            "formula_bytes": formula,
            "redis_bytes": held,
            "redis_per_version": per_version,
            "redis_per_version_formula": per_version_formula,
            "redis_optimizer_formula": redis_value_bytes(formula["optimizer"]),
            "redis_used_memory": info["used_memory"],
        }
        latencies.sort()
        publish_s.sort()
        out: dict = {
            "widths": {"rm_dim": config.rm_dim, "policy_dim": config.policy_dim, "attn_dim": config.attn_dim},
            "versions": n,
            "head_bytes": len(blobs[0][0]),
            "serving_bytes": len(blobs[0][2]),
            "optimizer_bytes": len(blobs[0][1]),
            "bytes": sizes,
            "poll_ms": 1000 * POLL_S,
            "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99),
            "max_ms": 1000 * latencies[-1],
            "publish_p50_ms": 1000 * percentile(publish_s, 50),  # the whole publish, the optimizer write included
            # The replica's own view: fetch + hash check + load + install (excludes the notice's trip).
            "server_load_mean_ms": 1000 * histogram_delta_mean(before, after, "r2m_head_swap_duration_seconds"),
            "phases_mean_ms": where(order),
            "phases_p99_ms": where(slowest),
        }
        print(f"  swap{label}: {len(kept)} versions kept, {per_version / 1e6:.1f} MB each in Redis (formula "
              f"{per_version_formula / 1e6:.1f}), optimizer {held['optimizer'] / 1e6:.1f} MB once", flush=True)
        print(f"  swap{label} phases, mean: " + ", ".join(f"{k} {v:.1f}" for k, v in out["phases_mean_ms"].items())
              + " ms; slowest 1%: " + ", ".join(f"{k} {v:.1f}" for k, v in out["phases_p99_ms"].items()) + " ms",
              flush=True)  # fmt: skip

        # --- throughput with and without a stream of swaps, alternating rounds ---------------------------------
        # Three windows a round: no swaps; swaps as the worker publishes on its defaults (the optimizer state every
        # R2M_OPTIMIZER_SAVE_S); and swaps that each write the optimizer state too (R2M_OPTIMIZER_SAVE_S=0, twice
        # the master's bytes per version, which Redis ingests on the cores the replica scores on).
        pairs = texts(16 if opts.quick else 256)
        per = []
        save_s = ServiceSettings.model_fields["optimizer_save_s"].default

        def swapping(k: int, every_s: float) -> tuple[dict, int]:
            stop = threading.Event()
            swaps = [0]

            def stream() -> None:
                while not stop.wait(opts.swap_interval):
                    publish(every_s)
                    swaps[0] += 1

            publisher = threading.Thread(target=stream, daemon=True)
            publisher.start()
            busy = drive_score(server.url, pairs, conc, duration, offset=k)
            stop.set()
            publisher.join()
            return busy, swaps[0]

        for k in range(rounds):
            quiet = drive_score(server.url, pairs, conc, duration, offset=k)
            busy, swaps = swapping(k, save_s)
            heavy, _ = swapping(k, 0.0)
            per.append(
                {
                    "quiet": quiet["seq_per_s"],
                    "swapping": busy["seq_per_s"],
                    "swapping_optimizer_every_version": heavy["seq_per_s"],
                    "swaps": swaps,
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
            "optimizer_save_s": save_s,
            "every_version_seq_per_s": statistics.median(p["swapping_optimizer_every_version"] for p in per),
            "every_version_ratio": statistics.median(p["swapping_optimizer_every_version"] / p["quiet"] for p in per),
        }
        print(
            f"  swap{label}: p50 {out['p50_ms']:.0f} ms, p99 {out['p99_ms']:.0f} ms; throughput during swaps "
            f"{out['throughput']['ratio']:.3f} of without ({out['throughput']['every_version_ratio']:.3f} with the "
            "optimizer state written with every version)",
            flush=True,
        )
        th = out["throughput"]
        target = name in ("default", "quick")  # the 8B set has no target yet: it sets one
        out["rows"] = [
            row(
                f"bytes per kept version in Redis{label} (master + serving copy) vs docs/headstore.md's formula",
                per_version,
                "B",
                baseline=per_version_formula,
                ratio=per_version / per_version_formula,
            ),
            row(
                f"optimizer state in Redis{label}, once (the worker's) vs the formula",
                held["optimizer"],
                "B",
                baseline=sizes["redis_optimizer_formula"],
                ratio=held["optimizer"] / sizes["redis_optimizer_formula"] if held["optimizer"] else None,
            ),
            row(f"swap publish-to-served latency p50{label}", out["p50_ms"], "ms"),
            row(f"swap publish-to-served latency p99{label}", out["p99_ms"], "ms", target="< 250" if target else None),
            row(
                f"/score c={conc} during swaps (1 per {opts.swap_interval:g} s, the optimizer state every "
                f"{save_s:g} s as the worker writes it){label} vs without",
                th["swapping_seq_per_s"],
                "seq/s",
                baseline=th["quiet_seq_per_s"],
                ratio=th["ratio"],
                target=">= 0.95" if target else None,
            ),
            row(
                f"/score c={conc} during swaps{label}, the optimizer state with every version, vs without",
                th["every_version_seq_per_s"],
                "seq/s",
                baseline=th["quiet_seq_per_s"],
                ratio=th["every_version_ratio"],
            ),
        ]
        return out
    finally:
        gc.unfreeze()
        if server is not None:
            server.stop()
        redis_proc.stop()
