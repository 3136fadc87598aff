"""Reading a request body in either encoding (docs/api.md) into one JSON-like tree whose tensors are WireTensors."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from r2m.client.wire import BINARY_CONTENT_TYPE, WireError, decode_binary, unpack_request

from ..errors import BadInput
from ..schemas import ErrorResponse, StaleHeadResponse

__all__ = [
    "ERROR_RESPONSES",
    "STALE_HEAD_RESPONSE",
    "error_responses",
    "read_model",
    "read_model_and_body",
    "request_body_openapi",
]

M = TypeVar("M", bound=BaseModel)

_ERRORS = {
    400: "Malformed body (not JSON, or not a valid binary frame).",
    401: "Missing or invalid API key.",
    404: "No such head version (see /heads/current for the kept ones).",
    413: "Body or item count over the configured limits.",
    415: "Unsupported Content-Type.",
    422: "The request parsed but a field is invalid; `detail` names it.",
    503: "Model loading, server overloaded or store unreachable; retry after `Retry-After` seconds.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` entries of these error statuses, from the one table above."""
    return {code: {"model": ErrorResponse, "description": _ERRORS[code]} for code in codes}


# What a route that reads a request body can answer besides 200.
ERROR_RESPONSES = error_responses(400, 401, 413, 415, 422, 503)
# /score with local read-outs of another head than the served one.
STALE_HEAD_RESPONSE: dict[int | str, dict[str, Any]] = {
    409: {
        "model": StaleHeadResponse,
        "description": "The read-outs came from another head version than this replica serves (`head_version`).",
    }
}


def request_body_openapi(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` declaring both encodings of a request body."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
                BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


async def read_model(request: Request, model: type[M]) -> M:
    """Parse and validate the body as `model`, from JSON or from the binary (safetensors) encoding."""
    return (await read_model_and_body(request, model))[0]


async def read_model_and_body(request: Request, model: type[M]) -> tuple[M, bytes | None]:
    """`read_model`, and the body itself when it came in the binary encoding (None for JSON)."""
    body = await request.body()
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    payload: Any
    if ctype == BINARY_CONTENT_TYPE:
        try:
            meta, tensors = decode_binary(body)
            payload = unpack_request(meta, tensors)
        except WireError as exc:
            raise BadInput(f"body: invalid binary request: {exc}", status_code=400) from exc
    elif ctype in ("application/json", "") or ctype.endswith("+json"):
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInput(f"body: not valid JSON: {exc}", status_code=400) from exc
    else:
        raise BadInput(
            f"Content-Type {ctype!r} is not supported; send application/json or {BINARY_CONTENT_TYPE}",
            status_code=415,
        )
    try:
        return model.model_validate(payload), body if ctype == BINARY_CONTENT_TYPE else None
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None
