"""Turning validated wire requests into model inputs, with every check whose limit comes from the settings: item
counts, token counts, hidden-state shapes and values. Each check is written once; /score, /preferences and
/get_reward call them."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import torch

from r2m.client.wire import WireTensor, encode_binary, pack_request

from .backbone import Encoded
from .config import ServiceSettings
from .engine import PreparedItem, ScoringEngine
from .errors import BadInput
from .model import omega
from .rtecache import RTECache
from .schemas import PreferencesRequest, ScoreRequest, as_payload

__all__ = [
    "QueuedBatch",
    "check_hidden",
    "check_hidden_values",
    "check_item_count",
    "check_readout",
    "check_text_length",
    "check_token_count",
    "max_tokens_of",
    "prepare_embed_items",
    "prepare_preferences",
    "prepare_queries",
    "prepare_score_items",
    "tokenize",
]

# --- the checks --------------------------------------------------------------------------------------------------


def check_item_count(n: int, path: str, noun: str, settings: ServiceSettings) -> None:
    """413 when one request carries more than R2M_MAX_ITEMS_PER_REQUEST items."""
    if n > settings.max_items_per_request:
        raise BadInput(
            f"{path}: {n} {noun} exceed R2M_MAX_ITEMS_PER_REQUEST={settings.max_items_per_request}", status_code=413
        )


def check_token_count(encoded: Encoded, path: str, limit: int, what: str = "prompt + response is ") -> Encoded:
    """422 when a text is longer than the reward model reads (R2M_MAX_TOKENS, capped by its context)."""
    if len(encoded) > limit:
        raise BadInput(
            f"{path}: {what}{len(encoded)} reward-model tokens, over the limit of {limit} "
            "(R2M_MAX_TOKENS, capped by the model's context)"
        )
    return encoded


def max_tokens_of(engine: ScoringEngine, settings: ServiceSettings) -> int:
    cap = engine.backbone.max_tokens
    return min(cap, settings.max_tokens) if settings.max_tokens else cap


def check_text_length(chars: int, path: str, engine: ScoringEngine, limit: int, what: str) -> None:
    """422 before tokenizing when a text has more characters than `limit` tokens can hold (the backbone's most
    characters per token): the tokenizer's time grows with the text, the limit's answer should not."""
    bound = limit * engine.backbone.max_chars_per_token
    if chars > bound:
        raise BadInput(
            f"{path}: {what}{chars} characters, more than {limit} reward-model tokens can hold ({bound} characters "
            "at most; R2M_MAX_TOKENS, capped by the model's context)"
        )


def tokenize(engine: ScoringEngine, prompt: str, response: str, path: str, limit: int) -> Encoded:
    """A (prompt, response) as the reward model reads it, checked against the limit before and after tokenizing."""
    check_text_length(len(prompt) + len(response), path, engine, limit, "prompt + response is ")
    return check_token_count(engine.backbone.encode(prompt, response), path, limit)


def check_hidden(
    t: WireTensor, path: str, settings: ServiceSettings, *, min_rows: int = 1, prefix_rows: int = 0
) -> torch.Tensor:
    """Check a `(T, policy_dim)` wire tensor (shape, length, finite and bounded values) and return a zero-copy,
    read-only view of it; BadInput naming `path` and the limit otherwise.

    `prefix_rows`: rows of a shared prefix in front of these (the length limit applies to the sum); `min_rows` is
    0 for the rows after a prefix.
    """
    if len(t.shape) != 2:
        raise BadInput(f"{path}: expected shape (T, {settings.policy_dim}), got {list(t.shape)}")
    rows, width = t.shape
    if width != settings.policy_dim:
        raise BadInput(
            f"{path}: hidden width {width} does not match the server's policy width R2M_POLICY_DIM="
            f"{settings.policy_dim}"
        )
    if rows < min_rows:
        raise BadInput(f"{path}: needs at least one hidden-state row, got 0 (omit the field for no feedback)")
    if prefix_rows + rows > settings.max_hidden_tokens:
        what = f"{prefix_rows} prefix + {rows} own" if prefix_rows else str(rows)
        raise BadInput(f"{path}: {what} hidden-state rows exceed R2M_MAX_HIDDEN_TOKENS={settings.max_hidden_tokens}")
    dtype = t.torch_dtype
    if not rows:
        return torch.empty(t.shape, dtype=dtype)
    # The request's own bytes, never written to (the wire module silences torch's warning about that).
    view = torch.frombuffer(t.data, dtype=torch.uint8).view(dtype).view(t.shape)
    check_hidden_values(view, path, settings.max_hidden_abs)
    return view


def check_hidden_values(h: torch.Tensor, path: str, bound: float) -> None:
    """BadInput naming `path`, the row and the value when `h` holds a NaN, an Inf or a magnitude above `bound`.

    One `aminmax` pass decides (NaN propagates into it), far cheaper than a float32 sum of bf16 on a CPU without
    native bf16; only a refused tensor pays for the exact scan. Values near the
    float32 limit are finite yet overflow inside the attention, so the bound is what keeps a head finite.
    """
    lo, hi = (float(v) for v in torch.aminmax(h))
    if math.isfinite(lo) and math.isfinite(hi) and max(-lo, hi) <= bound:
        return
    bad = ~torch.isfinite(h)
    if bool(bad.any()):
        row = int(bad.any(dim=1).nonzero()[0, 0])
        raise BadInput(f"{path}: non-finite value (NaN or Inf) in row {row}; hidden states must be finite")
    over = (h.abs() > bound).nonzero()[0]
    row, col = int(over[0]), int(over[1])
    raise BadInput(
        f"{path}: value {float(h[row, col]):.4g} in row {row}, column {col} exceeds R2M_MAX_HIDDEN_ABS={bound:g} "
        "in magnitude; send the policy's last-layer hidden states (after its final norm), which stay far below it"
    )


# --- per route ---------------------------------------------------------------------------------------------------


def prepare_score_items(req: ScoreRequest, engine: ScoringEngine, settings: ServiceSettings) -> list[PreparedItem]:
    """Tokenize and check every item of a /score request; raises BadInput on the first bad one."""
    check_item_count(len(req.items), "items", "items", settings)
    w = omega(req.step, req.total_steps, settings.omega_floor)
    limit = max_tokens_of(engine, settings)
    # Each shared prefix becomes one tensor, checked once; its items hold references to it, never copies.
    prefixes = [check_hidden(t, f"prefixes[{j}]", settings) for j, t in enumerate(req.prefixes)]
    out = []
    for i, item in enumerate(req.items):
        hidden = prefix = None
        if item.policy_hidden is not None:
            path = f"items[{i}].policy_hidden"
            if item.prefix is None:
                hidden = check_hidden(item.policy_hidden, path, settings)
            else:
                prefix = prefixes[item.prefix]  # the schema checked the index
                if item.policy_hidden.dtype != req.prefixes[item.prefix].dtype:
                    raise BadInput(
                        f"{path}: dtype {item.policy_hidden.dtype} differs from its prefix's, "
                        f"prefixes[{item.prefix}] ({req.prefixes[item.prefix].dtype}); send both in one dtype"
                    )
                hidden = check_hidden(item.policy_hidden, path, settings, min_rows=0, prefix_rows=int(prefix.shape[0]))
        encoded = tokenize(engine, item.prompt, item.response, f"items[{i}]", limit)
        if item.readout is not None:
            readout = check_readout(item.readout, f"items[{i}].readout", engine.backbone.rm_dim, settings)
            rte = engine.rte_cache.get(RTECache.key(item.prompt, item.response))
            out.append(PreparedItem(encoded=encoded, hidden=None, w=w, readout=readout, rte=rte))
            continue
        out.append(PreparedItem(encoded=encoded, hidden=hidden, w=w if hidden is not None else 1.0, prefix=prefix))
    return out


def prepare_cached_readouts(
    req: ScoreRequest, engine: ScoringEngine, settings: ServiceSettings
) -> list[PreparedItem] | None:
    """`prepare_score_items` for a request whose every item carries a read-out (and no hidden states) of a text
    whose RTE this replica has cached, else None. Nothing is tokenized: the text was tokenized and its length
    checked when /embed cached its RTE, and the backbone will not read it."""
    if req.prefixes or any(it.readout is None or it.policy_hidden is not None for it in req.items):
        return None
    check_item_count(len(req.items), "items", "items", settings)
    w = omega(req.step, req.total_steps, settings.omega_floor)
    out = []
    for i, item in enumerate(req.items):
        rte = engine.rte_cache.get(RTECache.key(item.prompt, item.response))
        if rte is None or item.readout is None:
            return None
        readout = check_readout(item.readout, f"items[{i}].readout", engine.backbone.rm_dim, settings)
        out.append(PreparedItem(encoded=Encoded(input_ids=[]), hidden=None, w=w, readout=readout, rte=rte))
    return out


def check_readout(t: WireTensor, path: str, rm_dim: int, settings: ServiceSettings) -> torch.Tensor:
    """A `(rm_dim,)` read-out as a float32 tensor; BadInput naming `path` for another shape or a non-finite or
    out-of-bound value (R2M_MAX_HIDDEN_ABS, as for hidden states)."""
    if tuple(t.shape) != (rm_dim,):
        raise BadInput(f"{path}: expected shape ({rm_dim},) (the reward model's width), got {list(t.shape)}")
    view = torch.frombuffer(t.data, dtype=torch.uint8).view(t.torch_dtype).view(1, rm_dim)
    check_hidden_values(view, path, settings.max_hidden_abs)
    return view[0].float()  # a copy: the request body is not kept


def prepare_embed_items(
    items: list[tuple[str, str]], engine: ScoringEngine, settings: ServiceSettings
) -> list[PreparedItem]:
    """Tokenize and check every /embed item; each RTE computed goes into the replica's RTE cache."""
    check_item_count(len(items), "items", "items", settings)
    limit = max_tokens_of(engine, settings)
    out = []
    for i, (prompt, response) in enumerate(items):
        key = RTECache.key(prompt, response)
        encoded = tokenize(engine, prompt, response, f"items[{i}]", limit)
        out.append(PreparedItem(encoded=encoded, hidden=None, w=1.0, rte=engine.rte_cache.get(key), cache_key=key))
    return out


def prepare_queries(queries: list[str], engine: ScoringEngine, settings: ServiceSettings) -> list[PreparedItem]:
    """Tokenize and check every /get_reward query (a full templated text); raises BadInput naming the first bad one."""
    check_item_count(len(queries), "query", "texts", settings)
    limit = max_tokens_of(engine, settings)
    out = []
    for i, text in enumerate(queries):
        check_text_length(len(text), f"query[{i}]", engine, limit, "")
        encoded = engine.backbone.encode_text(text, settings.get_reward_special_tokens)
        if len(encoded) == 0:
            raise BadInput(f"query[{i}]: tokenizes to no tokens; send the templated prompt + response")
        out.append(PreparedItem(encoded=check_token_count(encoded, f"query[{i}]", limit, what=""), hidden=None, w=1.0))
    return out


@dataclass(frozen=True)
class QueuedBatch:
    """A checked /preferences batch as it goes into the queue."""

    batch_id: str
    body: bytes  # the binary encoding: the request body as received when it came binary
    tokens: bytes  # Encoded.pack of the tokens of `request.texts()`, so that the worker never tokenizes them again


def prepare_preferences(
    req: PreferencesRequest, engine: ScoringEngine, settings: ServiceSettings, binary_body: bytes | None = None
) -> QueuedBatch:
    """Check a /preferences batch like /score items (each text tokenized once, each tensor's values read once,
    nothing converted) and make what the queue stores. `binary_body`: the request as received, when it came in
    the binary encoding; it is queued as it is."""
    texts = req.texts()
    check_item_count(len(texts), "groups/pairs", "responses", settings)
    paths = [f"groups[{i}].responses[{k}]" for i, g in enumerate(req.groups) for k in range(len(g.responses))]
    paths += [f"pairs[{i}].{side}" for i in range(len(req.pairs)) for side in ("chosen", "rejected")]
    limit = max_tokens_of(engine, settings)
    encoded = [tokenize(engine, p, r, path, limit) for (p, r), path in zip(texts, paths)]
    for i, g in enumerate(req.groups):
        for k, t in enumerate(g.hidden or []):
            check_hidden(t, f"groups[{i}].hidden[{k}]", settings)
    for i, pair in enumerate(req.pairs):
        for name in ("chosen_hidden", "rejected_hidden"):
            t = getattr(pair, name)
            if t is not None:
                check_hidden(t, f"pairs[{i}].{name}", settings)
    batch_id = req.batch_id or uuid.uuid4().hex
    if binary_body is None:
        payload = as_payload(req)
        payload["batch_id"] = batch_id
        binary_body = encode_binary(*pack_request(payload))
    return QueuedBatch(batch_id, binary_body, Encoded.pack(encoded))
