"""The worker's judge in-process: verdict parsing, pair choice, the OpenAI judge against a fake server of the test's
own (both orders, log-probabilities, 429 with Retry-After, 5xx, garbage, a refused parameter, rate limits), and what
an update does with the labels or without them (trained, refused as judge_unavailable, nothing to train)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from r2m.client.wire import WireTensor
from r2m.service.config import ServiceSettings
from r2m.service.engine import build_engine
from r2m.service.headstore import MemoryHeadStore
from r2m.service.metrics import WorkerMetrics
from r2m.service.queue import MemoryPreferenceQueue
from r2m.service.schemas import PreferencesRequest
from r2m.service.update.judge import (
    CallableJudge,
    OpenAIJudge,
    RateLimit,
    build_judge,
    choose_pairs,
    judge_info,
    load_template,
    render,
    verdict_from_logprobs,
    verdict_from_text,
)
from r2m.service.update.training import HeadTrainer, NothingToTrain, UpdateRefused
from r2m.service.update.worker import Worker
from tests.fake_judge import FakeJudge, completion, logprob_longer, longer_first

P = 8


def test_text_verdicts_are_read_tolerantly_and_anything_else_is_garbage() -> None:
    for text in ("A", " A.", "Response A", "[[A]]", "(A)", "**A**", "Answer: A", "The better response is A", "a",
                 "A: Paris", "I pick [[A]] here"):  # fmt: skip
        assert verdict_from_text(text) == 1.0, text
    for text in ("B", "Response B", "[[B]]", "Output (B)", "b."):
        assert verdict_from_text(text) == 0.0, text
    for text in ("", "Both", "As a judge I cannot say", "tie", "C", "Absolutely"):
        assert verdict_from_text(text) is None, text


def test_logprob_verdicts_weigh_the_two_letters() -> None:
    content = [{"token": "A", "logprob": math.log(0.6), "top_logprobs": [
        {"token": "A", "logprob": math.log(0.6)}, {"token": " B", "logprob": math.log(0.2)},
        {"token": "Both", "logprob": math.log(0.2)}]}]  # fmt: skip
    assert verdict_from_logprobs(content) == pytest.approx(0.75)
    later = [{"token": "[[", "logprob": 0.0, "top_logprobs": [{"token": "[[", "logprob": 0.0}]}, *content]
    assert verdict_from_logprobs(later) == pytest.approx(0.75), "the first token that holds a letter"
    assert verdict_from_logprobs([{"token": "Hm", "logprob": 0.0, "top_logprobs": []}]) is None
    assert verdict_from_logprobs(None) is None


def test_pairs_are_each_groups_best_vs_worst_then_others_and_groups_may_differ_in_size() -> None:
    rewards = [0.1, 0.9, 0.5, -1.0, 2.0, 0.0, 1.0, 3.0, 2.5]
    groups = [range(0, 3), range(3, 5), range(5, 9)]
    best_worst = {(1, 0), (4, 3), (7, 5)}
    picks = choose_pairs(rewards, groups, 3, torch.Generator().manual_seed(0))
    assert set(picks) == best_worst
    many = choose_pairs(rewards, groups, 7, torch.Generator().manual_seed(1))
    assert best_worst <= set(many) and len({tuple(sorted(p)) for p in many}) == 7
    assert all(any(i in g and j in g for g in groups) for i, j in many), "both responses of one group"
    assert choose_pairs(rewards, groups, 7, torch.Generator().manual_seed(1)) == many


def test_templates_fill_their_placeholders_once_and_a_bad_one_names_the_setting(tmp_path: Path) -> None:
    assert render("{prompt}|{response_a}|{response_b}", "p {response_b}", "a", "b") == "p {response_b}|a|b"
    (tmp_path / "bad.txt").write_text("{prompt} {response_a}")
    with pytest.raises(ValueError, match=r"R2M_JUDGE_TEMPLATE=.*lacks \{response_b\}"):
        load_template(str(tmp_path / "bad.txt"))
    with pytest.raises(ValueError, match="R2M_JUDGE_TEMPLATE=.*cannot read"):
        load_template(str(tmp_path / "missing.txt"))
    assert all(p in load_template(None) for p in ("{prompt}", "{response_a}", "{response_b}"))


def _openai(fake: FakeJudge, metrics: WorkerMetrics | None = None, **kw) -> OpenAIJudge:
    judge = OpenAIJudge(fake.url, "judge-model", kw.pop("api_key", None), **{"retries": 2, **kw})
    judge.metrics = metrics or WorkerMetrics()
    return judge


def _count(metrics: WorkerMetrics, outcome: str) -> float:
    return metrics.judge_requests.labels(outcome)._value.get()


PAIRS = [("q", "a long answer", "short"), ("q", "tiny", "a much longer answer")]


def test_openai_judge_asks_both_orders_reads_the_text_and_sends_the_key(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeJudge(longer_first)
    try:
        metrics = WorkerMetrics()
        verdicts = _openai(fake, metrics, api_key="sk-secret-123").judge(PAIRS, time.monotonic() + 10)
        assert [v.label for v in verdicts] == [True, False]
        assert len(fake.requests) == 4, "each pair in both orders"
        shown = sorted(r["body"]["messages"][0]["content"].split("[Response A]\n")[1][:6] for r in fake.requests)
        assert shown == ["a long", "a much", "short\n", "tiny\n\n"]
        body = fake.requests[0]["body"]
        assert body["model"] == "judge-model" and body["max_tokens"] == 4 and body["temperature"] == 0
        assert body["logprobs"] is True and body["top_logprobs"] == 5
        assert fake.requests[0]["headers"]["Authorization"] == "Bearer sk-secret-123"
        assert _count(metrics, "ok") == 4
        assert metrics.judge_tokens.labels("prompt")._value.get() == 200
        assert "sk-secret" not in caplog.text
    finally:
        fake.close()


def test_orders_that_disagree_abstain_and_logprob_verdicts_are_used() -> None:
    fake = FakeJudge(lambda body: completion("A"))  # position bias: always the first shown
    try:
        verdicts = _openai(fake).judge(PAIRS[:1], time.monotonic() + 10)
        assert verdicts[0].label is None and verdicts[0].disagreed and not verdicts[0].failed
        fake.script = logprob_longer
        v = _openai(fake).judge(PAIRS, time.monotonic() + 10)
        assert v[0].preference == pytest.approx((0.8 + 0.9) / 2) and v[1].preference == pytest.approx(0.15)
        one = _openai(fake, both_orders=False).judge(PAIRS[:1], time.monotonic() + 10)
        assert one[0].preference == pytest.approx(0.8)
    finally:
        fake.close()


def test_429_retry_after_is_honoured_and_5xx_is_retried() -> None:
    fake = FakeJudge(longer_first)
    try:
        metrics = WorkerMetrics()
        fake.queue = [(429, {"Retry-After": "1"}, {"error": "slow down"}), (503, {}, {"error": "busy"})]
        v = _openai(fake, metrics, both_orders=False, concurrency=1).judge(PAIRS[:1], time.monotonic() + 10)
        assert v[0].label is True
        times = [r["time"] for r in fake.requests]
        assert len(times) == 3 and times[1] - times[0] >= 1.0, "waited the Retry-After"
        assert (_count(metrics, "rate_limited"), _count(metrics, "error"), _count(metrics, "ok")) == (1, 1, 1)
        # A Retry-After beyond the deadline: no wait, no label.
        fake.queue = [(429, {"Retry-After": "30"}, {})]
        started = time.monotonic()
        v = _openai(fake, both_orders=False).judge(PAIRS[:1], time.monotonic() + 2)
        assert v[0].failed and v[0].label is None and time.monotonic() - started < 1.5
    finally:
        fake.close()


def test_garbage_abstains_errors_fail_and_a_refused_parameter_is_dropped() -> None:
    fake = FakeJudge(lambda body: completion("Both are fine."))
    try:
        metrics = WorkerMetrics()
        v = _openai(fake, metrics).judge(PAIRS[:1], time.monotonic() + 10)
        assert v[0].label is None and not v[0].failed and _count(metrics, "garbage") == 2
        fake.queue = [(400, {}, {"error": {"message": "logprobs are not supported by this model"}})]
        fake.script = longer_first
        judge = _openai(fake, both_orders=False)
        assert judge.judge(PAIRS[:1], time.monotonic() + 10)[0].label is True
        assert "logprobs" not in fake.requests[-1]["body"] and not judge._logprobs
        fake.queue = [(401, {}, {"error": "bad key"})]
        v = _openai(fake, metrics, both_orders=False).judge(PAIRS[:1], time.monotonic() + 10)
        assert v[0].failed and _count(metrics, "error") == 1, "a 4xx is not retried"
    finally:
        fake.close()
    judge = OpenAIJudge("http://127.0.0.1:9/v1", "m", retries=1)  # nothing listens on port 9
    assert judge.judge(PAIRS[:1], time.monotonic() + 5)[0].failed


def test_rate_limit_spaces_requests_and_refuses_past_the_deadline() -> None:
    limit = RateLimit(rpm=2)
    limit.window_s = 0.5
    started = time.monotonic()
    assert limit.acquire(10, started + 5) and limit.acquire(10, started + 5)
    assert limit.acquire(10, time.monotonic() + 0.05) is None, "two in the window: a third would wait past 0.05 s"
    assert limit.acquire(10, started + 5) is not None
    assert time.monotonic() - started >= 0.5, "the third waited for the window"
    tokens = RateLimit(tpm=100)
    lease = tokens.acquire(90, time.monotonic() + 1)
    assert lease is not None and tokens.acquire(20, time.monotonic() + 0.2) is None
    tokens.settle(lease, 50)  # the answer's usage was less than estimated
    assert tokens.acquire(20, time.monotonic() + 0.2) is not None


def test_build_judge_names_the_setting_and_info_hides_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="R2M_JUDGE: .*no callable 'nope'"):
        build_judge(ServiceSettings(judge="json:nope"))
    with pytest.raises(ValueError, match="R2M_JUDGE_MODEL"):
        ServiceSettings(judge="openai:http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="R2M_JUDGE='nonsense'"):
        ServiceSettings(judge="nonsense")
    with pytest.raises(ValueError, match="R2M_JUDGE_DEADLINE_S"):
        ServiceSettings(judge="json:dumps", judge_deadline_s=60)
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-hidden")
    s = ServiceSettings(judge="openai:http://127.0.0.1:1/v1", judge_model="m", judge_api_key_env="MY_JUDGE_KEY")
    judge = build_judge(s)
    assert isinstance(judge, OpenAIJudge) and judge.model == "m"
    info = judge_info(s, judge)
    assert info == {"kind": "openai", "model": "m", "pairs_per_batch": 16, "both_orders": True,
                    "with_pseudo_labels": False, "rpm": 0, "tpm": 0}  # fmt: skip
    assert "sk-hidden" not in repr(info) and "sk-hidden" not in repr(s)
    assert judge_info(ServiceSettings()) is None


# --- the update with a judge --------------------------------------------------------------------------------------


def _h(rows: int, seed: int) -> WireTensor:
    return WireTensor.from_array(np.random.default_rng(seed).standard_normal((rows, P)).astype(np.float32))


RESPONSES = ["the answer is good", "no", "thanks for the question", "you can cook with some water"]


def _request(batch_id: str, groups: int = 2) -> PreferencesRequest:
    group = lambda g: {"prompt": f"hello what is the answer {g}", "responses": RESPONSES,  # noqa: E731
                       "hidden": [_h(4 + i, 10 * g + i) for i in range(4)]}  # fmt: skip
    return PreferencesRequest.model_validate(
        {"groups": [group(g) for g in range(groups)], "step": 50, "total_steps": 100, "batch_id": batch_id}
    )


def _trainer(tiny: Path, judge: object, **kw) -> tuple[HeadTrainer, WorkerMetrics]:
    base = dict(model=str(tiny), policy_dim=P, attn_dim=8, device="cpu", train_lr=1e-2, train_steps=3, judge_pairs=3)
    settings = ServiceSettings(**{**base, **kw})
    metrics = WorkerMetrics()
    return HeadTrainer(build_engine(settings), settings, build_judge(settings, judge), metrics), metrics


def longer(prompt: str, a: str, b: str) -> bool:
    return len(a) > len(b)


def test_judge_labels_train_as_pairs_with_the_groups_hidden_states(tiny_neox_rm: Path) -> None:
    calls: list[tuple[str, str]] = []

    def judge(prompt: str, a: str, b: str) -> bool:
        calls.append((a, b))
        return len(a) > len(b)

    trainer, metrics = _trainer(tiny_neox_rm, judge)
    before = [p.detach().clone() for p in trainer.head.parameters()]
    weights, optim, _ = trainer.state_bytes()
    stats = trainer.update([_request("b1")], batch_ids=["b1"])
    assert len(calls) == 3 and stats.pairs == 3 and stats.groups == 0, "judge labels only, no pseudo-labels"
    assert stats.judge is not None and stats.judge.labels == 3 and stats.pair_bt > 0 and stats.bt == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.head.parameters()))
    assert metrics.judge_pairs.labels("labelled")._value.get() == 3
    assert isinstance(trainer.labeller.judge, CallableJudge)
    # The same batch again from the same head (a retry): the same pairs, from the verdicts already paid for.
    trainer.load(0, weights, optim)
    again = trainer.update([_request("b1")], batch_ids=["b1"])
    assert len(calls) == 3 and again.judge is not None and again.judge.cached == 3
    # With the pseudo-labels beside the judge's.
    trainer, _ = _trainer(tiny_neox_rm, longer, judge_with_pseudo_labels=True)
    both = trainer.update([_request("b2")], batch_ids=["b2"])
    assert both.groups == 2 and both.pairs == 3 and both.bt > 0


def test_a_failed_judge_invents_no_label_and_refuses_a_judge_only_update(tiny_neox_rm: Path) -> None:
    def broken(prompt: str, a: str, b: str) -> bool:
        raise ConnectionError("judge down")

    trainer, metrics = _trainer(tiny_neox_rm, broken)
    with pytest.raises(UpdateRefused) as refused:
        trainer.update([_request("b1")], batch_ids=["b1"])
    assert refused.value.reason == "judge_unavailable"
    assert metrics.judge_pairs.labels("failed")._value.get() == 3 and _count(metrics, "error") == 3
    # Beside the pseudo-labels, the batch trains on what it has.
    trainer, _ = _trainer(tiny_neox_rm, broken, judge_with_pseudo_labels=True)
    stats = trainer.update([_request("b1")], batch_ids=["b1"])
    assert stats.groups == 2 and stats.pairs == 0 and stats.judge is not None and stats.judge.failed == 3
    # Every pair abstained: nothing to train, which is no failure.
    trainer, _ = _trainer(tiny_neox_rm, lambda p, a, b: 0.5)
    with pytest.raises(NothingToTrain):
        trainer.update([_request("b1")], batch_ids=["b1"])


def test_a_hung_judge_is_cut_at_the_deadline(tiny_neox_rm: Path) -> None:
    def hung(prompt: str, a: str, b: str) -> bool:
        time.sleep(30)
        return True

    trainer, _ = _trainer(tiny_neox_rm, hung, judge_deadline_s=1.0, judge_concurrency=2)
    started = time.monotonic()
    with pytest.raises(UpdateRefused, match="judge_unavailable"):
        trainer.update([_request("b1")], batch_ids=["b1"])
    assert time.monotonic() - started < 5


def test_worker_retries_then_dead_letters_judge_unavailable_and_acks_all_abstained(tiny_neox_rm: Path) -> None:
    answers = {"mode": "down"}

    def judge(prompt: str, a: str, b: str) -> float:
        if answers["mode"] == "down":
            raise TimeoutError("judge timed out")
        return 0.5

    trainer, metrics = _trainer(tiny_neox_rm, judge)
    queue, store = MemoryPreferenceQueue(), MemoryHeadStore()
    worker = Worker(trainer, queue, store, metrics, claim_idle_ms=1, block_ms=10, max_attempts=2)
    queue.add("b1", _body(_request("b1")))
    for _ in range(6):
        worker.run_once()
        time.sleep(0.01)
    dead = queue.dead_letters(10)
    assert [(d.batch_id, d.reason) for d in dead] == [("b1", "judge_unavailable")]
    assert store.latest() == 0, "no version from a batch without labels"
    assert metrics.dead_letters.labels("judge_unavailable")._value.get() == 1
    answers["mode"] = "abstain"
    queue.add("b2", _body(_request("b2")))
    worker.run_once()
    assert queue.stats()["pending"] == 0 and store.latest() == 0
    assert metrics.judge_updates.labels("nothing_to_train")._value.get() == 1


def _body(req: PreferencesRequest) -> bytes:
    from r2m.client.wire import encode_binary, pack_request
    from r2m.service.schemas import as_payload

    return encode_binary(*pack_request(as_payload(req)))


def test_a_task_that_breaks_fails_alone_and_the_wait_ends() -> None:
    from r2m.service.update.judge import run_bounded

    def boom() -> int:
        raise RuntimeError("a bug in a judge")

    started = time.monotonic()
    assert run_bounded([boom, lambda: 2], 2, float("inf")) == [None, 2]
    assert run_bounded([lambda: time.sleep(5) or 1, lambda: 2], 2, time.monotonic() + 0.3) == [None, 2]
    assert time.monotonic() - started < 2
