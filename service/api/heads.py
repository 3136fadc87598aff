"""Head versions: the current one, downloads of kept ones (safetensors), rollback."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from ..engine import HeadVersion
from ..headcodec import head_to_bytes, serving_bytes, sha256
from ..headstore import StoreUnavailable
from ..headstore import rollback as rollback_to
from ..schemas import HeadInfo, RollbackRequest
from .deps import AuthDep, EngineDep, StateDep
from .payload import error_responses, read_model, request_body_openapi

router = APIRouter(prefix="/heads", tags=["heads"], dependencies=[AuthDep])



def _info(meta: dict, served: HeadVersion, kept: list[int], refusal: dict | None = None) -> HeadInfo:
    fields = {k: meta.get(k) for k in HeadInfo.model_fields if k in meta}
    served_sha = served.meta.get("serving_sha256", served.meta.get("sha256"))
    return HeadInfo(
        **fields,
        served_version=served.version,
        served_sha256=served_sha,
        served_swap_ms=served.swap_ms or None,
        kept_versions=kept,
        last_refusal=refusal,
    )


def _unavailable(exc: StoreUnavailable) -> HTTPException:
    return HTTPException(503, f"head store unavailable: {exc}", headers={"Retry-After": "1"})


@router.get("/current", response_model=HeadInfo, responses=error_responses(401, 503))
async def current(state: StateDep, engine: EngineDep) -> HeadInfo:
    """The latest published head version (and the one this replica serves)."""
    served = engine.current
    store = state.store
    try:
        latest = await run_in_threadpool(store.latest) if store else None
        meta = await run_in_threadpool(store.meta, latest) if store and latest is not None else None
        kept = await run_in_threadpool(store.versions) if store else []
        refusal = await run_in_threadpool(store.last_refusal) if store else None
    except StoreUnavailable:
        latest, meta, kept, refusal = None, None, [], None
    return _info(meta or {**served.meta, "version": served.version}, served, kept, refusal)


@router.get(
    "/{version}",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **error_responses(401, 404, 422, 503)},
)
async def download(
    version: int, state: StateDep, engine: EngineDep, copy: Literal["master", "serving"] = "master"
) -> Response:
    """A kept head version's weights as safetensors. `copy=serving`: what replicas score with (the serving copy,
    where the publisher made one), what a local-feedback client must compute with."""
    served = engine.current
    blob: bytes | None = None
    digest: str | None = None
    if state.store is not None:
        try:
            meta = await run_in_threadpool(state.store.meta, version)
            if meta is not None:
                # A replica serves the master when the publisher made no serving copy. The digest is the writer's.
                serving = copy == "serving" and "serving_sha256" in meta
                blob = await run_in_threadpool(state.store.serving if serving else state.store.weights, version)
                digest = meta["serving_sha256" if serving else "sha256"]
        except StoreUnavailable as exc:
            if version != served.version:
                raise _unavailable(exc) from exc
    if blob is None and version == served.version:  # not in the store (yet): this replica's own
        if copy == "serving":
            blob = await run_in_threadpool(serving_bytes, served.head)  # exactly what this replica scores with
        elif version == 0:
            blob = await run_in_threadpool(lambda: head_to_bytes(engine.initial_head()))  # rebuilt: it is seeded
        digest = None
    if blob is None:
        raise HTTPException(404, f"head version {version} is not kept (see /heads/current for kept_versions)")
    if digest is None:
        digest = await run_in_threadpool(sha256, blob)
    headers = {
        "X-R2M-Head-Version": str(version),
        "X-R2M-Head-SHA256": digest,
        "Content-Disposition": f'attachment; filename="r2m-head-v{version}.safetensors"',
    }
    return Response(blob, media_type="application/octet-stream", headers=headers)


@router.post(
    "/rollback",
    response_model=HeadInfo,
    responses=error_responses(400, 401, 404, 413, 415, 422, 503),
    openapi_extra=request_body_openapi(RollbackRequest, binary=False),
)
async def rollback(request: Request, state: StateDep, engine: EngineDep) -> HeadInfo:
    """Republish a kept version as the newest one; every replica swaps to it."""
    body = await read_model(request, RollbackRequest)
    if state.store is None:
        raise HTTPException(503, "no head store is configured on this replica")
    try:
        meta = await run_in_threadpool(rollback_to, state.store, body.version)
        kept = await run_in_threadpool(state.store.versions)
    except KeyError:
        raise HTTPException(404, f"head version {body.version} is not kept; cannot roll back to it") from None
    except StoreUnavailable as exc:
        raise _unavailable(exc) from exc
    return _info(meta, engine.current, kept)
