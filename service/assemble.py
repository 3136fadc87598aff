"""Where the parts meet: the stores a deployment shares, the update worker, and a replica's running parts. The app
(`api.app`) and the CLI (`r2m worker`) both build theirs here, so the two never drift apart."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .batcher import Batcher
from .config import ServiceSettings
from .engine import ScoringEngine
from .headstore import HeadStore, MemoryHeadStore
from .headsync import HeadSync
from .metrics import ServiceMetrics, WorkerMetrics
from .queue import MemoryPreferenceQueue, PreferenceQueue, RedisPreferenceQueue
from .redisheads import RedisHeadStore
from .update.judge import PairJudge, build_judge
from .update.training import HeadTrainer
from .update.worker import Worker, WorkerThread

__all__ = ["Replica", "build_worker", "start_replica", "stores"]


def stores(settings: ServiceSettings) -> tuple[HeadStore, PreferenceQueue]:
    """The head store and the preference queue: in Redis when R2M_REDIS_URL is set (shared by every replica and
    worker), else in this process (embedded mode)."""
    if settings.redis_url:
        return (
            RedisHeadStore(settings.redis_url, settings.redis_prefix, settings.head_keep),
            RedisPreferenceQueue(settings.redis_url, settings.redis_prefix),
        )
    return MemoryHeadStore(settings.head_keep), MemoryPreferenceQueue()


def build_worker(
    engine: ScoringEngine,
    settings: ServiceSettings,
    queue: PreferenceQueue,
    store: HeadStore,
    metrics: WorkerMetrics,
    judge: Any = None,
    **overrides: Any,
) -> Worker:
    """The update worker on `engine`'s backbone, with the R2M_WORKER_* settings (`overrides`: Worker's own
    keywords, e.g. a shorter `block_ms` for a worker that shares its process with a server). Its judge: `judge`
    (a `PairJudge` or a Python judge, e.g. a program's own), else the one R2M_JUDGE names, else none; ValueError
    naming the setting when that cannot be built."""
    options: dict[str, Any] = {
        "max_batches": settings.worker_max_batches,
        "claim_idle_ms": settings.worker_claim_idle_ms,
        "max_attempts": settings.worker_max_attempts,
    }
    trainer = HeadTrainer(engine, settings, build_judge(settings, judge), metrics)
    return Worker(trainer, queue, store, metrics, **{**options, **overrides})


@dataclass
class Replica:
    """A replica's running parts around its engine; `stop` stops them in reverse order of start."""

    engine: ScoringEngine
    batcher: Batcher
    store: HeadStore
    queue: PreferenceQueue
    background: list[Any] = field(default_factory=list)  # things with .stop(): the head sync, an embedded worker


def start_replica(
    engine: ScoringEngine, settings: ServiceSettings, metrics: ServiceMetrics, judge: PairJudge | None = None
) -> Replica:
    """Start the batcher (in the running event loop), the head sync and, in embedded mode, the update worker (with
    `judge`, built by `build_judge`)."""
    batcher = Batcher(
        engine,
        metrics,
        max_batch_tokens=settings.max_batch_tokens,
        max_queue_items=settings.max_queue_items,
        batch_wait_ms=settings.batch_wait_ms,
    )
    batcher.start()
    store, queue = stores(settings)
    replica = Replica(engine, batcher, store, queue)
    if not settings.redis_url and settings.embedded_worker:
        worker = build_worker(engine, settings, queue, store, WorkerMetrics(metrics.registry), judge, block_ms=500)
        replica.background.append(WorkerThread(worker).start())
    sync = HeadSync(engine, store, metrics, settings.model, settings.head_poll_s)
    sync.start()
    replica.background.append(sync)
    metrics.model_ready.set(1)
    metrics.head_version.set(engine.current.version)
    return replica
