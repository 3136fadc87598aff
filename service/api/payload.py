"""Reading a request body in either encoding (docs/api.md) into one JSON-like tree whose tensors are WireTensors."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from r2m.client.wire import BINARY_CONTENT_TYPE, WireError, decode_binary, unpack_request

from ..errors import BadInput
from ..schemas import ErrorResponse

__all__ = ["ERROR_RESPONSES", "read_model", "request_body_openapi"]

M = TypeVar("M", bound=BaseModel)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Malformed body (not JSON, or not a valid binary frame).",
        401: "Missing or invalid API key.",
        413: "Body or item count over the configured limits.",
        415: "Unsupported Content-Type.",
        422: "The request parsed but a field is invalid; `detail` names it.",
        503: "Model loading or server overloaded; retry after `Retry-After` seconds.",
    }.items()
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
        return model.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None
