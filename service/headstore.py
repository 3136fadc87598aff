"""The head store: versioned R2M heads (safetensors blobs + metadata), the applied-batch ledger, swap notices.

Two implementations behind one interface: `redisheads.RedisHeadStore` (the shared spine of a scaled-out deployment;
its Redis layout is there) and `MemoryHeadStore` here (the embedded `r2m serve` with no Redis). Versions form one
increasing sequence: a publish names the version it was trained from (`parent`) and fails with `Conflict` if
another publish came first, so several workers never fork the sequence. A rollback publishes a new version carrying
an older version's weights, so replicas only ever move forward.

A kept version holds what a replica serves (the serving copy) and what a rollback restores (the float32 master); the
worker's optimizer state exists once, tagged with the version it was taken at, what a restarted or second worker
resumes from (docs/headstore.md has the bytes of each). The worker writes it every `R2M_OPTIMIZER_SAVE_S` and when it
stops, not with every version: a publish without one keeps the stored state (`keep_optim`), a publish with one drops
the previous state in the version's transaction and stores the new one after the announcement, so the replicas'
swap never waits for bytes only the worker reads. A worker that dies in between leaves no state, and the next update
starts AdamW afresh.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from typing import Any, Protocol

from .headcodec import sha256

__all__ = [
    "Conflict",
    "HeadStore",
    "MemoryHeadStore",
    "StoreFull",
    "StoreUnavailable",
    "digests_of",
    "new_meta",
    "rollback",
]


class Conflict(Exception):
    """Another version was published since the one this update was trained from."""


class StoreUnavailable(Exception):
    """The store (Redis) cannot be reached."""


class StoreFull(Exception):
    """A publish does not fit in the store (Redis answered OOM: `maxmemory` with `noeviction`); nothing of it was
    written. The message says how much the version needs and what Redis holds."""


class HeadStore(Protocol):
    def latest(self) -> int | None: ...
    def versions(self) -> list[int]: ...
    def meta(self, version: int) -> dict[str, Any] | None: ...
    def weights(self, version: int) -> bytes | None: ...
    def serving(self, version: int) -> bytes | None: ...
    def optim(self, version: int) -> bytes | None: ...
    def optim_state(self) -> tuple[int, bytes] | None: ...
    def save_optim(self, version: int, optim: bytes) -> bool: ...
    def applied(self, batch_ids: Iterable[str]) -> set[str]: ...
    def publish(
        self,
        *,
        parent: int | None,
        weights: bytes,
        optim: bytes | None,
        meta: dict[str, Any],
        batch_ids: list[str],
        serving: bytes | None = None,
        digests: tuple[str, str | None] | None = None,
        keep_optim: bool = False,
    ) -> dict[str, Any]: ...
    def wait_for_change(self, seen: int | None, timeout: float) -> int | None: ...
    def record_refusal(self, refusal: dict[str, Any]) -> None: ...
    def last_refusal(self) -> dict[str, Any] | None: ...
    def footprint(self) -> dict[str, int]: ...
    def close(self) -> None: ...


def rollback(store: HeadStore, to: int) -> dict[str, Any]:
    """Republish kept version `to` as the newest version (its weights and serving copy), so that replicas move
    forward to it; KeyError when `to` is not kept.

    One optimizer state is stored, taken at one version: rolling back to that version carries it over, to any other
    resets it (the next update starts AdamW afresh from `to`'s weights). The new version's metadata says which
    (`optimizer`: `reset` or `restored`)."""
    for _ in range(10):
        meta, weights = store.meta(to), store.weights(to)
        if meta is None or weights is None:
            raise KeyError(to)
        base = {k: v for k, v in meta.items() if k in ("config", "model")}
        serving = store.serving(to)
        optim = store.optim(to)  # None unless the stored state was taken at `to`
        # The blobs are the ones `to` was published with: its digests, not a second hash of the same bytes.
        digests = (meta["sha256"], meta.get("serving_sha256") if serving is not None else None)
        try:
            return store.publish(
                parent=store.latest(),
                weights=weights,
                optim=optim,
                meta={**base, "rollback_of": to, "optimizer": "reset" if optim is None else "restored"},
                batch_ids=[],
                serving=serving,
                digests=digests,
            )
        except Conflict:
            continue  # a worker published meanwhile: roll back on top of that one
    raise Conflict("could not roll back: versions kept being published")


def new_meta(
    version: int,
    parent: int | None,
    weights: bytes,
    meta: dict[str, Any],
    batch_ids: list[str],
    serving: bytes | None,
    digests: tuple[str, str | None],
) -> dict:
    full = {
        **meta,
        "version": version,
        "parent": parent,
        "batch_ids": list(batch_ids),
        "created": time.time(),
        "sha256": digests[0],
        "bytes": len(weights),
    }
    if serving is not None:
        full |= {"serving_sha256": digests[1], "serving_bytes": len(serving)}
    return full


def digests_of(weights: bytes, serving: bytes | None) -> tuple[str, str | None]:
    """Hashed before a publish takes its timestamp (the replica's swap latency starts at `created`), unless the
    writer passes the digests it took when it encoded the blobs."""
    return sha256(weights), sha256(serving) if serving is not None else None


class MemoryHeadStore:
    """In-process store for the embedded mode; same semantics as Redis, guarded by one condition variable."""

    def __init__(self, keep: int = 5) -> None:
        self.keep = keep
        self._cond = threading.Condition()
        self._versions: dict[int, tuple[bytes, dict[str, Any], bytes | None]] = {}  # weights, meta, serving
        self._optim: tuple[int, bytes] | None = None  # the optimizer state and the version it was taken at
        self._latest: int | None = None
        self._applied: set[str] = set()
        self._refusal: dict[str, Any] | None = None

    def latest(self) -> int | None:
        return self._latest

    def versions(self) -> list[int]:
        return sorted(self._versions)

    def meta(self, version: int) -> dict[str, Any] | None:
        entry = self._versions.get(version)
        return dict(entry[1]) if entry else None

    def weights(self, version: int) -> bytes | None:
        entry = self._versions.get(version)
        return entry[0] if entry else None

    def serving(self, version: int) -> bytes | None:
        entry = self._versions.get(version)
        return entry[2] if entry else None

    def optim(self, version: int) -> bytes | None:
        """The stored optimizer state if it was taken at `version`; None otherwise."""
        kept = self._optim
        return kept[1] if kept is not None and kept[0] == version else None

    def optim_state(self) -> tuple[int, bytes] | None:
        """The stored optimizer state and the version it was taken at (the newest, or an older one of its line)."""
        return self._optim

    def save_optim(self, version: int, optim: bytes) -> bool:
        """Store the optimizer state taken at `version` if that is still the newest version; whether it was."""
        with self._cond:
            if version != self._latest:
                return False
            self._optim = (version, optim)
            return True

    def applied(self, batch_ids: Iterable[str]) -> set[str]:
        return {b for b in batch_ids if b in self._applied}

    def publish(
        self,
        *,
        parent: int | None,
        weights: bytes,
        optim: bytes | None,
        meta: dict[str, Any],
        batch_ids: list[str],
        serving: bytes | None = None,
        digests: tuple[str, str | None] | None = None,
        keep_optim: bool = False,
    ) -> dict[str, Any]:
        digests = digests or digests_of(weights, serving)
        with self._cond:
            if parent != self._latest:
                raise Conflict(f"latest is {self._latest}, update was trained from {parent}")
            version = 0 if parent is None else parent + 1
            full = new_meta(version, parent, weights, meta, batch_ids, serving, digests)
            self._versions[version] = (weights, full, serving)
            if optim is not None or not keep_optim:
                self._optim = (version, optim) if optim is not None else None
            self._applied.update(batch_ids)
            self._latest = version
            for old in sorted(self._versions)[: -self.keep]:
                del self._versions[old]
            self._cond.notify_all()
            return full

    def footprint(self) -> dict[str, int]:
        """Bytes held, by part: `weights`, `serving` and `meta` of the kept versions, and `optimizer`."""
        with self._cond:
            entries = list(self._versions.values())
            optim = self._optim
        return {
            "weights": sum(len(w) for w, _, _ in entries),
            "serving": sum(len(s or b"") for _, _, s in entries),
            "meta": sum(len(json.dumps(m)) for _, m, _ in entries),
            "optimizer": len(optim[1]) if optim is not None else 0,
        }

    def wait_for_change(self, seen: int | None, timeout: float) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: self._latest != seen, timeout=timeout)
            return self._latest

    def record_refusal(self, refusal: dict[str, Any]) -> None:
        self._refusal = dict(refusal)

    def last_refusal(self) -> dict[str, Any] | None:
        return self._refusal

    def close(self) -> None:
        pass
