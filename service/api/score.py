"""POST /score: rewards for (prompt, response) items, with the policy's hidden states when given."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..batcher import StaleReadouts
from ..model import omega
from ..schemas import ScoreRequest, ScoreResponse
from ..validation import prepare_cached_readouts, prepare_score_items
from .deps import AuthDep, ServingDep
from .payload import ERROR_RESPONSES, STALE_HEAD_RESPONSE, read_model, request_body_openapi

router = APIRouter(tags=["scoring"], dependencies=[AuthDep])


@router.post(
    "/score",
    response_model=ScoreResponse,
    response_model_exclude_none=True,
    responses={**ERROR_RESPONSES, **STALE_HEAD_RESPONSE},
    openapi_extra=request_body_openapi(ScoreRequest),
)
async def score(request: Request, serving: ServingDep) -> ScoreResponse:
    """Score a batch of items; JSON or binary (application/vnd.r2m+safetensors) body. Items carry the policy's
    hidden states, or read-outs computed next to the policy (local feedback, with the request's head_version)."""
    engine, batcher, settings = serving.engine, serving.batcher, serving.settings
    req = await read_model(request, ScoreRequest)
    if req.head_version is not None and req.head_version != engine.current.version:
        batcher.metrics.stale_head_requests.inc()
        raise StaleReadouts(req.head_version, engine.current.version)  # before any work; the batcher checks again
    # Local feedback's read-outs on RTEs this replica cached need neither tokenizing nor a hidden-state scan: cheap
    # enough for the event loop. Anything else is CPU work: off the event loop.
    items = prepare_cached_readouts(req, engine, settings)
    if items is None:
        items = await run_in_threadpool(prepare_score_items, req, engine, settings)
    local = [it for it in items if it.readout is not None]
    if local:
        hits = sum(it.rte is not None for it in local)
        batcher.metrics.embed_cache.labels(result="hit").inc(hits)
        batcher.metrics.embed_cache.labels(result="miss").inc(len(local) - hits)
    result = await batcher.submit(items, head_version=req.head_version)
    with_feedback = any(it.policy_hidden is not None or it.readout is not None for it in req.items)
    w = omega(req.step, req.total_steps, settings.omega_floor) if with_feedback else 1.0
    return ScoreResponse(
        rewards=result.rewards,
        head_version=result.head_version,
        omega=w,
        uncertainty=result.uncertainty,
        members=result.members if req.return_members else None,
    )
