"""Prompt-prefix sharing against the real server: the same rewards with and without it, in both encodings, smaller
requests, and a clear 4xx for every malformed use of `prefixes` / `prefix` (docs/api.md)."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
import torch

from r2m.client import R2MClient
from r2m.client.wire import BINARY_CONTENT_TYPE, WireTensor, encode_binary, pack_request

from ..unit.service.test_engine import BF16_REWARD_TOL
from .conftest import POLICY_DIM, Process

PROMPT = "How do I boil an egg?"
RESPONSES = [
    "Put the egg in cold water, bring it to a boil, simmer for nine minutes, then cool it in ice water.",
    "No idea. Look it up yourself.",
    "Eggs are laid by hens.",
    "Boil water, add the egg, wait ten minutes.",
]
PROMPT_ROWS = 96


def _group(dtype: torch.dtype, k: int = len(RESPONSES), seed: int = 0) -> list[torch.Tensor]:
    """K full sequences of a causal policy: the same prompt rows, then each response's own (ragged) rows."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randn(PROMPT_ROWS, POLICY_DIM, generator=g)
    return [torch.cat([prompt, torch.randn(5 + 7 * j, POLICY_DIM, generator=g)]).to(dtype) for j in range(k)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_and_unshared_requests_give_equal_rewards_in_both_encodings(
    server: Process, dtype: torch.dtype
) -> None:
    hidden = _group(dtype)
    other = _group(dtype, k=2, seed=1)  # a second group in the same call, and an item without hidden states
    prompts = [PROMPT] * 4 + ["Name a colour."] * 2 + [PROMPT]
    responses = [*RESPONSES, "Blue.", "Seven.", "Soft-boil it."]
    hs = [*hidden, *other, None]
    results = {}
    for encoding in ("json", "binary"):
        with R2MClient(server.url, encoding=encoding, max_retries=1) as client:
            for share in (True, False):
                out = client.score(prompts, responses, hs, step=50, total_steps=100, share_prefix=share)
                results[encoding, share] = out.rewards
    for share in (True, False):
        assert results["json", share] == results["binary", share], "the two encodings carry the same bytes"
    shared, base = results["binary", True], results["binary", False]
    # float32: the segments' sums differ from the concatenated ones only in order. bfloat16: each matmul rounds its
    # output to bf16 (no float32-output bf16 matmul on CPU), so the two forms differ within the documented bf16
    # tolerance (docs/api.md: 5e-3 of the rewards' spread), not bit for bit.
    tol = 1e-5 if dtype == torch.float32 else BF16_REWARD_TOL * (max(base) - min(base))
    assert shared == pytest.approx(base, abs=tol)
    with R2MClient(server.url, max_retries=1) as client:
        plain = client.score(prompts, responses).rewards
    assert all(abs(a - b) > 1e-6 for a, b in zip(base[:6], plain[:6])), "the feedback (prefix included) counts"
    assert base[6] == plain[6]


def test_chunked_shared_requests_give_the_same_rewards(server: Process) -> None:
    hidden = _group(torch.float32)  # float32: equal up to summation order (bf16: see the test above)
    with R2MClient(server.url, max_retries=1, max_items_per_request=3) as client:
        chunked = client.score(PROMPT, RESPONSES, hidden, step=50, total_steps=100).rewards
    with R2MClient(server.url, max_retries=1) as client:
        whole = client.score(PROMPT, RESPONSES, hidden, step=50, total_steps=100, share_prefix=False).rewards
    assert chunked == pytest.approx(whole, abs=1e-5)


@pytest.mark.parametrize("encoding", ["binary", "json"])
def test_the_shared_request_is_smaller_by_k_minus_1_over_k_of_the_prompt_part(encoding: str) -> None:
    k = len(RESPONSES)
    hidden = _group(torch.bfloat16)
    client = R2MClient("http://unused", encoding=encoding)

    def size(share: bool) -> int:
        (chunk,) = client._plan_score(PROMPT, RESPONSES, hidden, share)
        body = client._score_body(chunk, 50, 100)
        return len(body["content"]) if encoding == "binary" else len(json.dumps(body["json"]))

    prompt_part = k * PROMPT_ROWS * POLICY_DIM * 2 * (4 / 3 if encoding == "json" else 1)  # bf16, base64 in JSON
    saved = size(False) - size(True)
    assert saved >= 0.99 * (k - 1) / k * prompt_part, (saved, prompt_part)
    assert saved <= prompt_part


def _tensor(arr: np.ndarray, dtype: str = "float32") -> dict:
    return {"dtype": dtype, "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode()}


def _rows(n: int, dtype=np.float32, width: int = POLICY_DIM) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, width)).astype(dtype)


def _item(hidden: dict | None, prefix: int | None = None) -> dict:
    item: dict = {"prompt": PROMPT, "response": "Boil it."}
    if hidden is not None:
        item["policy_hidden"] = hidden
    if prefix is not None:
        item["prefix"] = prefix
    return item


NAN_PREFIX = _rows(4)
NAN_PREFIX[2, 1] = np.nan

BAD_PREFIX_REQUESTS = {
    "index out of range": ({"prefixes": [_tensor(_rows(4))], "items": [_item(_tensor(_rows(2)), 1)]}, "prefix=1"),
    "prefix without policy_hidden": (
        {"prefixes": [_tensor(_rows(4))], "items": [_item(None, 0)]},
        "items[0].prefix is set but policy_hidden is missing",
    ),
    "unused prefix": (
        {"prefixes": [_tensor(_rows(4)), _tensor(_rows(3))], "items": [_item(_tensor(_rows(2)), 0)]},
        "prefixes[1] are not used",
    ),
    "prefix of the wrong width": (
        {"prefixes": [_tensor(_rows(4, width=7))], "items": [_item(_tensor(_rows(2)), 0)]},
        "prefixes[0]: hidden width 7",
    ),
    "rows of the wrong width": (
        {"prefixes": [_tensor(_rows(4))], "items": [_item(_tensor(_rows(2, width=7)), 0)]},
        "items[0].policy_hidden: hidden width 7",
    ),
    "dtype differs from the prefix": (
        {"prefixes": [_tensor(_rows(4))], "items": [_item(_tensor(_rows(2, np.float16), "float16"), 0)]},
        "differs from its prefix",
    ),
    "NaN in a prefix": ({"prefixes": [_tensor(NAN_PREFIX)], "items": [_item(_tensor(_rows(2)), 0)]}, "row 2"),
    "prefix + rows over the limit": (
        {"prefixes": [_tensor(_rows(500))], "items": [_item(_tensor(_rows(13)), 0)]},
        "500 prefix + 13 own hidden-state rows exceed R2M_MAX_HIDDEN_TOKENS=512",
    ),
    "empty prefix": ({"prefixes": [_tensor(_rows(0))], "items": [_item(_tensor(_rows(2)), 0)]}, "prefixes[0]"),
    "no own rows and no prefix": ({"items": [_item(_tensor(_rows(0)))]}, "at least one"),
    "negative index": ({"prefixes": [_tensor(_rows(4))], "items": [_item(_tensor(_rows(2)), -1)]}, "prefix"),
}


@pytest.mark.parametrize("case", list(BAD_PREFIX_REQUESTS))
def test_bad_prefix_use_gets_a_422_naming_the_field(server: Process, case: str) -> None:
    body, needle = BAD_PREFIX_REQUESTS[case]
    r = httpx.post(f"{server.url}/score", json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert needle.lower() in json.dumps(r.json()["detail"]).lower(), r.text


def test_bad_prefix_use_in_a_binary_body_gets_the_same_answer(server: Process) -> None:
    payload = {"prefixes": [WireTensor.from_array(NAN_PREFIX)], "items": [_item(WireTensor.from_array(_rows(2)), 0)]}
    r = httpx.post(
        f"{server.url}/score",
        content=encode_binary(*pack_request(payload)),
        headers={"content-type": BINARY_CONTENT_TYPE},
        timeout=30,
    )
    assert r.status_code == 422 and "prefixes[0]" in r.text and "row 2" in r.text, r.text


def test_a_raw_request_with_zero_own_rows_after_a_prefix_is_scored(server: Process) -> None:
    rows = _rows(6)
    shared = {
        "prefixes": [_tensor(rows)],
        "items": [_item(_tensor(_rows(0)), 0), _item(_tensor(_rows(3)), 0)],
        "step": 50,
        "total_steps": 100,
    }
    full = {
        "items": [_item(_tensor(rows)), _item(_tensor(np.concatenate([rows, _rows(3)])))],
        "step": 50,
        "total_steps": 100,
    }
    a, b = (httpx.post(f"{server.url}/score", json=body, timeout=30) for body in (shared, full))
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    assert a.json()["rewards"] == pytest.approx(b.json()["rewards"], abs=1e-5)
