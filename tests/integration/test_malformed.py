"""Malformed bodies against a real `r2m serve`: every JSON route answers 4xx with a detail, never 5xx, and a pooled
connection stays usable after each answer (a 500 used to close it without saying so)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from .conftest import Process

# Every route that reads a JSON body, with a valid body to mutate.
ROUTES = {
    "/score": {"items": [{"prompt": "How do I boil an egg?", "response": "Simmer it."}]},
    "/embed": {"items": [{"prompt": "How do I boil an egg?", "response": "Simmer it."}]},
    "/preferences": {"groups": [{"prompt": "p", "responses": ["a", "b"]}]},
    "/get_reward": {"query": ["How do I boil an egg? Simmer it."]},
    "/heads/rollback": {"version": 0},
    "/preferences/dead-letters/replay": {"ids": ["0-1"]},
}

RAW_BODIES = [
    b"",
    b"{",
    b"not json",
    b"\xff\xfe\x00{}",  # not UTF-8
    b"[" * 5000 + b"]" * 5000,  # nested beyond the parser's recursion limit
    b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}",  # deeper than any request
    b'{"x": ' + b"9" * 5000 + b"}",  # an integer of more than 4,300 digits
    b'{"items": NaN}',
    b'{"items": Infinity}',
    b'{"items": -Infinity}',
    b'{"items": 1e99999}',
    b"null",
    b"[]",
    b'"text"',
    b"123",
]


def _strings_replaced(body: object, value: object) -> list[object]:
    """One body per string leaf of `body`, with that leaf replaced by `value` (and one per key)."""
    out: list[object] = []

    def walk(node: object, rebuild) -> None:  # noqa: ANN001
        if isinstance(node, str):
            out.append(rebuild(value))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, lambda new, k=k: rebuild({**node, k: new}))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, lambda new, i=i: rebuild([*node[:i], new, *node[i + 1 :]]))

    walk(body, lambda new: new)
    return out


def _mutations(body: dict) -> list[bytes]:
    """Bodies that break one thing each: a string leaf made a lone surrogate, NaN, a huge number, a list or a dict;
    every top-level field of the wrong type."""
    texts = []
    for bad in ("\ud800", "\udead\ubeef", "ok \udfff tail"):
        texts += [json.dumps(b).encode() for b in _strings_replaced(body, bad)]
    weird = []
    for value in (float("nan"), float("inf"), 10**400, [], {}, None, True, -1):
        for b in _strings_replaced(body, value):
            weird.append(json.dumps(b, allow_nan=True).encode())
        for key in body:
            weird.append(json.dumps({**body, key: value}, allow_nan=True).encode())
    return texts + weird


@pytest.mark.slow
def test_no_malformed_body_gets_a_server_error_on_any_json_route(server: Process) -> None:
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for route, valid in ROUTES.items():
            for body in RAW_BODIES + _mutations(valid):
                r = client.post(route, content=body, headers={"content-type": "application/json"})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code < 500, (route, body[:200], r.status_code, r.text[:500])
                assert r.headers.get("content-type", "").startswith("application/json"), (route, r.headers)
                if r.status_code >= 400:  # some mutations are still valid requests (an empty query list)
                    assert r.json().get("detail"), (route, body[:200], r.text[:300])
            # The pooled connection is still good: the next request on it is answered.
            assert client.get("/healthz").status_code == 200
    assert set(statuses) <= {200, 202, 400, 404, 413, 415, 422, 503}, statuses
    assert sum(n for code, n in statuses.items() if code >= 400) > 200, statuses


def test_a_lone_surrogate_is_named_with_its_field_on_every_text_route(server: Process) -> None:
    cases = {
        "/get_reward": ({"query": ["fine", "bad \ud800"]}, "query[1]"),
        "/score": ({"items": [{"prompt": "\udead\ubeef", "response": "r"}]}, "items[0].prompt"),
        "/embed": ({"items": [{"prompt": "p", "response": "x\udfff"}]}, "items[0].response"),
        "/preferences": ({"groups": [{"prompt": "p", "responses": ["a", "\ud800"]}]}, "responses[1]"),
    }
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for route, (body, where) in cases.items():
            r = client.post(route, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
            assert r.status_code == 422, (route, r.text)
            assert where in r.json()["detail"] and "surrogate" in r.json()["detail"], r.text


def test_an_oversized_text_is_refused_before_it_is_tokenized(server: Process) -> None:
    """3 MB of text would take seconds of tokenizer time; the character bound refuses it at once."""
    big = "word " * (3 * 2**20 // 5)  # under the fixture's 4 MiB body limit
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for route, body in {
            "/get_reward": {"query": [big]},
            "/score": {"items": [{"prompt": "p", "response": big}]},
            "/embed": {"items": [{"prompt": big, "response": "r"}]},
        }.items():
            started = time.perf_counter()
            r = client.post(route, json=body)
            took = time.perf_counter() - started
            assert r.status_code in (413, 422), (route, r.status_code, r.text[:300])
            assert "characters" in r.json()["detail"], r.text[:300]
            # Tokenizing it would take seconds: the bound answers first.
            assert took < 3.0, (route, took)
