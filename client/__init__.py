"""r2m.client: the thin client a trainer imports to get rewards from the r2m service (numpy + httpx only).

    from r2m.client import R2MClient

    with R2MClient("http://127.0.0.1:8000", api_key="...") as rm:
        result = rm.score("What is 2+2?", ["4.", "Five."], hidden=[h0, h1], step=10, total_steps=100)
    print(result.rewards, result.head_version)  # h0, h1: (T, D) numpy arrays or torch tensors, bf16 welcome

`AsyncR2MClient` is the same, awaited. Errors are `R2MError`s; the tree is in `r2m.client._exceptions`.
"""

from ._client import AsyncR2MClient, EmbedResult, PreferencesResult, R2MClient, ScoreResult
from ._exceptions import (
    AuthenticationError,
    InvalidRequest,
    R2MError,
    ServerError,
    ServiceUnavailable,
    StaleHead,
    Timeout,
    TransportError,
    WireError,
)
from .wire import BINARY_CONTENT_TYPE, WireTensor

__all__ = [
    "BINARY_CONTENT_TYPE",
    "AsyncR2MClient",
    "AuthenticationError",
    "EmbedResult",
    "InvalidRequest",
    "PreferencesResult",
    "R2MClient",
    "R2MError",
    "ScoreResult",
    "ServerError",
    "ServiceUnavailable",
    "StaleHead",
    "Timeout",
    "TransportError",
    "WireError",
    "WireTensor",
]
