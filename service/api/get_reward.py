"""POST /get_reward: OpenRLHF's remote reward-model contract, scored through the same dynamic batcher as /score.

The OpenRLHF 0.11.2 contract matched (its client, its `serve_rm`): docs/integrations.md, "OpenRLHF".
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..validation import prepare_queries
from .deps import AuthDep, ServingDep
from .payload import ERROR_RESPONSES, read_model, request_body_openapi

__all__ = ["GetRewardRequest", "GetRewardResponse", "router"]

router = APIRouter(tags=["drop-in"], dependencies=[AuthDep])


class GetRewardRequest(BaseModel):
    # OpenRLHF may grow new fields; a drop-in route ignores what it does not use rather than failing the rollout.
    model_config = ConfigDict(extra="ignore")

    query: list[str] = Field(
        description="Full texts, prompt + response already rendered with the policy's chat template; each is "
        "tokenized as one sequence by the reward model's tokenizer (no chat template applied here)."
    )
    prompts: list[Any] | None = Field(default=None, description="Sent by OpenRLHF; ignored.")
    labels: list[Any] | None = Field(default=None, description="Sent by OpenRLHF; ignored.")


class GetRewardResponse(BaseModel):
    rewards: list[float] = Field(description="Raw score-head outputs, one per query, in order (no normalisation).")
    scores: list[float] = Field(description="The same values: OpenRLHF reads `scores` for filtering and logging.")
    extra_logs: dict[str, list[float]] = Field(
        description="Per-query values OpenRLHF logs: `head_version`, the head that scored the query (a float so "
        "that OpenRLHF can average it), and with an ensemble `uncertainty`, the members' reward std."
    )


@router.post(
    "/get_reward",
    response_model=GetRewardResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=request_body_openapi(GetRewardRequest, binary=False),
)
async def get_reward(request: Request, serving: ServingDep) -> GetRewardResponse:
    """OpenRLHF remote reward model: rewards for full templated texts (plain RM, no hidden states)."""
    engine, batcher, settings = serving.engine, serving.batcher, serving.settings
    req = await read_model(request, GetRewardRequest)
    logs: dict[str, list[float]] = {"head_version": []}
    if not req.query:
        if settings.ensemble > 1:
            logs["uncertainty"] = []
        return GetRewardResponse(rewards=[], scores=[], extra_logs=logs)
    items = await run_in_threadpool(prepare_queries, req.query, engine, settings)
    result = await batcher.submit(items)
    logs["head_version"] = [float(result.head_version)] * len(result.rewards)
    if result.uncertainty is not None:
        logs["uncertainty"] = result.uncertainty
    return GetRewardResponse(rewards=result.rewards, scores=result.rewards, extra_logs=logs)
