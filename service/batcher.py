"""Dynamic batching of /score requests into backbone batches.

Requests queue up while the model thread is busy; each time it frees up, the batcher takes whole requests in
arrival order until the token budget is full (a request larger than the budget runs alone, chunked inside the
model), waits `batch_wait_ms` for company only when it would otherwise run a lone request, and scores them all with
one head snapshot. Whole requests, never parts, go into a batch, so one request is never scored by two heads.

Requests that need no backbone (every item's RTE cached: local feedback's /score with read-outs, a repeated /embed)
go to a second lane with its own thread: they are scored at once, in batches of their own that take a millisecond,
instead of waiting for the backbone batch that is running (tens to hundreds of ms) to end. On CUDA both lanes
queue kernels on the device's one stream, so a cached batch still waits for the kernels already queued there (not
for the rest of the backbone batch); results come back to the host on the lane's thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .engine import HeadVersion, NonFiniteReward, PreparedItem, ScoringEngine
from .metrics import ServiceMetrics

__all__ = ["Batcher", "BadReward", "BatchResult", "Overloaded", "StaleReadouts"]

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full; the caller should answer 503 with Retry-After."""


class BadReward(Exception):
    """The request's batch produced a non-finite reward: answered 5xx, never 200. `retry`: the replica reverted to
    its last good head, so a retry is scored by that one (503); otherwise 500."""

    def __init__(self, detail: str, retry: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry = retry


class StaleReadouts(Exception):
    """The request's read-outs came from head `sent`, but this replica scores with head `served`: answered 409 so
    that the client refreshes its copy of the attention and sends read-outs of `served` (one reward, one head)."""

    def __init__(self, sent: int, served: int) -> None:
        super().__init__(
            f"the read-outs were computed with head version {sent}, but this replica serves version {served}; "
            f"fetch GET /heads/{served}?copy=serving, recompute them and retry"
        )
        self.sent = sent
        self.served = served


@dataclass(frozen=True)
class BatchResult:
    rewards: list[float]
    head_version: int
    uncertainty: list[float] | None = None  # an ensemble's: the members' std per item
    members: list[list[float]] | None = None
    rte: torch.Tensor | None = None  # (n, D_rm) float32, when the request asked for its RTEs (/embed)


@dataclass
class _Pending:
    items: list[PreparedItem]
    future: asyncio.Future[BatchResult]
    tokens: int
    head_version: int | None = None  # the head the request's read-outs came from: scored by it or refused
    want_rte: bool = False
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class _Lane:
    """A queue, the thread its batches run on and the task that feeds it."""

    name: str
    executor: ThreadPoolExecutor
    queue: deque[_Pending] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Batcher:
    def __init__(
        self,
        engine: ScoringEngine,
        metrics: ServiceMetrics,
        *,
        max_batch_tokens: int,
        max_queue_items: int,
        batch_wait_ms: float,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_items = max_queue_items
        self.batch_wait = batch_wait_ms / 1000.0
        self._queued_items = 0
        # One model thread: the backbone already uses every core through torch's intra-op threads. The cached lane's
        # batches are a few small matmuls (the head on cached RTEs and read-outs).
        self._model = _Lane("model", ThreadPoolExecutor(max_workers=1, thread_name_prefix="r2m-model"))
        self._cached = _Lane("cached", ThreadPoolExecutor(max_workers=1, thread_name_prefix="r2m-cached"))

    @property
    def _lanes(self) -> tuple[_Lane, _Lane]:
        return self._model, self._cached

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for lane in self._lanes:
            lane.task = loop.create_task(self._run(lane), name=f"r2m-batcher-{lane.name}")

    async def stop(self) -> None:
        for lane in self._lanes:
            if lane.task is not None:
                lane.task.cancel()
                try:
                    await lane.task
                except asyncio.CancelledError:
                    pass
            self._shutting_down(lane.queue)
            lane.queue.clear()
            lane.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(
        self, items: list[PreparedItem], *, head_version: int | None = None, want_rte: bool = False
    ) -> BatchResult:
        """Queue one request's items and wait for their rewards. `head_version`: the request's read-outs came from
        that head; StaleReadouts when the batch's head is another. `want_rte`: also return the items' RTEs."""
        if self._queued_items and self._queued_items + len(items) > self.max_queue_items:
            raise Overloaded(f"{self._queued_items} items are queued (R2M_MAX_QUEUE_ITEMS={self.max_queue_items})")
        fut: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        tokens = sum(len(it.encoded) for it in items if it.rte is None)  # a cached RTE costs no backbone tokens
        lane = self._model if tokens else self._cached
        lane.queue.append(_Pending(items, fut, tokens, head_version, want_rte))
        self._queued_items += len(items)
        self.metrics.queue_items.set(self._queued_items)
        lane.wakeup.set()
        return await fut

    def _take_batch(self, lane: _Lane) -> list[_Pending]:
        """Whole requests in arrival order: up to the token budget on the model lane, all of them on the cached."""
        batch: list[_Pending] = []
        tokens = 0
        while lane.queue:
            p = lane.queue[0]
            if p.future.done():  # the client went away while waiting
                lane.queue.popleft()
                self._queued_items -= len(p.items)
                continue
            if batch and tokens + p.tokens > self.max_batch_tokens:
                break
            batch.append(lane.queue.popleft())
            self._queued_items -= len(p.items)
            tokens += p.tokens
        self.metrics.queue_items.set(self._queued_items)
        return batch

    async def _run(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not lane.queue:
                lane.wakeup.clear()
                await lane.wakeup.wait()
            if self.batch_wait and len(lane.queue) == 1 and 0 < lane.queue[0].tokens < self.max_batch_tokens:
                await asyncio.sleep(self.batch_wait)
            batch = self._take_batch(lane)
            head = self.engine.current
            batch = self._drop_stale(batch, head.version)
            if not batch:
                continue
            items = [it for p in batch for it in p.items]
            started = time.perf_counter()
            for p in batch:
                self.metrics.queue_wait.observe(started - p.enqueued)
            want_rte = any(p.want_rte for p in batch)
            try:
                values, std, members, rte = await loop.run_in_executor(
                    lane.executor, self._score, items, head, want_rte
                )
            except asyncio.CancelledError:  # stop() while the batch runs: nobody will hear about it otherwise
                self._shutting_down(batch)
                raise
            except NonFiniteReward as exc:
                self._non_finite(lane, batch, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - every waiting request must hear about it
                log.exception("scoring a batch of %d requests / %d items failed", len(batch), len(items))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self._observe(batch, items, time.perf_counter() - started)
            if std is not None:
                for u in std:
                    self.metrics.reward_uncertainty.observe(u)
            offset = 0
            for p in batch:
                n = len(p.items)
                if not p.future.done():
                    part = slice(offset, offset + n)
                    p.future.set_result(
                        BatchResult(
                            values[part],
                            head.version,
                            std[part] if std is not None else None,
                            members[part] if members is not None else None,
                            rte[part] if rte is not None and p.want_rte else None,
                        )
                    )
                offset += n

    def _score(
        self, items: list[PreparedItem], head: HeadVersion, want_rte: bool
    ) -> tuple[list[float], list[float] | None, list[list[float]] | None, torch.Tensor | None]:
        """`engine.score_all` on the lane's thread, its results already on the host: reading a CUDA tensor on the
        event loop would wait for every kernel queued on the device, the other lane's backbone batch included."""
        scores = self.engine.score_all(items, head, self.max_batch_tokens)
        return (*scores.lists(), scores.rte.cpu() if scores.rte is not None and want_rte else None)

    @staticmethod
    def _shutting_down(pending: Iterable[_Pending]) -> None:
        for p in pending:
            if not p.future.done():
                p.future.set_exception(Overloaded("server is shutting down"))

    def _drop_stale(self, batch: list[_Pending], served: int) -> list[_Pending]:
        """Refuse the requests whose read-outs came from another head than the one this batch is scored by."""
        keep = []
        for p in batch:
            if p.head_version is not None and p.head_version != served:
                self.metrics.stale_head_requests.inc()
                if not p.future.done():
                    p.future.set_exception(StaleReadouts(p.head_version, served))
            else:
                keep.append(p)
        return keep

    def _non_finite(self, lane: _Lane, batch: list[_Pending], exc: NonFiniteReward) -> None:
        """Fail the requests a non-finite reward touches; when the head is to blame, every request of the batch
        (all were scored by it) and the replica goes back to its last good head."""
        self.metrics.non_finite_rewards.inc(len(exc.items))
        if exc.from_backbone:
            log.error("%s (items %s); those requests get 500", exc, exc.items[:10])
            bad, start = set(exc.items), 0
            for p in batch:
                hit = sorted(i - start for i in bad if start <= i < start + len(p.items))
                start += len(p.items)
                if hit and not p.future.done():
                    detail = f"the reward model's embedding of items {hit} is non-finite; no reward was produced"
                    p.future.set_exception(BadReward(detail, retry=False))
            # The other requests are scored again next round, by themselves.
            rest = [p for p in batch if not p.future.done()]
            lane.queue.extendleft(reversed(rest))
            self._queued_items += sum(len(p.items) for p in rest)
            return
        now = self.engine.revert(exc.version)
        self.metrics.head_reverts.inc()
        if now is None:
            detail = f"{exc}; there is no earlier head to go back to, so this replica cannot score it"
            log.error(detail)
        else:
            self.metrics.head_version.set(now.version)
            detail = f"{exc}; this replica went back to head version {now.version}: retry"
            log.error("%s; reverted to head version %d and will not serve %d again", exc, now.version, exc.version)
        for p in batch:
            if not p.future.done():
                p.future.set_exception(BadReward(detail, retry=now is not None))

    def _observe(self, batch: list[_Pending], items: list[PreparedItem], seconds: float) -> None:
        m = self.metrics
        m.batch_requests.observe(len(batch))
        m.batch_items.observe(len(items))
        tokens = sum(p.tokens for p in batch)
        m.batch_tokens.observe(tokens)
        m.tokens_scored.inc(tokens)
        m.batch_duration.observe(seconds)
        feedback = sum(1 for it in items if it.hidden is not None and it.w < 1.0)
        m.items_scored.labels(mode="feedback").inc(feedback)
        m.items_scored.labels(mode="vanilla").inc(len(items) - feedback)
