"""Reading a request body in either encoding (docs/api.md) into one JSON-like tree whose tensors are WireTensors."""

from __future__ import annotations

import json
import math
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
    "parse_json",
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


def request_body_openapi(model: type[BaseModel], binary: bool = True) -> dict[str, Any]:
    """`openapi_extra` declaring a request body read by `read_model`: JSON, and the binary encoding unless told."""
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if binary:
        content[BINARY_CONTENT_TYPE] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


MAX_JSON_DEPTH = 32  # the deepest request schema nests 6 levels; a deeper body is not one of ours
MAX_JSON_INT_DIGITS = 20  # every integer of the API fits in 64 bits


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (RFC 8259); send a finite number or null")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is out of range for a 64-bit float")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits; at most {MAX_JSON_INT_DIGITS} are accepted")
    return int(text)


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int)


def parse_json(body: bytes) -> Any:
    """The body as JSON, or BadInput naming what is wrong: 400 for what is not JSON (or not UTF-8, or numbers JSON
    has no room for: NaN, Infinity, out of range, over 20 digits), 422 for JSON no request of this API can be (nested
    deeper than MAX_JSON_DEPTH, or a string with an unpaired UTF-16 surrogate, which no tokenizer accepts), with
    the path of the offending value."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"body: not valid JSON: not UTF-8 at byte {exc.start}", status_code=400) from None
    try:
        payload = _DECODER.decode(text)
    except RecursionError:
        raise BadInput(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels", status_code=400) from None
    except ValueError as exc:  # JSONDecodeError, and what the number hooks raise
        raise BadInput(f"body: not valid JSON: {exc}", status_code=400) from None
    _check_tree(payload)
    return payload


def _check_tree(payload: Any) -> None:
    """Depth and text rules over a parsed body, iteratively (no recursion on what a client sent)."""
    stack: list[tuple[Any, str, int]] = [(payload, "body", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as exc:
                    bad = value[exc.start]
                    raise BadInput(
                        f"{path}: holds an unpaired UTF-16 surrogate (\\u{ord(bad):04x}) at character {exc.start}; "
                        "send valid Unicode text"
                    ) from None
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise BadInput(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in items:
            if isinstance(key, str):
                stack.append((key, f"{path} (a key)", depth))
            stack.append((child, f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]", depth + 1))


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
        payload = parse_json(body)
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
