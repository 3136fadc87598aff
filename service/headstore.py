"""The head store: versioned R2M heads (safetensors blobs + metadata), the applied-batch ledger, swap notices.

Two implementations behind one interface: `RedisHeadStore` (the shared spine of a scaled-out deployment) and
`MemoryHeadStore` (the embedded `r2m serve` with no Redis). Versions form one increasing sequence: a publish names
the version it was trained from (`parent`) and fails with `Conflict` if another publish came first, so several
workers never fork the sequence. A rollback publishes a new version carrying an older version's weights, so
replicas only ever move forward.

Redis layout (prefix `r2m` by default):
    {p}:heads:latest          latest version (int)
    {p}:heads:versions        sorted set of kept versions
    {p}:head:{v}:weights      safetensors of the head's state dict (float32: the master copy)
    {p}:head:{v}:serving      the same with the attention matrices in float16: what replicas fetch (half the bytes)
    {p}:head:{v}:optim        safetensors of the optimizer state (for workers)
    {p}:head:{v}:meta         JSON metadata (version, parent, batch_ids, loss, created, sha256, config, model)
    {p}:heads:applied         set of batch ids already part of a published version
    {p}:heads:last_refusal    JSON of the last candidate a worker refused (reason, figures, batch ids, time)
    {p}:heads:announce        pub/sub channel, one JSON message per new version
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from typing import Any, Protocol

import redis

from .headcodec import sha256

__all__ = ["Conflict", "HeadStore", "MemoryHeadStore", "RedisHeadStore", "StoreUnavailable", "rollback"]


class Conflict(Exception):
    """Another version was published since the one this update was trained from."""


class StoreUnavailable(Exception):
    """The store (Redis) cannot be reached."""


class HeadStore(Protocol):
    def latest(self) -> int | None: ...
    def versions(self) -> list[int]: ...
    def meta(self, version: int) -> dict[str, Any] | None: ...
    def weights(self, version: int) -> bytes | None: ...
    def serving(self, version: int) -> bytes | None: ...
    def optim(self, version: int) -> bytes | None: ...
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
    ) -> dict[str, Any]: ...
    def wait_for_change(self, seen: int | None, timeout: float) -> int | None: ...
    def record_refusal(self, refusal: dict[str, Any]) -> None: ...
    def last_refusal(self) -> dict[str, Any] | None: ...
    def close(self) -> None: ...


def rollback(store: HeadStore, to: int) -> dict[str, Any]:
    """Republish kept version `to` as the newest version (its weights, optimizer state and serving copy), so that
    replicas move forward to it; KeyError when `to` is not kept."""
    for _ in range(10):
        meta, weights = store.meta(to), store.weights(to)
        if meta is None or weights is None:
            raise KeyError(to)
        base = {k: v for k, v in meta.items() if k in ("config", "model")}
        try:
            return store.publish(
                parent=store.latest(),
                weights=weights,
                optim=store.optim(to),
                meta={**base, "rollback_of": to},
                batch_ids=[],
                serving=store.serving(to),
            )
        except Conflict:
            continue  # a worker published meanwhile: roll back on top of that one
    raise Conflict("could not roll back: versions kept being published")


def _new_meta(
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


def _digests(weights: bytes, serving: bytes | None) -> tuple[str, str | None]:
    """Hashed before a publish takes its timestamp: the replica's swap latency starts at `created`."""
    return sha256(weights), sha256(serving) if serving is not None else None


class MemoryHeadStore:
    """In-process store for the embedded mode; same semantics as Redis, guarded by one condition variable."""

    def __init__(self, keep: int = 5) -> None:
        self.keep = keep
        self._cond = threading.Condition()
        self._versions: dict[int, tuple[bytes, bytes | None, dict[str, Any], bytes | None]] = {}
        self._latest: int | None = None
        self._applied: set[str] = set()
        self._refusal: dict[str, Any] | None = None

    def latest(self) -> int | None:
        return self._latest

    def versions(self) -> list[int]:
        return sorted(self._versions)

    def meta(self, version: int) -> dict[str, Any] | None:
        entry = self._versions.get(version)
        return dict(entry[2]) if entry else None

    def weights(self, version: int) -> bytes | None:
        entry = self._versions.get(version)
        return entry[0] if entry else None

    def serving(self, version: int) -> bytes | None:
        entry = self._versions.get(version)
        return entry[3] if entry else None

    def optim(self, version: int) -> bytes | None:
        entry = self._versions.get(version)
        return entry[1] if entry else None

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
    ) -> dict[str, Any]:
        digests = _digests(weights, serving)
        with self._cond:
            if parent != self._latest:
                raise Conflict(f"latest is {self._latest}, update was trained from {parent}")
            version = 0 if parent is None else parent + 1
            full = _new_meta(version, parent, weights, meta, batch_ids, serving, digests)
            self._versions[version] = (weights, optim, full, serving)
            self._applied.update(batch_ids)
            self._latest = version
            for old in sorted(self._versions)[: -self.keep]:
                del self._versions[old]
            self._cond.notify_all()
            return full

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


class RedisHeadStore:
    """The head store in Redis, shared by every replica and worker."""

    def __init__(self, url: str, prefix: str = "r2m", keep: int = 5, client: redis.Redis | None = None) -> None:
        self.url = url
        self.keep = keep
        self.p = prefix
        self.r = client or redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self._pubsub: Any = None

    def _k(self, *parts: object) -> str:
        return ":".join([self.p, *map(str, parts)])

    def _call(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"redis at {self.url} is unreachable: {exc}") from exc

    def latest(self) -> int | None:
        value = self._call(self.r.get, self._k("heads", "latest"))
        return int(value) if value is not None else None

    def versions(self) -> list[int]:
        return [int(v) for v in self._call(self.r.zrange, self._k("heads", "versions"), 0, -1)]

    def meta(self, version: int) -> dict[str, Any] | None:
        raw = self._call(self.r.get, self._k("head", version, "meta"))
        return json.loads(raw) if raw is not None else None

    def weights(self, version: int) -> bytes | None:
        return self._call(self.r.get, self._k("head", version, "weights"))

    def serving(self, version: int) -> bytes | None:
        return self._call(self.r.get, self._k("head", version, "serving"))

    def optim(self, version: int) -> bytes | None:
        return self._call(self.r.get, self._k("head", version, "optim"))

    def applied(self, batch_ids: Iterable[str]) -> set[str]:
        ids = list(batch_ids)
        if not ids:
            return set()
        flags = self._call(self.r.smismember, self._k("heads", "applied"), ids)
        return {b for b, f in zip(ids, flags) if f}

    def publish(
        self,
        *,
        parent: int | None,
        weights: bytes,
        optim: bytes | None,
        meta: dict[str, Any],
        batch_ids: list[str],
        serving: bytes | None = None,
    ) -> dict[str, Any]:
        latest_key = self._k("heads", "latest")
        digests = _digests(weights, serving)
        try:
            with self.r.pipeline() as pipe:
                pipe.watch(latest_key)
                raw = pipe.get(latest_key)
                current = int(raw) if raw is not None else None
                if current != parent:
                    raise Conflict(f"latest is {current}, update was trained from {parent}")
                version = 0 if parent is None else parent + 1
                full = _new_meta(version, parent, weights, meta, batch_ids, serving, digests)
                pipe.multi()
                pipe.set(self._k("head", version, "weights"), weights)
                if serving is not None:
                    pipe.set(self._k("head", version, "serving"), serving)
                if optim is not None:
                    pipe.set(self._k("head", version, "optim"), optim)
                pipe.set(self._k("head", version, "meta"), json.dumps(full))
                if batch_ids:
                    pipe.sadd(self._k("heads", "applied"), *batch_ids)
                pipe.zadd(self._k("heads", "versions"), {str(version): version})
                pipe.set(latest_key, version)
                pipe.publish(self._k("heads", "announce"), json.dumps({"version": version, "sha256": full["sha256"]}))
                pipe.execute()
        except redis.WatchError as exc:
            raise Conflict("another version was published during this publish") from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"redis at {self.url} is unreachable: {exc}") from exc
        self._prune()
        return full

    def _prune(self) -> None:
        old = self._call(self.r.zrange, self._k("heads", "versions"), 0, -(self.keep + 1))
        for v in old:
            v = int(v)
            # Unlist first, so kept_versions never names a version whose blobs are already gone.
            self._call(self.r.zrem, self._k("heads", "versions"), str(v))
            keys = [self._k("head", v, name) for name in ("weights", "serving", "optim", "meta")]
            self._call(self.r.delete, *keys)

    def wait_for_change(self, seen: int | None, timeout: float) -> int | None:
        """Block until an announcement or `timeout`; return the latest version either way (timer catch-up)."""
        try:
            if self._pubsub is None:
                self._pubsub = self.r.pubsub(ignore_subscribe_messages=True)
                self._pubsub.subscribe(self._k("heads", "announce"))
            latest = self.latest()
            if latest != seen:
                return latest
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if self._pubsub.get_message(timeout=left) is not None:
                    break
            return self.latest()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._drop_pubsub()
            raise StoreUnavailable(f"redis at {self.url} is unreachable: {exc}") from exc

    def record_refusal(self, refusal: dict[str, Any]) -> None:
        """The last candidate a worker refused to publish (shown by /heads/current)."""
        self._call(self.r.set, self._k("heads", "last_refusal"), json.dumps(refusal))

    def last_refusal(self) -> dict[str, Any] | None:
        raw = self._call(self.r.get, self._k("heads", "last_refusal"))
        return json.loads(raw) if raw is not None else None

    def _drop_pubsub(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
            self._pubsub = None

    def close(self) -> None:
        self._drop_pubsub()
        self.r.close()
