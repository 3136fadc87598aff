"""Assembles the FastAPI app: routers, error handlers, the middleware (size limit, memory budget, metrics) and the
model loading."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..allocator import release_free_memory
from ..assemble import start_replica
from ..batcher import BadReward, Overloaded, StaleReadouts
from ..config import ServiceSettings
from ..engine import ScoringEngine, build_engine, check_ensemble
from ..errors import BadInput
from ..metrics import ServiceMetrics
from ..schemas import EmbedRequest, PreferencesRequest, ReplayRequest, RollbackRequest, ScoreRequest
from ..update.judge import build_judge, judge_info
from . import embed, get_reward, heads, health, preferences, score
from .deps import ServiceState
from .drain import EXIT_GRACE_S
from .get_reward import GetRewardRequest
from .middleware import RequestGate

__all__ = ["create_app"]

log = logging.getLogger("r2m.service")

# Request bodies parsed by hand (two encodings) whose schemas the OpenAPI document must still show.
_BODY_MODELS = (ScoreRequest, EmbedRequest, PreferencesRequest, GetRewardRequest, RollbackRequest, ReplayRequest)


def create_app(
    settings: ServiceSettings | None = None, engine: ScoringEngine | None = None, judge: Any = None
) -> FastAPI:
    """The reward server. With `engine` given it is ready at once; otherwise the model loads in the background
    after start-up, /healthz answers meanwhile and /readyz says 503 until it is loaded. `judge`: the embedded
    worker's judge (a Python judge or a `PairJudge`) instead of the one R2M_JUDGE names."""
    settings = settings or ServiceSettings()
    check_ensemble(settings)  # a misconfigured ensemble fails here, before the model loads
    state = ServiceState(settings=settings, metrics=ServiceMetrics())
    pair_judge = None
    if not settings.redis_url and settings.embedded_worker:
        pair_judge = build_judge(settings, judge)  # a judge that cannot be built fails here too
    elif judge is not None:
        log.warning("a judge was given, but this replica runs no worker: the judge of `r2m worker` labels the pairs")
    state.judge_info = judge_info(settings, pair_judge)

    def install(m: ScoringEngine) -> None:
        replica = start_replica(m, settings, state.metrics, pair_judge)
        state.engine, state.batcher = m, replica.batcher
        state.store, state.queue = replica.store, replica.queue
        state.background.extend(replica.background)

    async def load() -> None:
        started = time.perf_counter()
        try:
            m = await asyncio.to_thread(build_engine, settings)
        except Exception as exc:  # noqa: BLE001 - reported by /readyz and the log; `r2m serve` then exits
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.debug("loading the model %r failed", settings.model, exc_info=True)
            message = f"R2M_MODEL={settings.model!r} could not be loaded: {state.load_error}"
            if state.on_fatal is not None:
                state.on_fatal(message)
            else:
                log.error("%s", message)
            return
        state.metrics.model_load_seconds.set(time.perf_counter() - started)
        log.info("model %r loaded in %.1f s", settings.model, time.perf_counter() - started)
        install(m)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if engine is not None:
            install(engine)
        else:
            loader = asyncio.create_task(load())
        trimmer = asyncio.create_task(_release_memory_when_idle(state))
        yield
        trimmer.cancel()
        if loader is not None and not loader.done():
            loader.cancel()
        # Under a drain the threads get what is left of its deadline; one still busy then ends with the process.
        drain = state.drain if state.draining else None
        for thing in reversed(state.background):
            timeout = max(0.1, drain.seconds_left(after=EXIT_GRACE_S)) if drain is not None else None
            await asyncio.to_thread(thing.stop, timeout)
        if state.batcher is not None:
            await state.batcher.stop()

    app = FastAPI(
        title="r2m",
        version=__version__,
        summary="Reward model as a service with R2M real-time alignment to the policy's hidden states.",
        lifespan=lifespan,
    )
    app.state.r2m = state
    app.include_router(health.router)
    app.include_router(score.router)
    app.include_router(embed.router)
    app.include_router(preferences.router)
    app.include_router(heads.router)
    app.include_router(get_reward.router)
    app.add_middleware(RequestGate, state=state)
    _install_error_handlers(app)
    _install_openapi(app)
    return app


IDLE_RELEASE_S = 2.0


async def _release_memory_when_idle(state: ServiceState) -> None:
    """After a burst, once no request has arrived for IDLE_RELEASE_S and none is in flight, the heaps' free pages go
    back to the kernel (`allocator.release_free_memory`), so that an idle replica's memory returns to its baseline."""
    released_at = checked = state.requests
    while True:
        await asyncio.sleep(IDLE_RELEASE_S)
        quiet = state.requests == checked and state.in_flight == 0
        if quiet and state.requests != released_at:
            await asyncio.to_thread(release_free_memory)
            released_at = state.requests
        checked = state.requests


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return JSONResponse(
            {"detail": f"server overloaded: {exc}; retry later"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(StaleReadouts)
    async def stale_readouts(request: Request, exc: StaleReadouts) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "head_version": exc.served}, status_code=409)

    @app.exception_handler(BadReward)
    async def bad_reward(request: Request, exc: BadReward) -> JSONResponse:
        if exc.retry:
            return JSONResponse({"detail": exc.detail}, status_code=503, headers={"Retry-After": "0"})
        return JSONResponse({"detail": exc.detail}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": [_error_entry(e) for e in exc.errors()]}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # Starlette re-raises after this answer and uvicorn then closes the connection: say so, so that a pooled
        # client does not send its next request on it.
        return JSONResponse(
            {"detail": "internal server error; see the server log"}, status_code=500, headers={"Connection": "close"}
        )


def _error_entry(error: Any) -> dict[str, Any]:
    """A validation error as JSON whatever the input was (a NaN, bytes, an object): the offending input is left out
    (its location names it) and the context's values become text."""
    entry = {k: v for k, v in error.items() if k not in ("input", "ctx", "url")}
    if error.get("ctx"):
        entry["ctx"] = {k: str(v) for k, v in error["ctx"].items()}
    return jsonable_encoder(entry)


def _install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for m in _BODY_MODELS:
                body = m.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[m.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
