"""Section 9, ensembles: /score with five heads (R2M_ENSEMBLE=5) against one, on the default model, and the update.

Two servers, identical but for R2M_ENSEMBLE, started together and driven in alternating short rounds with the same
hidden-state payload (256 x D_policy bf16 per item, a step where omega < 1): the five members share the one
backbone forward and the one feedback read-out, so only their score layers differ. The ratio is N = 1's seq/s over
N = 5's per round (time ratio), the median over rounds. The update: one GREBT phase of the same request, cached
RTEs, in one process, with one head and with five (each member on its own bootstrap weights).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from r2m.client.wire import WireTensor
from r2m.service.launch import http_ready, start_server, wait_until

from ._common import best_time, drive_score, row, texts
from .serve import server_env

ROWS = 256
N = 5


def _update_seconds(opts, members: int, quick: bool) -> float:  # noqa: ANN001
    from r2m.service.config import ServiceSettings
    from r2m.service.engine import build_engine
    from r2m.service.schemas import PreferencesRequest
    from r2m.service.update.training import HeadTrainer

    dims = {"policy_dim": 64, "attn_dim": 64} if quick else {"policy_dim": opts.policy_dim}
    settings = ServiceSettings(_env_file=None, model=opts.model, device=opts.device, ensemble=members, guard=False,
                               **dims)  # fmt: skip
    trainer = HeadTrainer(build_engine(settings), settings)
    pool = texts(64 if not quick else 8, seed=7)
    torch.manual_seed(0)
    groups = [
        {"prompt": pool[g * 4][0], "responses": [r for _, r in pool[g * 4 : g * 4 + 4]],
         "hidden": [WireTensor.from_array(torch.randn(16 if quick else 64, settings.policy_dim).to(torch.bfloat16))
                    for _ in range(4)]}
        for g in range(len(pool) // 4)
    ]  # fmt: skip
    req = PreferencesRequest.model_validate({"groups": groups, "step": 50, "total_steps": 100, "batch_id": "b"})
    trainer.update([req])  # fills the RTE cache; first-call costs out of the timings
    return best_time(lambda: trainer.update([req]), 2 if quick else 3, opts.device, 0)


def run(opts) -> dict:  # noqa: ANN001
    levels = [8] if opts.quick else [8, 32]
    rounds = 1 if opts.quick else opts.rounds
    duration = opts.duration if opts.quick else max(2.0, opts.duration / 2)
    pairs = texts(64 if opts.quick else 512)
    torch.manual_seed(0)
    hidden = [torch.randn(ROWS, opts.policy_dim).to(torch.bfloat16) for _ in range(16)]
    tmp = Path(opts.tmp)
    env = server_env(opts)
    one = start_server(tmp, env, timeout=240, name="ensemble-1", wait=False)
    five = start_server(tmp, {**env, "R2M_ENSEMBLE": str(N)}, timeout=240, name="ensemble-5", wait=False)
    out: dict = {"members": N, "hidden_rows": ROWS, "policy_dim": opts.policy_dim, "rounds": rounds, "rows": []}
    try:
        for s in (one, five):
            wait_until(s, http_ready(f"{s.url}/readyz"), 240)
        for c in levels:
            per = []
            for k in range(rounds):
                a = drive_score(one.url, pairs, c, duration, hidden=hidden, offset=k)
                b = drive_score(five.url, pairs, c, duration, hidden=hidden, offset=k)
                per.append({"one": a["seq_per_s"], "five": b["seq_per_s"], "ratio": a["seq_per_s"] / b["seq_per_s"]})
            res = {
                "one_seq_per_s": statistics.median(p["one"] for p in per),
                "five_seq_per_s": statistics.median(p["five"] for p in per),
                "ratio": statistics.median(p["ratio"] for p in per),
                "round_ratios": [p["ratio"] for p in per],
            }
            out[f"c{c}"] = res
            print(f"  ensemble c={c}: N=1 {res['one_seq_per_s']:.1f} seq/s, N={N} {res['five_seq_per_s']:.1f} seq/s, "
                  f"ratio {res['ratio']:.3f}", flush=True)  # fmt: skip
            out["rows"].append(
                row(
                    f"/score c={c}, N={N} heads vs 1 (bf16 {ROWS}x{opts.policy_dim} hidden), time ratio",
                    res["five_seq_per_s"],
                    "seq/s",
                    baseline=res["one_seq_per_s"],
                    ratio=res["ratio"],
                    target="<= 1.1",
                )
            )
    finally:
        one.stop()
        five.stop()
    u1, u5 = _update_seconds(opts, 1, opts.quick), _update_seconds(opts, N, opts.quick)
    out |= {"update_one_s": u1, "update_five_s": u5}
    out["rows"].append(row(f"GREBT update (cached), N={N} heads vs 1, time ratio", u5, "s", baseline=u1, ratio=u5 / u1))
    return out
