"""verl adapter: the r2m service as verl's custom reward function (httpx + numpy only; no torch, no verl import).

    reward.custom_reward_function.path=pkg://r2m.client.verl        # or /path/to/r2m/client/verl.py
    reward.custom_reward_function.name=compute_score                # one sample per call (the default manager)
    # verl's legacy BatchRewardManager (reward_model.reward_manager=batch): name=compute_score_batched

The module-level functions read the service address from `R2M_URL` (default http://127.0.0.1:8000) and the key from
`R2M_API_KEY` and share one cached `R2MClient`; `make_compute_score(...)` / `make_compute_score_batched(...)` build
functions with explicit settings. The prompt comes from the sample's `extra_info` (`prompt`, then `question`). The
verl 0.9.1 contract matched: docs/integrations.md, "verl".
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from r2m.client import R2MClient

__all__ = [
    "DEFAULT_PROMPT_KEYS",
    "compute_score",
    "compute_score_batched",
    "get_client",
    "make_compute_score",
    "make_compute_score_batched",
    "prompt_from_extra_info",
]

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_PROMPT_KEYS = ("prompt", "question")

ComputeScore = Callable[..., float]
ComputeScoreBatched = Callable[..., list[float]]

_clients: dict[tuple[str, str | None], R2MClient] = {}
_clients_lock = threading.Lock()


def get_client(base_url: str | None = None, api_key: str | None = None) -> R2MClient:
    """The process-wide cached client for `base_url` (default `R2M_URL`, else http://127.0.0.1:8000)."""
    url = base_url or os.environ.get("R2M_URL") or DEFAULT_URL
    key = (url, api_key)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = R2MClient(url, api_key=api_key)
        return _clients[key]


def prompt_from_extra_info(
    extra_info: Mapping[str, Any] | None, prompt_keys: Sequence[str] = DEFAULT_PROMPT_KEYS
) -> str:
    """The prompt text carried in a verl sample's `extra_info`, or "" when it has none (see the module docstring)."""
    if not extra_info:
        return ""
    for k in prompt_keys:
        value = extra_info.get(k)
        if value is None:
            continue
        if isinstance(value, str):
            return value
        messages = [m for m in value if isinstance(m, Mapping)]  # a chat, maybe a numpy object array from parquet
        users = [m for m in messages if m.get("role") == "user"]
        if users:
            return str(users[-1].get("content", ""))
        raise TypeError(f"extra_info[{k!r}] is a {type(value).__name__} without a user message; expected a string")
    return ""


def _resolve_client(client: R2MClient | None, base_url: str | None, api_key: str | None) -> Callable[[], R2MClient]:
    if client is not None:
        return lambda: client
    # Resolved on first use, so that R2M_URL set after import (e.g. by a Ray worker's env) still counts.
    return lambda: get_client(base_url, api_key)


def make_compute_score(
    base_url: str | None = None,
    *,
    api_key: str | None = None,
    prompt_keys: Sequence[str] = DEFAULT_PROMPT_KEYS,
    client: R2MClient | None = None,
) -> ComputeScore:
    """A verl `compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float`.

    Args:
        base_url: the r2m service; default `R2M_URL`, else http://127.0.0.1:8000.
        api_key: Bearer key; default `R2M_API_KEY` (read by the client).
        prompt_keys: `extra_info` keys tried in order for the prompt.
        client: an `R2MClient` to use instead of the cached one (tests: one on an `httpx.MockTransport`).

    Returns:
        The reward function; it returns the raw reward (a float) of `solution_str` for the sample's prompt.

    Example:
        >>> compute_score = make_compute_score("http://rm:8000")
        >>> compute_score("gsm8k", "The answer is 4.", "4", {"question": "What is 2+2?"})
        1.93
    """
    get = _resolve_client(client, base_url, api_key)

    def compute_score(
        data_source: Any = None,
        solution_str: str = "",
        ground_truth: Any = None,
        extra_info: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> float:
        prompt = prompt_from_extra_info(extra_info, prompt_keys)
        return float(get().score(prompt, [solution_str]).rewards[0])

    return compute_score


def make_compute_score_batched(
    base_url: str | None = None,
    *,
    api_key: str | None = None,
    prompt_keys: Sequence[str] = DEFAULT_PROMPT_KEYS,
    client: R2MClient | None = None,
) -> ComputeScoreBatched:
    """verl's batch form, `compute_score(data_sources, solution_strs, ground_truths, extra_infos, **kwargs)`,
    returning one float per sample in order; the samples go to the service in as few requests as the client allows.
    Args as `make_compute_score`."""
    get = _resolve_client(client, base_url, api_key)

    def compute_score_batched(
        data_sources: Sequence[Any] | None = None,
        solution_strs: Sequence[str] = (),
        ground_truths: Sequence[Any] | None = None,
        extra_infos: Sequence[Mapping[str, Any] | None] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        responses = [str(s) for s in solution_strs]
        if not responses:
            return []
        infos = list(extra_infos) if extra_infos is not None else [None] * len(responses)
        if len(infos) != len(responses):
            raise ValueError(f"{len(responses)} solution_strs but {len(infos)} extra_infos")
        prompts = [prompt_from_extra_info(info, prompt_keys) for info in infos]
        return [float(r) for r in get().score(prompts, responses).rewards]

    return compute_score_batched


compute_score = make_compute_score()
compute_score_batched = make_compute_score_batched()
