"""The HTTP clients of r2m: `R2MClient` (blocking) and `AsyncR2MClient` (asyncio), both on httpx.

The two share everything but I/O in `_BaseClient`: argument checks, chunking of large groups, request
encoding, response parsing, the retry decision and the backoff delay, and the mapping of statuses to errors.
Each client only runs its own loop: send, ask `_after_attempt` what to do, sleep, send again.

Retries: connection errors, timeouts and the statuses 429, 502, 503, 504 are retried up to `max_retries` times
with exponential backoff and jitter (`backoff * 2**attempt`, at most `max_backoff` seconds), or after the
`Retry-After` the service sends (also capped by `max_backoff`). Other statuses are never retried.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import os
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, NamedTuple

import httpx
import numpy as np

from ._exceptions import (
    AuthenticationError,
    InvalidRequest,
    R2MError,
    ServerError,
    ServiceUnavailable,
    StaleHead,
    Timeout,
    TransportError,
)
from .wire import BINARY_CONTENT_TYPE, WireTensor, encode_binary, jsonify_request, pack_request, tensor_from_json

__all__ = ["AsyncR2MClient", "EmbedResult", "PreferencesResult", "R2MClient", "ScoreResult"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Errors that a second try cannot fix: a bad URL scheme, an undecodable body, a redirect loop.
_FINAL_HTTPX_ERRORS = (httpx.UnsupportedProtocol, httpx.DecodingError, httpx.TooManyRedirects)


class _ScorePart(NamedTuple):
    rewards: list[float]
    head_version: int
    omega: float
    uncertainty: list[float] | None
    members: list[list[float]] | None


@dataclass(frozen=True)
class ScoreResult:
    """The answer to `score()`, merged over the requests a large call was split into.

    Attributes:
        rewards: raw score-head outputs (no sigmoid), one per response, in order.
        head_version: the newest head version that scored any of the items.
        head_versions: the head version that scored each item (chunks may straddle a hot swap).
        omega: `w(t)` for the call's step (items without hidden states were scored with `w = 1`).
        uncertainty: with an ensemble on the service (R2M_ENSEMBLE > 1), each reward's uncertainty (the members'
            std); None otherwise.
        members: with an ensemble and `return_members=True`, each response's members' rewards; None otherwise.
    """

    rewards: list[float]
    head_version: int
    head_versions: list[int]
    omega: float
    uncertainty: list[float] | None = None
    members: list[list[float]] | None = None


@dataclass(frozen=True)
class EmbedResult:
    """The answer to `embed()`: what a client computing the feedback next to the policy needs (docs/api.md).

    Attributes:
        embeddings: the reward model's reward-token embeddings e, a float32 numpy array (N, rm_dim).
        rewards: the plain reward model's rewards phi(e), one per response.
        head_version: the head the (last) answering replica serves: compute the read-outs with its weights.
    """

    embeddings: np.ndarray
    rewards: list[float]
    head_version: int


@dataclass(frozen=True)
class PreferencesResult:
    """The answer to `post_preferences()`: the id of every batch it was queued as (one unless it was split)."""

    batch_ids: list[str]
    groups: int
    pairs: int


class _BaseClient:
    """Settings and all the logic that does not touch the network; see the module docstring."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        timeout: float | None,
        max_retries: int,
        backoff: float,
        max_backoff: float,
        encoding: Literal["binary", "json"],
        max_items_per_request: int,
        max_bytes_per_request: int,
        headers: Mapping[str, str] | None,
    ) -> None:
        if encoding not in ("binary", "json"):
            raise ValueError(f"encoding must be 'binary' or 'json', got {encoding!r}")
        for name, value, low in (
            ("max_retries", max_retries, 0),
            ("max_items_per_request", max_items_per_request, 1),
            ("max_bytes_per_request", max_bytes_per_request, 1),
        ):
            if type(value) is not int or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= backoff <= max_backoff:
            raise ValueError(f"need 0 <= backoff <= max_backoff, got backoff={backoff}, max_backoff={max_backoff}")
        self.base_url = base_url
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.encoding = encoding
        self.max_items_per_request = max_items_per_request
        self.max_bytes_per_request = max_bytes_per_request
        api_key = api_key if api_key is not None else os.environ.get("R2M_API_KEY") or None
        self._headers = {"User-Agent": "r2m-client", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._random = random.Random()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, encoding={self.encoding!r})"

    # --- /score: arguments, chunks, bodies, answers ---------------------------------------------------------

    def _plan_score(
        self,
        prompts: str | Sequence[str],
        responses: Sequence[str],
        hidden: Any,
        share_prefix: bool = True,
        prefix_lengths: int | Sequence[int | None] | None = None,
        readouts: Any = None,
    ) -> list[list[dict]]:
        """Check the arguments of `score()`, split shared prompt prefixes off (see `_split_prefixes`) and split the
        items into chunks that each fit one request. An item that uses a prefix holds it under the private key
        `"_prefix"`; `_score_body` turns that into the request's `prefixes` and an index."""
        prompts, hidden, readouts = self._score_arguments(prompts, responses, hidden, readouts)
        items = [
            self._score_item(i, prompt, response, h, a)
            for i, (prompt, response, h, a) in enumerate(zip(prompts, responses, hidden, readouts, strict=True))
        ]
        if prefix_lengths is not None:
            _apply_prefix_lengths(items, prefix_lengths)
        elif share_prefix:
            _split_prefixes(items)
        return self._chunk_items(items)

    @staticmethod
    def _score_arguments(
        prompts: str | Sequence[str], responses: Sequence[str], hidden: Any, readouts: Any
    ) -> tuple[Sequence[str], Sequence[Any], Sequence[Any]]:
        """`score()`'s arguments checked, one entry per response each: its prompt, its hidden states and its
        read-out (None where it has none)."""
        if isinstance(responses, str) or not isinstance(responses, Sequence):
            raise InvalidRequest(f"responses must be a sequence of strings, got {type(responses).__name__}")
        n = len(responses)
        if n == 0:
            raise InvalidRequest("responses is empty: there is nothing to score")
        if isinstance(prompts, str):
            prompts = [prompts] * n  # one prompt for a whole group of responses
        elif not isinstance(prompts, Sequence) or len(prompts) != n:
            raise InvalidRequest(
                f"prompts must be one string or a sequence of {n} strings (one per response), got "
                f"{len(prompts) if isinstance(prompts, Sequence) else type(prompts).__name__}"
            )
        if hidden is None:
            hidden = [None] * n
        elif isinstance(hidden, np.ndarray) or type(hidden).__module__.startswith("torch"):
            raise InvalidRequest(
                "hidden must be a list with one (T_i, D) array per response, without padding; got one "
                f"{type(hidden).__name__}; slice each response's tokens out of the padded batch"
            )
        elif not isinstance(hidden, Sequence) or len(hidden) != n:
            raise InvalidRequest(f"hidden must be None or a sequence of {n} entries (None or a (T, D) array)")
        if readouts is not None:
            if any(h is not None for h in hidden):
                raise InvalidRequest("send either hidden or readouts, not both")
            if isinstance(readouts, np.ndarray) or type(readouts).__module__.startswith("torch"):
                readouts = list(readouts)  # an (N, rm_dim) array: one row per response
            if not isinstance(readouts, Sequence) or len(readouts) != n:
                raise InvalidRequest(f"readouts must be None or a sequence of {n} entries (None or an (rm_dim,) array)")
        else:
            readouts = [None] * n
        return prompts, hidden, readouts

    @staticmethod
    def _score_item(i: int, prompt: Any, response: Any, h: Any, a: Any) -> dict[str, Any]:
        """Response i's item: its texts, and its hidden states or read-out as a checked `WireTensor`."""
        for name, text in (("prompts", prompt), ("responses", response)):
            if not isinstance(text, str):
                raise InvalidRequest(f"{name}[{i}] must be a str, got {type(text).__name__}")
        item: dict[str, Any] = {"prompt": prompt, "response": response}
        if h is not None:
            t = WireTensor.from_array(h, path=f"hidden[{i}]")
            if len(t.shape) != 2:
                raise InvalidRequest(f"hidden[{i}] must be 2-D (T, D), got shape {list(t.shape)}")
            item["policy_hidden"] = t
        if a is not None:
            t = WireTensor.from_array(a, path=f"readouts[{i}]")
            if len(t.shape) != 1:
                raise InvalidRequest(f"readouts[{i}] must be 1-D (rm_dim,), got shape {list(t.shape)}")
            item["readout"] = t
        return item

    def _chunk_items(self, items: list[dict[str, Any]]) -> list[list[dict]]:
        """Consecutive items in chunks of at most `max_items_per_request` items and, roughly, `max_bytes_per_request`
        bytes: texts, tensors (grown by base64 in JSON) and each prefix once per chunk that uses it."""
        chunks: list[list[dict]] = []
        chunk: list[dict] = []
        chunk_cost = 0
        chunk_prefixes: set[int] = set()
        grow = 4 / 3 if self.encoding == "json" else 1  # base64 grows data by 4/3
        for item in items:
            cost = len(item["prompt"]) + len(item["response"])
            for key in ("policy_hidden", "readout"):
                if key in item:
                    cost += int(item[key].nbytes * grow)
            prefix = item.get("_prefix")
            new_prefix = prefix is not None and id(prefix) not in chunk_prefixes
            if prefix is not None and new_prefix:
                cost += int(prefix.nbytes * grow)  # a chunk carries each prefix its items use, once
            if chunk and (len(chunk) >= self.max_items_per_request or chunk_cost + cost > self.max_bytes_per_request):
                chunks.append(chunk)
                chunk, chunk_cost, chunk_prefixes = [], 0, set()
                if prefix is not None and not new_prefix:
                    cost += int(prefix.nbytes * grow)
            if prefix is not None:
                chunk_prefixes.add(id(prefix))
            chunk.append(item)  # an item larger than max_bytes_per_request goes alone
            chunk_cost += cost
        chunks.append(chunk)
        return chunks

    def _score_body(
        self,
        items: list[dict],
        step: int,
        total_steps: int,
        return_members: bool = False,
        head_version: int | None = None,
    ) -> dict[str, Any]:
        """The keyword arguments of `request()` for one chunk, in the client's encoding."""
        prefixes: list[WireTensor] = []
        index: dict[int, int] = {}
        wire_items = []
        for item in items:
            prefix = item.get("_prefix")
            if prefix is None:
                wire_items.append(item)
                continue
            if id(prefix) not in index:
                index[id(prefix)] = len(prefixes)
                prefixes.append(prefix)
            wire_items.append({k: v for k, v in item.items() if k != "_prefix"} | {"prefix": index[id(prefix)]})
        payload: dict[str, Any] = {"items": wire_items, "step": step, "total_steps": total_steps}
        if return_members:  # only then, as with prefixes: older servers accept the request as it was
            payload["return_members"] = True
        if head_version is not None:
            payload["head_version"] = head_version
        if prefixes:  # only then: a request without sharing stays exactly what servers before it accept
            payload["prefixes"] = prefixes
        if self.encoding == "json":
            return {"json": jsonify_request(payload)}
        return {
            "content": encode_binary(*pack_request(payload)),
            "headers": {"Content-Type": BINARY_CONTENT_TYPE},
        }

    @staticmethod
    def _check_step(step: int, total_steps: int) -> None:
        if type(total_steps) is not int or total_steps < 1:
            raise InvalidRequest(f"total_steps must be an integer >= 1, got {total_steps!r}")
        if type(step) is not int or not 0 <= step <= total_steps:
            raise InvalidRequest(f"step must be an integer in [0, total_steps={total_steps}], got {step!r}")

    @staticmethod
    def _parse_score(response: httpx.Response, n: int) -> _ScorePart:
        def numbers(x: Any) -> bool:
            return (
                isinstance(x, list)
                and len(x) == n
                and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in x)
            )

        try:
            body = response.json()
            rewards, head_version, omega = body["rewards"], body["head_version"], body["omega"]
            uncertainty, members = body.get("uncertainty"), body.get("members")
            ok = (
                numbers(rewards)
                and type(head_version) is int
                and isinstance(omega, (int, float))
                and (uncertainty is None or numbers(uncertainty))
                and (members is None or (isinstance(members, list) and len(members) == n))
            )
        except (ValueError, TypeError, KeyError):
            ok = False
        if not ok:
            raise R2MError(
                f"POST /score answered {response.status_code} with a body that does not follow the API "
                f"(expected {{rewards: [{n} numbers], head_version, omega}}): {response.text[:500]!r}"
            )
        return _ScorePart(
            [float(r) for r in rewards],
            head_version,
            float(omega),
            [float(u) for u in uncertainty] if uncertainty is not None else None,
            [[float(x) for x in m] for m in members] if members is not None else None,
        )

    @staticmethod
    def _merge(chunks: list[list[dict]], parts: list[_ScorePart]) -> ScoreResult:
        rewards = [r for part in parts for r in part.rewards]
        versions = [part.head_version for chunk, part in zip(chunks, parts, strict=True) for _ in chunk]
        unc = None if any(p.uncertainty is None for p in parts) else [u for p in parts for u in p.uncertainty or ()]
        members = None if any(p.members is None for p in parts) else [m for p in parts for m in p.members or ()]
        return ScoreResult(rewards, max(versions), versions, parts[0].omega, unc, members)

    # --- /embed and head weights: local feedback ---------------------------------------------------------------

    def _plan_embed(self, prompts: str | Sequence[str], responses: Sequence[str]) -> list[list[dict]]:
        checked = [it for c in self._plan_score(prompts, responses, None) for it in c]  # the same argument checks
        items = [{"prompt": it["prompt"], "response": it["response"]} for it in checked]
        k = self.max_items_per_request
        return [items[i : i + k] for i in range(0, len(items), k)]

    @staticmethod
    def _parse_embed(response: httpx.Response, n: int) -> EmbedResult:
        try:
            body = response.json()
            e = tensor_from_json(body["embeddings"]).to_float32()
            rewards, version = body["rewards"], body["head_version"]
            ok = e.ndim == 2 and e.shape[0] == n and isinstance(rewards, list) and len(rewards) == n
            ok = ok and type(version) is int
        except (ValueError, TypeError, KeyError, R2MError):
            ok = False
        if not ok:
            raise R2MError(
                f"POST /embed answered {response.status_code} with a body that does not follow the API "
                f"(expected {{embeddings: ({n}, rm_dim) tensor, rewards, head_version}}): {response.text[:300]!r}"
            )
        return EmbedResult(e, [float(r) for r in rewards], version)

    @staticmethod
    def _merge_embed(parts: list[EmbedResult]) -> EmbedResult:
        return EmbedResult(
            np.concatenate([p.embeddings for p in parts]),
            [r for p in parts for r in p.rewards],
            max(p.head_version for p in parts),
        )

    @staticmethod
    def _check_head_blob(version: int, response: httpx.Response) -> bytes:
        import hashlib

        blob = response.content
        want = response.headers.get("X-R2M-Head-SHA256")
        if want is not None and hashlib.sha256(blob).hexdigest() != want:
            raise R2MError(f"GET /heads/{version}: the body's sha256 does not match X-R2M-Head-SHA256 (cut short?)")
        return blob

    # --- /preferences: chunks and bodies ----------------------------------------------------------------------

    def _plan_preferences(
        self, groups: Sequence[Mapping[str, Any]] | None, pairs: Sequence[Mapping[str, Any]] | None
    ) -> list[dict[str, list]]:
        """Check groups and pairs and split them into batches of about `max_bytes_per_request` bytes each."""
        groups, pairs = list(groups or []), list(pairs or [])
        if not groups and not pairs:
            raise InvalidRequest("post_preferences needs at least one group or pair")
        batches: list[dict[str, list]] = []
        batch: dict[str, list] = {"groups": [], "pairs": []}
        cost = size = 0
        entries = [("groups", i, g) for i, g in enumerate(groups)] + [("pairs", i, p) for i, p in enumerate(pairs)]
        for kind, i, entry in entries:
            if not isinstance(entry, Mapping):
                raise InvalidRequest(f"{kind}[{i}] must be a dict, got {type(entry).__name__}")
            item = dict(entry)
            tensors = 0
            if kind == "groups":
                k = len(item.get("responses") or [])
                hidden = item.get("hidden")
                if hidden is not None:
                    if len(hidden) != k:
                        raise InvalidRequest(f"groups[{i}]: {len(hidden)} hidden-state tensors for {k} responses")
                    item["hidden"] = [
                        WireTensor.from_array(h, path=f"groups[{i}].hidden[{j}]") for j, h in enumerate(hidden)
                    ]
                    tensors = sum(t.nbytes for t in item["hidden"])
                if item.get("rewards") is not None:
                    item["rewards"] = [float(r) for r in item["rewards"]]
                size += max(k, 1)
            else:
                for name in ("chosen_hidden", "rejected_hidden"):
                    if item.get(name) is not None:
                        item[name] = WireTensor.from_array(item[name], path=f"pairs[{i}].{name}")
                        tensors += item[name].nbytes
                size += 2
            item_cost = (tensors * 4 // 3 if self.encoding == "json" else tensors) + len(str(item.get("prompt", "")))
            if (batch["groups"] or batch["pairs"]) and (
                cost + item_cost > self.max_bytes_per_request or size > self.max_items_per_request * 4
            ):
                batches.append(batch)
                batch, cost, size = {"groups": [], "pairs": []}, 0, 0
            batch[kind].append(item)
            cost += item_cost
        batches.append(batch)
        return batches

    def _preferences_body(self, batch: dict[str, list], step: int, total_steps: int, batch_id: str) -> dict:
        payload = {**batch, "step": step, "total_steps": total_steps, "batch_id": batch_id}
        if self.encoding == "json":
            return {"json": jsonify_request(payload)}
        return {"content": encode_binary(*pack_request(payload)), "headers": {"Content-Type": BINARY_CONTENT_TYPE}}

    @staticmethod
    def _batch_ids(batch_id: str | None, n: int) -> list[str]:
        base = batch_id or uuid.uuid4().hex
        return [base] if n == 1 else [f"{base}.{i}" for i in range(n)]

    # --- retries and errors ---------------------------------------------------------------------------------

    def _after_attempt(
        self, method: str, path: str, outcome: httpx.Response | httpx.RequestError, attempt: int, retries: int
    ) -> httpx.Response | float:
        """Decide what follows one attempt: return the successful response, return the seconds to wait before
        the next attempt, or raise the error the caller gets."""
        what = f"{method} {path}"
        if isinstance(outcome, httpx.Response):
            if outcome.status_code not in RETRY_STATUSES:
                return self._check_status(what, outcome)
            retry_after = _parse_retry_after(outcome.headers.get("Retry-After"))
            if attempt >= retries:
                raise ServiceUnavailable(
                    f"{what}: the service answered {outcome.status_code} {outcome.reason_phrase} to all "
                    f"{attempt + 1} attempts; {_detail_text(_detail(outcome))}",
                    status_code=outcome.status_code,
                    retry_after=retry_after,
                )
            return self._delay(attempt, retry_after)
        if isinstance(outcome, _FINAL_HTTPX_ERRORS) or not isinstance(outcome, httpx.TransportError):
            raise TransportError(f"{what}: {type(outcome).__name__}: {outcome}") from outcome
        if attempt >= retries:
            kind = Timeout if isinstance(outcome, httpx.TimeoutException) else TransportError
            raise kind(
                f"{what} to {self.base_url}: {type(outcome).__name__} ({outcome or 'no message'}) on all "
                f"{attempt + 1} attempts"
            ) from outcome
        return self._delay(attempt, None)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `attempt + 1`."""
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        # "Equal jitter": half the exponential step for sure, half at random, so clients that failed together
        # do not come back together.
        step = min(self.max_backoff, self.backoff * 2**attempt)
        return step * (0.5 + 0.5 * self._random.random())

    @staticmethod
    def _check_status(what: str, response: httpx.Response) -> httpx.Response:
        status = response.status_code
        if response.is_success:
            return response
        if status in (401, 403):
            detail = _detail(response)
            raise AuthenticationError(
                f"{what}: {status} {response.reason_phrase}: {_detail_text(detail)} "
                "(set api_key= or R2M_API_KEY to the service's key)",
                status_code=status,
                detail=detail,
            )
        if status == 409:
            try:
                served = response.json()["head_version"]
            except (ValueError, KeyError, TypeError):
                served = None
            if type(served) is int:
                detail = _detail(response)
                raise StaleHead(f"{what}: 409: {_detail_text(detail)}", head_version=served, detail=detail)
        if 400 <= status < 500:
            detail = _detail(response)
            raise InvalidRequest(f"{what}: {status}: {_detail_text(detail)}", status_code=status, detail=detail)
        if status >= 500:
            raise ServerError(
                f"{what}: {status} {response.reason_phrase}: {_detail_text(_detail(response))}",
                status_code=status,
            )
        raise R2MError(f"{what}: unexpected status {status} (is base_url right?)")


def _detail(response: httpx.Response) -> Any:
    """The service's `detail` (a string or FastAPI's list of errors), else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:1000]
    return body["detail"] if isinstance(body, dict) and "detail" in body else response.text[:1000]


def _detail_text(detail: Any) -> str:
    if isinstance(detail, list):  # FastAPI: [{"loc": ["body", "items", 0, "prompt"], "msg": "...", ...}]
        parts = []
        for err in detail:
            if isinstance(err, dict):
                parts.append(f"{'.'.join(str(x) for x in err.get('loc', []))}: {err.get('msg', err)}")
            else:
                parts.append(str(err))
        return "; ".join(parts)
    return str(detail)


def _parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return max(0.0, seconds) if seconds == seconds else None  # NaN is unreadable


# --- prompt-prefix sharing ------------------------------------------------------------------------------------


def _rows(t: WireTensor, start: int, stop: int) -> WireTensor:
    """Rows `start:stop` of a 2-D WireTensor as a zero-copy slice of its bytes."""
    row = t.shape[1] * t.itemsize
    return WireTensor(t.dtype, (stop - start, t.shape[1]), t.data[start * row : stop * row])


def _raw_rows(t: WireTensor) -> np.ndarray:
    """A `(T, words)` integer view of a 2-D WireTensor's bytes, for bit-exact row comparison (no copy)."""
    row = t.shape[1] * t.itemsize
    word = next(w for w in (np.uint64, np.uint32, np.uint16, np.uint8) if row % np.dtype(w).itemsize == 0)
    return np.frombuffer(t.data, dtype=word).reshape(t.shape[0], -1)


def common_prefix_rows(tensors: Sequence[WireTensor]) -> int:
    """The number of leading rows that are bit-identical in every tensor (same dtype and width assumed).

    Exact equality of the raw bytes, so sharing them is lossless by construction. Each tensor is compared with the
    first only over the run still common, so the cost is about one read of the shared rows per tensor.
    """
    base = _raw_rows(tensors[0])
    n = min(t.shape[0] for t in tensors)
    for t in tensors[1:]:
        if n == 0:
            break
        diff = (base[:n] != _raw_rows(t)[:n]).any(axis=1)  # (n,) True where a row differs
        first = int(diff.argmax())
        n = first if diff[first] else n
    return n


def _share(group: list[dict[str, Any]], rows: int) -> None:
    """Give the items of `group` one shared prefix: the first `rows` rows of the first item's hidden states."""
    prefix = _rows(group[0]["policy_hidden"], 0, rows)
    for item in group:
        t = item["policy_hidden"]
        item["policy_hidden"] = _rows(t, rows, t.shape[0])
        item["_prefix"] = prefix


def _split_prefixes(items: list[dict[str, Any]]) -> None:
    """Automatic sharing: items with the same prompt (and hidden dtype and width), two or more of them, send the
    longest run of leading rows they all have bit for bit once, as a prefix."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for item in items:
        t = item.get("policy_hidden")
        if t is not None:
            groups.setdefault((item["prompt"], t.dtype, t.shape[1]), []).append(item)
    for group in groups.values():
        if len(group) > 1:
            rows = common_prefix_rows([item["policy_hidden"] for item in group])
            if rows:
                _share(group, rows)


def _apply_prefix_lengths(items: list[dict[str, Any]], lengths: int | Sequence[int | None]) -> None:
    """Explicit sharing: items with the same prompt and the same given length L share their first L rows; the
    caller vouches that those rows are the same in each (the group's first item's rows are sent)."""
    n = len(items)
    if isinstance(lengths, int) and not isinstance(lengths, bool):
        lengths = [lengths] * n
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or len(lengths) != n:
        raise InvalidRequest(f"prefix_lengths must be an int or a sequence of {n} entries (int or None)")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for i, (item, length) in enumerate(zip(items, lengths)):
        if length is None or length == 0:
            continue
        t = item.get("policy_hidden")
        if type(length) is not int or length < 0 or t is None or length > t.shape[0]:
            rows = t.shape[0] if t is not None else "no hidden states"
            raise InvalidRequest(
                f"prefix_lengths[{i}]={length!r} must be None or an integer in [0, T] for hidden[{i}] ({rows} rows)"
            )
        groups.setdefault((item["prompt"], t.dtype, t.shape[1], length), []).append(item)
    for (_, _, _, length), group in groups.items():
        _share(group, length)


class R2MClient(_BaseClient):
    """Blocking client of the r2m reward service.

    Args:
        base_url: where the service listens.
        api_key: sent as `Authorization: Bearer <key>`; defaults to the `R2M_API_KEY` environment variable.
        timeout: seconds per attempt (connect, read, write, pool), or None for no limit.
        max_retries: retries after the first attempt for connection errors, timeouts and 429/502/503/504.
        backoff: the first retry waits about `backoff` seconds, doubling each time (with jitter).
        max_backoff: the longest wait between attempts, also the cap on the service's `Retry-After`.
        encoding: "binary" (safetensors body, raw tensor bytes) or "json" (base64 tensors).
        max_items_per_request: the most items in one `/score` request; larger calls are split.
        max_bytes_per_request: about the most bytes of tensors and text in one request; an item larger than
            this goes alone.
        transport: an httpx transport to use instead of the network (tests: `httpx.MockTransport`).
        headers: extra headers for every request.

    Example:
        >>> with R2MClient("http://127.0.0.1:8000") as rm:
        ...     result = rm.score("What is 2+2?", ["4.", "Five."], hidden=[h0, h1], step=10, total_steps=100)
        >>> result.rewards
        [1.93, -0.41]
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float | None = 60.0,
        max_retries: int = 5,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        encoding: Literal["binary", "json"] = "binary",
        max_items_per_request: int = 64,
        max_bytes_per_request: int = 64 * 2**20,
        transport: httpx.BaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
            encoding=encoding,
            max_items_per_request=max_items_per_request,
            max_bytes_per_request=max_bytes_per_request,
            headers=headers,
        )
        self._http = httpx.Client(base_url=base_url, headers=self._headers, timeout=timeout, transport=transport)
        self._sleep = time.sleep

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        max_retries: int | None = None,
    ) -> httpx.Response:
        """Send one request with the client's retries and error mapping; the base of every other method.

        Args:
            method: "GET", "POST", ...
            path: the route, e.g. "/preferences".
            json: a JSON body.
            content: a raw body (set its Content-Type in `headers`).
            headers: extra headers for this request.
            max_retries: overrides the client's `max_retries` for this request.

        Returns:
            The successful (2xx) `httpx.Response`.

        Raises:
            TransportError, Timeout, ServiceUnavailable: after all retries.
            AuthenticationError, InvalidRequest, ServerError: at once, for 401/403, other 4xx, other 5xx.

        Example:
            >>> rm.request("GET", "/heads/current").json()
        """
        retries = self.max_retries if max_retries is None else max_retries
        for attempt in itertools.count():
            try:
                outcome: httpx.Response | httpx.RequestError = self._http.request(
                    method, path, json=json, content=content, headers=headers
                )
            except httpx.RequestError as exc:
                outcome = exc
            step = self._after_attempt(method, path, outcome, attempt, retries)
            if isinstance(step, httpx.Response):
                return step
            self._sleep(step)
        raise AssertionError("unreachable")

    def score(
        self,
        prompts: str | Sequence[str],
        responses: Sequence[str],
        hidden: Sequence[Any | None] | None = None,
        *,
        step: int = 0,
        total_steps: int = 1,
        share_prefix: bool = True,
        prefix_lengths: int | Sequence[int | None] | None = None,
        return_members: bool = False,
        readouts: Sequence[Any | None] | None = None,
        head_version: int | None = None,
    ) -> ScoreResult:
        """Score responses with the service's reward model (R2M-corrected where hidden states are given).

        Large calls are split into requests of at most `max_items_per_request` items and about
        `max_bytes_per_request` bytes, sent one after another; the rewards come back in the order of
        `responses`.

        Args:
            prompts: one prompt per response, or one string for a whole group of responses.
            responses: the responses to score.
            hidden: None, or one entry per response: None or the policy's last-layer hidden states over the
                query + response tokens, a 2-D (T, D) numpy array or torch tensor (float32, float16 or
                bfloat16; float64 is sent as float32).
            step: the RL step t for the omega schedule, 0 <= step <= total_steps.
            total_steps: the total number of RL steps T, >= 1.
            share_prefix: send the hidden-state rows that all responses of one prompt have bit for bit (the
                prompt's, in a causal policy) once per request instead of once per response (docs/api.md,
                prompt-prefix sharing). Lossless: rewards are the same as without it.
            prefix_lengths: instead of searching, the number of leading rows of each response's hidden states
                that belong to its prompt (one int for all, or one int or None per response); responses of the
                same prompt with the same length send the first one's rows for all of them, unchecked.
            return_members: with an ensemble on the service, also return each member's reward.
            readouts: local feedback instead of `hidden` (docs/api.md): one entry per response, None or the
                read-out `(rm_dim,)` computed next to the policy from `embed()`'s RTE with head `head_version`'s
                weights (`r2m.trainer.local.LocalFeedbackClient` does all of it).
            head_version: the head the read-outs came from; a replica serving another answers 409 (`StaleHead`).

        Returns:
            A `ScoreResult` with one reward per response.

        Raises:
            StaleHead: the read-outs came from another head than the replica serves (`.head_version`).
            InvalidRequest: bad arguments (before anything is sent; `status_code` is None) or a 4xx from the
                service.
            WireError: a hidden-state entry of an unsupported type or dtype.
            R2MError: the other errors of `request()`.

        Example:
            >>> rm.score("What is 2+2?", ["4.", "Five."]).rewards
            [1.93, -0.41]
        """
        self._check_step(step, total_steps)
        chunks = self._plan_score(prompts, responses, hidden, share_prefix, prefix_lengths, readouts)
        parts = []
        for items in chunks:
            body = self._score_body(items, step, total_steps, return_members, head_version)
            response = self.request("POST", "/score", **body)
            parts.append(self._parse_score(response, len(items)))
        return self._merge(chunks, parts)

    def embed(self, prompts: str | Sequence[str], responses: Sequence[str]) -> EmbedResult:
        """The reward model's embeddings of the responses (`POST /embed`), for feedback computed next to the policy.

        Example:
            >>> rm.embed("What is 2+2?", ["4.", "Five."]).embeddings.shape
            (2, 384)
        """
        chunks = self._plan_embed(prompts, responses)
        parts = [self._parse_embed(self.request("POST", "/embed", json={"items": c}), len(c)) for c in chunks]
        return self._merge_embed(parts)

    def head_weights(self, version: int, copy: Literal["master", "serving"] = "serving") -> bytes:
        """A kept head version's weights (safetensors bytes, checked against their sha256). `copy="serving"`: the
        weights replicas score with, which read-outs must be computed with."""
        response = self.request("GET", f"/heads/{int(version)}?copy={copy}")
        return self._check_head_blob(version, response)

    def health(self) -> bool:
        """True when `GET /healthz` answers 2xx; False when the service cannot be reached or is unavailable.

        One attempt, no retries. Example: `while not rm.health(): time.sleep(1)`.
        """
        try:
            self.request("GET", "/healthz", max_retries=0)
        except (TransportError, Timeout, ServiceUnavailable):
            return False
        return True

    def ready(self) -> bool:
        """True when `GET /readyz` answers 200 (model loaded, head known); False on 503 or no connection.

        One attempt, no retries. Example: `assert rm.ready()`.
        """
        try:
            self.request("GET", "/readyz", max_retries=0)
        except (TransportError, Timeout, ServiceUnavailable):
            return False
        return True

    def info(self) -> dict[str, Any]:
        """`GET /info`: the model, widths, settings, head version and package version.

        Example: `rm.info()["head_version"]`.
        """
        return self.request("GET", "/info").json()

    def post_preferences(
        self,
        groups: Sequence[Mapping[str, Any]] | None = None,
        pairs: Sequence[Mapping[str, Any]] | None = None,
        *,
        step: int,
        total_steps: int,
        batch_id: str | None = None,
    ) -> PreferencesResult:
        """Queue a step's groups (and/or labelled pairs) for the R2M update (`POST /preferences`).

        Retried on 503 (e.g. Redis briefly down) like every request; the batch id makes a retry of a batch that
        was in fact queued harmless: the worker trains each id once.

        Args:
            groups: dicts `{"prompt", "responses": [K str], "hidden": [K (T_k, D) arrays] | None,
                "rewards": [K floats] | None}`, the hidden states from the policy after its update.
            pairs: dicts `{"prompt", "chosen", "rejected", "chosen_hidden", "rejected_hidden"}`.
            step, total_steps: the RL step whose policy made the hidden states, for the omega schedule.
            batch_id: an id for idempotent retries (default: a random one); split batches get `.0`, `.1`, ...

        Returns:
            A `PreferencesResult` with the queued batch ids.

        Example:
            >>> rm.post_preferences([{"prompt": p, "responses": ys, "hidden": hs}], step=3, total_steps=100)
        """
        self._check_step(step, total_steps)
        batches = self._plan_preferences(groups, pairs)
        ids = self._batch_ids(batch_id, len(batches))
        for batch, bid in zip(batches, ids):
            self.request("POST", "/preferences", **self._preferences_body(batch, step, total_steps, bid))
        return PreferencesResult(ids, len(groups or []), len(pairs or []))

    def current_head(self) -> dict[str, Any]:
        """`GET /heads/current`: the latest head version's metadata and the version this replica serves."""
        return self.request("GET", "/heads/current").json()

    def rollback(self, version: int) -> dict[str, Any]:
        """`POST /heads/rollback`: republish kept `version` as the newest head; returns its metadata."""
        return self.request("POST", "/heads/rollback", json={"version": version}).json()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> R2MClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncR2MClient(_BaseClient):
    """asyncio client of the r2m reward service; the same arguments and methods as `R2MClient`, awaited.

    Args:
        max_concurrency: the most requests of one `score()` call in flight at once (the other arguments are
            `R2MClient`'s; `transport` is an `httpx.AsyncBaseTransport`).

    Example:
        >>> async with AsyncR2MClient("http://127.0.0.1:8000") as rm:
        ...     result = await rm.score("What is 2+2?", ["4.", "Five."])
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float | None = 60.0,
        max_retries: int = 5,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        encoding: Literal["binary", "json"] = "binary",
        max_items_per_request: int = 64,
        max_bytes_per_request: int = 64 * 2**20,
        max_concurrency: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
            encoding=encoding,
            max_items_per_request=max_items_per_request,
            max_bytes_per_request=max_bytes_per_request,
            headers=headers,
        )
        if type(max_concurrency) is not int or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be an integer >= 1, got {max_concurrency!r}")
        self.max_concurrency = max_concurrency
        self._http = httpx.AsyncClient(base_url=base_url, headers=self._headers, timeout=timeout, transport=transport)
        self._sleep = asyncio.sleep

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        max_retries: int | None = None,
    ) -> httpx.Response:
        """Send one request with the client's retries and error mapping; see `R2MClient.request`.

        Example:
            >>> (await rm.request("GET", "/heads/current")).json()
        """
        retries = self.max_retries if max_retries is None else max_retries
        for attempt in itertools.count():
            try:
                outcome: httpx.Response | httpx.RequestError = await self._http.request(
                    method, path, json=json, content=content, headers=headers
                )
            except httpx.RequestError as exc:
                outcome = exc
            step = self._after_attempt(method, path, outcome, attempt, retries)
            if isinstance(step, httpx.Response):
                return step
            await self._sleep(step)
        raise AssertionError("unreachable")

    async def score(
        self,
        prompts: str | Sequence[str],
        responses: Sequence[str],
        hidden: Sequence[Any | None] | None = None,
        *,
        step: int = 0,
        total_steps: int = 1,
        share_prefix: bool = True,
        prefix_lengths: int | Sequence[int | None] | None = None,
        return_members: bool = False,
        readouts: Sequence[Any | None] | None = None,
        head_version: int | None = None,
    ) -> ScoreResult:
        """Score responses; see `R2MClient.score` for the arguments. Chunks go out concurrently.

        Example:
            >>> (await rm.score("What is 2+2?", ["4.", "Five."], step=3, total_steps=10)).rewards
            [1.93, -0.41]
        """
        self._check_step(step, total_steps)
        chunks = self._plan_score(prompts, responses, hidden, share_prefix, prefix_lengths, readouts)
        limit = asyncio.Semaphore(self.max_concurrency)

        async def send(items: list[dict]) -> _ScorePart:
            async with limit:  # encode inside the limit: at most max_concurrency bodies exist at once
                body = self._score_body(items, step, total_steps, return_members, head_version)
                response = await self.request("POST", "/score", **body)
            return self._parse_score(response, len(items))

        tasks = [asyncio.ensure_future(send(items)) for items in chunks]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return self._merge(chunks, list(parts))

    async def embed(self, prompts: str | Sequence[str], responses: Sequence[str]) -> EmbedResult:
        """`POST /embed`; see `R2MClient.embed`."""
        parts = []
        for c in self._plan_embed(prompts, responses):
            parts.append(self._parse_embed(await self.request("POST", "/embed", json={"items": c}), len(c)))
        return self._merge_embed(parts)

    async def head_weights(self, version: int, copy: Literal["master", "serving"] = "serving") -> bytes:
        """A kept head version's weights; see `R2MClient.head_weights`."""
        response = await self.request("GET", f"/heads/{int(version)}?copy={copy}")
        return self._check_head_blob(version, response)

    async def health(self) -> bool:
        """True when `GET /healthz` answers 2xx; False when unreachable or unavailable. One attempt."""
        try:
            await self.request("GET", "/healthz", max_retries=0)
        except (TransportError, Timeout, ServiceUnavailable):
            return False
        return True

    async def ready(self) -> bool:
        """True when `GET /readyz` answers 200; False on 503 or no connection. One attempt."""
        try:
            await self.request("GET", "/readyz", max_retries=0)
        except (TransportError, Timeout, ServiceUnavailable):
            return False
        return True

    async def info(self) -> dict[str, Any]:
        """`GET /info`: the model, widths, settings, head version and package version."""
        return (await self.request("GET", "/info")).json()

    async def post_preferences(
        self,
        groups: Sequence[Mapping[str, Any]] | None = None,
        pairs: Sequence[Mapping[str, Any]] | None = None,
        *,
        step: int,
        total_steps: int,
        batch_id: str | None = None,
    ) -> PreferencesResult:
        """Queue groups and/or pairs for the R2M update; see `R2MClient.post_preferences`."""
        self._check_step(step, total_steps)
        batches = self._plan_preferences(groups, pairs)
        ids = self._batch_ids(batch_id, len(batches))
        for batch, bid in zip(batches, ids):
            await self.request("POST", "/preferences", **self._preferences_body(batch, step, total_steps, bid))
        return PreferencesResult(ids, len(groups or []), len(pairs or []))

    async def current_head(self) -> dict[str, Any]:
        """`GET /heads/current`."""
        return (await self.request("GET", "/heads/current")).json()

    async def rollback(self, version: int) -> dict[str, Any]:
        """`POST /heads/rollback`."""
        return (await self.request("POST", "/heads/rollback", json={"version": version})).json()

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    aclose = close

    async def __aenter__(self) -> AsyncR2MClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
