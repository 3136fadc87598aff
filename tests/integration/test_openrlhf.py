"""`POST /get_reward` driven by OpenRLHF's own remote-RM client, from the installed `openrlhf` wheel, unmodified.

OpenRLHF 0.11.2 keeps that client in `openrlhf/utils/agent.py` (`SingleTurnAgentExecutor`: after each rollout it
decodes prompt + response and posts `{"query": [text], "prompts": [prompt], "labels": [label]}` with aiohttp, one
sample per request, every rollout concurrently). The file is loaded by path because `import openrlhf.utils` pulls the
math grader's dependencies (sympy, pylatexenc); the one module it imports, `openrlhf.utils.logging_utils`, is
OpenRLHF's own file too, loaded the same way. Nothing of theirs is stubbed or patched.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from bench.peer import OPENRLHF_LOGGING, load_openrlhf_agent, wrap_tokenizer
from r2m.service.backbone import Encoded, load_backbone

from .conftest import SMALL_SERVER_ENV, Process, start_server

pytest.importorskip("aiohttp", reason="OpenRLHF's client posts with aiohttp (pip install -e '.[test]')")

THREADS = 4  # OpenRLHF runs one event loop per vLLM engine actor; each loop has many rollouts in flight
PER_THREAD = 12
PROMPT = "<|user|>\nHow do I boil an egg?\n<|assistant|>\n"
RESPONSES = [
    "Put the egg in cold water, bring it to a boil, simmer for nine minutes, then cool it in ice water.",
    "No idea. Look it up yourself.",
    "Eggs are laid by hens.",
]


@pytest.fixture(scope="module")
def openrlhf_agent() -> Iterator[ModuleType]:
    had = OPENRLHF_LOGGING in sys.modules
    try:
        agent = load_openrlhf_agent()
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        yield agent
    finally:
        if not had:
            sys.modules.pop(OPENRLHF_LOGGING, None)


@pytest.fixture(scope="module")
def rm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    # A longer batch wait than /score's tests: the point here is merging many one-sample requests.
    env = {**SMALL_SERVER_ENV, "R2M_BATCH_WAIT_MS": "20", "OMP_NUM_THREADS": "1"}
    s = start_server(tmp_path_factory.mktemp("openrlhf"), env)
    yield s
    s.stop()


class CharTokenizer:
    """The policy's tokenizer as OpenRLHF uses it in the executor: `tok(text=...)` and `decode(ids)`."""

    def __call__(self, text: str, add_special_tokens: bool = False, return_tensors: str = "pt") -> dict:
        return {"input_ids": torch.tensor([[ord(c) for c in text]])}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


class ScriptedEngine:
    """Stands in for vLLM: 'generates' the response named by the prompt's index."""

    def __init__(self, responses: dict[str, str]) -> None:
        self.responses = responses

    async def generate(self, prompt_token_ids: list[int], params: object, multi_modal_data: object = None) -> object:
        text = self.responses["".join(chr(i) for i in prompt_token_ids)]
        await asyncio.sleep(0)
        out = SimpleNamespace(token_ids=[ord(c) for c in text], text=text, finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[out])


def _expected_reward(texts: list[str]) -> list[float]:
    """The default RM's own reward for each full text, computed here without the server: the text tokenized as one
    sequence (`[CLS] text [SEP]`), the encoder's mean-pooled, L2-normalised embedding, the fitted linear head."""
    backbone = load_backbone("default", device="cpu", dtype="float32")
    out = []
    for text in texts:
        enc = backbone.tokenizer(text)
        rte = backbone.embed([Encoded(enc["input_ids"], enc["token_type_ids"])])
        out.append(float(backbone.plain_reward(rte)[0]))
    return out


def _metric_total(text: str, name: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_openrlhf_rollouts_get_rewards_through_one_batcher(rm_server: Process, openrlhf_agent) -> None:
    n = THREADS * PER_THREAD
    prompts = [f"{PROMPT}({i}) " for i in range(n)]
    responses = {p: f"{RESPONSES[i % 3]} [{i}]" for i, p in enumerate(prompts)}
    executor = openrlhf_agent.SingleTurnAgentExecutor(remote_rm_url=f"{rm_server.url}/get_reward")
    engine, tokenizer = ScriptedEngine(responses), CharTokenizer()
    outputs: dict[int, dict] = {}
    errors: list[BaseException] = []

    async def rollouts(indices: range) -> None:
        params = SimpleNamespace(max_tokens=256, logprobs=None)
        results = await asyncio.gather(
            *[executor.execute(prompts[i], f"label-{i}", params, 2048, tokenizer, engine) for i in indices]
        )
        outputs.update(zip(indices, results))

    def engine_actor(k: int) -> None:
        try:
            asyncio.run(rollouts(range(k * PER_THREAD, (k + 1) * PER_THREAD)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    before = httpx.get(f"{rm_server.url}/metrics").text
    threads = [threading.Thread(target=engine_actor, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    after = httpx.get(f"{rm_server.url}/metrics").text
    assert not errors, errors
    assert sorted(outputs) == list(range(n))

    # OpenRLHF swallows reward errors (it logs them and leaves reward None): every rollout must have one.
    texts = [prompts[i] + responses[prompts[i]] for i in range(n)]
    got = [outputs[i]["reward"] for i in range(n)]
    assert all(isinstance(r, list) and len(r) == 1 for r in got), got[:3]
    assert [outputs[i]["scores"] for i in range(n)] == got
    assert all(outputs[i]["extra_logs"] == {"head_version": [0.0]} for i in range(n))
    expected = _expected_reward(texts)
    assert [r[0] for r in got] == pytest.approx(expected, abs=1e-4)
    assert len({round(r[0], 4) for r in got}) > 3, "distinct texts should get distinct rewards"

    # One sample per request, yet the batcher merged them: more requests than backbone batches.
    requests = _metric_total(after, "r2m_batch_requests_sum") - _metric_total(before, "r2m_batch_requests_sum")
    batches = _metric_total(after, "r2m_batch_requests_count") - _metric_total(before, "r2m_batch_requests_count")
    assert requests == n
    assert batches < n, f"{n} concurrent /get_reward requests ran in {batches} batches: none were merged"


def test_a_batch_request_matches_single_requests(rm_server: Process) -> None:
    texts = [PROMPT + r for r in RESPONSES]
    batch = httpx.post(f"{rm_server.url}/get_reward", json={"query": texts}).json()
    singles = [httpx.post(f"{rm_server.url}/get_reward", json={"query": [t]}).json()["rewards"][0] for t in texts]
    assert batch["rewards"] == pytest.approx(singles, abs=1e-5)
    assert batch["scores"] == batch["rewards"]
    assert batch["extra_logs"] == {"head_version": [0.0] * 3}


def test_empty_query_list_gets_empty_lists(rm_server: Process) -> None:
    r = httpx.post(f"{rm_server.url}/get_reward", json={"query": [], "prompts": [], "labels": []})
    assert r.status_code == 200
    assert r.json() == {"rewards": [], "scores": [], "extra_logs": {"head_version": []}}


def test_prompts_and_labels_are_optional_and_not_checked(rm_server: Process) -> None:
    for body in (
        {"query": [PROMPT + RESPONSES[0]]},
        {"query": [PROMPT + RESPONSES[0]], "prompts": [PROMPT, PROMPT], "labels": [None, 3, "x"]},
        {"query": [PROMPT + RESPONSES[0]], "prompts": None, "labels": None, "something_new": 1},
    ):
        r = httpx.post(f"{rm_server.url}/get_reward", json=body)
        assert r.status_code == 200, r.text
        assert len(r.json()["rewards"]) == 1


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"query": ["ok", "word " * 2000]}, 422, "query[1]: "),
        ({"query": "not a list"}, 422, "query"),
        ({"prompts": ["p"]}, 422, "query"),
        ({"query": ["x"] * 300}, 413, "R2M_MAX_ITEMS_PER_REQUEST"),
    ],
    ids=["too-long", "not-a-list", "no-query", "too-many"],
)
def test_bad_requests_get_a_clear_4xx(rm_server: Process, body: dict, status: int, needle: str) -> None:
    r = httpx.post(f"{rm_server.url}/get_reward", json=body)
    assert r.status_code == status, r.text
    assert needle in str(r.json()["detail"])
    assert httpx.post(f"{rm_server.url}/get_reward", json={"query": ["still serving"]}).status_code == 200


def test_get_reward_takes_the_same_optional_key_as_score(tmp_path_factory: pytest.TempPathFactory) -> None:
    key = "s3cret-key"
    s = start_server(tmp_path_factory.mktemp("openrlhf-auth"), {**SMALL_SERVER_ENV, "R2M_API_KEY": key})
    try:
        body = {"query": [PROMPT + RESPONSES[0]]}
        # OpenRLHF sends no Authorization header: with a key set it must go through a proxy that adds it.
        assert httpx.post(f"{s.url}/get_reward", json=body).status_code == 401
        ok = httpx.post(f"{s.url}/get_reward", json=body, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and len(ok.json()["rewards"]) == 1
    finally:
        s.stop()


def test_a_templated_text_scores_as_score_does_on_a_chat_rm(
    tiny_llama_rm: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """On a chat RM, the policy's rendered template (when it is the RM's template) gives /score's reward."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_rm)
    pairs = [("what is python ?", "a code ."), ("how do i cook ?", "math .")]
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False)
        for p, r in pairs
    ]
    assert all(t.startswith(tok.bos_token) for t in texts)
    s = start_server(tmp_path_factory.mktemp("openrlhf-chat"), {**SMALL_SERVER_ENV, "R2M_MODEL": str(tiny_llama_rm)})
    try:
        got = httpx.post(f"{s.url}/get_reward", json={"query": texts}).json()["rewards"]
        items = [{"prompt": p, "response": r} for p, r in pairs]
        expected = httpx.post(f"{s.url}/score", json={"items": items}).json()["rewards"]
    finally:
        s.stop()
    assert got == pytest.approx(expected, abs=1e-5)


WRAPPINGS = {"nothing": None, "bos": "<s> $A", "bos+eos": "<s> $A </s>"}


def test_get_reward_tokenizes_and_scores_exactly_as_openrlhf_serve_rm(
    tiny_llama_rm: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """OpenRLHF's own serve_rm (its RewardModelProxy from the wheel: tokenize_fn and get_reward, cast to float32) and
    r2m's /get_reward on decoder RMs whose tokenizers add nothing, a BOS, or a BOS and an EOS by default, for queries
    that do and do not start with BOS: the same token ids and the same rewards."""
    pytest.importorskip("deepspeed", reason="serve_rm imports deepspeed (pip install -e '.[test]')")
    from transformers import AutoTokenizer

    from bench.peer import serve_rm_reference

    tmp = tmp_path_factory.mktemp("serve-rm-exact")
    models = {name: wrap_tokenizer(tiny_llama_rm, tmp / name, single) for name, single in WRAPPINGS.items()}
    tok = AutoTokenizer.from_pretrained(tiny_llama_rm)
    pairs = [("what is python ?", "a code ."), ("how do i cook ?", "math . you do it well"), ("hello", "yes")]
    templated = [
        tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False)
        for p, r in pairs
    ]
    texts = [*templated, *(f"user : {p} assistant : {r}" for p, r in pairs)]  # with and without a leading BOS
    assert all(t.startswith("<s>") for t in templated) and not any(t.startswith("<s>") for t in texts[3:])
    reference = serve_rm_reference(list(models.values()), texts, tmp / "probe")
    for name, path in models.items():
        ref = reference[str(path)]
        wrapped = AutoTokenizer.from_pretrained(path)("hello")["input_ids"]
        assert len(wrapped) == 1 + (WRAPPINGS[name] or "$A").count("<"), (name, wrapped)  # the wrapping is real
        backbone = load_backbone(str(path), device="cpu", dtype="float32")
        assert [backbone.encode_text(t).input_ids for t in texts] == ref["input_ids"], name
        s = start_server(
            tmp_path_factory.mktemp(f"r2m-{name}"), {**SMALL_SERVER_ENV, "R2M_MODEL": str(path), "R2M_DTYPE": "float32"}
        )
        try:
            got = httpx.post(f"{s.url}/get_reward", json={"query": texts}).json()["rewards"]
        finally:
            s.stop()
        assert got == pytest.approx(ref["rewards"], abs=1e-4), name


def test_get_reward_special_tokens_tokenizer_restores_the_tokenizer_defaults(tiny_llama_rm: Path, tmp_path) -> None:
    bos_rm = wrap_tokenizer(tiny_llama_rm, tmp_path / "bos", WRAPPINGS["bos"])
    backbone = load_backbone(str(bos_rm), device="cpu", dtype="float32")
    bos = backbone.tokenizer.bos_token_id
    plain, templated = "user : hi", "<s> user : hi"
    # auto on a decoder RM = none = serve_rm: the text's ids only.
    assert backbone.encode_text(plain).input_ids == backbone.encode_text(plain, "none").input_ids
    assert backbone.encode_text(plain).input_ids[0] != bos and backbone.encode_text(templated).input_ids[0] == bos
    # tokenizer: the default BOS, never a second one.
    with_defaults = backbone.encode_text(plain, "tokenizer").input_ids
    assert with_defaults[0] == bos and with_defaults[1] != bos
    assert backbone.encode_text(templated, "tokenizer").input_ids == with_defaults


def test_an_encoder_rm_keeps_its_cls_and_sep_on_get_reward() -> None:
    backbone = load_backbone("default", device="cpu", dtype="float32")
    tok = backbone.tokenizer
    ids = backbone.encode_text("hello world").input_ids
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert backbone.encode_text("hello world", "none").input_ids == ids[1:-1]
