"""Wire schemas of the HTTP API (docs/api.md). Tensor fields accept the JSON form or, after a binary body is
unpacked, the `WireTensor` it references; both validate through the one codec in `r2m.client.wire`."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, model_validator

from r2m.client.wire import WireTensor, tensor_from_json

__all__ = [
    "as_payload",
    "ErrorResponse",
    "HeadInfo",
    "PreferenceGroup",
    "PreferencePair",
    "PreferencesAccepted",
    "PreferencesRequest",
    "RollbackRequest",
    "DeadLetterInfo",
    "EmbedItem",
    "EmbedRequest",
    "EmbedResponse",
    "StaleHeadResponse",
    "DeadLetters",
    "ReplayRequest",
    "ReplayResult",
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


def as_payload(obj: Any) -> Any:
    """A validated request as a plain tree with its WireTensors in place (for `pack_request`)."""
    if isinstance(obj, BaseModel):
        return {name: as_payload(getattr(obj, name)) for name in type(obj).model_fields}
    if isinstance(obj, list):
        return [as_payload(v) for v in obj]
    return obj


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class ScoreItem(_Strict):
    prompt: str = Field(min_length=1, description="The query x, plain text (not templated).")
    response: str = Field(description="The response y, plain text; may be empty (policies do emit empty answers).")
    policy_hidden: TensorField | None = Field(
        None,
        description="The policy's last-layer hidden states over query + response, shape (T, policy_dim); with "
        "`prefix`, only the rows after the shared prefix (may then be (0, policy_dim)).",
    )
    prefix: int | None = Field(
        None,
        ge=0,
        description="Index into the request's `prefixes`: the item's hidden states are "
        "cat(prefixes[prefix], policy_hidden). Needs policy_hidden.",
    )
    readout: TensorField | None = Field(
        None,
        description="Local feedback (docs/api.md): the attention read-out a = attention(e, h) computed next to the "
        "policy with head `head_version`'s weights on the RTE /embed returned, shape (rm_dim,); instead of "
        "policy_hidden. Needs the request's head_version.",
    )


class ScoreRequest(_Strict):
    items: list[ScoreItem] = Field(min_length=1, description="Items to score, each scored independently.")
    prefixes: list[TensorField] = Field(
        default_factory=list,
        description="Shared prompt-prefix hidden states, each (T_p, policy_dim), T_p >= 1, sent once for the items "
        "that name them in `prefix`; every prefix must be used by at least one item.",
    )
    step: int = Field(0, ge=0, description="RL step t of the omega schedule.")
    total_steps: int = Field(1, ge=1, description="Total RL steps T of the omega schedule.")
    return_members: bool = Field(False, description="With an ensemble (R2M_ENSEMBLE > 1): also each member's reward.")
    head_version: int | None = Field(
        None,
        ge=0,
        description="The head version the items' read-outs were computed with; 409 when this replica serves "
        "another (its version is in the answer). Required with read-outs.",
    )

    @model_validator(mode="after")
    def _readouts_name_their_head(self) -> ScoreRequest:
        for i, item in enumerate(self.items):
            if item.readout is None:
                continue
            if item.policy_hidden is not None or item.prefix is not None:
                raise ValueError(f"items[{i}]: send either policy_hidden (and prefix) or readout, not both")
            if self.head_version is None:
                raise ValueError(f"items[{i}].readout needs the request's head_version (the head it came from)")
        return self

    @model_validator(mode="after")
    def _step_in_range(self) -> ScoreRequest:
        if self.step > self.total_steps:
            raise ValueError(f"step={self.step} must be <= total_steps={self.total_steps}")
        return self

    @model_validator(mode="after")
    def _prefixes_used_and_in_range(self) -> ScoreRequest:
        used = set()
        for i, item in enumerate(self.items):
            if item.prefix is None:
                continue
            if item.prefix >= len(self.prefixes):
                raise ValueError(
                    f"items[{i}].prefix={item.prefix} is out of range: the request has {len(self.prefixes)} prefixes"
                )
            if item.policy_hidden is None:
                raise ValueError(
                    f"items[{i}].prefix is set but policy_hidden is missing; send the rows after the prefix "
                    "(shape (0, policy_dim) when there are none)"
                )
            used.add(item.prefix)
        unused = sorted(set(range(len(self.prefixes))) - used)
        if unused:
            raise ValueError(f"prefixes{unused} are not used by any item; send only the prefixes items name")
        return self


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
BATCH_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"


class PreferenceGroup(_Strict):
    prompt: str = Field(min_length=1, description="The query shared by the group.")
    responses: list[str] = Field(min_length=2, description="The group's K responses (K >= 2).")
    hidden: list[TensorField] | None = Field(
        None,
        description="The current policy's last-layer hidden states for each response, K tensors (T_k, policy_dim); "
        "omit for feedback-free (head-only) updates.",
    )
    rewards: list[FiniteFloat] | None = Field(
        None, description="The rewards the responses got at scoring time (optional; used when ranking by them)."
    )

    @model_validator(mode="after")
    def _counts(self) -> PreferenceGroup:
        k = len(self.responses)
        if self.hidden is not None and len(self.hidden) != k:
            raise ValueError(f"hidden has {len(self.hidden)} tensors for {k} responses")
        if self.rewards is not None and len(self.rewards) != k:
            raise ValueError(f"rewards has {len(self.rewards)} values for {k} responses")
        return self


class PreferencePair(_Strict):
    prompt: str = Field(min_length=1)
    chosen: str
    rejected: str
    chosen_hidden: TensorField | None = None
    rejected_hidden: TensorField | None = None

    @model_validator(mode="after")
    def _both_or_none(self) -> PreferencePair:
        if (self.chosen_hidden is None) != (self.rejected_hidden is None):
            raise ValueError("give hidden states for both chosen and rejected, or for neither")
        return self


class PreferencesRequest(_Strict):
    groups: list[PreferenceGroup] = Field(default_factory=list, description="Groups for in-group pseudo-labels.")
    pairs: list[PreferencePair] = Field(default_factory=list, description="Labelled pairs (our extension).")
    step: int = Field(ge=0, description="The RL step t whose policy produced the hidden states (omega schedule).")
    total_steps: int = Field(ge=1, description="Total RL steps T.")
    batch_id: str | None = Field(
        None,
        pattern=BATCH_ID_PATTERN,
        description="Client-chosen id; a retried batch with the same id is trained once.",
    )

    def texts(self) -> list[tuple[str, str]]:
        """Every (prompt, response) of the batch in its one flat order: each group's responses, then each pair's
        chosen and rejected. The tokens queued with a batch and the worker's flattening follow it."""
        out = [(g.prompt, r) for g in self.groups for r in g.responses]
        return out + [(p.prompt, r) for p in self.pairs for r in (p.chosen, p.rejected)]

    @model_validator(mode="after")
    def _not_empty(self) -> PreferencesRequest:
        if not self.groups and not self.pairs:
            raise ValueError("a preference batch needs at least one group or pair")
        if self.step > self.total_steps:
            raise ValueError(f"step={self.step} must be <= total_steps={self.total_steps}")
        return self


class PreferencesAccepted(BaseModel):
    batch_id: str = Field(description="Id of the queued batch; head metadata lists the batch ids each version used.")
    groups: int
    pairs: int


class HeadInfo(BaseModel):
    version: int
    parent: int | None = None
    batch_ids: list[str] = Field(default_factory=list)
    created: float | None = None
    sha256: str | None = None
    loss: dict[str, float] | None = None
    rollback_of: int | None = None
    optimizer: str | None = Field(
        None,
        description="A rollback's effect on the worker's optimizer state, kept for the newest version only: reset "
        "(rolled back to an older version) or restored (to the newest).",
    )
    guard: dict[str, float] | None = Field(
        None, description="The head guard's figures for this version on its canary (docs/api.md, 'The head guard')."
    )
    served_version: int = Field(description="The version this replica serves right now.")
    served_sha256: str | None = Field(None, description="Hash of the copy this replica serves (None: version 0).")
    served_swap_ms: dict[str, float] | None = Field(
        None,
        description="How this replica's swap to the served version went, in ms per phase: notice (publication to "
        "the load's start), fetch, hash, load (decode and checks), install. None for a head it built itself.",
    )
    kept_versions: list[int] = Field(default_factory=list)
    last_refusal: dict[str, Any] | None = Field(
        None, description="The last candidate head a worker refused to publish: reason, figures, batch ids, time."
    )


class DeadLetterInfo(BaseModel):
    id: str = Field(description="Its id in the dead-letter stream (what a replay names).")
    batch_id: str
    reason: str = Field(description="Why the worker gave up: undecodable, update_error, non_finite_*, guard_*.")
    detail: str
    attempts: int
    failed: float = Field(description="Unix time the worker gave up.")
    enqueued: float = Field(description="Unix time /preferences accepted the batch.")


class DeadLetters(BaseModel):
    dead_letters: list[DeadLetterInfo]


class ReplayRequest(_Strict):
    ids: list[str] | None = Field(None, description="Dead-letter ids to replay; omit (or null) for all of them.")


class ReplayResult(BaseModel):
    batch_ids: list[str] = Field(description="The batches put back on the preference stream.")


class RollbackRequest(_Strict):
    version: int = Field(ge=0, description="A kept version to return to; it is republished as a new version.")


class ScoreResponse(BaseModel):
    rewards: list[float] = Field(
        description="Raw score-head outputs, one per item, in order; an ensemble's aggregated (R2M_AGGREGATION)."
    )
    head_version: int = Field(description="The head version that scored every item of this request.")
    omega: float = Field(description="w(t) for the request's step; items without hidden states use 1.")
    uncertainty: list[float] | None = Field(
        None, description="With an ensemble: each item's uncertainty, the members' reward std (absent otherwise)."
    )
    members: list[list[float]] | None = Field(
        None, description="With an ensemble and return_members: each item's members' rewards."
    )


class EmbedItem(_Strict):
    prompt: str = Field(min_length=1, description="The query x, plain text (not templated).")
    response: str = Field(description="The response y, plain text; may be empty.")


class EmbedRequest(_Strict):
    items: list[EmbedItem] = Field(min_length=1, description="Items whose reward-token embeddings to return.")


class EmbedResponse(BaseModel):
    embeddings: dict[str, Any] = Field(
        description="The items' reward-token embeddings e, one float32 tensor (N, rm_dim) in the wire's JSON form."
    )
    rewards: list[float] = Field(description="The plain reward model's rewards phi(e) (w = 1), one per item.")
    head_version: int = Field(description="The head this replica serves: the one to compute read-outs with.")


class StaleHeadResponse(BaseModel):
    detail: str = Field(description="Which head the read-outs came from and which one this replica serves.")
    head_version: int = Field(description="The head version this replica serves.")


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
    ensemble: int = Field(description="Members of the served head (R2M_ENSEMBLE); 1: a single score layer.")
    aggregation: str = Field(description="How an ensemble's members' rewards become one (R2M_AGGREGATION).")
    uwo_lambda: float = Field(description="With aggregation `uwo`: the weight of the members' variance.")
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
    judge: dict[str, Any] | None = Field(
        None,
        description="The worker's judge (R2M_JUDGE): kind, model, pairs per batch, both orders, with pseudo-labels, "
        "rate limits; never its key. None: no judge.",
    )
