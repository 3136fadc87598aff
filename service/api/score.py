"""POST /score: rewards for (prompt, response) items, with the policy's hidden states when given."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..model import omega
from ..schemas import ScoreRequest, ScoreResponse
from ..validation import prepare_score_items
from .deps import AuthDep, BatcherDep, EngineDep, SettingsDep
from .payload import ERROR_RESPONSES, read_model, request_body_openapi

router = APIRouter(tags=["scoring"], dependencies=[AuthDep])


@router.post(
    "/score",
    response_model=ScoreResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    openapi_extra=request_body_openapi(ScoreRequest),
)
async def score(request: Request, engine: EngineDep, batcher: BatcherDep, settings: SettingsDep) -> ScoreResponse:
    """Score a batch of items; JSON or binary (application/vnd.r2m+safetensors) body."""
    req = await read_model(request, ScoreRequest)
    # Tokenizing and the finiteness scan of the hidden states are CPU work: keep them off the event loop.
    items = await run_in_threadpool(prepare_score_items, req, engine, settings)
    result = await batcher.submit(items)
    with_feedback = any(it.policy_hidden is not None for it in req.items)
    w = omega(req.step, req.total_steps, settings.omega_floor) if with_feedback else 1.0
    return ScoreResponse(
        rewards=result.rewards,
        head_version=result.head_version,
        omega=w,
        uncertainty=result.uncertainty,
        members=result.members if req.return_members else None,
    )
