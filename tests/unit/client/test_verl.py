"""The verl adapter against an `httpx.MockTransport`, and loaded the way verl loads a custom reward function."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest

from r2m.client import R2MClient, ServiceUnavailable


@pytest.fixture(scope="module")
def r2m_verl() -> Iterator[ModuleType]:
    """The adapter, imported here rather than at collection: importing a submodule sets it as an attribute of
    `r2m.client`, and the pinned public surface (test_exported_members) must not see it."""
    import r2m.client

    module = importlib.import_module("r2m.client.verl")
    yield module
    vars(r2m.client).pop("verl", None)


class FakeService:
    """/score answering len(response) + 100 * len(prompt), so the test can see which prompt went with which text."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/score"
        body = json.loads(request.content)
        self.bodies.append(body)
        rewards = [len(it["response"]) + 100.0 * len(it["prompt"]) for it in body["items"]]
        return httpx.Response(200, json={"rewards": rewards, "head_version": 3, "omega": 1.0})


def _client(service: FakeService, **kwargs) -> R2MClient:
    return R2MClient("http://rm", encoding="json", transport=httpx.MockTransport(service), **kwargs)


def test_compute_score_sends_the_prompt_from_extra_info(r2m_verl: ModuleType) -> None:
    service = FakeService()
    compute_score = r2m_verl.make_compute_score(client=_client(service))
    # Called the way verl's naive reward manager calls it: keywords only, plus verl's extra keywords.
    got = compute_score(
        data_source="openai/gsm8k",
        solution_str="four",
        ground_truth="4",
        extra_info={"question": "2+2?", "index": 7, "num_turns": None},
        reward_router_address=None,
    )
    assert got == 4 + 100.0 * 4 and isinstance(got, float)
    assert service.bodies[-1]["items"] == [{"prompt": "2+2?", "response": "four"}]
    # Positional, as verl's default_compute_score is typed; no extra_info: an empty prompt.
    assert compute_score("src", "abc", None) == 3.0
    assert service.bodies[-1]["items"] == [{"prompt": "", "response": "abc"}]


@pytest.mark.parametrize(
    ("extra_info", "prompt"),
    [
        (None, ""),
        ({}, ""),
        ({"index": 1}, ""),
        ({"prompt": "p", "question": "q"}, "p"),
        ({"question": "q"}, "q"),
        ({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"}]}, "u1"),
        (
            {"prompt": np.array([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], dtype=object)},
            "b",
        ),
    ],
)
def test_prompt_from_extra_info(r2m_verl: ModuleType, extra_info, prompt: str) -> None:
    assert r2m_verl.prompt_from_extra_info(extra_info) == prompt


def test_prompt_keys_are_configurable_and_a_chat_without_user_is_an_error(r2m_verl: ModuleType) -> None:
    assert r2m_verl.prompt_from_extra_info({"instruction": "i", "prompt": "p"}, ("instruction",)) == "i"
    with pytest.raises(TypeError, match="user message"):
        r2m_verl.prompt_from_extra_info({"prompt": [{"role": "system", "content": "s"}]})


def test_batched_form_keeps_the_order_and_chunks(r2m_verl: ModuleType) -> None:
    service = FakeService()
    batched = r2m_verl.make_compute_score_batched(client=_client(service, max_items_per_request=2))
    infos = [{"prompt": "a"}, {"prompt": "bb"}, None, {"question": "c"}, {"prompt": "a"}]
    texts = ["x", "yy", "zzz", "w", "vvvv"]
    # Keywords, as verl's BatchRewardManager calls it (data_sources is a numpy object array there).
    got = batched(
        data_sources=np.array(["s"] * 5, dtype=object), solution_strs=texts, ground_truths=[None] * 5, extra_infos=infos
    )
    assert got == [101.0, 202.0, 3.0, 101.0, 104.0]
    assert [len(b["items"]) for b in service.bodies] == [2, 2, 1]
    assert batched(data_sources=[], solution_strs=[], ground_truths=[], extra_infos=[]) == []
    with pytest.raises(ValueError, match="extra_infos"):
        batched(["s"], ["x"], [None], [{}, {}])


def test_service_errors_raise_instead_of_a_silent_zero(r2m_verl: ModuleType) -> None:
    client = R2MClient(
        "http://rm",
        max_retries=0,
        transport=httpx.MockTransport(lambda r: httpx.Response(503, json={"detail": "busy"})),
    )
    with pytest.raises(ServiceUnavailable):
        r2m_verl.make_compute_score(client=client)("s", "x", None, {"prompt": "p"})


def test_module_level_functions_use_one_cached_client_from_r2m_url(
    r2m_verl: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(r2m_verl, "_clients", {})
    monkeypatch.setenv("R2M_URL", "http://rm-from-env:9000")
    first = r2m_verl.get_client()
    assert first.base_url == "http://rm-from-env:9000"
    assert r2m_verl.get_client() is first
    assert r2m_verl.get_client("http://other") is not first
    monkeypatch.delenv("R2M_URL")
    assert r2m_verl.get_client().base_url == "http://127.0.0.1:8000"


def test_importing_the_adapter_needs_neither_torch_nor_verl(r2m_verl: ModuleType) -> None:
    code = (
        "import sys, r2m.client.verl as v; "
        "assert callable(v.compute_score) and callable(v.compute_score_batched); "
        "bad = [m for m in ('torch', 'verl') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _verl_import_utils():
    """verl's own loader, `verl/utils/import_utils.py` from the installed wheel, loaded by path: `import verl`
    starts with Ray and tensordict, and this file needs only the standard library."""
    spec = importlib.util.find_spec("verl")
    if spec is None or spec.origin is None:
        pytest.skip("verl is not installed: pip install verl==0.9.1 --no-deps")
    path = Path(spec.origin).parent / "utils" / "import_utils.py"
    mod_spec = importlib.util.spec_from_file_location("verl_import_utils", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("form", ["file", "pkg"])
def test_verl_loads_our_file_and_calls_it(r2m_verl: ModuleType, form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    load_extern_object = _verl_import_utils().load_extern_object
    path = r2m_verl.__file__ if form == "file" else "pkg://r2m.client.verl"
    fn = load_extern_object(module_path=path, object_name="compute_score")
    batched = load_extern_object(module_path=path, object_name="compute_score_batched")
    assert callable(fn) and callable(batched)
    # Every file load is a fresh module with its own client cache: point each one's at the fake service.
    service = FakeService()
    for f in (fn, batched):
        monkeypatch.setitem(f.__globals__["_clients"], ("http://127.0.0.1:8000", None), _client(service))
    monkeypatch.delenv("R2M_URL", raising=False)
    assert fn(data_source="s", solution_str="hi", ground_truth=None, extra_info={"prompt": "p"}) == 102.0
    assert batched(data_sources=["s"], solution_strs=["hey"], ground_truths=[None], extra_infos=[None]) == [3.0]
