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
    {p}:heads:announce        pub/sub channel, one JSON message per new version
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from collections.abc import Iterable
from typing import Any, Protocol

import redis
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .model import HeadConfig, R2MHead

__all__ = [
    "Conflict",
    "HeadStore",
    "MemoryHeadStore",
    "RedisHeadStore",
    "StoreUnavailable",
    "head_from_bytes",
    "head_to_bytes",
    "serving_bytes",
    "optimizer_from_bytes",
    "optimizer_to_bytes",
]


class Conflict(Exception):
    """Another version was published since the one this update was trained from."""


class StoreUnavailable(Exception):
    """The store (Redis) cannot be reached."""


# The attention matrices replicas serve travel in float16: half of the swap's fetch, hash and load time (a 40 MB
# head at d = 2048 becomes 20 MB), at a relative rounding error of ~5e-4 in weights of magnitude ~1/sqrt(d). The score
# layer phi stays float32, so a row without feedback (w = 1) still gets the plain RM's reward bit for bit.
SERVING_DTYPE = torch.float16


def head_to_bytes(head: R2MHead, attention_dtype: torch.dtype = torch.float32) -> bytes:
    """The head's state dict as safetensors; the attention matrices in `attention_dtype`, phi always float32."""
    state = {
        k: v.detach().to(attention_dtype if k.startswith("attention.") else torch.float32).cpu().contiguous()
        for k, v in head.state_dict().items()
    }
    return st_save(state, metadata={"config": json.dumps(head.config.to_dict())})


def serving_bytes(head: R2MHead) -> bytes:
    """The copy replicas fetch on a swap (`SERVING_DTYPE` attention): see `head_to_bytes`."""
    return head_to_bytes(head, SERVING_DTYPE)


def head_from_bytes(blob: bytes, config: HeadConfig) -> R2MHead:
    """Rebuild a float32 head from a master or serving blob; raises ValueError when the blob does not fit `config`
    (another model or width)."""
    state = {k: v if v.dtype == torch.float32 else v.float() for k, v in st_load(blob).items()}
    with torch.device("meta"):  # no random init of weights that are overwritten at once (~100 ms at d = 2048)
        head = R2MHead(config)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise ValueError(f"head weights do not fit this server's head config {config}: {got} vs {expected}")
    head.load_state_dict(state, assign=True)
    return head


def optimizer_to_bytes(opt: torch.optim.Optimizer) -> bytes:
    """The optimizer state as safetensors (tensors) + JSON metadata (scalars and param groups); no pickle."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    return st_save(tensors, metadata=meta)


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]).get("__metadata__") or {}


def optimizer_from_bytes(opt: torch.optim.Optimizer, blob: bytes) -> None:
    meta = _safetensors_metadata(blob)
    state: dict[int, dict[str, Any]] = {}
    for key, value in st_load(blob).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in json.loads(meta.get("scalars", "{}")).items():
        state.setdefault(int(pid), {}).update(values)
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


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
    def rollback(self, to: int) -> dict[str, Any]: ...
    def wait_for_change(self, seen: int | None, timeout: float) -> int | None: ...
    def close(self) -> None: ...


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

    def rollback(self, to: int) -> dict[str, Any]:
        with self._cond:
            entry = self._versions.get(to)
            if entry is None:
                raise KeyError(to)
            weights, optim, meta, serving = entry
            base = {k: v for k, v in meta.items() if k in ("config", "model")}
            return self.publish(
                parent=self._latest,
                weights=weights,
                optim=optim,
                meta={**base, "rollback_of": to},
                batch_ids=[],
                serving=serving,
            )

    def wait_for_change(self, seen: int | None, timeout: float) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: self._latest != seen, timeout=timeout)
            return self._latest

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
                current = pipe.get(latest_key)
                current = int(current) if current is not None else None
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

    def rollback(self, to: int) -> dict[str, Any]:
        for _ in range(10):
            meta, weights = self.meta(to), self.weights(to)
            if meta is None or weights is None:
                raise KeyError(to)
            base = {k: v for k, v in meta.items() if k in ("config", "model")}
            try:
                return self.publish(
                    parent=self.latest(),
                    weights=weights,
                    optim=self.optim(to),
                    meta={**base, "rollback_of": to},
                    batch_ids=[],
                    serving=self.serving(to),
                )
            except Conflict:
                continue
        raise Conflict("could not roll back: versions kept being published")

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
