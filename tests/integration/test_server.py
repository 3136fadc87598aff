"""The real server (uvicorn on loopback, default model) driven by the real client and by raw HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import struct

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from r2m.client import AsyncR2MClient, InvalidRequest, R2MClient
from r2m.client.wire import BINARY_CONTENT_TYPE, WireTensor, encode_binary, pack_request

from .conftest import POLICY_DIM, Process

PROMPT = "How do I boil an egg?"
RESPONSES = [
    "Put the egg in cold water, bring it to a boil, simmer for nine minutes, then cool it in ice water.",
    "No idea. Look it up yourself.",
    "Eggs are laid by hens.",
]


def _hidden(n: int, rows: int = 12, dtype: np.dtype = np.float32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((rows + i, POLICY_DIM)).astype(dtype) for i in range(n)]


def test_rewards_with_and_without_hidden_states(server: Process) -> None:
    with R2MClient(server.url, max_retries=1) as client:
        plain = client.score(PROMPT, RESPONSES)
        assert plain.omega == 1.0 and plain.head_version == 0
        assert plain.rewards[0] > max(plain.rewards[1:]), "the default RM should prefer the helpful answer"
        hidden = _hidden(len(RESPONSES))
        at_t0 = client.score(PROMPT, RESPONSES, hidden, step=0, total_steps=100)
        assert at_t0.rewards == plain.rewards, "at t = 0 the reward is the plain RM's, exactly"
        late = client.score(PROMPT, RESPONSES, hidden, step=50, total_steps=100)
        assert late.omega == pytest.approx(0.6)
        assert all(abs(a - b) > 1e-6 for a, b in zip(late.rewards, plain.rewards))
        mixed = client.score(PROMPT, RESPONSES, [hidden[0], None, hidden[2]], step=50, total_steps=100)
        assert mixed.rewards[1] == plain.rewards[1]
        assert mixed.rewards[0] == pytest.approx(late.rewards[0], abs=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_json_and_binary_encodings_agree_for_every_dtype(server: Process, dtype: str) -> None:
    hidden = [torch.randn(10 + i, POLICY_DIM).to(getattr(torch, dtype)) for i in range(len(RESPONSES))]
    results = []
    for encoding in ("json", "binary"):
        with R2MClient(server.url, encoding=encoding, max_retries=1) as client:
            results.append(client.score(PROMPT, RESPONSES, hidden, step=30, total_steps=100).rewards)
    assert results[0] == results[1]


def test_raw_json_request_as_in_the_readme(server: Process) -> None:
    h = np.ones((4, POLICY_DIM), dtype=np.float32)
    body = {
        "items": [
            {
                "prompt": PROMPT,
                "response": RESPONSES[0],
                "policy_hidden": {
                    "dtype": "float32",
                    "shape": [4, POLICY_DIM],
                    "data": base64.b64encode(h.tobytes()).decode(),
                },
            },
            {"prompt": PROMPT, "response": RESPONSES[1]},
        ],
        "step": 10,
        "total_steps": 100,
    }
    r = httpx.post(f"{server.url}/score", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"rewards", "head_version", "omega"} and len(out["rewards"]) == 2


def _item(hidden: dict | None = None, prompt: str = PROMPT, response: str = "Boil it.") -> dict:
    item: dict = {"prompt": prompt, "response": response}
    if hidden is not None:
        item["policy_hidden"] = hidden
    return item


def _tensor(arr: np.ndarray, dtype: str = "float32") -> dict:
    return {"dtype": dtype, "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode()}


def _binary_body(payload: dict) -> bytes:
    meta, tensors = pack_request(payload)
    return encode_binary(meta, tensors)


GOOD = np.zeros((3, POLICY_DIM), dtype=np.float32)
NAN = GOOD.copy()
NAN[1, 5] = np.nan
INF = GOOD.copy()
INF[2, 0] = np.inf
HUGE = GOOD.copy()
HUGE[0, 3] = 3.0e38  # finite, but it once trained a NaN head

BAD_JSON_REQUESTS = {
    "wrong hidden width": (
        {"items": [_item(_tensor(np.zeros((3, 7), np.float32)))]},
        422,
        "R2M_POLICY_DIM=64",
    ),
    "hidden not 2-D": ({"items": [_item(_tensor(np.zeros(8, np.float32)))]}, 422, "policy_hidden"),
    "zero hidden rows": ({"items": [_item(_tensor(np.zeros((0, 64), np.float32)))]}, 422, "at least one"),
    "NaN in hidden": ({"items": [_item(_tensor(NAN))]}, 422, "row 1"),
    "Inf in hidden": ({"items": [_item(_tensor(INF))]}, 422, "non-finite"),
    "huge finite hidden": ({"items": [_item(_tensor(HUGE))]}, 422, "row 0, column 3 exceeds R2M_MAX_HIDDEN_ABS"),
    "too many hidden rows": (
        {"items": [_item(_tensor(np.zeros((513, 64), np.float32)))]},
        422,
        "R2M_MAX_HIDDEN_TOKENS=512",
    ),
    "empty prompt": ({"items": [_item(prompt="")]}, 422, "prompt"),
    "no items": ({"items": []}, 422, "items"),
    "missing response": ({"items": [{"prompt": "x"}]}, 422, "response"),
    "unknown field": ({"items": [_item()], "temperature": 1}, 422, "temperature"),
    "over-long text": ({"items": [_item(response="word " * 600)]}, 422, "limit of 512"),
    "too many items": ({"items": [_item()] * 257}, 413, "R2M_MAX_ITEMS_PER_REQUEST=256"),
    "step past total": ({"items": [_item()], "step": 11, "total_steps": 10}, 422, "total_steps"),
    "negative step": ({"items": [_item()], "step": -1}, 422, "step"),
    "unknown dtype": ({"items": [_item({"dtype": "int8", "shape": [1, 64], "data": "AA=="})]}, 422, "int8"),
    "malformed base64": (
        {"items": [_item({"dtype": "float32", "shape": [1, 64], "data": "@@@"})]},
        422,
        "base64",
    ),
    "data length mismatch": (
        {"items": [_item({"dtype": "float32", "shape": [2, 64], "data": base64.b64encode(b"\0" * 256).decode()})]},
        422,
        "bytes",
    ),
    "tensor not an object": ({"items": [_item("abc")]}, 422, "tensor"),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("case", list(BAD_JSON_REQUESTS))
def test_bad_json_input_gets_a_clear_4xx(server: Process, case: str) -> None:
    body, status, needle = BAD_JSON_REQUESTS[case]
    r = httpx.post(f"{server.url}/score", json=body, timeout=30)
    assert r.status_code == status, r.text
    detail = json.dumps(r.json()["detail"])
    assert needle.lower() in detail.lower(), detail


def _frame_with(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


BAD_RAW_REQUESTS = {
    "malformed JSON": (b'{"items": [', "application/json", 400, "JSON"),
    "not UTF-8": (b"\xff\xfe\x00", "application/json", 400, "JSON"),
    "truncated binary frame": (b"\x10\x00", BINARY_CONTENT_TYPE, 400, "binary"),
    "binary header beyond body": (struct.pack("<Q", 10**6) + b"{}", BINARY_CONTENT_TYPE, 400, "binary"),
    "binary without metadata": (_frame_with({}, b""), BINARY_CONTENT_TYPE, 400, "r2m"),
    "binary with unknown ref": (
        _frame_with({"__metadata__": {"r2m": json.dumps({"items": [_item({"ref": "nope"})]})}}, b""),
        BINARY_CONTENT_TYPE,
        400,
        "nope",
    ),
    "binary with unknown dtype": (
        _frame_with(
            {
                "__metadata__": {"r2m": json.dumps({"items": [_item({"ref": "t0"})]})},
                "t0": {"dtype": "I8", "shape": [1, 64], "data_offsets": [0, 64]},
            },
            b"\0" * 64,
        ),
        BINARY_CONTENT_TYPE,
        400,
        "I8",
    ),
    "binary NaN": (
        _binary_body({"items": [_item(WireTensor.from_array(NAN))]}),
        BINARY_CONTENT_TYPE,
        422,
        "row 1",
    ),
    "unsupported content type": (b"items=1", "application/x-www-form-urlencoded", 415, "Content-Type"),
}


@pytest.mark.parametrize("case", list(BAD_RAW_REQUESTS))
def test_bad_raw_input_gets_a_clear_4xx(server: Process, case: str) -> None:
    body, ctype, status, needle = BAD_RAW_REQUESTS[case]
    r = httpx.post(f"{server.url}/score", content=body, headers={"content-type": ctype}, timeout=30)
    assert r.status_code == status, r.text
    assert needle.lower() in json.dumps(r.json()["detail"]).lower(), r.text


def test_oversized_body_is_rejected_before_it_is_read(server: Process) -> None:
    big = np.zeros((400, POLICY_DIM), dtype=np.float32)  # 100 KiB per item as base64
    r = httpx.post(f"{server.url}/score", json={"items": [_item(_tensor(big))] * 50}, timeout=30)
    assert r.status_code == 413
    assert "R2M_MAX_REQUEST_BYTES" in r.json()["detail"]


def test_oversized_chunked_body_without_length_is_rejected(server: Process) -> None:
    def chunks():
        for _ in range(80):
            yield b" " * 65536

    r = httpx.post(f"{server.url}/score", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413


def test_client_rejects_mismatched_counts_before_sending(server: Process) -> None:
    with R2MClient(server.url, max_retries=0) as client:
        with pytest.raises(InvalidRequest):
            client.score(["a", "b", "c"], ["x", "y"])
        with pytest.raises(InvalidRequest):
            client.score(PROMPT, RESPONSES, _hidden(2))


def test_server_stays_healthy_after_a_stream_of_bad_requests(server: Process) -> None:
    for body, _, _ in list(BAD_JSON_REQUESTS.values()) * 3:
        httpx.post(f"{server.url}/score", json=body, timeout=30)
    for body, ctype, _, _ in BAD_RAW_REQUESTS.values():
        httpx.post(f"{server.url}/score", content=body, headers={"content-type": ctype}, timeout=30)
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    with R2MClient(server.url, max_retries=0) as client:
        assert len(client.score(PROMPT, RESPONSES, _hidden(3), step=5, total_steps=10).rewards) == 3
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'status="500"' not in metrics


def _metric(text: str, name: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_concurrent_requests_are_merged_into_batches(server: Process) -> None:
    before = httpx.get(f"{server.url}/metrics").text
    n = 48

    async def burst() -> list[float]:
        async with AsyncR2MClient(server.url, max_retries=0, timeout=60) as client:
            results = await asyncio.gather(
                *[client.score(PROMPT, [f"{RESPONSES[i % 3]} ({i})"], _hidden(1, seed=i)) for i in range(n)]
            )
        return [r.rewards[0] for r in results]

    rewards = asyncio.run(burst())
    assert len(rewards) == n and all(np.isfinite(rewards))
    after = httpx.get(f"{server.url}/metrics").text
    batches = sum(_metric(after, "r2m_batch_requests_count").values()) - sum(
        _metric(before, "r2m_batch_requests_count").values()
    )
    merged_requests = sum(_metric(after, "r2m_batch_requests_sum").values()) - sum(
        _metric(before, "r2m_batch_requests_sum").values()
    )
    assert merged_requests == n
    assert batches < n, f"{n} concurrent requests ran in {batches} batches: none were merged"
    # The same rewards come back when the requests run one by one: batching changes nothing but speed.
    with R2MClient(server.url, max_retries=0) as client:
        single = client.score(PROMPT, [f"{RESPONSES[0]} (0)"], _hidden(1, seed=0)).rewards[0]
    assert single == pytest.approx(rewards[0], abs=1e-5)


def test_metrics_report_requests_tokens_and_load_time(server: Process) -> None:
    text = httpx.get(f"{server.url}/metrics").text
    requests = _metric(text, "r2m_http_requests_total")
    assert any(dict(k).get("route") == "/score" and dict(k).get("status") == "200" for k in requests)
    assert sum(_metric(text, "r2m_tokens_scored_total").values()) > 0
    assert sum(_metric(text, "r2m_model_load_seconds").values()) > 0
    assert sum(_metric(text, "r2m_http_request_duration_seconds_count").values()) > 0


def test_info_describes_the_model(server: Process) -> None:
    with R2MClient(server.url, max_retries=0) as client:
        info = client.info()
    assert info["model"] == "default" and info["rm_dim"] == 384 and info["policy_dim"] == POLICY_DIM
    assert info["max_tokens"] == 512 and info["auth"] is False
