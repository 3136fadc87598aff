"""POST /get_reward: OpenRLHF's remote reward-model contract, scored through the same dynamic batcher as /score.

Matched against OpenRLHF 0.11.2: the client is `SingleTurnAgentExecutor._fetch_rewards_via_http` in
`openrlhf/utils/agent.py` (one sample per request, many concurrently; it reads `rewards`, then `scores` falling back
to `rewards`, and `extra_logs`, whose values become per-sample tensors), the reference server is
`openrlhf/cli/serve_rm.py` (`{"rewards": r, "scores": r, "extra_logs": {...}}`, raw model outputs, normalisation off
by default). OpenRLHF sends no Authorization header: run this route with R2M_API_KEY unset or behind a proxy that
adds the key.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..config import ServiceSettings
from ..engine import PreparedItem, R2MModel
from ..errors import BadInput
from ..validation import max_tokens_of
from .deps import AuthDep, BatcherDep, ModelDep, SettingsDep
from .payload import ERROR_RESPONSES

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
        "that OpenRLHF can average it)."
    )


def prepare_queries(queries: list[str], model: R2MModel, settings: ServiceSettings) -> list[PreparedItem]:
    """Tokenize and check every query; raises BadInput naming the first bad one."""
    if len(queries) > settings.max_items_per_request:
        raise BadInput(
            f"query: {len(queries)} texts exceed R2M_MAX_ITEMS_PER_REQUEST={settings.max_items_per_request}",
            status_code=413,
        )
    limit = max_tokens_of(model, settings)
    out = []
    for i, text in enumerate(queries):
        encoded = model.backbone.encode_text(text)
        if len(encoded) == 0:
            raise BadInput(f"query[{i}]: tokenizes to no tokens; send the templated prompt + response")
        if len(encoded) > limit:
            raise BadInput(
                f"query[{i}]: {len(encoded)} reward-model tokens, over the limit of {limit} "
                "(R2M_MAX_TOKENS, capped by the model's context)"
            )
        out.append(PreparedItem(encoded=encoded, hidden=None, w=1.0))
    return out


@router.post("/get_reward", response_model=GetRewardResponse, responses=ERROR_RESPONSES)
async def get_reward(
    req: GetRewardRequest, model: ModelDep, batcher: BatcherDep, settings: SettingsDep
) -> GetRewardResponse:
    """OpenRLHF remote reward model: rewards for full templated texts (plain RM, no hidden states)."""
    if not req.query:
        return GetRewardResponse(rewards=[], scores=[], extra_logs={"head_version": []})
    items = await run_in_threadpool(prepare_queries, req.query, model, settings)
    result = await batcher.submit(items)
    return GetRewardResponse(
        rewards=result.rewards,
        scores=result.rewards,
        extra_logs={"head_version": [float(result.head_version)] * len(result.rewards)},
    )
