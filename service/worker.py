"""The R2M update worker: preference batches in, GREBT steps on the feedback attention and score head, new head
versions out (R2M.md, "Updating").

`HeadTrainer` is the one training step, used by `r2m worker` (Redis) and by the embedded worker thread of
`r2m serve` alike. `Worker` is the loop around it: read batches, skip those already part of a published version,
train from the latest version, publish, and only then acknowledge. A batch whose worker dies before the publish
stays pending and is taken over by another worker; one whose worker dies after it is recognised and skipped.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from r2m.client.wire import decode_binary, unpack_request

from .config import ServiceSettings
from .engine import R2MModel, head_is_finite, initial_head, pad_hidden
from .heads import (
    Conflict,
    HeadStore,
    StoreUnavailable,
    head_from_bytes,
    head_to_bytes,
    optimizer_from_bytes,
    optimizer_to_bytes,
    serving_bytes,
)
from .model import bt_loss, grebt_loss, omega
from .prefqueue import Message, PreferenceQueue, QueueUnavailable
from .schemas import PreferencesRequest

__all__ = [
    "HeadTrainer",
    "RTECache",
    "UpdateRefused",
    "UpdateStats",
    "Worker",
    "WorkerMetrics",
    "WorkerThread",
    "decode_batch",
]

log = logging.getLogger("r2m.worker")


class RTECache:
    """Reward-token embeddings by text hash: the backbone is frozen, so a text's RTE never changes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._data: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(prompt: str, response: str) -> bytes:
        return hashlib.sha256(f"{len(prompt)}:{prompt}{response}".encode()).digest()

    def get(self, key: bytes) -> torch.Tensor | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes or key in self._data:
            return
        self._data[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._data.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._data)


class UpdateRefused(Exception):
    """The update's candidate head must not be published; `reason` is a short label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class UpdateStats:
    loss: float
    bt: float
    gre: float
    pair_bt: float
    group_reward_std: float
    groups: int
    pairs: int
    seconds: float
    rte_hits: int = 0
    rte_misses: int = 0

    def loss_dict(self) -> dict[str, float]:
        return {"grebt": self.loss, "bt": self.bt, "gre": self.gre, "pair_bt": self.pair_bt}


@dataclass
class _Flat:
    """Every response of a batch in one list, with the index ranges that make up its groups and pairs."""

    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    hidden: list[torch.Tensor | None] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    groups: list[range] = field(default_factory=list)
    given: list[list[float] | None] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)

    def add(self, prompt: str, response: str, hidden: torch.Tensor | None, w: float) -> int:
        self.prompts.append(prompt)
        self.responses.append(response)
        self.hidden.append(hidden)
        self.weights.append(w)
        return len(self.prompts) - 1


def _flatten(requests: Sequence[PreferencesRequest], omega_floor: float) -> _Flat:
    flat = _Flat()
    for req in requests:
        w = omega(req.step, req.total_steps, omega_floor)
        for g in req.groups:
            hidden = [t.to_torch() for t in g.hidden] if g.hidden is not None else [None] * len(g.responses)
            start = len(flat.prompts)
            for response, h in zip(g.responses, hidden):
                flat.add(g.prompt, response, h, w)
            flat.groups.append(range(start, len(flat.prompts)))
            flat.given.append(list(g.rewards) if g.rewards is not None else None)
        for p in req.pairs:
            ch = p.chosen_hidden.to_torch() if p.chosen_hidden is not None else None
            rh = p.rejected_hidden.to_torch() if p.rejected_hidden is not None else None
            flat.pairs.append((flat.add(p.prompt, p.chosen, ch, w), flat.add(p.prompt, p.rejected, rh, w)))
    return flat


class HeadTrainer:
    """The trainable head and its optimizer, on top of the frozen backbone of `model`."""

    def __init__(self, model: R2MModel, settings: ServiceSettings) -> None:
        self.model = model
        self.settings = settings
        device = model.backbone.device
        self.head = initial_head(model.backbone, model.head_config, settings.seed).to(device).train()
        self.opt = self._optimizer()
        self.version: int | None = None  # the store version the local head equals; None: the unpublished initial
        self.cache = RTECache(settings.rte_cache_mb * 2**20)

    def _optimizer(self) -> torch.optim.Optimizer:
        s = self.settings
        return torch.optim.AdamW(self.head.parameters(), lr=s.train_lr, weight_decay=s.train_weight_decay)

    def load(self, version: int, weights: bytes, optim: bytes | None) -> None:
        self.head = head_from_bytes(weights, self.model.head_config).to(self.model.backbone.device).train()
        self.opt = self._optimizer()
        if optim is not None:
            optimizer_from_bytes(self.opt, optim)
            for group in self.opt.param_groups:  # settings win over the saved hyper-parameters
                group["lr"] = self.settings.train_lr
                group["weight_decay"] = self.settings.train_weight_decay
        self.version = version

    def state_bytes(self) -> tuple[bytes, bytes, bytes]:
        """(float32 weights, optimizer state, the float16 serving copy replicas fetch)."""
        return head_to_bytes(self.head), optimizer_to_bytes(self.opt), serving_bytes(self.head)

    def rtes(self, prompts: Sequence[str], responses: Sequence[str], use_cache: bool = True) -> torch.Tensor:
        """RTEs `(N, D_rm)`, from the cache where possible; misses go through the backbone in token-budget chunks."""
        keys = [RTECache.key(p, r) for p, r in zip(prompts, responses)]
        out: list[torch.Tensor | None] = [self.cache.get(k) if use_cache else None for k in keys]
        missing = [i for i, v in enumerate(out) if v is None]
        self.cache.hits += len(keys) - len(missing)
        self.cache.misses += len(missing)
        if missing:
            encoded = [self.model.backbone.encode(prompts[i], responses[i]) for i in missing]
            fresh = self.model.embed(encoded, self.settings.max_batch_tokens)
            for j, i in enumerate(missing):
                out[i] = fresh[j]
                if use_cache:
                    self.cache.put(keys[i], fresh[j].detach().clone())
        return torch.stack(out)  # type: ignore[arg-type]

    def update(self, requests: Sequence[PreferencesRequest], use_cache: bool = True) -> UpdateStats:
        """One R2M optimisation phase on the batches' groups (GREBT) and labelled pairs (BT).

        Raises UpdateRefused when a loss or the updated weights are non-finite; the head is then left in an unknown
        state, and the caller reloads it from the store before training again.
        """
        started = time.perf_counter()
        hits, misses = self.cache.hits, self.cache.misses
        s = self.settings
        flat = _flatten(requests, s.omega_floor)
        device = self.model.backbone.device
        rte = self.rtes(flat.prompts, flat.responses, use_cache).to(device)  # (N, D_rm)
        w = torch.tensor(flat.weights, dtype=torch.float32, device=device)
        use = [h is not None and wi < 1.0 for h, wi in zip(flat.hidden, flat.weights)]
        h_pad = mask = sel = None
        if any(use):
            # dtype None: bf16/fp16 hidden states stay as they came; the attention reads them without a float32 copy.
            h_pad, mask = pad_hidden([h for h, u in zip(flat.hidden, use) if u], None, device)
            sel = torch.tensor(use, device=device)
        rank_given = s.rank_by == "given" and all(g is not None for g in flat.given)
        first: dict[str, float] = {}
        for step in range(s.train_steps):
            rewards = self.head(rte, w, h_pad, mask, with_feedback=sel)  # (N,)
            terms, weights = [], []
            grebt = None
            if flat.groups:
                groups = [rewards[r.start : r.stop] for r in flat.groups]
                rank_by = [torch.tensor(g, device=device) for g in flat.given] if rank_given else None
                grebt = grebt_loss(groups, alpha=s.grebt_alpha, rank_by=rank_by)
                terms.append(grebt.total)
                weights.append(len(flat.groups))
            pair = None
            if flat.pairs:
                idx = torch.tensor(flat.pairs, device=device)
                pair = bt_loss(rewards[idx[:, 0]], rewards[idx[:, 1]])
                terms.append(pair)
                weights.append(len(flat.pairs))
            loss = sum(t * n for t, n in zip(terms, weights)) / sum(weights)
            if not math.isfinite(loss.item()):
                raise UpdateRefused("non_finite_loss", f"GREBT loss {loss.item()} at optimizer step {step}")
            if step == 0:
                with torch.no_grad():
                    stds = [rewards[r.start : r.stop].std(correction=0).item() for r in flat.groups]
                first = {
                    "loss": loss.item(),
                    "bt": grebt.bt.item() if grebt is not None else 0.0,
                    "gre": grebt.gre.item() if grebt is not None else 0.0,
                    "pair_bt": pair.item() if pair is not None else 0.0,
                    "group_reward_std": sum(stds) / len(stds) if stds else 0.0,
                }
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), s.train_max_grad_norm)
            self.opt.step()
        if not head_is_finite(self.head):
            raise UpdateRefused("non_finite_weights", "the updated head's weights hold NaN or Inf")
        return UpdateStats(
            **first,
            groups=len(flat.groups),
            pairs=len(flat.pairs),
            seconds=time.perf_counter() - started,
            rte_hits=self.cache.hits - hits,
            rte_misses=self.cache.misses - misses,
        )


def decode_batch(body: bytes) -> PreferencesRequest:
    meta, tensors = decode_binary(body)
    return PreferencesRequest.model_validate(unpack_request(meta, tensors))


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.batches = Counter("r2m_worker_batches_total", "Preference batches trained into a version.", registry=r)
        self.skipped = Counter(
            "r2m_worker_batches_skipped_total", "Batches skipped: already part of a published version.", registry=r
        )
        self.rejected = Counter(
            "r2m_worker_batches_rejected_total", "Batches that could not be decoded (logged, dropped).", registry=r
        )
        self.updates = Counter("r2m_worker_updates_total", "Head versions published by this worker.", registry=r)
        self.refused = Counter(
            "r2m_worker_updates_refused_total",
            "Updates whose candidate head was not published, by reason.",
            ["reason"],
            registry=r,
        )
        self.conflicts = Counter(
            "r2m_worker_publish_conflicts_total", "Updates retrained because another version came first.", registry=r
        )
        self.update_seconds = Histogram(
            "r2m_worker_update_duration_seconds",
            "Time of one update (RTEs + GREBT steps).",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.loss = Gauge("r2m_grebt_loss", "GREBT loss of the last update (before its step).", ["term"], registry=r)
        self.group_std = Gauge(
            "r2m_group_reward_std", "Mean reward std inside groups in the last update (degeneration).", registry=r
        )
        self.version = Gauge("r2m_worker_head_version", "Head version the worker trains from.", registry=r)
        self.queue_length = Gauge("r2m_queue_length", "Batches in the preference stream.", registry=r)
        self.queue_pending = Gauge("r2m_queue_pending", "Batches delivered to a worker, not acknowledged.", registry=r)
        self.queue_lag = Gauge("r2m_queue_lag", "Batches not yet delivered to any worker.", registry=r)
        self.cache_hits = Counter("r2m_rte_cache_hits_total", "RTE cache hits.", registry=r)
        self.cache_misses = Counter("r2m_rte_cache_misses_total", "RTE cache misses.", registry=r)


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
            weights, optim = self.store.weights(latest), self.store.optim(latest)
            if weights is None:  # pruned between the two reads; the next sync finds the newer one
                raise Conflict(f"version {latest} vanished while loading")
            self.trainer.load(latest, weights, optim)
        self.metrics.version.set(self.trainer.version or 0)

    def _meta(self, stats: UpdateStats | None = None) -> dict:
        meta: dict = {"config": self.trainer.model.head_config.to_dict(), "model": self.trainer.settings.model}
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
        requests: dict[str, PreferencesRequest] = {}
        entries = [m.entry_id for m in messages]
        for m in messages:
            if m.batch_id in requests:
                continue  # the same batch posted twice (a client retry): train it once
            try:
                requests[m.batch_id] = decode_batch(m.body)
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
                stats = self.trainer.update(list(requests.values()))
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
