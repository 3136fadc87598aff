"""Section 10, feedback at the policy (docs/api.md, local feedback) against feedback on the server, on the same items.

Bytes: every request and response body of one scored response, counted at the client's transport, for T = 256 and
T = 700 rows of bf16 hidden states (D_policy wide): server-side feedback is one `/score` carrying h; local feedback
is `/embed` (the texts; e back), the rewards computed at the policy; with `rewards_on="server"` it is `/embed` then
`/score` carrying the D_rm read-out. HTTP headers are left out (a few hundred bytes either way).

Throughput: one server, closed loops of r2m's sync client in threads (one response per call), alternating rounds
of vanilla (no hidden states), server-side feedback, local feedback (`r2m.trainer.local.LocalFeedbackClient`, its
attention on this process's CPU) and local read-outs with the rewards on the server. Every call scores a text never
scored before: the second round trip's /score finds e in the cache its /embed filled, as in RL, and nothing else
hits a cache. The ratios are vanilla seq/s over each
mode's, medians of the rounds; with the CPU the server process and this process (the client, local attention
included) spent per scored response. This process stands in for the policy node, so its torch runs one intra-op
thread while the section runs (every mode alike): with two, OpenMP's workers spin-wait after each 0.2 ms attention
call and burn ~7 ms of the server's CPU per call (10.7 against 3.0 ms of client CPU per call, one call in flight,
measured 2026-12-01).

It runs twice. On shared cores (the server and this process on every CPU) the local attention competes with the
server for the same cores, which a policy node with its own device does not: there local mode's ratio is the sum of
both processes' CPU, and moves with how fast the server's backbone is on the machine (1.02-1.08 on a slower one,
1.14-1.17 on a faster one, the same code). On split cores (a second server pinned to half the CPUs with as many torch
threads, this process on the other half) the client's compute is its own, as on a policy node, and the ratio is what
local feedback costs the reward host: the target applies to that one.
"""

from __future__ import annotations

import itertools
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch

from ._common import CpuMeter, percentile, row, start_r2m, texts
from .serve import server_env

LENGTHS = (256, 700)
CPU_KEYS = ("server_cpu_ms_per_request", "client_cpu_ms_per_request")


class CountingTransport(httpx.HTTPTransport):
    """Counts request and response body bytes per path."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        response.read()
        path = request.url.path
        self.bytes[path] = self.bytes.get(path, 0) + len(request.content) + len(response.content)
        self.calls[path] = self.calls.get(path, 0) + 1
        return response

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


def bytes_per_response(url: str, pairs: list[tuple[str, str]], rows: int, dim: int) -> dict[str, Any]:
    """Body bytes of scoring `len(pairs)` responses one per call, each with (rows, dim) bf16 hidden states."""
    from r2m.client import R2MClient
    from r2m.trainer.local import LocalFeedbackClient

    torch.manual_seed(rows)
    hidden = [torch.randn(rows, dim).to(torch.bfloat16) for _ in pairs]
    transport = CountingTransport()
    with R2MClient(url, transport=transport) as client:
        local = LocalFeedbackClient(client)
        local.head(client.current_head()["version"])  # the head download: once per version, not per response
        out: dict[str, Any] = {"rows": rows, "policy_dim": dim, "responses": len(pairs)}
        both = LocalFeedbackClient(client, rewards_on="server")
        both.head(client.current_head()["version"])
        for mode, scorer in (("server", client), ("local", local), ("local_server", both)):
            transport.reset()
            for (p, r), h in zip(pairs, hidden):
                scorer.score(p, [r], hidden=[h], step=50, total_steps=100)
            out[mode] = {
                "bytes_per_response": sum(transport.bytes.values()) / len(pairs),
                "per_route": {k: v / len(pairs) for k, v in transport.bytes.items()},
            }
    out["ratio"] = out["server"]["bytes_per_response"] / out["local"]["bytes_per_response"]
    return out


def drive(call: Callable[[int], None], concurrency: int, duration: float, offset: int) -> dict[str, float]:
    """`concurrency` threads, each calling `call(i)` in a closed loop for `duration` seconds."""
    lat: list[float] = []
    done = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + duration

    def loop(k: int) -> None:
        i = offset + k
        while time.perf_counter() < stop:
            t = time.perf_counter()
            call(i)
            with lock:
                lat.append(time.perf_counter() - t)
                done[0] += 1
            i += concurrency

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"seq_per_s": done[0] / wall, "p50_ms": 1000 * percentile(lat, 50), "p99_ms": 1000 * percentile(lat, 99),
            "requests": done[0]}  # fmt: skip


MODES = {"server": "server-side feedback", "local": "local feedback",
         "local_server": "local read-outs, rewards on the server"}  # fmt: skip


def run(opts) -> dict:  # noqa: ANN001
    pairs = texts(32 if opts.quick else 512)
    levels = [1, 8] if opts.quick else opts.overhead_levels
    rounds = 1 if opts.quick else opts.rounds
    duration = opts.duration if opts.quick else max(2.0, opts.duration / 2)
    out: dict[str, Any] = {"rounds": rounds, "duration_s": duration, "client_threads": 1, "rows": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        server = start_r2m(Path(opts.tmp), server_env(opts), "local")
        try:
            for rows in LENGTHS:
                b = bytes_per_response(server.url, pairs[: 4 if opts.quick else 16], rows, opts.policy_dim)
                out[f"bytes_t{rows}"] = b
                print(f"  bytes/response T={rows}: server-side {b['server']['bytes_per_response']:.0f}, local "
                      f"{b['local']['bytes_per_response']:.0f} ({b['ratio']:.0f}x fewer); rewards on the server "
                      f"{b['local_server']['bytes_per_response']:.0f}", flush=True)  # fmt: skip
                out["rows"].append(
                    row(
                        f"bytes/response T={rows} bf16 x {opts.policy_dim}: local vs server-side feedback (ratio: x "
                        "fewer)",
                        b["local"]["bytes_per_response"],
                        "B",
                        baseline=b["server"]["bytes_per_response"],
                        ratio=b["ratio"],
                        target=">= 100" if rows == 700 else None,
                    )
                )
            print("  shared cores (the server and this process on every core):", flush=True)
            out.update(throughput(server, pairs, levels, rounds, duration, opts.policy_dim))
        finally:
            server.stop()
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:  # the shared figure is then the only one, and the target applies to it
            out["split"] = {"skipped": f"{len(cpus)} CPU: nothing to split"}
            out["rows"] += _overhead_rows(out, levels, "shared cores", "<= 1.1")
            return out
        # The policy node's own compute: the server on one half of the CPUs (its torch threads as many), this process
        # on the other. Children inherit the affinity they are started with.
        half = len(cpus) // 2
        server_cpus, client_cpus = cpus[:half], cpus[half:]
        os.sched_setaffinity(0, server_cpus)
        try:
            split = start_r2m(Path(opts.tmp), {**server_env(opts), "OMP_NUM_THREADS": str(half)}, "local-split")
        finally:
            os.sched_setaffinity(0, client_cpus)
        try:
            print(f"  split cores (the server on CPUs {server_cpus}, this process on {client_cpus}):", flush=True)
            out["split"] = {"server_cpus": server_cpus, "client_cpus": client_cpus}
            out["split"].update(throughput(split, pairs, levels, rounds, duration, opts.policy_dim))
        finally:
            split.stop()
            os.sched_setaffinity(0, cpus)
        # The target is the reward host's cost: with the attention at the policy, as where the policy has its own
        # device; the shared figure adds the stand-in policy's compute to the server's cores.
        out["rows"] += _overhead_rows(out, levels, "shared cores", None)
        out["rows"] += _overhead_rows(out["split"], levels, "split cores", "<= 1.1")
    finally:
        torch.set_num_threads(threads)
    return out


def throughput(
    server: Any, pairs: list[tuple[str, str]], levels: list[int], rounds: int, duration: float, policy_dim: int
) -> dict[str, Any]:
    """Closed loops of every mode at each concurrency, `rounds` alternating rounds: medians per level (`c{n}`)."""
    from r2m.client import R2MClient
    from r2m.trainer.local import LocalFeedbackClient

    torch.manual_seed(0)
    hidden = [torch.randn(LENGTHS[0], policy_dim).to(torch.bfloat16) for _ in range(16)]
    meter = CpuMeter(server.proc.pid)
    out: dict[str, Any] = {}
    with R2MClient(server.url, max_retries=2, timeout=300) as client:
        local = LocalFeedbackClient(client)
        fresh = itertools.count()  # every call scores a new text, as in RL: no RTE-cache hit across calls

        def call(scorer: Any, with_hidden: bool) -> Callable[[int], None]:
            def one(i: int) -> None:
                p, r = pairs[i % len(pairs)]
                r = f"{r} ({next(fresh)})"
                h = [hidden[i % len(hidden)]] if with_hidden else None
                scorer.score(p, [r], hidden=h, step=50 if with_hidden else 0, total_steps=100)

            return one

        local_server = LocalFeedbackClient(client, rewards_on="server")
        modes = {"vanilla": call(client, False), "server": call(client, True), "local": call(local, True),
                 "local_server": call(local_server, True)}  # fmt: skip
        for fn in modes.values():
            fn(0)  # warm: connections, the head download, the first attention call
        for c in levels:
            per = []
            for k in range(rounds):
                rnd = {}
                for m, fn in modes.items():
                    meter.start()
                    r = drive(fn, c, duration, offset=k)
                    rnd[m] = {**r, **meter.stop(int(r["requests"]))}  # CPU ms per scored response
                per.append(rnd)
            res: dict[str, Any] = {
                f"{m}_{key}": statistics.median(p[m][key] for p in per)
                for m in modes
                for key in ("seq_per_s", "p50_ms", "p99_ms", *CPU_KEYS)
            }
            for m in MODES:
                res[f"{m}_ratio"] = statistics.median(p["vanilla"]["seq_per_s"] / p[m]["seq_per_s"] for p in per)
            out[f"c{c}"] = res
            print(f"  c={c}: vanilla {res['vanilla_seq_per_s']:.1f} seq/s; server-side ratio "
                  f"{res['server_ratio']:.3f}, local ratio {res['local_ratio']:.3f}; p50 vanilla "
                  f"{res['vanilla_p50_ms']:.1f} ms, server-side {res['server_p50_ms']:.1f} ms, local "
                  f"{res['local_p50_ms']:.1f} ms; local, the server finishing, ratio "
                  f"{res['local_server_ratio']:.3f}, p50 {res['local_server_p50_ms']:.1f} ms; server CPU per "
                  "response vanilla "
                  f"{res['vanilla_server_cpu_ms_per_request']:.1f} ms, server-side "
                  f"{res['server_server_cpu_ms_per_request']:.1f} ms, local "
                  f"{res['local_server_cpu_ms_per_request']:.1f} ms (client: "
                  f"{res['local_client_cpu_ms_per_request']:.1f} ms)", flush=True)  # fmt: skip
        out["stale_retries"] = local.stale_retries
    return out


def _overhead_rows(res: dict[str, Any], levels: list[int], cores: str, target: str | None) -> list[dict[str, Any]]:
    rows = []
    for c in levels:
        r = res[f"c{c}"]
        for m, what in MODES.items():
            rows.append(
                row(
                    f"R2M overhead c={c}, T={LENGTHS[0]}, {cores}: {what} vs vanilla, time ratio",
                    r[f"{m}_seq_per_s"],
                    "seq/s",
                    baseline=r["vanilla_seq_per_s"],
                    ratio=r[f"{m}_ratio"],
                    target=target if m == "local" else None,
                )
            )
        rows.append(
            row(
                f"server CPU per response c={c}, T={LENGTHS[0]}, {cores}: local feedback vs vanilla (ratio)",
                r["local_server_cpu_ms_per_request"],
                "ms",
                baseline=r["vanilla_server_cpu_ms_per_request"],
                ratio=r["local_server_cpu_ms_per_request"] / r["vanilla_server_cpu_ms_per_request"],
            )
        )
    return rows
