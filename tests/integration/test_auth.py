"""Optional Bearer auth: every route but health, readiness and metrics needs the key."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from r2m.client import AuthenticationError, R2MClient

from .conftest import SMALL_SERVER_ENV, Process, start_server

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    s = start_server(tmp_path_factory.mktemp("auth"), {**SMALL_SERVER_ENV, "R2M_API_KEY": KEY})
    yield s
    s.stop()


BODY = {"items": [{"prompt": "hi", "response": "hello"}]}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}])
def test_score_and_info_need_the_key(auth_server: Process, headers: dict) -> None:
    r = httpx.post(f"{auth_server.url}/score", json=BODY, headers=headers)
    assert r.status_code == 401 and "API key" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{auth_server.url}/info", headers=headers).status_code == 401


def test_the_right_key_is_accepted(auth_server: Process) -> None:
    r = httpx.post(f"{auth_server.url}/score", json=BODY, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and len(r.json()["rewards"]) == 1
    with R2MClient(auth_server.url, api_key=KEY, max_retries=0) as client:
        assert client.info()["auth"] is True
        assert len(client.score("hi", ["hello", "bye"]).rewards) == 2


def test_health_and_metrics_stay_open(auth_server: Process) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{auth_server.url}{path}").status_code == 200, path


def test_client_without_key_gets_an_authentication_error(auth_server: Process, monkeypatch) -> None:
    monkeypatch.delenv("R2M_API_KEY", raising=False)
    with R2MClient(auth_server.url, max_retries=3) as client, pytest.raises(AuthenticationError):
        client.score("hi", ["hello"])
