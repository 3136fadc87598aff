"""POST /embed: the reward model's embeddings of (prompt, response) items, for feedback computed next to the policy.

A local-feedback client (docs/api.md, "Local feedback") sends the texts here, runs the head's attention over the
policy's hidden states on its own device, and sends the read-outs to /score. The replica keeps the RTEs it returned
(R2M_EMBED_CACHE_MB) so that /score does not run the backbone again.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from r2m.client.wire import tensor_to_json

from ..schemas import EmbedRequest, EmbedResponse
from ..validation import prepare_embed_items
from .deps import AuthDep, ServingDep
from .payload import ERROR_RESPONSES, read_model, request_body_openapi

router = APIRouter(tags=["scoring"], dependencies=[AuthDep])


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=request_body_openapi(EmbedRequest),
)
async def embed(request: Request, serving: ServingDep) -> EmbedResponse:
    """Reward-token embeddings (float32, N x rm_dim), the plain rewards, and the head version this replica serves."""
    engine, batcher, settings = serving.engine, serving.batcher, serving.settings
    req = await read_model(request, EmbedRequest)
    items = await run_in_threadpool(
        prepare_embed_items, [(it.prompt, it.response) for it in req.items], engine, settings
    )
    result = await batcher.submit(items, want_rte=True)
    assert result.rte is not None
    return EmbedResponse(
        embeddings=tensor_to_json(result.rte.float().contiguous().numpy()),
        rewards=result.rewards,
        head_version=result.head_version,
    )
