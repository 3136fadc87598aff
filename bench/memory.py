"""Section 11: the process's memory under load against R2M_MAX_INFLIGHT_BYTES.

`r2m serve` on its defaults (embedded, bundled RM, policy width 2048) at a budget of 256 MiB and at its default
budget, driven by 200 connections for 150 s (plain HTTP, JSON bodies as a tester sends them): every other request
carries a (256, 2048) float32 hidden-state tensor (2.8 MB of base64), the rest text only. Reported per budget: the
baseline RSS once warm, the peak RSS during the load (the kernel's high-water mark, reset when the load starts),
requests answered 200 and 503, and the RSS 10 s after the load ends. Targets: peak <= baseline + budget + 10%, and
idle within 20% of the baseline.

    .venv/bin/python -m bench --only memory
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._common import row, start_r2m, texts

ROWS, DIM = 256, 2048


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def _bodies(n: int) -> list[bytes]:
    """Half with a (256, 2048) float32 tensor, half text only; JSON as it goes on the wire."""
    pairs = texts(n)
    rng = np.random.default_rng(0)
    out = []
    for i, (p, r) in enumerate(pairs):
        item: dict[str, Any] = {"prompt": p, "response": r}
        if i % 2 == 0:
            h = rng.standard_normal((ROWS, DIM), dtype=np.float32)
            item["policy_hidden"] = {"dtype": "float32", "shape": [ROWS, DIM], "data": base64.b64encode(h).decode()}
        out.append(json.dumps({"items": [item], "step": 50, "total_steps": 100}).encode())
    return out


def _load(url: str, bodies: list[bytes], connections: int, seconds: float) -> dict[str, int]:
    import httpx

    counts: dict[str, int] = {}

    async def main() -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
            stop = time.monotonic() + seconds

            async def loop(k: int) -> None:
                i = k
                while time.monotonic() < stop:
                    try:
                        r = await client.post("/score", content=bodies[i % len(bodies)],
                                              headers={"content-type": "application/json"})  # fmt: skip
                        key = str(r.status_code)
                    except httpx.HTTPError as exc:
                        key = type(exc).__name__
                    counts[key] = counts.get(key, 0) + 1
                    i += connections

            await asyncio.gather(*(loop(k) for k in range(connections)))

    asyncio.run(main())
    return counts


def measure(budget: int | None, connections: int, seconds: float, tmp: Path) -> dict[str, Any]:
    from r2m.service.config import default_inflight_bytes

    env = {"R2M_EMBEDDED_WORKER": "false"}
    if budget is not None:
        env["R2M_MAX_INFLIGHT_BYTES"] = str(budget)
    budget_used = budget if budget is not None else default_inflight_bytes()  # what the server computes too
    bodies = _bodies(32)
    with start_r2m(tmp, env, name=f"memory-{budget}") as server:
        pid = server.proc.pid
        _load(server.url, bodies, 8, 10.0)  # warm: first-call costs and the allocator's steady state
        time.sleep(2.0)
        baseline = _rss_kib(pid, "VmRSS") * 1024
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the high-water mark restarts from the current RSS
        counts = _load(server.url, bodies, connections, seconds)
        peak = _rss_kib(pid, "VmHWM") * 1024
        time.sleep(10.0)
        idle = _rss_kib(pid, "VmRSS") * 1024
    return {"budget": budget_used, "baseline": baseline, "peak": peak, "idle": idle, "counts": counts}


def run(opts: argparse.Namespace) -> dict[str, Any]:
    connections, seconds = (40, 10.0) if opts.quick else (200, 150.0)
    results = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, budget in (("256 MiB", 256 * 2**20), ("default", None)):
            m = measure(budget, connections, seconds, Path(tmp))
            results[name] = m
            mib = 2**20
            bound = m["baseline"] + 1.1 * m["budget"]
            rows.append(row(f"peak RSS under load, budget {name} ({m['budget'] // mib} MiB): vs baseline + "
                            f"budget + 10% ({bound / mib:.0f} MiB)", m["peak"] / mib, "MiB", baseline=bound / mib,
                            ratio=m["peak"] / bound, target="<= 1"))  # fmt: skip
            rows.append(row(f"RSS 10 s after the load, budget {name}: vs the warm baseline ({m['baseline'] // mib} "
                            "MiB)", m["idle"] / mib, "MiB", baseline=m["baseline"] / mib,
                            ratio=m["idle"] / m["baseline"], target="<= 1.2"))  # fmt: skip
    return {"connections": connections, "seconds": seconds, "results": results, "rows": rows,
            "pid": os.getpid()}  # fmt: skip
