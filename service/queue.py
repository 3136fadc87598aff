"""The preference queue: batches accepted by POST /preferences, waiting for the worker, and the dead letters.

`RedisPreferenceQueue` is a Redis stream with one consumer group: `add` is an `XADD` (the 202 is sent only after it
returns), a worker reads with `XREADGROUP`, acknowledges (`XACK`, then `XDEL`) only after the update that used the
batch is published, and takes over batches left pending by a dead worker with `XAUTOCLAIM`. A batch whose update
fails or is refused stays pending (another attempt after the claim interval); `record_failure` counts its attempts,
and after `R2M_WORKER_MAX_ATTEMPTS` the worker moves it, with its reason, to the dead-letter stream: acknowledged
on the main stream, kept there until `replay` puts it back. `MemoryPreferenceQueue` gives the embedded mode the
same semantics in-process.

Redis layout (prefix `r2m` by default):
    {p}:preferences            the stream (fields batch_id, body, tokens, enqueued)
    {p}:preferences:attempts   hash entry id -> failed attempts so far
    {p}:preferences:dead       the dead-letter stream (the same fields plus reason, detail, attempts, failed)
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

__all__ = [
    "DeadLetter",
    "MemoryPreferenceQueue",
    "Message",
    "PreferenceQueue",
    "QueueUnavailable",
    "RedisPreferenceQueue",
    "UnknownDeadLetter",
    "dead_letters_json",
    "replay_dead_letters",
]


class UnknownDeadLetter(Exception):
    """A replay named dead-letter ids that are not on the dead-letter stream."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__(f"no dead letter with id {', '.join(ids)}")
        self.ids = ids


class QueueUnavailable(Exception):
    """The queue (Redis) cannot be reached; nothing was queued."""


@dataclass(frozen=True)
class Message:
    entry_id: str
    batch_id: str
    body: bytes  # the batch in the binary encoding (docs/api.md)
    enqueued: float  # unix time the batch was accepted
    tokens: bytes | None = None  # the reward model's tokens of its texts, as the API computed them (Encoded.pack)


@dataclass(frozen=True)
class DeadLetter:
    """A batch the worker gave up on: why, after how many attempts, and the batch itself (to replay)."""

    entry_id: str  # in the dead-letter stream
    batch_id: str
    reason: str  # a short label (also the metric's): non_finite_loss, guard_scale, undecodable, ...
    detail: str
    attempts: int
    failed: float  # unix time
    enqueued: float
    message: Message = field(repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.entry_id,
            "batch_id": self.batch_id,
            "reason": self.reason,
            "detail": self.detail,
            "attempts": self.attempts,
            "failed": self.failed,
            "enqueued": self.enqueued,
        }


class PreferenceQueue(Protocol):
    def add(self, batch_id: str, body: bytes, tokens: bytes | None = None) -> str: ...
    def read(self, consumer: str, count: int, block_ms: int) -> list[Message]: ...
    def claim_stale(self, consumer: str, min_idle_ms: int, count: int) -> list[Message]: ...
    def ack(self, entry_ids: list[str]) -> None: ...
    def record_failure(self, entry_id: str) -> int: ...
    def dead_letter(self, messages: list[Message], reason: str, detail: str, attempts: int) -> None: ...
    def dead_letters(self, count: int = 100) -> list[DeadLetter]: ...
    def replay(self, dead_ids: list[str] | None = None) -> list[str]: ...
    def stats(self) -> dict[str, float]: ...
    def dead_count(self) -> int: ...
    def close(self) -> None: ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisPreferenceQueue:
    def __init__(self, url: str, prefix: str = "r2m", client: redis.Redis | None = None) -> None:
        self.url = url
        self.stream = f"{prefix}:preferences"
        self.attempts = f"{prefix}:preferences:attempts"
        self.dead = f"{prefix}:preferences:dead"
        self.group = f"{prefix}-workers"
        self.r = client or redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=2)
        self._group_ready = False

    def _unavailable(self, exc: Exception) -> QueueUnavailable:
        self._group_ready = False
        return QueueUnavailable(f"redis at {self.url} is unreachable: {exc}")

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            self._ensure_group()
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    @staticmethod
    def _fields(batch_id: str, body: bytes, tokens: bytes | None, enqueued: float) -> dict[Any, Any]:
        fields: dict[Any, Any] = {"batch_id": batch_id, "body": body, "enqueued": repr(enqueued)}
        if tokens is not None:
            fields["tokens"] = tokens
        return fields

    def add(self, batch_id: str, body: bytes, tokens: bytes | None = None) -> str:
        return _text(self._call(self.r.xadd, self.stream, self._fields(batch_id, body, tokens, time.time())))

    @staticmethod
    def _message(entry_id: Any, fields: dict) -> Message:
        return Message(
            entry_id=_text(entry_id),
            batch_id=fields[b"batch_id"].decode(),
            body=fields[b"body"],
            enqueued=float(fields.get(b"enqueued", b"0")),
            tokens=fields.get(b"tokens"),
        )

    def _messages(self, entries: list) -> list[Message]:
        return [self._message(e, f) for e, f in entries if f]  # no fields: deleted while pending

    def read(self, consumer: str, count: int, block_ms: int) -> list[Message]:
        reply: Any = self._call(
            self.r.xreadgroup, self.group, consumer, {self.stream: ">"}, count=count, block=block_ms
        )
        return self._messages(reply[0][1]) if reply else []

    def claim_stale(self, consumer: str, min_idle_ms: int, count: int) -> list[Message]:
        reply = self._call(self.r.xautoclaim, self.stream, self.group, consumer, min_idle_ms, "0-0", count)
        return self._messages(reply[1])

    def ack(self, entry_ids: list[str]) -> None:
        if not entry_ids:
            return
        with self.r.pipeline() as pipe:
            pipe.xack(self.stream, self.group, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)
            pipe.hdel(self.attempts, *entry_ids)
            self._call(pipe.execute)

    def record_failure(self, entry_id: str) -> int:
        return int(self._call(self.r.hincrby, self.attempts, entry_id, 1))

    def dead_letter(self, messages: list[Message], reason: str, detail: str, attempts: int) -> None:
        """Move `messages` (one batch, with its duplicates) to the dead-letter stream and acknowledge them, in one
        transaction: a batch is in exactly one of the two streams."""
        if not messages:
            return
        m = messages[0]
        fields = self._fields(m.batch_id, m.body, m.tokens, m.enqueued)
        fields |= {"reason": reason, "detail": detail[:2000], "attempts": attempts, "failed": repr(time.time())}
        ids = [x.entry_id for x in messages]
        with self.r.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead, fields)
            pipe.xack(self.stream, self.group, *ids)
            pipe.xdel(self.stream, *ids)
            pipe.hdel(self.attempts, *ids)
            self._call(pipe.execute)

    def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        out = []
        for entry_id, f in self._call(self.r.xrange, self.dead, count=count):
            out.append(
                DeadLetter(
                    entry_id=_text(entry_id),
                    batch_id=f[b"batch_id"].decode(),
                    reason=f[b"reason"].decode(),
                    detail=f.get(b"detail", b"").decode(),
                    attempts=int(f.get(b"attempts", 0)),
                    failed=float(f.get(b"failed", 0)),
                    enqueued=float(f.get(b"enqueued", 0)),
                    message=self._message(entry_id, f),
                )
            )
        return out

    def replay(self, dead_ids: list[str] | None = None) -> list[str]:
        """Put dead letters (all when `dead_ids` is None) back on the stream as new entries; returns their batch ids.
        A batch already part of a published version is still skipped by the worker, so a replay trains it once."""
        letters = [d for d in self.dead_letters(count=100_000) if dead_ids is None or d.entry_id in dead_ids]
        for d in letters:
            m = d.message
            with self.r.pipeline(transaction=True) as pipe:
                pipe.xadd(self.stream, self._fields(m.batch_id, m.body, m.tokens, m.enqueued))
                pipe.xdel(self.dead, d.entry_id)
                self._call(pipe.execute)
        return [d.batch_id for d in letters]

    def stats(self) -> dict[str, float]:
        """Stream length, pending (delivered, not acknowledged) and lag (never delivered) counts."""
        length = self._call(self.r.xlen, self.stream)
        groups = self._call(self.r.xinfo_groups, self.stream)
        group: dict[str, Any] = next((g for g in groups if g["name"] in (self.group, self.group.encode())), {})
        return {"length": length, "pending": group.get("pending", 0), "lag": group.get("lag") or 0}

    def dead_count(self) -> int:
        return int(self._call(self.r.xlen, self.dead))

    def close(self) -> None:
        self.r.close()


class MemoryPreferenceQueue:
    """The same queue in process memory, for `r2m serve` without Redis."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seq = 0
        self._new: OrderedDict[str, Message] = OrderedDict()
        self._pending: dict[str, tuple[Message, str, float]] = {}  # entry -> (message, consumer, delivered at)
        self._attempts: dict[str, int] = {}
        self._dead: OrderedDict[str, DeadLetter] = OrderedDict()

    def _entry_id(self) -> str:
        self._seq += 1
        return f"{int(time.time() * 1000)}-{self._seq}"

    def add(self, batch_id: str, body: bytes, tokens: bytes | None = None) -> str:
        with self._cond:
            entry = self._entry_id()
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
                self._attempts.pop(e, None)

    def record_failure(self, entry_id: str) -> int:
        with self._cond:
            self._attempts[entry_id] = self._attempts.get(entry_id, 0) + 1
            return self._attempts[entry_id]

    def dead_letter(self, messages: list[Message], reason: str, detail: str, attempts: int) -> None:
        if not messages:
            return
        with self._cond:
            m = messages[0]
            entry = self._entry_id()
            self._dead[entry] = DeadLetter(
                entry, m.batch_id, reason, detail[:2000], attempts, time.time(), m.enqueued, m
            )
            self.ack([x.entry_id for x in messages])

    def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        with self._cond:
            return list(self._dead.values())[:count]

    def replay(self, dead_ids: list[str] | None = None) -> list[str]:
        with self._cond:
            letters = [d for e, d in self._dead.items() if dead_ids is None or e in dead_ids]
            for d in letters:
                del self._dead[d.entry_id]
                self.add(d.batch_id, d.message.body, d.message.tokens)
            return [d.batch_id for d in letters]

    def stats(self) -> dict[str, float]:
        with self._cond:
            return {"length": len(self._new) + len(self._pending), "pending": len(self._pending), "lag": len(self._new)}

    def dead_count(self) -> int:
        return len(self._dead)

    def close(self) -> None:
        pass


def dead_letters_json(queue: PreferenceQueue, count: int = 100) -> str:
    """The dead letters as JSON lines (what `r2m worker --dead-letters` prints)."""
    return "\n".join(json.dumps(d.summary()) for d in queue.dead_letters(count))


def replay_dead_letters(queue: PreferenceQueue, ids: list[str] | None) -> list[str]:
    """Put the dead letters `ids` (all when None) back on the stream and return their batch ids; `UnknownDeadLetter`
    naming every id that is not a dead letter, before anything moves."""
    if ids is not None:
        known = {d.entry_id for d in queue.dead_letters(count=100_000)}
        unknown = sorted(set(ids) - known)
        if unknown:
            raise UnknownDeadLetter(unknown)
    return queue.replay(ids)
