"""Wire schemas of the HTTP API (docs/api.md). Tensor fields accept the JSON form or, after a binary body is
unpacked, the `WireTensor` it references; both validate through the one codec in `r2m.client._wire`."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, model_validator

from r2m.client._wire import WireTensor, tensor_from_json

__all__ = [
    "ErrorResponse",
    "HealthResponse",
    "InfoResponse",
    "ReadyResponse",
    "ScoreItem",
    "ScoreRequest",
    "ScoreResponse",
    "TensorField",
]

TENSOR_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Tensor",
    "description": "A tensor: raw little-endian C-order bytes, base64 encoded (see docs/api.md).",
    "properties": {
        "dtype": {"type": "string", "enum": ["float32", "float16", "bfloat16"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 8},
        "data": {"type": "string", "contentEncoding": "base64"},
    },
    "required": ["dtype", "shape", "data"],
    "additionalProperties": False,
}


def _as_tensor(value: Any) -> WireTensor:
    if isinstance(value, WireTensor):
        return value
    if isinstance(value, dict):
        return tensor_from_json(value)
    raise ValueError('expected a tensor object {"dtype", "shape", "data"}')


TensorField = Annotated[WireTensor, PlainValidator(_as_tensor), WithJsonSchema(TENSOR_JSON_SCHEMA)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class ScoreItem(_Strict):
    prompt: str = Field(min_length=1, description="The query x, plain text (not templated).")
    response: str = Field(description="The response y, plain text; may be empty (policies do emit empty answers).")
    policy_hidden: TensorField | None = Field(
        None,
        description="The policy's last-layer hidden states over query + response, shape (T, policy_dim).",
    )


class ScoreRequest(_Strict):
    items: list[ScoreItem] = Field(min_length=1, description="Items to score, each scored independently.")
    step: int = Field(0, ge=0, description="RL step t of the omega schedule.")
    total_steps: int = Field(1, ge=1, description="Total RL steps T of the omega schedule.")

    @model_validator(mode="after")
    def _step_in_range(self) -> ScoreRequest:
        if self.step > self.total_steps:
            raise ValueError(f"step={self.step} must be <= total_steps={self.total_steps}")
        return self


class ScoreResponse(BaseModel):
    rewards: list[float] = Field(description="Raw score-head outputs, one per item, in order.")
    head_version: int = Field(description="The head version that scored every item of this request.")
    omega: float = Field(description="w(t) for the request's step; items without hidden states use 1.")


class ErrorResponse(BaseModel):
    detail: str | list[dict[str, Any]] = Field(description="What was wrong, where, and the limit.")


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    status: str
    head_version: int | None = None


class InfoResponse(BaseModel):
    version: str
    model: str
    model_kind: str
    rm_dim: int
    policy_dim: int
    attn_dim: int
    attn_heads: int
    omega_floor: float
    device: str
    dtype: str
    max_tokens: int
    max_hidden_tokens: int
    max_items_per_request: int
    max_batch_tokens: int
    max_request_bytes: int
    head_version: int
    auth: bool
    model_info: dict[str, Any] = Field(default_factory=dict)
