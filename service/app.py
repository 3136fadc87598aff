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

from . import __version__
from .api import embed, get_reward, heads, health, preferences, score
from .api.deps import ServiceState
from .batcher import BadReward, Batcher, Overloaded, StaleHead
from .config import ServiceSettings
from .engine import ScoringEngine, build_engine, check_ensemble
from .errors import BadInput
from .headstore import MemoryHeadStore, RedisHeadStore
from .headsync import HeadSync
from .metrics import ServiceMetrics, WorkerMetrics
from .middleware import RequestGate
from .queue import MemoryPreferenceQueue, RedisPreferenceQueue
from .schemas import PreferencesRequest, ScoreRequest
from .training import HeadTrainer
from .worker import Worker, WorkerThread

__all__ = ["create_app"]

log = logging.getLogger("r2m.service")

# Request bodies parsed by hand (two encodings) whose schemas the OpenAPI document must still show.
_BODY_MODELS = (ScoreRequest, PreferencesRequest)


def create_app(settings: ServiceSettings | None = None, engine: ScoringEngine | None = None) -> FastAPI:
    """The reward server. With `engine` given it is ready at once; otherwise the model loads in the background
    after start-up, /healthz answers meanwhile and /readyz says 503 until it is loaded."""
    settings = settings or ServiceSettings()
    check_ensemble(settings)  # a misconfigured ensemble fails here, before the model loads
    state = ServiceState(settings=settings, metrics=ServiceMetrics())

    def install(m: ScoringEngine) -> None:
        state.engine = m
        state.batcher = Batcher(
            m,
            state.metrics,
            max_batch_tokens=settings.max_batch_tokens,
            max_queue_items=settings.max_queue_items,
            batch_wait_ms=settings.batch_wait_ms,
        )
        state.batcher.start()
        if settings.redis_url:
            state.store = RedisHeadStore(settings.redis_url, settings.redis_prefix, settings.head_keep)
            state.queue = RedisPreferenceQueue(settings.redis_url, settings.redis_prefix)
        else:  # embedded mode: the same queue, store and worker logic, in this process
            state.store = MemoryHeadStore(settings.head_keep)
            state.queue = MemoryPreferenceQueue()
            if settings.embedded_worker:
                worker = Worker(
                    HeadTrainer(m, settings),
                    state.queue,
                    state.store,
                    WorkerMetrics(state.metrics.registry),
                    max_batches=settings.worker_max_batches,
                    claim_idle_ms=settings.worker_claim_idle_ms,
                    block_ms=500,
                    max_attempts=settings.worker_max_attempts,
                )
                state.background.append(WorkerThread(worker).start())
        sync = HeadSync(m, state.store, state.metrics, settings.model, settings.head_poll_s)
        sync.start()
        state.background.append(sync)
        state.metrics.model_ready.set(1)
        state.metrics.head_version.set(m.current.version)

    async def load() -> None:
        started = time.perf_counter()
        try:
            m = await asyncio.to_thread(build_engine, settings)
        except Exception as exc:  # noqa: BLE001 - reported by /readyz and the log, the process stays up
            log.exception("loading the model %r failed", settings.model)
            state.load_error = f"{type(exc).__name__}: {exc}"
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
        yield
        if loader is not None and not loader.done():
            loader.cancel()
        for thing in reversed(state.background):
            await asyncio.to_thread(thing.stop)
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

    @app.exception_handler(StaleHead)
    async def stale_head(request: Request, exc: StaleHead) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "head_version": exc.served}, status_code=409)

    @app.exception_handler(BadReward)
    async def bad_reward(request: Request, exc: BadReward) -> JSONResponse:
        if exc.retry:
            return JSONResponse({"detail": exc.detail}, status_code=503, headers={"Retry-After": "0"})
        return JSONResponse({"detail": exc.detail}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error; see the server log"}, status_code=500)


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
