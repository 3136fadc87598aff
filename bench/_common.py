"""Helpers every section shares: timing, processes on loopback, the /score load generator, result rows.

A section's `run(opts)` returns a dict with its measurements and a `rows` list (see `row`): one line of the final
table per figure, each beside the baseline it was measured against in the same run.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from r2m.service.launch import Process, start_server


class Unavailable(Exception):
    """A section cannot run on this machine; the message says why and how to make it run."""


# --- result rows -------------------------------------------------------------------------------------------------


def row(
    figure: str,
    value: float,
    unit: str = "",
    *,
    baseline: float | None = None,
    ratio: float | None = None,
    target: str | None = None,
) -> dict[str, Any]:
    """One table line. `target` is `">= 0.85"` or `"<= 2"` and applies to `ratio` (or to `value` without one)."""
    subject = ratio if ratio is not None else value
    return {
        "figure": figure,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "ratio": ratio,
        "target": target,
        "met": meets(subject, target) if target else None,
    }


def meets(x: float, target: str) -> bool:
    op, _, bound = target.partition(" ")
    b = float(bound)
    return {">=": x >= b, ">": x > b, "<=": x <= b, "<": x < b}[op]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in [0, 100])."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


# --- timing ------------------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def best_time(fn: Callable[[], Any], repeat: int, device: str = "cpu", warmup: int = 1) -> float:
    """Fastest of `repeat` timed calls (seconds): the least disturbed by the other tenants of a shared machine."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def interleaved(fns: dict[str, Callable[[], Any]], repeat: int, device: str = "cpu") -> dict[str, float]:
    """Best time of each function, calling them in turns so that a burst of load elsewhere hits them all alike."""
    for fn in fns.values():
        fn()
    sync(device)
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t)
    return best


# --- texts -------------------------------------------------------------------------------------------------------


def texts(n: int, seed: int = 123) -> list[tuple[str, str]]:
    """`n` (prompt, response) pairs from r2m's synthetic preference set: the same texts for every section."""
    from r2m.data import generate_preferences

    pairs = generate_preferences(max(1, n // 2 + 1), seed=seed)
    out = [(p["prompt"], p[k]) for p in pairs for k in ("chosen", "rejected")]
    return out[:n]


# --- processes on loopback ---------------------------------------------------------------------------------------


def start_r2m(tmp: Path, env: dict[str, str], name: str = "r2m") -> Process:
    """`r2m serve` on a free loopback port (r2m.service.launch); `env` holds R2M_* settings."""
    return start_server(tmp, env, timeout=240, name=name)


def histogram_delta_mean(before: str, after: str, name: str) -> float:
    """Mean of a Prometheus histogram over the observations made between two scrapes of /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    def totals(text: str) -> tuple[float, float]:
        s = c = 0.0
        for fam in text_string_to_metric_families(text):
            for x in fam.samples:
                if x.name == f"{name}_sum":
                    s += x.value
                elif x.name == f"{name}_count":
                    c += x.value
        return s, c

    (s0, c0), (s1, c1) = totals(before), totals(after)
    return (s1 - s0) / (c1 - c0) if c1 > c0 else math.nan


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (all its threads; this process when `pid` is None); NaN where
    /proc is missing. Per-request CPU of the server and of the client says where the time of a request goes."""
    if pid is None:
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


class CpuMeter:
    """CPU seconds used by the server `pid` and by this process (the client) between `start()` and `stop(n)`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def start(self) -> None:
        self.s0, self.c0 = cpu_seconds(self.pid), cpu_seconds()

    def stop(self, requests: int) -> dict[str, float]:
        n = max(1, requests)
        return {
            "server_cpu_ms_per_request": 1000 * (cpu_seconds(self.pid) - self.s0) / n,
            "client_cpu_ms_per_request": 1000 * (cpu_seconds() - self.c0) / n,
        }


# --- the /score load generator -----------------------------------------------------------------------------------


def drive_score(
    url: str,
    pairs: Sequence[tuple[str, str]],
    concurrency: int,
    duration: float,
    hidden: Sequence[Any] | None = None,
    offset: int = 0,
) -> dict[str, float]:
    """`concurrency` closed loops, each posting one (prompt, response) per /score request with r2m's own async
    client (binary encoding), for `duration` seconds. With `hidden`, each item carries one of those tensors and a
    step where omega < 1, so the feedback attention runs. Returns seq/s and latency p50/p99 in ms."""
    from r2m.client import AsyncR2MClient

    lat: list[float] = []

    async def main() -> tuple[int, float]:
        done = 0
        async with AsyncR2MClient(url, max_retries=2, timeout=300) as client:
            await client.score(*pairs[0][:1], [pairs[0][1]])  # the connection pool warm, not timed
            stop = time.perf_counter() + duration

            async def loop(k: int) -> None:
                nonlocal done
                i = offset + k
                while time.perf_counter() < stop:
                    p, r = pairs[i % len(pairs)]
                    h = [hidden[i % len(hidden)]] if hidden is not None else None
                    t = time.perf_counter()
                    await client.score(p, [r], h, step=50 if hidden is not None else 0, total_steps=100)
                    lat.append(time.perf_counter() - t)
                    done += 1
                    i += concurrency

            t0 = time.perf_counter()
            await asyncio.gather(*(loop(k) for k in range(concurrency)))
            return done, time.perf_counter() - t0

    n, wall = asyncio.run(main())
    lat.sort()
    return {
        "seq_per_s": n / wall,
        "p50_ms": 1000 * percentile(lat, 50),
        "p99_ms": 1000 * percentile(lat, 99),
        "requests": n,
    }
