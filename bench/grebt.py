"""Section 6, GREBT update: time of one update on a batch of 256 groups, with and without the RTE cache.

One update = reward-token embeddings of every response (the frozen backbone, or the cache: the worker saw these
(prompt, response) pairs when they were scored or in an earlier update), the head's forward with the hidden states,
the GREBT loss, backward and an optimizer step. Uncached runs the backbone on every response; cached finds every
RTE in the cache. Same trainer, same request, in one process.
"""

from __future__ import annotations

import torch

from r2m.client.wire import WireTensor

from ._common import best_time, row, texts


def run(opts) -> dict:  # noqa: ANN001
    from r2m.service.config import ServiceSettings
    from r2m.service.engine import build_engine
    from r2m.service.schemas import PreferencesRequest
    from r2m.service.update.training import HeadTrainer

    n_groups, k, rows = (8, 2, 16) if opts.quick else (opts.grebt_groups, opts.grebt_k, opts.grebt_rows)
    # quick: a small head (D_policy = d = 64), so the run checks the path, fast; else d = 2048 as in the paper.
    dim = 64 if opts.quick else opts.policy_dim
    dims = {"policy_dim": 64, "attn_dim": 64} if opts.quick else {"policy_dim": dim}
    settings = ServiceSettings(model=opts.model, device=opts.device, train_steps=1, **dims)
    trainer = HeadTrainer(build_engine(settings), settings)
    torch.manual_seed(0)
    pool = texts(n_groups * k, seed=7)

    def request(groups: int) -> PreferencesRequest:
        body = []
        for g in range(groups):
            members = pool[g * k : (g + 1) * k]
            body.append(
                {
                    "prompt": members[0][0],
                    # The synthetic set pairs responses per prompt; a group takes K of them under one prompt.
                    "responses": [r for _, r in members],
                    "hidden": [WireTensor.from_array(torch.randn(rows, dim).to(torch.bfloat16)) for _ in members],
                }
            )
        return PreferencesRequest.model_validate({"groups": body, "step": 50, "total_steps": 100})

    req = request(n_groups)
    trainer.update([request(2)], use_cache=False)  # first-call costs (allocator, kernels) out of the timings
    uncached = best_time(lambda: trainer.update([req], use_cache=False), 1 if not opts.quick else 2, opts.device, 0)
    trainer.update([req])  # fills the cache
    cached = best_time(lambda: trainer.update([req]), 3, opts.device, 0)
    out = {
        "groups": n_groups,
        "k": k,
        "hidden_rows": rows,
        "policy_dim": dim,
        "attn_dim": settings.attn_dim,
        "uncached_s": uncached,
        "cached_s": cached,
        "speedup": uncached / cached,
        "rte_cache_hits": trainer.cache.hits,
    }
    out["rows"] = [
        row(
            f"GREBT update, {n_groups} groups of {k}: cached vs uncached (speed-up)",
            cached,
            "s",
            baseline=uncached,
            ratio=out["speedup"],
            target=">= 5",
        )
    ]
    return out
