"""The R2M update worker: the loop around one training step (`r2m.service.training`).

Read preference batches from the queue, skip those already part of a published version, train from the latest
version, check the candidate, publish, and only then acknowledge. A batch whose worker dies before the publish
stays pending and is taken over by another worker; one whose worker dies after it is recognised and skipped. The
same loop runs in `r2m worker` (Redis) and in the embedded worker thread of `r2m serve`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from r2m.client.wire import decode_binary, unpack_request

from .backbone import Encoded
from .headstore import Conflict, HeadStore, StoreUnavailable
from .metrics import WorkerMetrics
from .queue import Message, PreferenceQueue, QueueUnavailable
from .schemas import PreferencesRequest
from .training import HeadTrainer, UpdateRefused, UpdateStats

__all__ = ["Batch", "Worker", "WorkerThread", "decode_batch"]

log = logging.getLogger("r2m.worker")


@dataclass(frozen=True)
class Batch:
    """A queued batch, decoded once: the request and the tokens the API computed for its texts (if it sent them)."""

    request: PreferencesRequest
    encoded: list[Encoded] | None


def decode_batch(body: bytes, tokens: bytes | None = None) -> Batch:
    """The queued body (the binary encoding, docs/api.md) and tokens (`Encoded.pack`) as the worker trains on them;
    the values were checked by the API, so no tensor is read or converted here."""
    meta, tensors = decode_binary(body)
    request = PreferencesRequest.model_validate(unpack_request(meta, tensors))
    encoded = Encoded.unpack(tokens) if tokens is not None else None
    if encoded is not None and len(encoded) != len(request.texts()):
        raise ValueError(f"{len(encoded)} token lists for {len(request.texts())} texts")
    return Batch(request, encoded)


class Worker:
    """Reads preference batches, trains, publishes, acknowledges. Safe to run several against one Redis."""

    def __init__(
        self,
        trainer: HeadTrainer,
        queue: PreferenceQueue,
        store: HeadStore,
        metrics: WorkerMetrics | None = None,
        *,
        consumer: str | None = None,
        max_batches: int = 16,
        claim_idle_ms: int = 30000,
        block_ms: int = 1000,
    ) -> None:
        self.trainer = trainer
        self.queue = queue
        self.store = store
        self.metrics = metrics or WorkerMetrics()
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.max_batches = max_batches
        self.claim_idle_ms = claim_idle_ms
        self.block_ms = block_ms
        self._last_claim = 0.0
        self.last_stats: UpdateStats | None = None

    def sync(self) -> None:
        """Make the local head the latest published one; publish version 0 if the store is empty."""
        latest = self.store.latest()
        if latest is None:
            weights, optim, serving = self.trainer.state_bytes()
            try:
                meta = self.store.publish(
                    parent=None, weights=weights, optim=optim, meta=self._meta(), batch_ids=[], serving=serving
                )
                self.trainer.version = meta["version"]
            except Conflict:
                self.sync()
            return
        if latest != self.trainer.version:
            blob = self.store.weights(latest)
            if blob is None:  # pruned between the two reads; the next sync finds the newer one
                raise Conflict(f"version {latest} vanished while loading")
            self.trainer.load(latest, blob, self.store.optim(latest))
        self.metrics.version.set(self.trainer.version or 0)

    def _meta(self, stats: UpdateStats | None = None) -> dict:
        meta: dict = {"config": self.trainer.engine.head_config.to_dict(), "model": self.trainer.settings.model}
        if stats is not None:
            meta |= {
                "loss": stats.loss_dict(),
                "groups": stats.groups,
                "pairs": stats.pairs,
                "group_reward_std": stats.group_reward_std,
                "update_seconds": stats.seconds,
                "worker": self.consumer,
            }
        return meta

    def _next_messages(self) -> list[Message]:
        now = time.monotonic()
        if now - self._last_claim >= self.claim_idle_ms / 1000 / 2:
            self._last_claim = now
            stale = self.queue.claim_stale(self.consumer, self.claim_idle_ms, self.max_batches)
            if stale:
                log.info("took over %d batches left pending by another worker", len(stale))
                return stale
        return self.queue.read(self.consumer, self.max_batches, self.block_ms)

    def run_once(self) -> int:
        """Handle what is queued (waiting up to block_ms); returns the number of batches trained."""
        messages = self._next_messages()
        self._observe_queue()
        if not messages:
            return 0
        requests: dict[str, Batch] = {}
        entries = [m.entry_id for m in messages]
        for m in messages:
            if m.batch_id in requests:
                continue  # the same batch posted twice (a client retry): train it once
            try:
                requests[m.batch_id] = decode_batch(m.body, m.tokens)
            except Exception:  # noqa: BLE001 - validated at the API; a bad one must not block the queue
                log.exception("batch %s could not be decoded; dropping it", m.batch_id)
                self.metrics.rejected.inc()
        for _ in range(10):
            self.sync()
            done = self.store.applied(requests)
            if done:
                self.metrics.skipped.inc(len(done))
                for b in done:
                    requests.pop(b)
            if not requests:
                self.queue.ack(entries)
                return 0
            try:
                batches = list(requests.values())
                stats = self.trainer.update([b.request for b in batches], encoded=[b.encoded for b in batches])
            except UpdateRefused as exc:
                self.trainer.version = None  # the local head is spoilt: reload the served one before the next update
                self.metrics.refused.labels(exc.reason).inc()
                log.error("not publishing the update of batches %s: %s", sorted(requests), exc)
                raise
            weights, optim, serving = self.trainer.state_bytes()
            try:
                meta = self.store.publish(
                    parent=self.trainer.version,
                    weights=weights,
                    optim=optim,
                    meta=self._meta(stats),
                    batch_ids=list(requests),
                    serving=serving,
                )
            except Conflict:
                self.metrics.conflicts.inc()
                self.trainer.version = None  # force a reload of the version that won
                continue
            self.trainer.version = meta["version"]
            self.queue.ack(entries)
            self._observe_update(stats, len(requests), meta["version"])
            log.info(
                "version %d: %d batches, %d groups, %d pairs, loss %.4f (bt %.4f, gre %.4f), %.2f s",
                meta["version"],
                len(requests),
                stats.groups,
                stats.pairs,
                stats.loss,
                stats.bt,
                stats.gre,
                stats.seconds,
            )
            return len(requests)
        raise Conflict("gave up after 10 publish conflicts in a row")

    def _observe_update(self, stats: UpdateStats, batches: int, version: int) -> None:
        m = self.metrics
        self.last_stats = stats
        m.batches.inc(batches)
        m.updates.inc()
        m.update_seconds.observe(stats.seconds)
        for term, value in stats.loss_dict().items():
            m.loss.labels(term).set(value)
        m.group_std.set(stats.group_reward_std)
        m.version.set(version)
        m.cache_hits.inc(stats.rte_hits)
        m.cache_misses.inc(stats.rte_misses)

    def _observe_queue(self) -> None:
        try:
            stats = self.queue.stats()
        except QueueUnavailable:
            return
        self.metrics.queue_length.set(stats["length"])
        self.metrics.queue_pending.set(stats["pending"])
        self.metrics.queue_lag.set(stats["lag"])

    def run(self, stop: threading.Event) -> None:
        """Loop until `stop` is set; a Redis outage is waited out, with the batches left safely pending."""
        backoff = 0.5
        while not stop.is_set():
            try:
                self.run_once()
                backoff = 0.5
            except (QueueUnavailable, StoreUnavailable) as exc:
                log.warning("%s; retrying in %.1f s", exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception:  # noqa: BLE001 - keep the worker alive; the batch stays pending for a retry
                log.exception("update failed; the batches stay pending and will be retried")
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)


class WorkerThread:
    """A `Worker` on a daemon thread (the embedded mode of `r2m serve`)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=worker.run, args=(self._stop,), name="r2m-worker", daemon=True)

    def start(self) -> WorkerThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
