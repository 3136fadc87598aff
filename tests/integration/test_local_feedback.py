"""Local feedback against a real server: `/embed`, read-outs computed next to the policy, `/score` with them.

The server runs the default model with its embedded worker (an in-memory head store), so posted preferences
publish new head versions that the replica swaps to while the tests score.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from r2m.client import InvalidRequest, R2MClient, StaleHead
from r2m.client.wire import tensor_to_json
from r2m.trainer.local import LocalFeedbackClient

from .conftest import POLICY_DIM, SMALL_SERVER_ENV, Process, start_server

ENV = {**SMALL_SERVER_ENV, "R2M_TRAIN_LR": "1e-2", "R2M_TRAIN_STEPS": "2", "R2M_HEAD_POLL_S": "0.1",
       "R2M_GUARD": "false", "OMP_NUM_THREADS": "1"}  # fmt: skip
PROMPT = "How do I boil an egg?"
RESPONSES = ["Simmer it for nine minutes.", "No idea.", "Eggs come from hens.", "Boil water, add the egg, wait."]
TOLERANCE = 1e-5  # absolute, on rewards of magnitude ~1-5: float32 reduction-order noise between two batchings


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    with start_server(tmp_path_factory.mktemp("local"), ENV) as s:
        yield s


def _hidden(n: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(12 + 5 * i, POLICY_DIM, generator=g).to(dtype) for i in range(n)]


def _advance(rm: R2MClient, seed: int) -> int:
    """Post one group, wait for the replica to serve the version it makes; returns that version."""
    before = rm.current_head()["served_version"]
    hidden = _hidden(len(RESPONSES), torch.float32, seed)
    rm.post_preferences([{"prompt": PROMPT, "responses": RESPONSES, "hidden": hidden}], step=1, total_steps=4)
    deadline = time.monotonic() + 60
    while rm.current_head()["served_version"] == before:
        assert time.monotonic() < deadline, "the posted batch never became a served head"
        time.sleep(0.05)
    return rm.current_head()["served_version"]


def _score_requests(server: Process) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith("r2m_http_requests_total{") and
               'route="/score"' in x)  # fmt: skip


@pytest.mark.parametrize("rewards_on", ["policy", "server"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_read_outs_give_the_rewards_of_server_side_feedback(
    server: Process, dtype: torch.dtype, rewards_on: str
) -> None:
    with R2MClient(server.url) as rm:
        local = LocalFeedbackClient(rm, rewards_on=rewards_on)  # type: ignore[arg-type]
        for round_ in range(2):  # version 0, then a trained head
            hidden = _hidden(len(RESPONSES), dtype, seed=round_)
            served = rm.score(PROMPT, RESPONSES, hidden=hidden, step=2, total_steps=4, share_prefix=False)
            before = _score_requests(server)
            mine = local.score(PROMPT, RESPONSES, hidden=hidden, step=2, total_steps=4)
            assert _score_requests(server) - before == (0 if rewards_on == "policy" else 1)  # one round trip or two
            assert mine.head_version == served.head_version
            assert mine.omega == served.omega < 1
            np.testing.assert_allclose(mine.rewards, served.rewards, rtol=0, atol=TOLERANCE)
            plain = rm.score(PROMPT, RESPONSES)
            assert not np.allclose(mine.rewards, plain.rewards, atol=1e-3), "the feedback really moved the rewards"
            if round_ == 0:
                _advance(rm, seed=10)
        assert local.heads_fetched == 2 and local.server_finished == 0


def test_a_stale_head_version_gets_409_and_the_client_retry_lands_on_the_new_one(server: Process) -> None:
    with R2MClient(server.url) as rm:
        hidden = _hidden(len(RESPONSES), torch.float32, seed=3)
        emb = rm.embed(PROMPT, RESPONSES)
        old = emb.head_version
        local = LocalFeedbackClient(rm, rewards_on="server")
        readouts = local.readouts(old, torch.from_numpy(emb.embeddings), hidden)
        new = _advance(rm, seed=11)
        with pytest.raises(StaleHead) as info:
            rm.score(PROMPT, RESPONSES, readouts=readouts, head_version=old, step=2, total_steps=4)
        assert info.value.status_code == 409 and info.value.head_version == new
        assert f"serves version {new}" in str(info.value)

        # The wrapper meets the same 409 (its /embed answer names the old version) and recomputes with the new head.
        real_embed = rm.embed
        rm.embed = lambda *a, **k: type(emb)(real_embed(*a, **k).embeddings, emb.rewards, old)  # type: ignore[method-assign]
        try:
            result = local.score(PROMPT, RESPONSES, hidden=hidden, step=2, total_steps=4)
        finally:
            del rm.embed
        assert result.head_version == new and local.stale_retries == 1
        served = rm.score(PROMPT, RESPONSES, hidden=hidden, step=2, total_steps=4, share_prefix=False)
        np.testing.assert_allclose(result.rewards, served.rewards, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("rewards_on", ["policy", "server"])
def test_swaps_during_a_stream_of_local_requests_fail_none(server: Process, rewards_on: str) -> None:
    stop = threading.Event()
    published: list[int] = []

    def keep_publishing() -> None:
        with R2MClient(server.url) as rm:
            seed = 100
            while not stop.is_set() and len(published) < 6:
                published.append(_advance(rm, seed))
                seed += 1

    with R2MClient(server.url) as rm:
        local = LocalFeedbackClient(rm, rewards_on=rewards_on)  # type: ignore[arg-type]
        start = rm.current_head()["served_version"]
        publisher = threading.Thread(target=keep_publishing, daemon=True)
        publisher.start()
        versions, failures = [], []
        deadline = time.monotonic() + 120
        while (publisher.is_alive() or len(versions) < 20) and time.monotonic() < deadline:
            try:
                r = local.score(PROMPT, RESPONSES, hidden=_hidden(len(RESPONSES), torch.bfloat16, len(versions)),
                                step=2, total_steps=4)  # fmt: skip
                versions.append(r.head_version)
            except Exception as exc:  # noqa: BLE001 - counted, then asserted to be none
                failures.append(repr(exc))
        stop.set()
        publisher.join(timeout=60)
    assert not failures, failures[:3]
    assert len(published) >= 3 and max(versions) > start, (published, versions[:5], versions[-5:])
    assert versions == sorted(versions)  # one replica: a request never goes back to an older head


def test_bad_read_outs_get_a_clear_422(server: Process) -> None:
    info = httpx.get(f"{server.url}/info").json()
    rm_dim = info["rm_dim"]
    good = tensor_to_json(np.zeros(rm_dim, np.float32))
    cases = {
        "shape": ({"readout": tensor_to_json(np.zeros(rm_dim + 1, np.float32))}, 0, "expected shape"),
        "nan": ({"readout": tensor_to_json(np.full(rm_dim, np.nan, np.float32))}, 0, "non-finite"),
        "no version": ({"readout": good}, None, "needs the request's head_version"),
        "both": ({"readout": good, "policy_hidden": tensor_to_json(np.zeros((2, POLICY_DIM), np.float32))}, 0,
                 "either policy_hidden"),
    }  # fmt: skip
    for name, (extra, version, message) in cases.items():
        body: dict = {"items": [{"prompt": PROMPT, "response": RESPONSES[0], **extra}], "step": 1, "total_steps": 4}
        if version is not None:
            body["head_version"] = httpx.get(f"{server.url}/heads/current").json()["served_version"]
        r = httpx.post(f"{server.url}/score", json=body)
        assert r.status_code == 422 and message in r.text, (name, r.status_code, r.text[:300])
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_embed_returns_the_plain_rewards_and_caches_what_score_reuses(server: Process, tmp_path: Path) -> None:
    with R2MClient(server.url) as rm:
        emb = rm.embed(PROMPT, RESPONSES)
        plain = rm.score(PROMPT, RESPONSES)
        assert emb.embeddings.shape == (len(RESPONSES), rm.info()["rm_dim"]) and emb.embeddings.dtype == np.float32
        np.testing.assert_allclose(emb.rewards, plain.rewards, rtol=0, atol=TOLERANCE)

        def hits() -> float:
            text = httpx.get(f"{server.url}/metrics").text
            line = next(x for x in text.splitlines() if x.startswith('r2m_embed_cache_total{result="hit"}'))
            return float(line.split()[-1])

        before = hits()
        LocalFeedbackClient(rm, rewards_on="server").score(PROMPT, RESPONSES, hidden=_hidden(len(RESPONSES),
                                                           torch.float32, 5), step=1, total_steps=4)  # fmt: skip
        assert hits() - before == len(RESPONSES)  # /score with read-outs ran no backbone forward for them


def test_read_outs_of_texts_the_replica_has_not_embedded_get_the_rewards_of_cached_ones(server: Process) -> None:
    """/score with read-outs takes a path without tokenizing when every RTE is cached; a text /embed never saw (a
    replica behind a load balancer that did not get the /embed) is tokenized and run through the backbone."""
    with R2MClient(server.url) as rm:
        responses = [f"{r} (not embedded before)" for r in RESPONSES]
        rng = np.random.default_rng(7)
        readouts = [rng.standard_normal(rm.info()["rm_dim"]).astype(np.float32) for _ in responses]
        version = rm.current_head()["served_version"]
        kw = {"readouts": readouts, "head_version": version, "step": 1, "total_steps": 4}
        missed = rm.score(PROMPT, responses, **kw)
        rm.embed(PROMPT, responses)
        cached = rm.score(PROMPT, responses, **kw)
    assert missed.head_version == cached.head_version == version
    np.testing.assert_allclose(missed.rewards, cached.rewards, rtol=0, atol=TOLERANCE)
    assert len(set(np.round(cached.rewards, 4))) == len(responses)  # the read-outs and texts matter


def test_where_the_policy_side_cannot_finish_the_server_does(server: Process) -> None:
    """A reward that is not finite at the policy, or a head version gone from the store (404): the call goes to
    /score with the read-outs, and its rewards are the server's."""
    hidden = _hidden(len(RESPONSES), torch.float32, seed=21)
    with R2MClient(server.url) as rm:
        served = rm.score(PROMPT, RESPONSES, hidden=hidden, step=2, total_steps=4, share_prefix=False)
        local = LocalFeedbackClient(rm)
        head = local.head(served.head_version)
        broken = copy.deepcopy(head)
        broken.score.weight.data.fill_(float("inf"))
        local._heads[served.head_version] = broken  # what a head gone bad at the policy would give
        before = _score_requests(server)
        result = local.score(PROMPT, RESPONSES, hidden=hidden, step=2, total_steps=4)
        assert local.server_finished == 1 and _score_requests(server) - before == 1
        np.testing.assert_allclose(result.rewards, served.rewards, rtol=0, atol=TOLERANCE)

        # /embed named a version the store no longer keeps (heads moving faster than R2M_HEAD_KEEP): its download
        # is a real 404, and the server finishes with the version it serves.
        gone = LocalFeedbackClient(rm)
        real_embed = rm.embed
        rm.embed = lambda *a, **k: dataclasses.replace(real_embed(*a, **k), head_version=10**6)  # type: ignore[method-assign]
        try:
            result = gone.score(PROMPT, RESPONSES, hidden=hidden, step=2, total_steps=4)
        finally:
            del rm.embed
        assert result.head_version == served.head_version
        np.testing.assert_allclose(result.rewards, served.rewards, rtol=0, atol=TOLERANCE)
        assert gone.server_finished == 1
        # A server from before /info named its aggregation: the server finishes, and /info is asked once.
        older = LocalFeedbackClient(rm)
        asked = []
        real_info = rm.info
        rm.info = lambda: asked.append(1) or {k: v for k, v in real_info().items() if k != "aggregation"}  # type: ignore[method-assign]
        try:
            results = [older.score(PROMPT, RESPONSES, hidden=hidden, step=2, total_steps=4) for _ in range(2)]
        finally:
            del rm.info
        assert older.server_finished == 2 and len(asked) == 1
        np.testing.assert_allclose(results[1].rewards, served.rewards, rtol=0, atol=TOLERANCE)
        with pytest.raises(InvalidRequest, match="step"):  # the caller's error, named before any request
            gone.score(PROMPT, RESPONSES, hidden=hidden, step=5, total_steps=4)
