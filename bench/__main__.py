"""r2m benchmarks: each section measures a figure beside its baseline in the same run (the machine is noisy).

    .venv/bin/python -m bench                       # every section, JSON to bench/results.json
    .venv/bin/python -m bench --only codec score    # some sections
    .venv/bin/python -m bench --quick               # tiny sizes, for CI: checks the benchmark runs

Sections:
    codec    binary decode of 16 x 256 x 2048 fp16/bf16 (decode + copy into torch) beside a plain memory copy;
             JSON/base64 decode of the same
    score    /score throughput of the real server (uvicorn, default model) at several concurrencies, vanilla and
             with 256 x policy_dim bf16 hidden states; latency p50/p99
    grebt    one GREBT update on 256 groups of 2 (pairs) with hidden states, RTE cache cold vs warm
    swap     publish-to-served latency of head versions through Redis (a replica and a redis-server of ours)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from r2m.client import AsyncR2MClient
from r2m.client._wire import WireTensor, decode_binary, encode_binary, pack_request, tensor_from_json, tensor_to_json

HERE = Path(__file__).resolve().parent


def _best(fn, repeat: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_codec(quick: bool) -> dict:
    n, T, D = (4, 64, 256) if quick else (16, 256, 2048)
    out = {"shape": [n, T, D]}
    for dtype in (torch.float16, torch.bfloat16):
        tensors = [torch.randn(T, D).to(dtype) for _ in range(n)]
        payload = {"items": [{"prompt": "p", "response": "r", "policy_hidden": t} for t in tensors]}
        body = encode_binary(*pack_request(payload))
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        dst = [torch.empty(T, D, dtype=dtype) for _ in range(n)]
        # The baseline copies the same bytes out of the same body buffer, minus all parsing.
        whole = torch.frombuffer(body, dtype=torch.uint8)
        per = T * D * 2
        src = [whole[len(body) - nbytes + i * per : len(body) - nbytes + (i + 1) * per] for i in range(n)]

        def decode() -> None:
            meta, ts = decode_binary(body)
            for i, t in enumerate(ts.values()):
                t.to_torch(out=dst[i])

        def memcpy() -> None:
            for s, d in zip(src, dst):
                d.view(-1).view(torch.uint8).copy_(s)

        js = [tensor_to_json(WireTensor.from_array(t)) for t in tensors]

        def decode_json() -> None:
            for i, j in enumerate(js):
                tensor_from_json(j).to_torch(out=dst[i])

        repeat = 5 if quick else 30
        t_dec, t_cpy, t_json = _best(decode, repeat), _best(memcpy, repeat), _best(decode_json, max(3, repeat // 5))
        name = str(dtype).removeprefix("torch.")
        out[name] = {
            "binary_decode_GBps": nbytes / t_dec / 1e9,
            "memcpy_GBps": nbytes / t_cpy / 1e9,
            "binary_vs_memcpy": t_cpy / t_dec,
            "json_base64_decode_GBps": nbytes / t_json / 1e9,
        }
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict[str, str], ready_url: str | None, log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while ready_url and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(ready_url, timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    if ready_url:
        proc.kill()
        raise RuntimeError(f"{cmd} not ready:\n{log.read_text()[-3000:]}")
    return proc


def _texts(n: int) -> list[tuple[str, str]]:
    from r2m.service.prefdata import generate_preferences

    pairs = generate_preferences(max(1, n // 2 + 1), seed=123)
    out = [(p["prompt"], p[k]) for p in pairs for k in ("chosen", "rejected")]
    return out[:n]


def bench_score(quick: bool, tmp: Path, policy_dim: int) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "R2M_PORT": str(port),
        "R2M_POLICY_DIM": str(policy_dim),
        "R2M_LOG_LEVEL": "warning",
        "R2M_EMBEDDED_WORKER": "false",
    }
    proc = _start([sys.executable, "-m", "r2m.service.cli", "serve"], env, f"{url}/readyz", tmp / "score.log")
    texts = _texts(64 if quick else 512)
    rows = 256
    hidden = [torch.randn(rows, policy_dim).to(torch.bfloat16) for _ in range(8)]
    duration = 2.0 if quick else 12.0
    out: dict = {"duration_s": duration, "hidden_rows": rows, "policy_dim": policy_dim}
    try:
        for with_hidden in (False, True):
            for conc in (1, 16) if quick else (1, 8, 16, 32):
                lat: list[float] = []

                async def run() -> int:
                    done = 0
                    stop = time.perf_counter() + duration
                    async with AsyncR2MClient(url, max_retries=2, timeout=120) as client:

                        async def loop(k: int) -> None:
                            nonlocal done
                            i = k
                            while time.perf_counter() < stop:
                                p, r = texts[i % len(texts)]
                                h = [hidden[i % len(hidden)]] if with_hidden else None
                                t = time.perf_counter()
                                await client.score(p, [r], h, step=50 if with_hidden else 0, total_steps=100)
                                lat.append(time.perf_counter() - t)
                                done += 1
                                i += conc

                        await asyncio.gather(*(loop(k) for k in range(conc)))
                    return done

                t0 = time.perf_counter()
                n = asyncio.run(run())
                wall = time.perf_counter() - t0
                lat.sort()
                key = f"{'hidden' if with_hidden else 'vanilla'}_c{conc}"
                out[key] = {
                    "seq_per_s": n / wall,
                    "p50_ms": 1000 * lat[len(lat) // 2],
                    "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
                    "requests": n,
                }
                print(f"  score {key}: {n / wall:.1f} seq/s, p50 {out[key]['p50_ms']:.1f} ms", flush=True)
        batches = httpx.get(f"{url}/metrics").text
        out["mean_requests_per_batch"] = _histogram_mean(batches, "r2m_batch_requests")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # The ceiling: the bare backbone in-process on the same texts, batch of 16.
    from r2m.service.backbone import load_backbone

    backbone = load_backbone("default", device="cpu", dtype="auto")
    enc = [backbone.encode(p, r) for p, r in texts[:16]]
    backbone.embed(enc)
    t = _best(lambda: backbone.embed(enc), 3 if quick else 10)
    out["backbone_in_process_seq_per_s_b16"] = 16 / t
    return out


def _histogram_mean(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = count = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == f"{name}_sum":
                total += s.value
            elif s.name == f"{name}_count":
                count += s.value
    return total / count if count else 0.0


def bench_grebt(quick: bool, policy_dim: int) -> dict:
    from r2m.service.app import build_model
    from r2m.service.config import ServiceSettings
    from r2m.service.schemas import PreferencesRequest
    from r2m.service.worker import HeadTrainer

    n_pairs = 16 if quick else 256
    rows = 64
    settings = ServiceSettings(policy_dim=policy_dim, device="cpu", train_steps=1)
    trainer = HeadTrainer(build_model(settings), settings)
    texts = _texts(2 * n_pairs)
    pairs = []
    for i in range(n_pairs):
        (p, c), (_, r) = texts[2 * i], texts[2 * i + 1]
        pairs.append(
            {
                "prompt": p,
                "chosen": c,
                "rejected": r,
                "chosen_hidden": WireTensor.from_array(torch.randn(rows, policy_dim).to(torch.bfloat16)),
                "rejected_hidden": WireTensor.from_array(torch.randn(rows, policy_dim).to(torch.bfloat16)),
            }
        )
    req = PreferencesRequest.model_validate({"pairs": pairs, "step": 50, "total_steps": 100})
    t = time.perf_counter()
    trainer.update([req], use_cache=False)
    cold = time.perf_counter() - t
    trainer.update([req])  # fills the cache
    warm = min(_best(lambda: trainer.update([req]), 3), cold)
    return {
        "pairs": n_pairs,
        "hidden_rows": rows,
        "policy_dim": policy_dim,
        "uncached_s": cold,
        "cached_s": warm,
        "speedup": cold / warm,
    }


def bench_swap(quick: bool, tmp: Path) -> dict:
    from r2m.service.app import build_model
    from r2m.service.config import ServiceSettings
    from r2m.service.heads import RedisHeadStore, head_to_bytes
    from r2m.service.worker import HeadTrainer

    exe = shutil.which("redis-server")
    if not exe:
        return {"skipped": "no redis-server on PATH"}
    rport, port = _free_port(), _free_port()
    redis_proc = _start(
        [exe, "--port", str(rport), "--save", "", "--appendonly", "no", "--dir", str(tmp)], {}, None, tmp / "redis.log"
    )
    redis_url = f"redis://127.0.0.1:{rport}/0"
    time.sleep(0.5)
    policy_dim = 2048
    env = {
        "R2M_PORT": str(port),
        "R2M_REDIS_URL": redis_url,
        "R2M_POLICY_DIM": str(policy_dim),
        "R2M_LOG_LEVEL": "warning",
    }
    url = f"http://127.0.0.1:{port}"
    server = _start([sys.executable, "-m", "r2m.service.cli", "serve"], env, f"{url}/readyz", tmp / "swap.log")
    try:
        settings = ServiceSettings(policy_dim=policy_dim, device="cpu")
        trainer = HeadTrainer(build_model(settings), settings)
        store = RedisHeadStore(redis_url)
        meta = {"config": trainer.model.head_config.to_dict(), "model": "default"}
        latencies = []
        parent = None
        n = 5 if quick else 40
        with httpx.Client(base_url=url) as client:
            for i in range(n + 1):
                with torch.no_grad():
                    trainer.head.score.weight.add_(0.001)
                weights = head_to_bytes(trainer.head)
                t0 = time.perf_counter()
                published = store.publish(parent=parent, weights=weights, optim=None, meta=meta, batch_ids=[f"b{i}"])
                parent = published["version"]
                while client.get("/heads/current").json()["served_version"] != parent:
                    if time.perf_counter() - t0 > 30:
                        raise RuntimeError("the replica did not swap within 30 s")
                if i:  # version 0 is a no-op for a replica that starts at 0
                    latencies.append(time.perf_counter() - t0)
        latencies.sort()
        return {
            "versions": n,
            "head_bytes": len(weights),
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "max_ms": 1000 * latencies[-1],
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
        redis_proc.terminate()
        redis_proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=["codec", "score", "grebt", "swap"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and durations (CI)")
    parser.add_argument("--policy-dim", type=int, default=2048)
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args(argv)
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "quick": args.quick,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            print(f"[{name}]", flush=True)
            if name == "codec":
                results[name] = bench_codec(args.quick)
            elif name == "score":
                results[name] = bench_score(args.quick, Path(tmp), args.policy_dim)
            elif name == "grebt":
                results[name] = bench_grebt(args.quick, args.policy_dim)
            elif name == "swap":
                results[name] = bench_swap(args.quick, Path(tmp))
            else:
                parser.error(f"unknown section {name!r}")
            print(json.dumps(results[name], indent=2), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
