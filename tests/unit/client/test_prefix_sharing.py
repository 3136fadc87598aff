"""Prompt-prefix sharing in the client: the split of full hidden states into one shared prefix per group plus each
response's own rows, checked bit for bit on the decoded requests (docs/api.md, "Prompt-prefix sharing")."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from r2m.client import InvalidRequest, WireTensor
from r2m.client._client import common_prefix_rows

from .test_client import FakeService, make_async_client, make_client

D = 16


def group(k: int, prompt_rows: int, response_rows: list[int], dtype=torch.bfloat16, seed: int = 0) -> list:
    """K full sequences whose first `prompt_rows` rows are equal (a causal policy's prompt) and the rest differ."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randn(prompt_rows, D, generator=g).to(dtype)
    return [torch.cat([prompt, torch.randn(response_rows[j], D, generator=g).to(dtype)]) for j in range(k)]


def raw(x) -> np.ndarray:
    """The bytes of a tensor as a flat uint8 array, to compare bit for bit."""
    return np.frombuffer(WireTensor.from_array(x).data, np.uint8)


def rebuilt(service: FakeService) -> list[np.ndarray | None]:
    """Every item's whole hidden states (prefix + own rows) as raw bytes, in the order the requests carried them."""
    out: list[np.ndarray | None] = []
    for body in service.decoded:
        prefixes = body.get("prefixes", [])
        for item in body["items"]:
            if "policy_hidden" not in item:
                out.append(None)
                continue
            own = np.frombuffer(item["policy_hidden"].data, np.uint8)
            front = np.frombuffer(prefixes[item["prefix"]].data, np.uint8) if item.get("prefix") is not None else []
            out.append(np.concatenate([front, own]))
    return out


@pytest.mark.parametrize("encoding", ["binary", "json"])
def test_a_ragged_group_sends_its_prompt_rows_once_and_rebuilds_bit_for_bit(encoding: str) -> None:
    hidden = group(4, prompt_rows=12, response_rows=[3, 7, 1, 5])
    service = FakeService()
    with make_client(service, encoding=encoding) as client:
        result = client.score("p", [f"r{i}" for i in range(4)], hidden, step=1, total_steps=2)
    (body,) = service.decoded
    assert len(body["prefixes"]) == 1 and body["prefixes"][0].shape == (12, D)
    assert [item["prefix"] for item in body["items"]] == [0, 0, 0, 0]
    assert [item["policy_hidden"].shape[0] for item in body["items"]] == [3, 7, 1, 5]
    assert all(np.array_equal(a, raw(h)) for a, h in zip(rebuilt(service), hidden))
    assert result.rewards == pytest.approx([i + float(h.float().sum()) for i, h in enumerate(hidden)], rel=1e-6)


def test_the_shared_run_ends_at_the_first_row_that_differs_in_any_response() -> None:
    hidden = group(3, prompt_rows=6, response_rows=[4, 4, 4])
    hidden[2] = hidden[2].clone()
    hidden[2][3, 5] = hidden[2][3, 5] + 1  # response 2 departs at row 3: only 3 rows are common to all
    assert common_prefix_rows([WireTensor.from_array(h) for h in hidden]) == 3
    service = FakeService()
    with make_client(service) as client:
        client.score("p", ["r0", "r1", "r2"], hidden)
    assert service.decoded[0]["prefixes"][0].shape == (3, D)
    assert all(np.array_equal(a, raw(h)) for a, h in zip(rebuilt(service), hidden))


def test_negative_zero_is_not_zero_for_the_split() -> None:
    a = np.zeros((4, D), np.float32)
    b = a.copy()
    b[0, 0] = -0.0  # equal as floats, different bits: sharing must not merge them
    assert common_prefix_rows([WireTensor.from_array(a), WireTensor.from_array(b)]) == 0


def test_no_common_prefix_and_a_lone_response_send_no_prefixes() -> None:
    rng = np.random.default_rng(0)
    hidden = [rng.standard_normal((5, D)).astype(np.float32) for _ in range(3)]
    alone = group(1, 8, [2])
    service = FakeService()
    with make_client(service) as client:
        client.score(["p", "p", "p", "q"], ["r0", "r1", "r2", "r3"], [*hidden, *alone])
    assert "prefixes" not in service.decoded[0] and all("prefix" not in it for it in service.decoded[0]["items"])
    assert all(np.array_equal(a, raw(h)) for a, h in zip(rebuilt(service), [*hidden, *alone]))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy_inputs_and_groups_interleaved_with_other_prompts(dtype) -> None:
    rng = np.random.default_rng(1)
    shared = {p: rng.standard_normal((n, D)).astype(dtype) for p, n in (("a", 5), ("b", 9))}
    prompts = ["a", "b", "a", "x", "b", "a"]
    hidden: list = [
        np.concatenate([shared[p], rng.standard_normal((2 + i, D)).astype(dtype)]) if p in shared else None
        for i, p in enumerate(prompts)
    ]
    service = FakeService()
    with make_client(service) as client:
        client.score(prompts, [f"r{i}" for i in range(6)], hidden)
    body = service.decoded[0]
    assert [t.shape[0] for t in body["prefixes"]] == [5, 9]  # in order of first use
    assert [it.get("prefix") for it in body["items"]] == [0, 1, 0, None, 1, 0]
    assert all((a is None and h is None) or np.array_equal(a, raw(h)) for a, h in zip(rebuilt(service), hidden))


def test_identical_sequences_leave_zero_own_rows() -> None:
    h = group(1, 4, [2])[0]
    service = FakeService()
    with make_client(service) as client:
        client.score("p", ["r0", "r1"], [h, h.clone()])
    items = service.decoded[0]["items"]
    assert service.decoded[0]["prefixes"][0].shape == (6, D)
    assert [it["policy_hidden"].shape for it in items] == [(0, D), (0, D)]


def test_share_prefix_false_sends_full_sequences() -> None:
    hidden = group(3, 8, [2, 3, 4])
    service = FakeService()
    with make_client(service) as client:
        client.score("p", ["r0", "r1", "r2"], hidden, share_prefix=False)
    assert "prefixes" not in service.decoded[0]
    assert [it["policy_hidden"].shape[0] for it in service.decoded[0]["items"]] == [10, 11, 12]


@pytest.mark.parametrize("encoding", ["binary", "json"])
def test_every_chunk_carries_the_prefixes_its_items_use(encoding: str) -> None:
    hidden = group(8, 10, [1, 2, 3, 4, 5, 6, 7, 8], seed=1) + group(2, 7, [3, 3], seed=2)
    prompts = ["p"] * 8 + ["q"] * 2
    service = FakeService()
    with make_client(service, encoding=encoding, max_items_per_request=3) as client:
        result = client.score(prompts, [f"r{i}" for i in range(10)], hidden)
    assert service.batch_sizes == [3, 3, 3, 1]
    assert [[t.shape[0] for t in body["prefixes"]] for body in service.decoded] == [[10], [10], [10, 7], [7]]
    assert all(np.array_equal(a, raw(h)) for a, h in zip(rebuilt(service), hidden))
    assert result.rewards == pytest.approx([i + float(h.float().sum()) for i, h in enumerate(hidden)], rel=1e-6)


def test_the_byte_budget_counts_a_prefix_once_per_chunk() -> None:
    # float32, D=16: a row is 64 bytes. Prefix 20 rows = 1280 bytes, own rows 2 x 64 = 128 bytes each.
    hidden = group(6, 20, [2] * 6, dtype=torch.float32)
    service = FakeService()
    with make_client(service, max_bytes_per_request=1700) as client:
        client.score("p", [f"r{i}" for i in range(6)], hidden)
    # 1280 + 3 x (128 + 4 text bytes) = 1676 fits, a 4th item does not; the next chunk pays the prefix again.
    assert service.batch_sizes == [3, 3]
    assert all(len(body["prefixes"]) == 1 for body in service.decoded)


def test_explicit_prefix_lengths_skip_the_search() -> None:
    hidden = group(3, 6, [2, 3, 4])
    service = FakeService()
    with make_client(service) as client:
        client.score("p", ["r0", "r1", "r2"], hidden, prefix_lengths=4)  # fewer rows than the common 6
        client.score("p", ["r0", "r1", "r2"], hidden, prefix_lengths=[6, 6, None])
    first, second = service.decoded
    assert first["prefixes"][0].shape == (4, D)
    assert second["prefixes"][0].shape == (6, D) and [it.get("prefix") for it in second["items"]] == [0, 0, None]
    assert all(np.array_equal(a, raw(h)) for a, h in zip(rebuilt(service), hidden + hidden))


@pytest.mark.parametrize(
    ("lengths", "match"),
    [
        ([1, 2], "a sequence of 3"),
        ([99, 1, 1], r"prefix_lengths\[0\]=99"),
        ([-1, 1, 1], "prefix_lengths"),
        ("3", "an int or a sequence"),
    ],
)
def test_bad_prefix_lengths_are_rejected_before_sending(lengths, match: str) -> None:
    service = FakeService()
    with make_client(service) as client, pytest.raises(InvalidRequest, match=match):
        client.score("p", ["r0", "r1", "r2"], group(3, 2, [1, 1, 1]), prefix_lengths=lengths)
    assert service.requests == []


def test_async_client_shares_prefixes_too() -> None:
    hidden = group(4, 9, [2, 2, 3, 3])

    async def main() -> list[float]:
        service = FakeService()
        async with make_async_client(service, max_items_per_request=2) as client:
            result = await client.score("p", ["r0", "r1", "r2", "r3"], hidden)
        assert all(body["prefixes"][0].shape == (9, D) for body in service.decoded)
        assert all(np.array_equal(a, raw(h)) for a, h in zip(rebuilt(service), hidden))
        return result.rewards

    rewards = asyncio.run(main())
    assert rewards == pytest.approx([i + float(h.float().sum()) for i, h in enumerate(hidden)], rel=1e-6)
