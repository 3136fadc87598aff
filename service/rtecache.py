"""Reward-token embeddings by text: the backbone is frozen, so a text's RTE never changes. The worker keeps one
cache (an update re-reads the texts of many batches) and each replica one for /embed (a local-feedback client's
/score then sends the read-out and the replica reuses the RTE instead of running the backbone again)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch

__all__ = ["RTECache"]


class RTECache:
    """A least-recently-used map from a (prompt, response) hash to its RTE, at most `max_bytes` of tensors.
    Thread-safe: a replica's request threads read it while its model thread fills it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._data: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(prompt: str, response: str) -> bytes:
        return hashlib.sha256(f"{len(prompt)}:{prompt}{response}".encode()).digest()

    def get(self, key: bytes) -> torch.Tensor | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        with self._lock:
            if size > self.max_bytes or key in self._data:
                return
            self._data[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._data.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._data)
