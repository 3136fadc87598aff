"""The R2M update worker: the loop around one training step (`r2m.service.update.training`).

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

from ..backbone import Encoded
from ..backoff import Backoff
from ..headstore import Conflict, HeadStore, StoreFull, StoreUnavailable
from ..metrics import WorkerMetrics
from ..queue import Message, PreferenceQueue, QueueUnavailable
from ..schemas import PreferencesRequest
from .training import HeadTrainer, NothingToTrain, UpdateRefused, UpdateStats

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


class _UpdateFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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
        max_attempts: int = 3,
    ) -> None:
        self.trainer = trainer
        self.queue = queue
        self.store = store
        self.metrics = metrics or WorkerMetrics()
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.max_batches = max_batches
        self.claim_idle_ms = claim_idle_ms
        self.block_ms = block_ms
        self.max_attempts = max_attempts
        self._last_claim = 0.0
        self._optim_saved: tuple[int, float] | None = None  # (version, monotonic s) of the store's optimizer state
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
                self._optim_saved = (meta["version"], time.monotonic())
                self._observe_store()
            except Conflict:
                self.sync()
            return
        if latest != self.trainer.version:
            blob = self.store.weights(latest)
            if blob is None:  # pruned between the two reads; the next sync finds the newer one
                raise Conflict(f"version {latest} vanished while loading")
            self.trainer.load(latest, blob, self._resumable_optim(latest))
            self._optim_saved = (latest, time.monotonic())  # nothing newer to write until it trains
        self.metrics.version.set(self.trainer.version or 0)

    def _resumable_optim(self, latest: int) -> bytes | None:
        """The stored optimizer state, to resume `latest` from: taken at `latest`, or at an older version of its line
        when the worker that published it had not written it since (`R2M_OPTIMIZER_SAVE_S`)."""
        kept = self.store.optim_state()
        if kept is None:
            return None
        if kept[0] != latest:
            log.info("resuming AdamW for head version %d from the optimizer state taken at version %d", latest, kept[0])
        return kept[1]

    def _optim_due(self) -> bool:
        """Whether this version's publish writes the optimizer state (every `R2M_OPTIMIZER_SAVE_S`, 0: always)."""
        every = self.trainer.settings.optimizer_save_s
        return every == 0 or self._optim_saved is None or time.monotonic() - self._optim_saved[1] >= every

    def save_optimizer(self) -> bool:
        """Write the optimizer state of the local head if it is the newest version and was published without one (a
        stopping worker's last step); whether it wrote."""
        version = self.trainer.version
        if version is None or (self._optim_saved is not None and self._optim_saved[0] == version):
            return False
        try:
            saved = self.store.latest() == version and self.store.save_optim(version, self.trainer.optim_bytes())
        except StoreUnavailable as exc:
            log.warning("the optimizer state of head version %d was not written: %s", version, exc)
            return False
        if saved:
            self._optim_saved = (version, time.monotonic())
            log.info("wrote the optimizer state of head version %d", version)
        return saved

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
            if stats.guard is not None:
                meta["guard"] = stats.guard.figures()
            if stats.judge is not None:
                meta["judge"] = stats.judge.figures()
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
        """Handle what is queued (waiting up to block_ms); returns the number of batches trained.

        The batches read together are trained as one update. If that update fails or is refused, each batch is
        trained alone, so that one poison batch holds no other back; a batch that still fails stays pending for
        another attempt and, after `max_attempts`, goes to the dead-letter stream with its reason."""
        messages = self._next_messages()
        self._observe_queue()
        if not messages:
            return 0
        entries: dict[str, list[Message]] = {}  # batch id -> its entries (a client's retried post: twice)
        for m in messages:
            entries.setdefault(m.batch_id, []).append(m)
        batches: dict[str, Batch] = {}
        for batch_id, ms in entries.items():
            try:
                batches[batch_id] = decode_batch(ms[0].body, ms[0].tokens)
            except Exception as exc:  # noqa: BLE001 - checked at the API; retrying cannot make it decode
                self._give_up(ms, "undecodable", f"{type(exc).__name__}: {exc}", attempts=1)
        if not batches:
            return 0
        try:
            return self._train_and_publish(batches, entries)
        except _UpdateFailed as failed:
            if len(batches) == 1:
                self._failed(next(iter(entries[b] for b in batches)), failed)
                return 0
            log.warning("the update of %d batches failed (%s); training them one at a time", len(batches), failed)
        trained = 0
        for batch_id, batch in batches.items():
            try:
                trained += self._train_and_publish({batch_id: batch}, entries)
            except _UpdateFailed as failed:
                self._failed(entries[batch_id], failed)
        return trained

    def _train_and_publish(self, batches: dict[str, Batch], entries: dict[str, list[Message]]) -> int:
        """One update on `batches` from the latest version, published, then acknowledged; _UpdateFailed when the
        update raises or is refused (the local head is then reloaded before the next one)."""
        ids = lambda bids: [m.entry_id for b in bids for m in entries[b]]  # noqa: E731
        for _ in range(10):
            self.sync()
            done = self.store.applied(batches)
            if done:
                self.metrics.skipped.inc(len(done))
                self.queue.ack(ids(done))
                batches = {b: v for b, v in batches.items() if b not in done}
            if not batches:
                return 0
            trained = self._train(batches)
            if trained is None:  # every pair abstained and nothing else trains: done, no version published
                self.queue.ack(ids(batches))
                return 0
            stats, (weights, optim, serving) = trained
            try:
                meta = self.store.publish(
                    parent=self.trainer.version,
                    weights=weights,
                    optim=optim,
                    meta=self._meta(stats),
                    batch_ids=list(batches),
                    serving=serving,
                    keep_optim=True,
                )
            except Conflict:
                self.metrics.conflicts.inc()
                self.trainer.version = None  # force a reload of the version that won
                continue
            except StoreFull as full:  # Redis at maxmemory (noeviction): nothing of the version was written
                raise self._refused(UpdateRefused("store_full", str(full)), batches) from full
            self.trainer.version = meta["version"]
            if optim is not None:
                self._optim_saved = (meta["version"], time.monotonic())
            self.trainer.commit()
            self.queue.ack(ids(batches))
            self._observe_update(stats, len(batches), meta["version"])
            self._log_version(meta["version"], stats, len(batches))
            return len(batches)
        raise Conflict("gave up after 10 publish conflicts in a row")

    def _train(self, batches: dict[str, Batch]) -> tuple[UpdateStats, tuple[bytes, bytes | None, bytes]] | None:
        """The update's training and the candidate's bytes; None when the judge left nothing to train; _UpdateFailed
        when the update is refused or breaks."""
        try:
            todo = list(batches.values())
            stats = self.trainer.update(
                [b.request for b in todo], encoded=[b.encoded for b in todo], batch_ids=list(batches)
            )
            return stats, self.trainer.state_bytes(with_optim=self._optim_due())
        except (QueueUnavailable, StoreUnavailable):
            raise
        except NothingToTrain as nothing:
            self.metrics.judge_updates.labels("nothing_to_train").inc()
            log.info("batches %s: %s; nothing to train, acknowledged", sorted(batches), nothing)
            return None
        except UpdateRefused as exc:
            if exc.reason == "judge_unavailable":
                self.metrics.judge_updates.labels("judge_unavailable").inc()
            raise self._refused(exc, batches) from exc
        except Exception as exc:  # noqa: BLE001 - a batch that breaks training must not block the queue
            self.trainer.version = None
            log.exception("the update of batches %s failed", sorted(batches))
            raise _UpdateFailed("update_error", f"{type(exc).__name__}: {exc}") from exc

    def _refused(self, exc: UpdateRefused, batches: dict[str, Batch]) -> _UpdateFailed:
        """A candidate that must not be published: counted, logged and recorded; the local head is spoilt, so the
        served one is reloaded before the next update."""
        self.trainer.version = None
        self.metrics.refused.labels(exc.reason).inc()
        log.error("not publishing the update of batches %s: %s", sorted(batches), exc)
        self._record_refusal(exc, list(batches))
        return _UpdateFailed(exc.reason, exc.detail)

    def _log_version(self, version: int, stats: UpdateStats, batches: int) -> None:
        g, j = stats.guard, stats.judge
        guard = (f"; guard: shift {g.mean_shift:+.2f}, spread {g.spread_ratio:.2f}, rank {g.rank_agreement:.2f} on "
                 f"{g.items} items") if g is not None else ""  # fmt: skip
        judge = (f"; judge: {j.labels} labels, {j.abstained} abstained, {j.failed} failed of {j.asked} pairs in "
                 f"{j.seconds:.1f} s") if j is not None else ""  # fmt: skip
        log.info(
            "version %d: %d batches, %d groups, %d pairs, loss %.4f (bt %.4f, gre %.4f), %.2f s%s%s", version, batches,
            stats.groups, stats.pairs, stats.loss, stats.bt, stats.gre, stats.seconds, guard, judge,
        )  # fmt: skip

    def _failed(self, messages: list[Message], failed: _UpdateFailed) -> None:
        """Count a failed attempt of one batch; after `max_attempts`, a dead letter. Until then it stays pending,
        and the claim loop hands it out again after `claim_idle_ms`."""
        attempts = max(self.queue.record_failure(m.entry_id) for m in messages)
        if attempts >= self.max_attempts:
            self._give_up(messages, failed.reason, failed.detail, attempts)
        else:
            log.warning(
                "batch %s: attempt %d of %d failed (%s); it stays pending and is tried again",
                messages[0].batch_id,
                attempts,
                self.max_attempts,
                failed.reason,
            )

    def _give_up(self, messages: list[Message], reason: str, detail: str, attempts: int) -> None:
        self.queue.dead_letter(messages, reason, detail, attempts)
        self.metrics.dead_letters.labels(reason).inc()
        log.error(
            "batch %s is a dead letter after %d attempt(s): %s: %s (list and replay them with `r2m worker "
            "--dead-letters` / `--replay`, or GET /preferences/dead-letters)",
            messages[0].batch_id,
            attempts,
            reason,
            detail,
        )

    def _record_refusal(self, exc: UpdateRefused, batch_ids: list[str]) -> None:
        refusal = {"reason": exc.reason, "detail": exc.detail, "batch_ids": batch_ids, "time": time.time()}
        refusal |= {"parent": self.trainer.version, "worker": self.consumer}
        if exc.report is not None:
            refusal["guard"] = exc.report.figures()
        try:
            self.store.record_refusal(refusal)
        except (StoreUnavailable, StoreFull):
            log.warning("could not record the refusal in the store")

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
        if stats.judge is not None and stats.judge.asked:
            m.judge_updates.labels("trained" if stats.judge.labels else "pseudo_labels_only").inc()
        self._observe_store()
        if stats.guard is not None:
            m.guard_mean_shift.set(stats.guard.mean_shift)
            m.guard_spread_ratio.set(stats.guard.spread_ratio)
            m.guard_rank_agreement.set(stats.guard.rank_agreement)
            m.guard_canary_items.set(stats.guard.items)

    def _observe_store(self) -> None:
        """`r2m_head_store_bytes{part}` from the store's own figures (Redis: MEMORY USAGE of its keys)."""
        try:
            parts = self.store.footprint()
        except StoreUnavailable:
            return
        for part, n in parts.items():
            self.metrics.store_bytes.labels(part).set(n)

    def _observe_queue(self) -> None:
        try:
            stats = self.queue.stats()
        except QueueUnavailable:
            return
        self.metrics.queue_length.set(stats["length"])
        self.metrics.queue_pending.set(stats["pending"])
        self.metrics.queue_lag.set(stats["lag"])
        self.metrics.dead_letter_queue.set(self.queue.dead_count())

    def run(self, stop: threading.Event) -> None:
        """Loop until `stop` is set; a Redis outage is waited out, with the batches left safely pending."""
        backoff = Backoff()
        while not stop.is_set():
            try:
                self.run_once()
                backoff.reset()
            except (QueueUnavailable, StoreUnavailable) as exc:
                log.warning("%s; retrying in %.1f s", exc, backoff.delay)
                backoff.wait(stop)
            except Exception:  # noqa: BLE001 - keep the worker alive; the batches stay pending for a retry
                log.exception("handling a read of the queue failed; its batches stay pending and will be retried")
                backoff.wait(stop)
        self.save_optimizer()


class WorkerThread:
    """A `Worker` on a daemon thread (the embedded mode of `r2m serve`)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=worker.run, args=(self._stop,), name="r2m-worker", daemon=True)

    def start(self) -> WorkerThread:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the update in progress; waits at most `timeout` seconds (default 30; a daemon thread: an update
        still running then ends with the process, its batch unacknowledged, so another worker trains it)."""
        self._stop.set()
        self._thread.join(timeout=30.0 if timeout is None else timeout)
