"""POST /preferences: a step's groups (and/or labelled pairs) with the current policy's hidden states, queued for
the worker's R2M update."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from ..queue import QueueUnavailable
from ..schemas import PreferencesAccepted, PreferencesRequest
from ..validation import prepare_preferences
from .deps import AuthDep, EngineDep, SettingsDep, StateDep
from .payload import ERROR_RESPONSES, read_model_and_body, request_body_openapi

router = APIRouter(tags=["updates"], dependencies=[AuthDep])


@router.post(
    "/preferences",
    status_code=202,
    response_model=PreferencesAccepted,
    responses=ERROR_RESPONSES,
    openapi_extra=request_body_openapi(PreferencesRequest),
)
async def preferences(
    request: Request, state: StateDep, engine: EngineDep, settings: SettingsDep
) -> PreferencesAccepted:
    """Queue a preference batch; 202 once it is durably queued, 503 (retry) when the queue is unreachable."""
    req, binary = await read_model_and_body(request, PreferencesRequest)
    batch = await run_in_threadpool(prepare_preferences, req, engine, settings, binary)
    if state.queue is None:
        raise HTTPException(503, "no preference queue is configured on this replica", headers={"Retry-After": "5"})
    try:
        await run_in_threadpool(state.queue.add, batch.batch_id, batch.body, batch.tokens)
    except QueueUnavailable as exc:
        raise HTTPException(
            503, f"preference queue unavailable: {exc}; nothing was queued, retry", headers={"Retry-After": "1"}
        ) from exc
    state.metrics.preference_batches.inc()
    state.metrics.preference_groups.inc(len(req.groups))
    state.metrics.preference_pairs.inc(len(req.pairs))
    return PreferencesAccepted(batch_id=batch.batch_id, groups=len(req.groups), pairs=len(req.pairs))
