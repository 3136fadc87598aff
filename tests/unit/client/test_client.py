"""R2MClient and AsyncR2MClient against an `httpx.MockTransport` standing in for the service."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import numpy as np
import pytest
import torch

from r2m.client import (
    BINARY_CONTENT_TYPE,
    AsyncR2MClient,
    AuthenticationError,
    InvalidRequest,
    R2MClient,
    R2MError,
    ScoreResult,
    ServerError,
    ServiceUnavailable,
    Timeout,
    TransportError,
    WireError,
    WireTensor,
)
from r2m.client.wire import decode_binary, tensor_from_json, unpack_request


class FakeService:
    """A /score that decodes either encoding like the real service and answers a reward that encodes the item:
    the number in the response text ("r7" -> 7), plus the sum of its hidden states (shared prefix included) when it
    has them."""

    def __init__(self, *, head_versions: list[int] | None = None):
        self.requests: list[httpx.Request] = []
        self.decoded: list[dict] = []
        self.head_versions = head_versions

    def decode(self, request: httpx.Request) -> dict:
        if request.headers["content-type"] == BINARY_CONTENT_TYPE:
            return unpack_request(*decode_binary(request.content))
        body = json.loads(request.content)
        for i, item in enumerate(body["items"]):
            if "policy_hidden" in item:
                item["policy_hidden"] = tensor_from_json(item["policy_hidden"], f"items[{i}].policy_hidden")
        body["prefixes"] = [tensor_from_json(t, f"prefixes[{j}]") for j, t in enumerate(body.get("prefixes", []))]
        return body

    @staticmethod
    def full_hidden(body: dict, item: dict) -> np.ndarray:
        """The item's whole hidden states as float32: its prefix's rows, then its own."""
        own = item["policy_hidden"].to_float32()
        if item.get("prefix") is None:
            return own
        return np.concatenate([body["prefixes"][item["prefix"]].to_float32(), own])

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path != "/score":
            return httpx.Response(404, json={"detail": "Not Found"})
        body = self.decode(request)
        self.decoded.append(body)
        rewards = [
            float(item["response"][1:])
            + (float(self.full_hidden(body, item).sum()) if "policy_hidden" in item else 0.0)
            for item in body["items"]
        ]
        version = self.head_versions[len(self.decoded) - 1] if self.head_versions else 3
        return httpx.Response(200, json={"rewards": rewards, "head_version": version, "omega": 0.75})

    @property
    def batch_sizes(self) -> list[int]:
        return [len(body["items"]) for body in self.decoded]


class Scripted:
    """Answers the given responses (or raises the given exceptions) in turn, then the last one forever."""

    def __init__(self, *outcomes: httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]):
        self.outcomes = outcomes
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        outcome = self.outcomes[min(len(self.requests), len(self.outcomes)) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome(request) if callable(outcome) else outcome


def ok(n: int = 1) -> httpx.Response:
    return httpx.Response(200, json={"rewards": [0.5] * n, "head_version": 1, "omega": 1.0})


def make_client(handler, **kwargs) -> R2MClient:
    kwargs = {"max_retries": 3, "backoff": 0.001, "max_backoff": 8.0, **kwargs}
    client = R2MClient("http://r2m.test", transport=httpx.MockTransport(handler), **kwargs)
    client.sleeps = []  # type: ignore[attr-defined]
    client._sleep = client.sleeps.append  # record the backoff instead of sleeping
    return client


def make_async_client(handler, **kwargs) -> AsyncR2MClient:
    kwargs = {"max_retries": 3, "backoff": 0.001, "max_backoff": 8.0, **kwargs}
    client = AsyncR2MClient("http://r2m.test", transport=httpx.MockTransport(handler), **kwargs)
    client.sleeps = []  # type: ignore[attr-defined]

    async def record(seconds: float) -> None:
        client.sleeps.append(seconds)  # type: ignore[attr-defined]

    client._sleep = record
    return client


def hidden_states(n: int, t: int = 3, d: int = 4, dtype=torch.bfloat16) -> list[torch.Tensor]:
    return [torch.full((t, d), float(i) / 8).to(dtype) for i in range(n)]


# --- scoring and chunking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["binary", "json"])
def test_chunks_split_and_reassemble_in_order(encoding):
    service = FakeService(head_versions=[4, 5, 5, 6])
    hidden = [h if i % 3 else None for i, h in enumerate(hidden_states(10))]
    with make_client(service, encoding=encoding, max_items_per_request=3) as client:
        result = client.score("p", [f"r{i}" for i in range(10)], hidden, step=2, total_steps=8)
    assert service.batch_sizes == [3, 3, 3, 1]
    expected = [i + (0.0 if h is None else float(h.float().sum())) for i, h in enumerate(hidden)]
    assert result == ScoreResult(expected, 6, [4, 4, 4, 5, 5, 5, 5, 5, 5, 6], 0.75)
    assert all(body["step"] == 2 and body["total_steps"] == 8 for body in service.decoded)


def test_chunks_respect_the_byte_budget_and_a_large_item_goes_alone():
    service = FakeService()
    small = np.zeros((10, 25), np.float32)  # 1000 bytes
    large = np.zeros((100, 25), np.float32)  # 10000 bytes
    hidden = [small, small, small, large, small, small]
    with make_client(service, max_bytes_per_request=2100) as client:
        result = client.score("p", [f"r{i}" for i in range(6)], hidden, share_prefix=False)  # all rows are equal
    assert service.batch_sizes == [2, 1, 1, 2]
    assert result.rewards == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_binary_body_decodes_on_the_server_to_the_same_request():
    service = FakeService()
    hidden = [torch.randn(5, 8).to(torch.bfloat16), None, np.random.default_rng(0).random((2, 8), np.float32)]
    with make_client(service, encoding="binary") as client:
        client.score(["a", "b", "c"], ["r0", "r1", "r2"], hidden, step=1, total_steps=2)
    (request,) = service.requests
    assert request.headers["content-type"] == BINARY_CONTENT_TYPE and request.url.path == "/score"
    assert service.decoded[0] == {
        "items": [
            {"prompt": "a", "response": "r0", "policy_hidden": WireTensor.from_array(hidden[0])},
            {"prompt": "b", "response": "r1"},
            {"prompt": "c", "response": "r2", "policy_hidden": WireTensor.from_array(hidden[2])},
        ],
        "step": 1,
        "total_steps": 2,
    }
    back = service.decoded[0]["items"][0]["policy_hidden"].to_torch()
    assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), hidden[0].view(torch.int16))


def test_json_body_follows_the_documented_form():
    service = FakeService()
    with make_client(service, encoding="json") as client:
        client.score("p", ["r0"], [np.ones((2, 3), np.float16)])
    body = json.loads(service.requests[0].content)
    assert service.requests[0].headers["content-type"] == "application/json"
    assert body["items"][0]["policy_hidden"]["dtype"] == "float16"
    assert body["items"][0]["policy_hidden"]["shape"] == [2, 3]
    assert body["step"] == 0 and body["total_steps"] == 1


def test_a_single_prompt_is_broadcast_to_the_group():
    service = FakeService()
    with make_client(service) as client:
        client.score("What is 2+2?", ["r0", "r1", "r2"])
    assert [item["prompt"] for item in service.decoded[0]["items"]] == ["What is 2+2?"] * 3


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((["p", "q"], ["r0"]), {}, "prompts must be one string or a sequence of 1"),
        (("p", "r0"), {}, "responses must be a sequence of strings, got str"),
        (("p", []), {}, "responses is empty"),
        (("p", ["r0", 5]), {}, r"responses\[1\] must be a str"),
        (("p", ["r0", "r1"], [None]), {}, "hidden must be None or a sequence of 2"),
        (("p", ["r0", "r1"], torch.zeros(2, 3, 4)), {}, "without padding"),
        (("p", ["r0"], [np.zeros(4, np.float32)]), {}, r"hidden\[0\] must be 2-D \(T, D\), got shape \[4\]"),
        (("p", ["r0"]), {"step": 5, "total_steps": 4}, r"step must be an integer in \[0, total_steps=4\]"),
        (("p", ["r0"]), {"total_steps": 0}, "total_steps must be an integer >= 1"),
    ],
)
def test_bad_arguments_are_rejected_before_anything_is_sent(args, kwargs, match):
    service = FakeService()
    with make_client(service) as client, pytest.raises(InvalidRequest, match=match) as info:
        client.score(*args, **kwargs)
    assert info.value.status_code is None and isinstance(info.value, ValueError)
    assert service.requests == []


def test_unsupported_hidden_dtype_is_a_wire_error_naming_the_item():
    service = FakeService()
    with make_client(service) as client, pytest.raises(WireError, match=r"hidden\[1\]: dtype int64"):
        client.score("p", ["r0", "r1"], [None, np.zeros((2, 2), np.int64)])
    assert service.requests == []


def test_a_response_that_breaks_the_api_is_an_r2m_error():
    handler = Scripted(httpx.Response(200, json={"rewards": [1.0], "head_version": 0, "omega": 1.0}))
    with make_client(handler) as client, pytest.raises(R2MError, match=r"expected \{rewards: \[2 numbers\]"):
        client.score("p", ["r0", "r1"])


# --- retries and errors -------------------------------------------------------------------------------------


def test_retries_on_503_honour_retry_after_then_succeed():
    handler = Scripted(
        httpx.Response(503, headers={"Retry-After": "2"}, json={"detail": "warming up"}),
        httpx.Response(429, headers={"Retry-After": "100"}),
        ok(2),
    )
    with make_client(handler, max_backoff=8.0) as client:
        assert client.score("p", ["r0", "r1"]).rewards == [0.5, 0.5]
    assert len(handler.requests) == 3
    assert client.sleeps == [2.0, 8.0]  # Retry-After, then Retry-After capped by max_backoff
    assert handler.requests[0].content == handler.requests[2].content  # the same body is sent again


def test_retry_after_as_an_http_date():
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    handler = Scripted(httpx.Response(503, headers={"Retry-After": when}), ok())
    with make_client(handler, max_backoff=60.0) as client:
        client.score("p", ["r0"])
    assert 25.0 < client.sleeps[0] <= 30.0


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    handler = Scripted(httpx.Response(502), httpx.Response(504), httpx.Response(503), httpx.Response(502), ok())
    with make_client(handler, max_retries=4, backoff=1.0, max_backoff=3.0) as client:
        client.score("p", ["r0"])
    steps = [1.0, 2.0, 3.0, 3.0]  # backoff * 2**attempt, capped at max_backoff
    assert len(client.sleeps) == 4
    assert all(step / 2 <= slept <= step for slept, step in zip(client.sleeps, steps, strict=True))


def test_gives_up_after_max_retries_with_service_unavailable():
    handler = Scripted(httpx.Response(503, headers={"Retry-After": "1"}, json={"detail": "model loading"}))
    with make_client(handler, max_retries=2) as client, pytest.raises(ServiceUnavailable) as info:
        client.score("p", ["r0"])
    assert len(handler.requests) == 3
    assert info.value.status_code == 503 and info.value.retry_after == 1.0
    assert "all 3 attempts" in str(info.value) and "model loading" in str(info.value)


def test_no_retry_on_422_and_the_detail_is_kept():
    detail = [{"loc": ["body", "items", 0, "policy_hidden"], "msg": "width 7 != 2048", "type": "value_error"}]
    handler = Scripted(httpx.Response(422, json={"detail": detail}))
    with make_client(handler) as client, pytest.raises(InvalidRequest) as info:
        client.score("p", ["r0"])
    assert len(handler.requests) == 1 and client.sleeps == []
    assert info.value.status_code == 422 and info.value.detail == detail
    assert "body.items.0.policy_hidden: width 7 != 2048" in str(info.value)
    assert not isinstance(info.value, AuthenticationError)


def test_a_string_detail_on_400():
    handler = Scripted(httpx.Response(400, json={"detail": "items[0].policy_hidden: NaN at [3, 5]"}))
    with make_client(handler) as client, pytest.raises(InvalidRequest, match=r"NaN at \[3, 5\]") as info:
        client.score("p", ["r0"])
    assert info.value.detail == "items[0].policy_hidden: NaN at [3, 5]"


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_raise_authentication_error_without_retry(status):
    handler = Scripted(httpx.Response(status, json={"detail": "missing or wrong API key"}))
    with make_client(handler) as client, pytest.raises(AuthenticationError, match="R2M_API_KEY") as info:
        client.score("p", ["r0"])
    assert len(handler.requests) == 1 and info.value.status_code == status
    assert isinstance(info.value, InvalidRequest)


def test_500_raises_server_error_without_retry():
    handler = Scripted(httpx.Response(500, json={"detail": "Internal Server Error"}))
    with make_client(handler) as client, pytest.raises(ServerError) as info:
        client.score("p", ["r0"])
    assert len(handler.requests) == 1 and info.value.status_code == 500


def test_connection_errors_are_retried_then_raise_transport_error():
    handler = Scripted(httpx.ConnectError("connection refused"))
    with make_client(handler, max_retries=2) as client, pytest.raises(TransportError) as info:
        client.score("p", ["r0"])
    assert len(handler.requests) == 3 and len(client.sleeps) == 2
    assert isinstance(info.value.__cause__, httpx.ConnectError) and "connection refused" in str(info.value)


def test_a_connection_error_then_success_recovers():
    handler = Scripted(httpx.ConnectError("reset"), httpx.ReadError("reset"), ok())
    with make_client(handler) as client:
        assert client.score("p", ["r0"]).rewards == [0.5]
    assert len(handler.requests) == 3


def test_timeouts_raise_timeout_after_retries():
    handler = Scripted(httpx.ReadTimeout("slow"))
    with make_client(handler, max_retries=1) as client, pytest.raises(Timeout):
        client.score("p", ["r0"])
    assert len(handler.requests) == 2


def test_the_bearer_header_is_sent(monkeypatch):
    monkeypatch.delenv("R2M_API_KEY", raising=False)
    service = FakeService()
    with make_client(service, api_key="s3cret") as client:
        client.score("p", ["r0"])
    assert service.requests[-1].headers["authorization"] == "Bearer s3cret"
    with make_client(service) as client:
        client.score("p", ["r0"])
    assert "authorization" not in service.requests[-1].headers
    monkeypatch.setenv("R2M_API_KEY", "from-env")
    with make_client(service) as client:
        client.score("p", ["r0"])
    assert service.requests[-1].headers["authorization"] == "Bearer from-env"
    assert "from-env" not in repr(client)


# --- health, info, low-level requests -----------------------------------------------------------------------


def test_health_ready_and_info():
    def handler(request: httpx.Request) -> httpx.Response:
        return {
            "/healthz": httpx.Response(200, json={"status": "ok"}),
            "/readyz": httpx.Response(503, json={"detail": "loading"}),
            "/info": httpx.Response(200, json={"model": "tiny", "head_version": 2}),
        }[request.url.path]

    with make_client(handler) as client:
        assert client.health() is True
        assert client.ready() is False
        assert client.info() == {"model": "tiny", "head_version": 2}
        assert client.sleeps == []  # health and ready make one attempt


def test_health_is_false_when_unreachable_after_one_attempt():
    handler = Scripted(httpx.ConnectError("refused"))
    with make_client(handler) as client:
        assert client.health() is False and client.ready() is False
    assert len(handler.requests) == 2


def test_request_is_the_base_for_other_routes():
    handler = Scripted(httpx.Response(503), lambda request: httpx.Response(202, json={"batch_id": "b1"}))
    with make_client(handler) as client:
        response = client.request("POST", "/preferences", json={"groups": []})
    assert response.status_code == 202 and response.json() == {"batch_id": "b1"}
    assert handler.requests[-1].url == "http://r2m.test/preferences"
    assert json.loads(handler.requests[-1].content) == {"groups": []}


def test_the_context_manager_closes_the_pool():
    with make_client(FakeService()) as client:
        pass
    assert client._http.is_closed


@pytest.mark.parametrize(
    "kwargs",
    [
        {"encoding": "msgpack"},
        {"max_retries": -1},
        {"max_items_per_request": 0},
        {"backoff": 10, "max_backoff": 1},
    ],
)
def test_bad_settings_fail_fast(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        R2MClient(**kwargs)


# --- the async client ---------------------------------------------------------------------------------------


def test_async_chunks_go_out_concurrently_within_the_limit_and_come_back_in_order():
    service = FakeService()
    in_flight = 0
    most_in_flight = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most_in_flight
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        first = service.decode(request)["items"][0]["response"]
        await asyncio.sleep(0.02 if first == "r0" else 0.001)  # the first chunk finishes last
        in_flight -= 1
        return service(request)

    async def main() -> ScoreResult:
        async with make_async_client(handler, max_items_per_request=2, max_concurrency=3) as client:
            return await client.score("p", [f"r{i}" for i in range(11)], hidden_states(11, dtype=torch.float16))

    result = asyncio.run(main())
    expected = [i + float(h.float().sum()) for i, h in enumerate(hidden_states(11, dtype=torch.float16))]
    assert result.rewards == expected and result.head_versions == [3] * 11
    assert sorted(service.batch_sizes) == [1, 2, 2, 2, 2, 2]
    assert most_in_flight == 3


def test_async_retries_then_succeeds_and_gives_up():
    async def main() -> None:
        handler = Scripted(httpx.Response(503, headers={"Retry-After": "1.5"}), ok())
        async with make_async_client(handler) as client:
            assert (await client.score("p", ["r0"])).rewards == [0.5]
        assert client.sleeps == [1.5] and len(handler.requests) == 2

        handler = Scripted(httpx.Response(429))
        async with make_async_client(handler, max_retries=2) as client:
            with pytest.raises(ServiceUnavailable) as info:
                await client.score("p", ["r0"])
        assert info.value.status_code == 429 and len(handler.requests) == 3

    asyncio.run(main())


def test_async_error_mapping_and_bearer_header():
    async def main() -> None:
        handler = Scripted(httpx.Response(422, json={"detail": "bad width"}))
        async with make_async_client(handler, api_key="k") as client:
            with pytest.raises(InvalidRequest, match="bad width"):
                await client.score("p", ["r0"])
        assert len(handler.requests) == 1 and handler.requests[0].headers["authorization"] == "Bearer k"

        handler = Scripted(httpx.Response(401, json={"detail": "no key"}))
        async with make_async_client(handler) as client:
            with pytest.raises(AuthenticationError):
                await client.score("p", ["r0"])

        handler = Scripted(httpx.ConnectError("refused"))
        async with make_async_client(handler, max_retries=1) as client:
            with pytest.raises(TransportError):
                await client.score("p", ["r0"])
            assert await client.health() is False
        assert len(handler.requests) == 3

    asyncio.run(main())


def test_async_binary_body_decodes_to_the_same_request():
    service = FakeService()
    hidden = torch.randn(4, 6).to(torch.bfloat16)

    async def main() -> None:
        async with make_async_client(service) as client:
            await client.score("p", ["r0"], [hidden], step=3, total_steps=9)

    asyncio.run(main())
    item = service.decoded[0]["items"][0]
    assert torch.equal(item["policy_hidden"].to_torch().view(torch.int16), hidden.view(torch.int16))
    assert service.decoded[0]["step"] == 3 and service.decoded[0]["total_steps"] == 9


# --- packaging ----------------------------------------------------------------------------------------------


def test_the_client_imports_and_encodes_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, r2m.client\n"
        "from r2m.client.wire import decode_binary, encode_binary, pack_request, unpack_request\n"
        "h = r2m.client.WireTensor.from_array(np.ones((2, 3), np.float16))\n"
        "req = unpack_request(*decode_binary(encode_binary(*pack_request({'h': h}))))\n"
        "assert req['h'] == h and sys.modules['torch'] is None\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
