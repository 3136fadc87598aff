"""Liveness, readiness, information and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..schemas import HealthResponse, InfoResponse, ReadyResponse
from ..validation import max_tokens_of
from .deps import AuthDep, EngineDep, StateDep
from .payload import error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse)
def healthz() -> HealthResponse:
    """Alive: the process answers."""
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
def readyz(state: StateDep) -> Response:
    """Ready: the model is loaded and a head version is known (503 before)."""
    if state.engine is None or state.draining:
        status = "draining" if state.draining else "failed" if state.load_error else "loading"
        return JSONResponse(ReadyResponse(status=status).model_dump(), status_code=503)
    return JSONResponse(ReadyResponse(status="ready", head_version=state.engine.current.version).model_dump())


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(state: StateDep) -> Response:
    """Prometheus metrics of this replica."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/info",
    response_model=InfoResponse,
    dependencies=[AuthDep],
    responses=error_responses(401, 503),
)
def info(state: StateDep, engine: EngineDep) -> InfoResponse:
    """The served model, its widths and the settings that shape requests."""
    s, b, cfg = state.settings, engine.backbone, engine.head_config
    return InfoResponse(
        version=__version__,
        model=s.model,
        model_kind=b.kind,
        rm_dim=b.rm_dim,
        policy_dim=cfg.policy_dim,
        attn_dim=cfg.attn_dim,
        attn_heads=cfg.n_heads,
        omega_floor=s.omega_floor,
        ensemble=cfg.members,
        aggregation=engine.aggregation,
        uwo_lambda=engine.uwo_lambda,
        device=str(b.device),
        dtype=str(b.dtype).removeprefix("torch."),
        max_tokens=max_tokens_of(engine, s),
        max_hidden_tokens=s.max_hidden_tokens,
        max_items_per_request=s.max_items_per_request,
        max_batch_tokens=s.max_batch_tokens,
        max_request_bytes=s.max_request_bytes,
        head_version=engine.current.version,
        auth=s.api_key is not None,
        model_info=b.info,
        judge=state.judge_info,
    )
