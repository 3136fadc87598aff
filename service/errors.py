"""Errors the routes raise on bad input; the app turns each into a 4xx whose `detail` says what and where."""

from __future__ import annotations

__all__ = ["BadInput", "PayloadTooLarge"]


class BadInput(Exception):
    """A request that parsed but says something the service cannot accept (422 unless told otherwise)."""

    def __init__(self, detail: str, status_code: int = 422) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status_code = status_code


class PayloadTooLarge(BadInput):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"request body exceeds R2M_MAX_REQUEST_BYTES={limit} bytes; split it (the client chunks large "
            "requests) or raise the limit",
            status_code=413,
        )
