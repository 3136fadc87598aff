"""The preference queue: batches accepted by POST /preferences, waiting for the worker.

`RedisPreferenceQueue` is a Redis stream with one consumer group: `add` is an `XADD` (the 202 is sent only after it
returns), a worker reads with `XREADGROUP`, acknowledges (`XACK`, then `XDEL`) only after the update that used the
batch is published, and takes over batches left pending by a dead worker with `XAUTOCLAIM`. `MemoryPreferenceQueue`
gives the embedded mode the same semantics in-process.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import redis

__all__ = ["MemoryPreferenceQueue", "Message", "PreferenceQueue", "QueueUnavailable", "RedisPreferenceQueue"]


class QueueUnavailable(Exception):
    """The queue (Redis) cannot be reached; nothing was queued."""


@dataclass(frozen=True)
class Message:
    entry_id: str
    batch_id: str
    body: bytes  # the batch in the binary encoding (docs/api.md)
    enqueued: float  # unix time the batch was accepted
    tokens: bytes | None = None  # the reward model's tokens of its texts, as the API computed them (Encoded.pack)


class PreferenceQueue(Protocol):
    def add(self, batch_id: str, body: bytes, tokens: bytes | None = None) -> str: ...
    def read(self, consumer: str, count: int, block_ms: int) -> list[Message]: ...
    def claim_stale(self, consumer: str, min_idle_ms: int, count: int) -> list[Message]: ...
    def ack(self, entry_ids: list[str]) -> None: ...
    def stats(self) -> dict[str, float]: ...
    def close(self) -> None: ...


class RedisPreferenceQueue:
    def __init__(self, url: str, prefix: str = "r2m", client: redis.Redis | None = None) -> None:
        self.url = url
        self.stream = f"{prefix}:preferences"
        self.group = f"{prefix}-workers"
        self.r = client or redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=2)
        self._group_ready = False

    def _unavailable(self, exc: Exception) -> QueueUnavailable:
        self._group_ready = False
        return QueueUnavailable(f"redis at {self.url} is unreachable: {exc}")

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def add(self, batch_id: str, body: bytes, tokens: bytes | None = None) -> str:
        fields: dict[str, str | bytes] = {"batch_id": batch_id, "body": body, "enqueued": repr(time.time())}
        if tokens is not None:
            fields["tokens"] = tokens
        try:
            self._ensure_group()
            entry = self.r.xadd(self.stream, fields)  # type: ignore[arg-type]
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    @staticmethod
    def _messages(entries: list) -> list[Message]:
        out = []
        for entry_id, fields in entries:
            if not fields:  # deleted while pending
                continue
            out.append(
                Message(
                    entry_id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
                    batch_id=fields[b"batch_id"].decode(),
                    body=fields[b"body"],
                    enqueued=float(fields.get(b"enqueued", b"0")),
                    tokens=fields.get(b"tokens"),
                )
            )
        return out

    def read(self, consumer: str, count: int, block_ms: int) -> list[Message]:
        try:
            self._ensure_group()
            reply: Any = self.r.xreadgroup(self.group, consumer, {self.stream: ">"}, count=count, block=block_ms)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return self._messages(reply[0][1]) if reply else []

    def claim_stale(self, consumer: str, min_idle_ms: int, count: int) -> list[Message]:
        try:
            self._ensure_group()
            reply = self.r.xautoclaim(self.stream, self.group, consumer, min_idle_ms, start_id="0-0", count=count)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return self._messages(reply[1])

    def ack(self, entry_ids: list[str]) -> None:
        if not entry_ids:
            return
        try:
            with self.r.pipeline() as pipe:
                pipe.xack(self.stream, self.group, *entry_ids)
                pipe.xdel(self.stream, *entry_ids)
                pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    def stats(self) -> dict[str, float]:
        """Stream length, pending (delivered, not acknowledged) and lag (never delivered) counts."""
        try:
            self._ensure_group()
            length = self.r.xlen(self.stream)
            groups = self.r.xinfo_groups(self.stream)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        group = next((g for g in groups if g["name"] in (self.group, self.group.encode())), {})
        return {"length": length, "pending": group.get("pending", 0), "lag": group.get("lag") or 0}

    def close(self) -> None:
        self.r.close()


class MemoryPreferenceQueue:
    """The same queue in process memory, for `r2m serve` without Redis."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seq = 0
        self._new: OrderedDict[str, Message] = OrderedDict()
        self._pending: dict[str, tuple[Message, str, float]] = {}  # entry -> (message, consumer, delivered at)

    def add(self, batch_id: str, body: bytes, tokens: bytes | None = None) -> str:
        with self._cond:
            self._seq += 1
            entry = f"{int(time.time() * 1000)}-{self._seq}"
            self._new[entry] = Message(entry, batch_id, body, time.time(), tokens)
            self._cond.notify_all()
            return entry

    def read(self, consumer: str, count: int, block_ms: int) -> list[Message]:
        with self._cond:
            if not self._new:
                self._cond.wait_for(lambda: bool(self._new), timeout=block_ms / 1000)
            out: list[Message] = []
            while self._new and len(out) < count:
                entry, msg = self._new.popitem(last=False)
                self._pending[entry] = (msg, consumer, time.monotonic())
                out.append(msg)
            return out

    def claim_stale(self, consumer: str, min_idle_ms: int, count: int) -> list[Message]:
        now = time.monotonic()
        with self._cond:
            stale = [e for e, (_, _, t) in self._pending.items() if (now - t) * 1000 >= min_idle_ms][:count]
            for e in stale:
                msg, _, _ = self._pending[e]
                self._pending[e] = (msg, consumer, now)
            return [self._pending[e][0] for e in stale]

    def ack(self, entry_ids: list[str]) -> None:
        with self._cond:
            for e in entry_ids:
                self._pending.pop(e, None)

    def stats(self) -> dict[str, float]:
        with self._cond:
            return {"length": len(self._new) + len(self._pending), "pending": len(self._pending), "lag": len(self._new)}

    def close(self) -> None:
        pass
