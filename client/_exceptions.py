"""The errors the r2m client raises; every one is an `R2MError`.

    R2MError
    ├── TransportError          could not reach the service (refused, reset, ...), after all retries
    ├── Timeout                 no answer within the timeout, after all retries
    ├── ServiceUnavailable      429, 502, 503 or 504 (busy, not ready) on every attempt
    ├── ServerError             another 5xx: the service failed; retrying will not help
    ├── InvalidRequest          a 4xx, or arguments the client rejected before sending
    │   ├── AuthenticationError 401/403: missing or wrong API key
    │   └── StaleHead           409: local read-outs of another head than the replica serves
    └── WireError               a tensor or body that does not follow the wire format (see `wire`)

`InvalidRequest` and `WireError` are also `ValueError`s, so code that catches `ValueError` for bad arguments
keeps working. Attributes: `status_code` on `ServiceUnavailable`, `ServerError` and `InvalidRequest` (`None`
when the client rejected the arguments itself), `retry_after` (seconds or `None`) on `ServiceUnavailable`, and
`detail` on `InvalidRequest`: the service's `detail`, a string or FastAPI's list of `{"loc", "msg", "type"}`.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError",
    "InvalidRequest",
    "R2MError",
    "ServerError",
    "ServiceUnavailable",
    "StaleHead",
    "Timeout",
    "TransportError",
    "WireError",
]


class R2MError(Exception):
    """Base class of every error the r2m client raises."""


class TransportError(R2MError):
    """The service could not be reached after all retries (the cause is chained as `__cause__`)."""


class Timeout(R2MError):
    """The service did not answer within the client's timeout, after all retries."""


class ServiceUnavailable(R2MError):
    """The service stayed busy or not ready (429, 502, 503, 504) after all retries."""

    def __init__(self, message: str, *, status_code: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after


class ServerError(R2MError):
    """The service failed while handling the request (5xx); the details are in its log, not the answer."""

    def __init__(self, message: str, *, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


class InvalidRequest(R2MError, ValueError):
    """The request is wrong; the message says what and where. Never retried.

    `status_code` is the service's 4xx, or `None` when the client rejected the arguments before sending.
    """

    def __init__(self, message: str, *, status_code: int | None = None, detail: Any = None):
        super().__init__(message)
        self.status_code = status_code
        self.detail = message if detail is None else detail


class AuthenticationError(InvalidRequest):
    """401/403: the service needs `Authorization: Bearer <key>` (set `api_key=` or `R2M_API_KEY`)."""


class StaleHead(InvalidRequest):
    """409: the request's read-outs were computed with another head version than the replica serves, now
    `head_version`. Recompute them with that version's weights and send again (`r2m.trainer.local` does)."""

    def __init__(self, message: str, *, head_version: int, detail: Any = None):
        super().__init__(message, status_code=409, detail=detail)
        self.head_version = head_version


class WireError(R2MError, ValueError):
    """A tensor or body does not follow the wire format; the message names the field path and the rule."""
