"""POST /preferences: a step's groups (and/or labelled pairs) with the current policy's hidden states, queued for
the worker's R2M update; the dead letters (batches the worker gave up on), listed and replayed."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from ..queue import PreferenceQueue, QueueUnavailable, UnknownDeadLetter, replay_dead_letters
from ..schemas import (
    DeadLetterInfo,
    DeadLetters,
    PreferencesAccepted,
    PreferencesRequest,
    ReplayRequest,
    ReplayResult,
)
from ..validation import prepare_preferences
from .deps import AuthDep, EngineDep, SettingsDep, StateDep
from .payload import ERROR_RESPONSES, error_responses, read_model, read_model_and_body, request_body_openapi

router = APIRouter(tags=["updates"], dependencies=[AuthDep])


def _queue(state: StateDep) -> PreferenceQueue:
    if state.queue is None:
        raise HTTPException(503, "no preference queue is configured on this replica", headers={"Retry-After": "5"})
    return state.queue


def _unavailable(exc: QueueUnavailable, then: str = "retry") -> HTTPException:
    return HTTPException(503, f"preference queue unavailable: {exc}; {then}", headers={"Retry-After": "1"})


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
    queue = _queue(state)
    req, binary = await read_model_and_body(request, PreferencesRequest)
    batch = await run_in_threadpool(prepare_preferences, req, engine, settings, binary)
    try:
        await run_in_threadpool(queue.add, batch.batch_id, batch.body, batch.tokens)
    except QueueUnavailable as exc:
        raise _unavailable(exc, "nothing was queued, retry") from exc
    state.metrics.preference_batches.inc()
    state.metrics.preference_groups.inc(len(req.groups))
    state.metrics.preference_pairs.inc(len(req.pairs))
    return PreferencesAccepted(batch_id=batch.batch_id, groups=len(req.groups), pairs=len(req.pairs))


@router.get("/preferences/dead-letters", response_model=DeadLetters, responses=error_responses(401, 503))
async def dead_letters(state: StateDep, limit: int = 100) -> DeadLetters:
    """The batches the worker gave up on, oldest first, with the reason (at most `limit`)."""
    try:
        letters = await run_in_threadpool(_queue(state).dead_letters, max(1, min(limit, 10_000)))
    except QueueUnavailable as exc:
        raise _unavailable(exc) from exc
    return DeadLetters(dead_letters=[DeadLetterInfo(**d.summary()) for d in letters])


@router.post(
    "/preferences/dead-letters/replay",
    response_model=ReplayResult,
    responses=error_responses(400, 401, 404, 413, 415, 422, 503),
    openapi_extra=request_body_openapi(ReplayRequest, binary=False),
)
async def replay(request: Request, state: StateDep) -> ReplayResult:
    """Put dead letters (by id, or all) back on the preference stream (after a settings fix); each trains once."""
    body = await read_model(request, ReplayRequest)
    try:
        batch_ids = await run_in_threadpool(replay_dead_letters, _queue(state), body.ids)
    except UnknownDeadLetter as exc:
        raise HTTPException(404, f"{exc} (GET /preferences/dead-letters)") from exc
    except QueueUnavailable as exc:
        raise _unavailable(exc) from exc
    return ReplayResult(batch_ids=batch_ids)
