"""The update path in-process: head store semantics, the trainer's GREBT step, the worker loop, embedded mode."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from r2m.client.wire import (
    BINARY_CONTENT_TYPE,
    WireTensor,
    encode_binary,
    jsonify_request,
    pack_request,
    tensor_to_json,
)
from r2m.service.api.app import create_app
from r2m.service.backbone import Encoded
from r2m.service.config import ServiceSettings
from r2m.service.engine import build_engine
from r2m.service.headcodec import head_from_bytes, head_to_bytes, optimizer_from_bytes, optimizer_to_bytes, sha256
from r2m.service.headstore import Conflict, MemoryHeadStore, rollback
from r2m.service.model import HeadConfig, R2MHead
from r2m.service.queue import MemoryPreferenceQueue
from r2m.service.rtecache import RTECache
from r2m.service.schemas import PreferencesRequest, as_payload
from r2m.service.update.training import HeadTrainer
from r2m.service.update.worker import Worker, decode_batch

P = 8  # policy width of these tests


def _settings(tiny: Path, **kw) -> ServiceSettings:
    base = dict(model=str(tiny), policy_dim=P, attn_dim=8, device="cpu", train_lr=1e-2, train_steps=10)
    return ServiceSettings(**{**base, **kw})


def _h(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, P)).astype(np.float32)


def _request(step: int = 50, batch_id: str | None = None, hidden: bool = True) -> PreferencesRequest:
    responses = ["the answer is good", "no", "thanks for the question", "you can cook with some water"]
    group = {"prompt": "hello what is the answer", "responses": responses}
    if hidden:
        group["hidden"] = [WireTensor.from_array(_h(4 + i, i)) for i in range(4)]
    pair = {"prompt": "help me cook", "chosen": "you can cook with some water", "rejected": "no"}
    if hidden:
        pair |= {"chosen_hidden": WireTensor.from_array(_h(5, 10)), "rejected_hidden": WireTensor.from_array(_h(3, 11))}
    return PreferencesRequest.model_validate(
        {"groups": [group], "pairs": [pair], "step": step, "total_steps": 100, "batch_id": batch_id}
    )


def _body(req: PreferencesRequest) -> bytes:
    return encode_binary(*pack_request(as_payload(req)))


# --- head store ------------------------------------------------------------------------------------------------


def test_memory_store_versions_conflicts_pruning_and_rollback() -> None:
    store = MemoryHeadStore(keep=3)
    v0 = store.publish(parent=None, weights=b"w0", optim=None, meta={"config": {}}, batch_ids=[])
    assert v0["version"] == 0 and v0["sha256"] == sha256(b"w0")
    with pytest.raises(Conflict):
        store.publish(parent=None, weights=b"x", optim=None, meta={}, batch_ids=["a"])
    for i in range(1, 5):
        store.publish(parent=i - 1, weights=f"w{i}".encode(), optim=b"o", meta={}, batch_ids=[f"b{i}"])
    assert store.latest() == 4 and store.versions() == [2, 3, 4]
    assert store.applied(["b1", "b4", "zz"]) == {"b1", "b4"}, "the ledger outlives pruned versions"
    back = rollback(store, 2)
    assert back["version"] == 5 and back["rollback_of"] == 2 and store.weights(5) == b"w2"
    with pytest.raises(KeyError):
        rollback(store, 0)  # pruned
    assert store.wait_for_change(4, timeout=0.01) == 5


def test_head_and_optimizer_round_trip_without_pickle() -> None:
    torch.manual_seed(0)
    head = R2MHead(HeadConfig(rm_dim=6, policy_dim=P, attn_dim=4, n_heads=2, score_bias=True))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    e, w = torch.randn(3, 6), torch.full((3,), 0.5)
    h, mask = torch.randn(3, 5, P), torch.ones(3, 5, dtype=torch.bool)
    head(e, w, h, mask).sum().backward()
    opt.step()
    clone = head_from_bytes(head_to_bytes(head), head.config)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), clone.state_dict().values()))
    opt2 = torch.optim.AdamW(clone.parameters(), lr=1.0)
    optimizer_from_bytes(opt2, optimizer_to_bytes(opt))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == 1e-3
    for k in s1["state"]:
        for name, value in s1["state"][k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(s2["state"][k][name]))
    with pytest.raises(ValueError, match="do not fit"):
        head_from_bytes(head_to_bytes(head), HeadConfig(rm_dim=6, policy_dim=P + 1, attn_dim=4, n_heads=2))


def test_rte_cache_evicts_least_recently_used() -> None:
    cache = RTECache(max_bytes=3 * 4 * 4)  # three float32 vectors of 4
    keys = [RTECache.key("p", str(i)) for i in range(4)]
    for k in keys[:3]:
        cache.put(k, torch.zeros(4))
    assert cache.get(keys[0]) is not None  # 0 is now the most recently used
    cache.put(keys[3], torch.zeros(4))
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and len(cache) == 3
    assert RTECache.key("ab", "c") != RTECache.key("a", "bc")


# --- trainer ---------------------------------------------------------------------------------------------------


def test_update_widens_the_labelled_margin_and_uses_the_cache(tiny_neox_rm: Path) -> None:
    settings = _settings(tiny_neox_rm)
    trainer = HeadTrainer(build_engine(settings), settings)
    req = _request()
    pair = req.pairs[0]

    def margin() -> float:
        rte = trainer.rtes([pair.prompt, pair.prompt], [pair.chosen, pair.rejected])
        h = [pair.chosen_hidden.to_torch(), pair.rejected_hidden.to_torch()]
        from r2m.service.scoring import score_rte

        with torch.no_grad():
            r = score_rte(trainer.head, rte, h, [0.8, 0.8])
        return float(r[0] - r[1])

    before = margin()
    attn_before = trainer.head.attention.w_k.weight.detach().clone()
    stats = trainer.update([req])
    assert margin() > before
    assert not torch.equal(trainer.head.attention.w_k.weight, attn_before), "feedback attention must train"
    assert stats.groups == 1 and stats.pairs == 1 and stats.bt > 0 and stats.gre > 0
    assert (stats.rte_hits, stats.rte_misses) == (2, 4), "margin() already embedded the pair's two texts"
    again = trainer.update([req])
    assert (again.rte_hits, again.rte_misses) == (6, 0)


def test_feedback_free_update_trains_only_the_score_layer(tiny_neox_rm: Path) -> None:
    settings = _settings(tiny_neox_rm)
    trainer = HeadTrainer(build_engine(settings), settings)
    attn = {k: v.clone() for k, v in trainer.head.attention.state_dict().items()}
    score = trainer.head.score.weight.detach().clone()
    trainer.update([_request(hidden=False)])
    assert all(torch.equal(v, trainer.head.attention.state_dict()[k]) for k, v in attn.items())
    assert not torch.equal(score, trainer.head.score.weight)


def test_the_score_layer_can_have_its_own_learning_rate(tiny_neox_rm: Path) -> None:
    moved = {}
    for lr_score in (None, 1.0):
        settings = _settings(tiny_neox_rm, train_lr=1e-3, train_steps=3, train_lr_score=lr_score)
        trainer = HeadTrainer(build_engine(settings), settings)
        phi, wk = trainer.head.score.weight.detach().clone(), trainer.head.attention.w_k.weight.detach().clone()
        trainer.update([_request()])
        moved[lr_score] = (
            float((trainer.head.score.weight - phi).abs().max()),
            float((trainer.head.attention.w_k.weight - wk).abs().max()),
        )
        assert len(trainer.opt.param_groups) == (1 if lr_score is None else 2)
    assert moved[1.0][0] > 100 * moved[None][0], moved  # phi at 1.0 against 1e-3
    assert moved[1.0][1] == pytest.approx(moved[None][1], rel=0.5), moved  # the attention at 1e-3 either way


def test_ranking_by_given_rewards_changes_the_pair(tiny_neox_rm: Path) -> None:
    settings = _settings(tiny_neox_rm, rank_by="given", train_steps=1)
    a = HeadTrainer(build_engine(settings), settings)
    req = _request()
    req.groups[0].rewards = [0.0, 5.0, 1.0, 2.0]
    req.pairs.clear()
    stats_given = a.update([req])
    settings_r = _settings(tiny_neox_rm, train_steps=1)
    b = HeadTrainer(build_engine(settings_r), settings_r)
    stats_recomputed = b.update([req])
    assert stats_given.gre == pytest.approx(stats_recomputed.gre)
    assert stats_given.bt != pytest.approx(stats_recomputed.bt)


# --- worker loop -----------------------------------------------------------------------------------------------


def test_worker_publishes_once_per_batch_and_skips_replays(tiny_neox_rm: Path) -> None:
    settings = _settings(tiny_neox_rm, train_steps=2)
    queue, store = MemoryPreferenceQueue(), MemoryHeadStore(keep=10)
    worker = Worker(HeadTrainer(build_engine(settings), settings), queue, store, block_ms=10)
    queue.add("b1", _body(_request(batch_id="b1")))
    queue.add("b1", _body(_request(batch_id="b1")))  # a client retry of the same batch
    assert worker.run_once() == 1
    assert store.latest() == 1 and store.meta(1)["batch_ids"] == ["b1"] and store.meta(0)["batch_ids"] == []
    assert queue.stats() == {"length": 0, "pending": 0, "lag": 0}
    queue.add("b1", _body(_request(batch_id="b1")))  # replayed after publication
    assert worker.run_once() == 0 and store.latest() == 1
    assert worker.metrics.skipped._value.get() == 1


def test_worker_retrains_on_top_of_a_version_published_by_another_worker(tiny_neox_rm: Path) -> None:
    settings = _settings(tiny_neox_rm, train_steps=1)
    model = build_engine(settings)
    queue, store = MemoryPreferenceQueue(), MemoryHeadStore(keep=10)
    w1 = Worker(HeadTrainer(model, settings), queue, store, block_ms=10)
    w2 = Worker(HeadTrainer(model, settings), queue, store, block_ms=10)
    w1.sync()
    w2.sync()
    queue.add("a", _body(_request(batch_id="a")))
    assert w1.run_once() == 1  # version 1
    queue.add("b", _body(_request(batch_id="b")))
    assert w2.run_once() == 1  # w2's head was at 0: it must reload 1, then publish 2 on top of it
    assert store.latest() == 2 and store.meta(2)["parent"] == 1
    assert torch.equal(
        head_from_bytes(store.weights(2), model.head_config).score.weight, w2.trainer.head.score.weight.detach()
    )


def test_a_batch_left_pending_by_a_dead_worker_is_taken_over(tiny_neox_rm: Path) -> None:
    settings = _settings(tiny_neox_rm, train_steps=1)
    queue, store = MemoryPreferenceQueue(), MemoryHeadStore(keep=10)
    queue.add("orphan", _body(_request(batch_id="orphan")))
    assert [m.batch_id for m in queue.read("dead-worker", 10, 10)] == ["orphan"]  # then the worker dies
    worker = Worker(HeadTrainer(build_engine(settings), settings), queue, store, claim_idle_ms=50, block_ms=10)
    time.sleep(0.06)
    assert worker.run_once() == 1
    assert store.meta(store.latest())["batch_ids"] == ["orphan"] and queue.stats()["pending"] == 0


def test_an_update_that_goes_non_finite_is_never_published_and_ends_a_dead_letter(tiny_neox_rm: Path) -> None:
    # A runaway learning rate: the first step puts the weights near the float32 limit, the second step's forward
    # overflows. Validated input, and still a head that must never reach a replica.
    settings = _settings(tiny_neox_rm, train_lr=1e30, train_steps=2)
    queue, store = MemoryPreferenceQueue(), MemoryHeadStore(keep=10)
    worker = Worker(HeadTrainer(build_engine(settings), settings), queue, store, block_ms=10, claim_idle_ms=1,
                    max_attempts=2)  # fmt: skip
    worker.sync()
    v0 = store.weights(0)
    queue.add("runaway", _body(_request(batch_id="runaway")))
    assert worker.run_once() == 0  # attempt 1: refused, the batch stays pending
    assert store.latest() == 0 and store.weights(0) == v0, "nothing was published"
    assert store.applied(["runaway"]) == set()
    assert queue.stats()["pending"] == 1 and queue.dead_count() == 0
    assert worker.trainer.version is None, "the spoilt local head must be reloaded before the next update"
    assert store.last_refusal()["reason"] == "non_finite_loss"
    time.sleep(0.01)
    assert worker.run_once() == 0  # attempt 2 (claimed back): the last one
    assert store.latest() == 0 and queue.stats() == {"length": 0, "pending": 0, "lag": 0}
    [dead] = queue.dead_letters()
    assert (dead.batch_id, dead.reason, dead.attempts) == ("runaway", "non_finite_loss", 2)
    metric = worker.metrics.registry.get_sample_value
    assert metric("r2m_worker_updates_refused_total", {"reason": "non_finite_loss"}) == 2
    assert metric("r2m_dead_letters_total", {"reason": "non_finite_loss"}) == 1
    worker.sync()
    assert worker.trainer.head.is_finite() and worker.trainer.version == 0
    # After the settings are fixed, a replay trains the batch once.
    fixed = _settings(tiny_neox_rm, train_steps=2)
    good = Worker(HeadTrainer(build_engine(fixed), fixed), queue, store, block_ms=10)
    assert queue.replay() == ["runaway"] and queue.dead_count() == 0
    assert good.run_once() == 1
    assert store.latest() == 1 and store.meta(1)["batch_ids"] == ["runaway"]
    assert queue.replay() == [] and good.run_once() == 0 and store.latest() == 1


def test_a_poison_batch_holds_back_no_other_batch(tiny_neox_rm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(tiny_neox_rm, train_steps=1)
    queue, store = MemoryPreferenceQueue(), MemoryHeadStore(keep=10)
    trainer = HeadTrainer(build_engine(settings), settings)
    real_update = trainer.update

    def update(requests, **kwargs):  # noqa: ANN001, ANN003, ANN202 - a batch that breaks training
        if any(r.batch_id == "poison" for r in requests):
            raise RuntimeError("boom")
        return real_update(requests, **kwargs)

    monkeypatch.setattr(trainer, "update", update)
    worker = Worker(trainer, queue, store, block_ms=10, max_attempts=1)
    queue.add("poison", _body(_request(batch_id="poison")))
    queue.add("good", _body(_request(batch_id="good")))
    assert worker.run_once() == 1  # the two together fail; alone, the good one trains and the poison one is given up
    assert store.meta(store.latest())["batch_ids"] == ["good"]
    [dead] = queue.dead_letters()
    assert (dead.batch_id, dead.reason) == ("poison", "update_error") and "RuntimeError: boom" in dead.detail
    assert queue.stats() == {"length": 0, "pending": 0, "lag": 0}


def test_an_undecodable_batch_is_a_dead_letter_at_once(tiny_neox_rm: Path) -> None:
    settings = _settings(tiny_neox_rm, train_steps=1)
    queue, store = MemoryPreferenceQueue(), MemoryHeadStore(keep=10)
    worker = Worker(HeadTrainer(build_engine(settings), settings), queue, store, block_ms=10)
    queue.add("garbage", b"not a safetensors frame")
    assert worker.run_once() == 0
    [dead] = queue.dead_letters()
    assert (dead.reason, dead.attempts) == ("undecodable", 1) and queue.stats()["length"] == 0


def test_the_guard_refuses_a_drifting_head_and_records_the_figures_of_published_ones(tiny_neox_rm: Path) -> None:
    queue, store = MemoryPreferenceQueue(), MemoryHeadStore(keep=10)
    sane = _settings(tiny_neox_rm, train_lr=1e-3, train_steps=1, guard_min_items=4)
    worker = Worker(HeadTrainer(build_engine(sane), sane), queue, store, block_ms=10, max_attempts=1)
    queue.add("a", _body(_request(batch_id="a")))
    assert worker.run_once() == 1
    guard = store.meta(1)["guard"]
    assert guard["items"] == 6 and abs(guard["mean_shift"]) < sane.guard_max_mean_shift, guard
    assert set(guard) >= {"spread_ratio", "rank_agreement", "served_mean_shift", "served_rank_agreement"}
    assert worker.metrics.registry.get_sample_value("r2m_guard_canary_items") == 6
    # A runaway learning rate: finite weights, rewards far from the plain RM's scale.
    runaway = _settings(tiny_neox_rm, train_lr=1.0, train_steps=20, guard_min_items=4)
    worker = Worker(HeadTrainer(build_engine(runaway), runaway), queue, store, block_ms=10, max_attempts=1)
    queue.add("b", _body(_request(batch_id="b")))
    assert worker.run_once() == 0
    assert store.latest() == 1, "the drifting candidate was not published"
    [dead] = queue.dead_letters()
    assert dead.reason.startswith("guard_") and "R2M_GUARD_" in dead.detail, dead
    refusal = store.last_refusal()
    assert refusal["reason"] == dead.reason and refusal["batch_ids"] == ["b"] and refusal["guard"]["items"] >= 6


def test_decode_batch_round_trips_the_queued_body() -> None:
    req = _request(batch_id="x1")
    assert decode_batch(_body(req)).request == req
    tokens = [Encoded([2, 5, i]) for i in range(len(req.texts()))]
    batch = decode_batch(_body(req), Encoded.pack(tokens))
    assert batch.request == req and batch.encoded == tokens
    with pytest.raises(ValueError, match="token lists for 6 texts"):
        decode_batch(_body(req), Encoded.pack(tokens[:2]))


# --- embedded mode: the same logic inside `r2m serve` ----------------------------------------------------------


def _wait(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_embedded_mode_trains_swaps_and_rolls_back(tiny_neox_rm: Path) -> None:
    settings = _settings(tiny_neox_rm, head_poll_s=0.2)
    with TestClient(create_app(settings)) as client:
        _wait(lambda: client.get("/readyz").status_code == 200)
        t = lambda seed: tensor_to_json(WireTensor.from_array(_h(5, seed)))  # noqa: E731
        score_body = {
            "items": [
                {"prompt": "help me cook", "response": "you can cook with some water", "policy_hidden": t(10)},
                {"prompt": "help me cook", "response": "no", "policy_hidden": t(11)},
            ],
            "step": 50,
            "total_steps": 100,
        }
        before = client.post("/score", json=score_body).json()
        assert before["head_version"] == 0
        pairs = [
            {
                "prompt": "help me cook",
                "chosen": "you can cook with some water",
                "rejected": "no",
                "chosen_hidden": t(10),
                "rejected_hidden": t(11),
            }
        ]
        accepted = client.post("/preferences", json={"pairs": pairs, "step": 50, "total_steps": 100})
        assert accepted.status_code == 202, accepted.text
        batch_id = accepted.json()["batch_id"]
        _wait(lambda: client.get("/heads/current").json()["served_version"] >= 1)
        after = client.post("/score", json=score_body).json()
        assert after["head_version"] == 1
        assert after["rewards"][0] - after["rewards"][1] > before["rewards"][0] - before["rewards"][1]
        current = client.get("/heads/current").json()
        assert current["batch_ids"] == [batch_id] and current["kept_versions"] == [0, 1]
        blob = client.get("/heads/1")
        assert blob.headers["x-r2m-head-sha256"] == current["sha256"] == sha256(blob.content)
        rolled = client.post("/heads/rollback", json={"version": 0}).json()
        assert rolled["version"] == 2 and rolled["rollback_of"] == 0
        _wait(lambda: client.post("/score", json=score_body).json()["head_version"] == 2)
        assert client.post("/score", json=score_body).json()["rewards"] == before["rewards"]
        assert client.post("/heads/rollback", json={"version": 99}).status_code == 404
        assert client.get("/heads/99").status_code == 404
        metrics = client.get("/metrics").text
        assert "r2m_worker_batches_total 1.0" in metrics and "r2m_head_swaps_total 2.0" in metrics


def test_a_head_that_scores_non_finite_is_reverted_and_never_answered(tiny_neox_rm: Path) -> None:
    settings = _settings(tiny_neox_rm, embedded_worker=False, head_poll_s=0.1)
    with TestClient(create_app(settings)) as client:
        _wait(lambda: client.get("/readyz").status_code == 200)
        state = client.app.state.r2m
        model, store = state.engine, state.store
        meta = {"config": model.head_config.to_dict(), "model": settings.model}
        body = {"items": [{"prompt": "help me cook", "response": "no"}]}  # the plain-RM path: phi alone
        plain = client.post("/score", json=body).json()["rewards"]

        def publish(edit) -> int:  # noqa: ANN001 - version 0's master (the served head's), edited, as the next version
            head = model.initial_head()
            with torch.no_grad():
                edit(head)
            latest = store.latest()
            return store.publish(parent=latest, weights=head_to_bytes(head), optim=None, meta=meta, batch_ids=[])[
                "version"
            ]

        publish(lambda h: None)  # version 0 as served
        overflow = publish(lambda h: h.score.weight.fill_(1e38))  # finite weights, an Inf reward
        _wait(lambda: model.current.version == overflow)
        r = client.post("/score", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "0", r.text
        assert f"head version {overflow} produced a non-finite reward" in r.json()["detail"]
        assert "went back to head version 0" in r.json()["detail"]
        again = client.post("/score", json=body).json()
        assert again == {"rewards": plain, "head_version": 0, "omega": 1.0}
        nan = publish(lambda h: h.attention.w_q.weight.fill_(float("nan")))  # refused at load
        _wait(lambda: nan in model.bad_versions)
        assert model.current.version == 0
        good = publish(lambda h: h.score.weight.mul_(2.0))
        _wait(lambda: model.current.version == good)
        assert overflow in model.bad_versions
        doubled = client.post("/score", json=body).json()
        assert doubled["head_version"] == good and doubled["rewards"][0] == pytest.approx(2 * plain[0], rel=1e-5)
        metrics = client.get("/metrics").text
        assert "r2m_head_reverts_total 1.0" in metrics and "r2m_non_finite_rewards_total 1.0" in metrics
        assert "r2m_head_load_failures_total 1.0" in metrics


@pytest.mark.parametrize("encoding", ["binary", "json"])
def test_a_posted_batch_is_tokenized_and_converted_once_end_to_end(
    tiny_neox_rm: Path, monkeypatch: pytest.MonkeyPatch, encoding: str
) -> None:
    """Server and worker together: each text goes through the tokenizer once (the API's tokens are queued with the
    batch), each hidden-state tensor is converted to torch once (the API checks a view of the request's bytes)."""
    from r2m.service.backbone import Backbone

    calls = {"encode": 0, "to_torch": 0}

    def counting(name, real):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(Backbone, "encode", counting("encode", Backbone.encode))
    monkeypatch.setattr(WireTensor, "to_torch", counting("to_torch", WireTensor.to_torch))
    req = _request(batch_id=f"once-{encoding}")  # one group of 4 responses and one pair, all with hidden states
    texts, tensors = len(req.texts()), 4 + 2
    with TestClient(create_app(_settings(tiny_neox_rm, head_poll_s=0.2))) as client:
        _wait(lambda: client.get("/readyz").status_code == 200)
        calls.update(encode=0, to_torch=0)  # start-up measured the RTE's scale on a few bundled prompts
        if encoding == "binary":
            r = client.post("/preferences", content=_body(req), headers={"content-type": BINARY_CONTENT_TYPE})
        else:
            r = client.post("/preferences", json=jsonify_request(as_payload(req)))
        assert r.status_code == 202, r.text
        _wait(lambda: client.get("/heads/current").json()["version"] == 1)
        assert calls == {"encode": texts, "to_torch": tensors}, calls


BAD_PREFERENCES = {
    "hidden count mismatch": (
        {"groups": [{"prompt": "p", "responses": ["a", "b", "c"], "hidden": ["H", "H"]}]},
        "2 tensors for 3 responses",
    ),
    "rewards count mismatch": (
        {"groups": [{"prompt": "p", "responses": ["a", "b"], "rewards": [1.0]}]},
        "1 values for 2 responses",
    ),
    "one response": ({"groups": [{"prompt": "p", "responses": ["a"]}]}, "responses"),
    "nothing to train": ({}, "at least one group or pair"),
    "one-sided pair hidden": (
        {"pairs": [{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_hidden": "H"}]},
        "both chosen and rejected",
    ),
    "huge hidden value": (
        {"groups": [{"prompt": "p", "responses": ["a", "b"], "hidden": ["H", "X"]}]},
        "groups[0].hidden[1]: value 3e+38 in row 0",
    ),
    "wrong width": ({"groups": [{"prompt": "p", "responses": ["a", "b"], "hidden": ["W", "W"]}]}, "R2M_POLICY_DIM"),
    "bad batch id": ({"pairs": [{"prompt": "p", "chosen": "a", "rejected": "b"}], "batch_id": "a b"}, "batch_id"),
}


@pytest.mark.parametrize("case", list(BAD_PREFERENCES))
def test_bad_preferences_get_a_clear_4xx_and_queue_nothing(tiny_neox_rm: Path, case: str) -> None:
    body, needle = BAD_PREFERENCES[case]
    good = tensor_to_json(WireTensor.from_array(_h(3, 0)))
    wide = tensor_to_json(WireTensor.from_array(np.zeros((3, P + 1), np.float32)))
    huge = tensor_to_json(WireTensor.from_array(np.full((3, P), 3.0e38, np.float32)))

    def fill(node):  # noqa: ANN001, ANN202
        if node == "H":
            return good
        if node == "W":
            return wide
        if node == "X":
            return huge
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        return node

    with TestClient(create_app(_settings(tiny_neox_rm, embedded_worker=False))) as client:
        _wait(lambda: client.get("/readyz").status_code == 200)
        r = client.post("/preferences", json={**fill(body), "step": 1, "total_steps": 10})
        assert r.status_code == 422, r.text
        assert needle in str(r.json()["detail"])
        assert client.app.state.r2m.queue.stats()["length"] == 0


def test_head_sync_waits_instead_of_spinning_on_an_empty_store(tiny_neox_rm: Path) -> None:
    from r2m.service.headsync import HeadSync
    from r2m.service.metrics import ServiceMetrics

    store = MemoryHeadStore()
    calls = []
    real_wait = store.wait_for_change

    def counting_wait(seen, timeout):  # noqa: ANN001, ANN202
        calls.append(seen)
        return real_wait(seen, timeout)

    store.wait_for_change = counting_wait  # type: ignore[method-assign]
    settings = _settings(tiny_neox_rm)
    model = build_engine(settings)
    sync = HeadSync(model, store, ServiceMetrics(), settings.model, poll_s=0.1)
    sync.start()
    time.sleep(0.5)
    assert len(calls) <= 8, f"{len(calls)} polls in 0.5 s with a 0.1 s timer: the sync thread spins"
    trainer = HeadTrainer(model, settings)
    with torch.no_grad():
        trainer.head.score.weight.add_(1.0)
    store.publish(
        parent=None,
        weights=head_to_bytes(trainer.head),
        optim=None,
        meta={"config": model.head_config.to_dict(), "model": settings.model},
        batch_ids=[],
    )
    store.publish(
        parent=0,
        weights=head_to_bytes(trainer.head),
        optim=None,
        meta={"config": model.head_config.to_dict(), "model": settings.model},
        batch_ids=["x"],
    )
    _wait(lambda: model.current.version == 1, timeout=5)
    sync.stop()
    assert torch.equal(model.current.head.score.weight, trainer.head.score.weight)
