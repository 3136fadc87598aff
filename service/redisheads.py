"""The head store in Redis (`headstore` has its semantics): shared by every replica and worker.

Redis layout (prefix `r2m` by default):
    {p}:heads:latest          latest version (int)
    {p}:heads:versions        sorted set of kept versions
    {p}:head:{v}:weights      safetensors of the head's state dict (float32: the master copy)
    {p}:head:{v}:serving      the serving copy: what replicas fetch and multiply (`headcodec`)
    {p}:head:{v}:meta         JSON metadata (version, parent, batch_ids, loss, created, sha256, config, model)
    {p}:heads:optim           the worker's optimizer state (safetensors), one whatever R2M_HEAD_KEEP is
    {p}:heads:optim:version   the version it was taken at
    {p}:heads:applied         set of batch ids already part of a published version
    {p}:heads:last_refusal    JSON of the last candidate a worker refused (reason, figures, batch ids, time)
    {p}:heads:announce        pub/sub channel, one JSON message per new version

Configure Redis with `maxmemory-policy noeviction` (an eviction could drop the preference stream): a publish that
does not fit is then refused whole (`StoreFull`), and nothing of it is written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any

import redis

from .headstore import Conflict, StoreFull, StoreUnavailable, digests_of, new_meta

__all__ = ["RedisHeadStore", "redis_value_bytes"]

log = logging.getLogger("r2m.headstore")


def redis_value_bytes(n: int) -> int:
    """What Redis holds for a value of `n` bytes of the size of head blobs: its allocator's (jemalloc's) size class,
    four classes per power of two, so up to 25% above `n` (a 128 MiB blob and its header take 160 MiB)."""
    if n <= 4096:
        return n
    step = 1 << max(0, (n - 1).bit_length() - 3)  # 2^k < n <= 2^(k+1): classes every 2^(k-2)
    return -(-n // step) * step


class RedisHeadStore:
    """The head store in Redis (module docstring), shared by every replica and worker."""

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
        except redis.OutOfMemoryError as exc:
            raise StoreFull(f"redis at {self.url} refused a write: {exc} ({self._memory()})") from exc

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
        """The stored optimizer state if it was taken at `version`; None otherwise."""
        kept = self.optim_state()
        return kept[1] if kept is not None and kept[0] == version else None

    def optim_state(self) -> tuple[int, bytes] | None:
        """The stored optimizer state and the version it was taken at (the newest, or an older one of its line)."""
        kept, state = self._call(self.r.mget, [self._k("heads", "optim", "version"), self._k("heads", "optim")])
        return (int(kept), state) if kept is not None and state is not None else None

    def applied(self, batch_ids: Iterable[str]) -> set[str]:
        ids = list(batch_ids)
        if not ids:
            return set()
        flags = self._call(self.r.smismember, self._k("heads", "applied"), ids)
        return {b for b, f in zip(ids, flags) if f}

    def _version_keys(self, version: int) -> list[str]:
        # `optim`: where versions kept their own optimizer state before it was kept once (`{p}:heads:optim`); the
        # keys of a store written by an older r2m go with their versions.
        return [self._k("head", version, name) for name in ("weights", "serving", "meta", "optim")]

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
        """Publish a version on top of `parent` (module docstring): Conflict when another came first, StoreFull when
        it does not fit (nothing written), StoreUnavailable when Redis cannot be reached. Without `optim`, the stored
        optimizer state stays if `keep_optim`, else it goes (a rollback's reset)."""
        latest_key, versions_key = self._k("heads", "latest"), self._k("heads", "versions")
        digests = digests or digests_of(weights, serving)
        try:
            with self.r.pipeline() as pipe:
                pipe.watch(latest_key)
                raw = pipe.get(latest_key)
                current = int(raw) if raw is not None else None
                if current != parent:
                    raise Conflict(f"latest is {current}, update was trained from {parent}")
                version = 0 if parent is None else parent + 1
                kept = [int(v) for v in pipe.zrange(versions_key, 0, -1)]  # type: ignore[arg-type]
                full = new_meta(version, parent, weights, meta, batch_ids, serving, digests)
                pipe.multi()
                # The oldest go in the same transaction, so the store never holds more than `keep` versions. UNLINK:
                # Redis frees the blobs' memory on its background thread, not before it announces this version.
                for old in kept[: max(0, len(kept) + 1 - self.keep)]:
                    pipe.zrem(versions_key, str(old))  # unlisted with its blobs: kept_versions never names a gone one
                    pipe.unlink(*self._version_keys(old))
                if optim is not None or not keep_optim:  # a new state is stored after the announcement
                    pipe.unlink(self._k("heads", "optim"), self._k("heads", "optim", "version"))
                pipe.set(self._k("head", version, "weights"), weights)
                if serving is not None:
                    pipe.set(self._k("head", version, "serving"), serving)
                pipe.set(self._k("head", version, "meta"), json.dumps(full))
                if batch_ids:
                    pipe.sadd(self._k("heads", "applied"), *batch_ids)
                pipe.zadd(versions_key, {str(version): version})
                pipe.set(latest_key, version)
                pipe.publish(self._k("heads", "announce"), json.dumps({"version": version, "sha256": full["sha256"]}))
                pipe.execute()
        except redis.WatchError as exc:
            raise Conflict("another version was published during this publish") from exc
        except redis.OutOfMemoryError as exc:
            need = len(weights) + len(serving or b"")
            said = str(exc).rsplit("caused error: ", 1)[-1]  # not the pipeline's echo of a blob
            raise StoreFull(
                f"head version {version} ({need} bytes, and {len(optim or b'')} of optimizer state) does not fit in "
                f"Redis at {self.url}: {said} ({self._memory()}); nothing of it was written. Raise Redis's maxmemory "
                "(docs/headstore.md sizes it) or lower R2M_HEAD_KEEP"
            ) from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"redis at {self.url} is unreachable: {exc}") from exc
        if optim is not None:
            self.save_optim(version, optim)
        return full

    def save_optim(self, version: int, optim: bytes) -> bool:
        """Store the optimizer state taken at `version` if that is still the newest version (a newer one makes it
        stale); whether it was stored. The version is published by then: a failure here is logged, and the next
        worker to load resumes an older state or starts AdamW afresh."""
        latest_key = self._k("heads", "latest")
        try:
            with self.r.pipeline() as pipe:
                pipe.watch(latest_key)
                if pipe.get(latest_key) != str(version).encode():
                    return False
                pipe.multi()
                # Two plain strings, not a hash: Redis keeps a SET's value as it read it, and copies a hash field's
                # (80 MB at the default widths: 120 ms of Redis's CPU per publish instead of 55).
                pipe.set(self._k("heads", "optim"), optim)
                pipe.set(self._k("heads", "optim", "version"), version)
                pipe.execute()
        except redis.WatchError:
            return False  # another version came first: this state is stale
        except (redis.OutOfMemoryError, redis.ConnectionError, redis.TimeoutError) as exc:
            log.error(
                "the optimizer state of head version %d (%d bytes) was not stored in Redis at %s: %s (%s); a worker "
                "that loads this version starts AdamW afresh (docs/headstore.md sizes maxmemory)",
                version, len(optim), self.url, exc, self._memory(),
            )  # fmt: skip
            return False
        return True

    def _memory(self) -> str:
        """Redis's own memory figures, for an error message."""
        try:
            info = self.r.info("memory")
        except redis.RedisError as exc:
            return f"INFO memory failed: {exc}"
        return f"used_memory {info.get('used_memory')}, maxmemory {info.get('maxmemory')}, policy " + str(
            info.get("maxmemory_policy")
        )

    def footprint(self) -> dict[str, int]:
        """Bytes the head store holds in Redis, by part, as Redis counts them (MEMORY USAGE: its allocator's size
        classes included): `weights`, `serving` and `meta` of the kept versions, and `optimizer`."""
        versions = self.versions()
        parts = ("weights", "serving", "meta")
        with self.r.pipeline(transaction=False) as pipe:
            for v in versions:
                for part in parts:
                    pipe.memory_usage(self._k("head", v, part))
            pipe.memory_usage(self._k("heads", "optim"))
            sizes = self._call(pipe.execute)
        out = {part: sum(n or 0 for n in sizes[i : -1 : len(parts)]) for i, part in enumerate(parts)}
        return out | {"optimizer": sizes[-1] or 0}

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
