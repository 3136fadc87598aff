"""The app in-process: readiness while the model loads, load failures, OpenAPI, settings."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from r2m.service.api import app as app_module
from r2m.service.config import ServiceSettings


def test_readyz_is_503_until_the_model_has_loaded(tiny_neox_rm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_build = app_module.build_engine

    def slow_build(settings: ServiceSettings):
        release.wait(30)
        return real_build(settings)

    monkeypatch.setattr(app_module, "build_engine", slow_build)
    settings = ServiceSettings(model=str(tiny_neox_rm), policy_dim=8, attn_dim=8, device="cpu")
    with TestClient(app_module.create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        busy = client.post("/score", json={"items": [{"prompt": "hello", "response": "world"}]})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        release.set()
        for _ in range(300):
            if client.get("/readyz").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert client.get("/readyz").json() == {"status": "ready", "head_version": 0}
        assert client.post("/score", json={"items": [{"prompt": "hello", "response": "world"}]}).status_code == 200


def test_a_model_that_fails_to_load_is_reported(tmp_path: Path) -> None:
    settings = ServiceSettings(model=str(tmp_path / "missing-model"), device="cpu")
    with TestClient(app_module.create_app(settings)) as client:
        for _ in range(200):
            body = client.get("/readyz").json()
            if body["status"] != "loading":
                break
            threading.Event().wait(0.05)
        assert body["status"] == "failed"
        r = client.post("/score", json={"items": [{"prompt": "a", "response": "b"}]})
        assert r.status_code == 503 and "failed to load" in r.json()["detail"]
        assert client.get("/healthz").status_code == 200


def test_openapi_documents_both_encodings_of_score() -> None:
    schema = app_module.create_app(ServiceSettings()).openapi()
    body = schema["paths"]["/score"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/vnd.r2m+safetensors"}
    components = schema["components"]["schemas"]
    assert {"ScoreRequest", "ScoreItem", "ScoreResponse", "ErrorResponse"} <= set(components)
    assert components["ScoreItem"]["properties"]["policy_hidden"]["anyOf"][0]["required"] == [
        "dtype",
        "shape",
        "data",
    ]


def test_settings_fail_fast_with_the_setting_to_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("R2M_ATTN_DIM", "100")
    monkeypatch.setenv("R2M_ATTN_HEADS", "3")
    with pytest.raises(ValueError, match="R2M_ATTN_DIM=100 must be divisible by R2M_ATTN_HEADS=3"):
        ServiceSettings()
    monkeypatch.delenv("R2M_ATTN_DIM")
    monkeypatch.delenv("R2M_ATTN_HEADS")
    monkeypatch.setenv("R2M_API_KEY", "")
    assert ServiceSettings().api_key is None


def test_isolated_settings_ignore_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from r2m.service.config import isolated_settings

    monkeypatch.setenv("R2M_TRAIN_LR", "0.5")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("R2M_POLICY_DIM=7\n")
    assert ServiceSettings().train_lr == 0.5 and ServiceSettings().policy_dim == 7
    s = isolated_settings(attn_dim=16)
    assert (s.train_lr, s.policy_dim, s.attn_dim) == (1e-6, 2048, 16)
