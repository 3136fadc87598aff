"""Shared request dependencies as `Annotated` aliases.

All of them are `async def`: they only read app state, and FastAPI runs a plain `def` dependency in its thread pool,
one hop per dependency per request, a cost that shows on the fast routes. The scoring routes take one `ServingDep`
and the auth check reads the state itself: FastAPI walks every node of a route's dependency tree on every request
(ten calls of `solve_dependencies` per /score with engine, batcher, settings and auth each depending on the
state)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..batcher import Batcher
from ..config import ServiceSettings
from ..engine import ScoringEngine
from ..headstore import HeadStore
from ..metrics import ServiceMetrics
from ..queue import PreferenceQueue
from .drain import Drain

__all__ = [
    "AuthDep",
    "EngineDep",
    "Serving",
    "ServingDep",
    "ServiceState",
    "SettingsDep",
    "StateDep",
    "require_api_key",
]


@dataclass
class ServiceState:
    """What one server process holds; `engine` and `batcher` are None until the model has loaded."""

    settings: ServiceSettings
    metrics: ServiceMetrics
    engine: ScoringEngine | None = None
    batcher: Batcher | None = None
    load_error: str | None = None
    store: HeadStore | None = None
    queue: PreferenceQueue | None = None
    background: list = field(default_factory=list)  # things with .stop(timeout), stopped at shutdown
    draining: bool = False  # SIGTERM came: finishing what was accepted, then exiting
    requests: int = 0  # HTTP requests that reached the gate (`RequestGate`), and those in flight now
    in_flight: int = 0
    drain: Drain | None = None  # the drain's deadlines and the requests in flight (`api.drain`)
    on_fatal: Callable[[str], None] | None = None  # how the process ends when the model cannot load (`r2m serve`)
    judge_info: dict[str, Any] | None = None  # what /info shows of the judge (`update.judge.judge_info`)


async def get_state(request: Request) -> ServiceState:
    return request.app.state.r2m


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_settings(state: StateDep) -> ServiceSettings:
    return state.settings


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]


def _not_ready(state: ServiceState) -> HTTPException:
    if state.load_error:
        return HTTPException(503, f"the model failed to load: {state.load_error}")
    return HTTPException(503, "the model is still loading; retry shortly", headers={"Retry-After": "1"})


async def get_engine(state: StateDep) -> ScoringEngine:
    if state.engine is None:
        raise _not_ready(state)
    return state.engine


EngineDep = Annotated[ScoringEngine, Depends(get_engine)]


@dataclass(frozen=True)
class Serving:
    """What a scoring route needs, once the model has loaded."""

    engine: ScoringEngine
    batcher: Batcher
    settings: ServiceSettings


async def get_serving(request: Request) -> Serving:
    state: ServiceState = request.app.state.r2m
    if state.engine is None or state.batcher is None:
        raise _not_ready(state)
    return Serving(state.engine, state.batcher, state.settings)


ServingDep = Annotated[Serving, Depends(get_serving)]

_bearer = HTTPBearer(auto_error=False, description="Set R2M_API_KEY on the server to require it.")


async def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """401 unless auth is off or the request carries `Authorization: Bearer <R2M_API_KEY>`."""
    key = request.app.state.r2m.settings.api_key
    if key is None:
        return
    if credentials is None:
        raise HTTPException(
            401, "missing API key: send `Authorization: Bearer <key>`", headers={"WWW-Authenticate": "Bearer"}
        )
    if not secrets.compare_digest(credentials.credentials.encode(), key.get_secret_value().encode()):
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})


AuthDep = Depends(require_api_key)
