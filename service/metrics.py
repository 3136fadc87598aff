"""Prometheus metrics of one server process. Each app owns its registry, so several apps can live in one process
(tests) without colliding; names are namespaced `r2m_*`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ServiceMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.http_requests = Counter(
            "r2m_http_requests_total",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "r2m_http_request_duration_seconds",
            "HTTP request latency by route and method.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.items_scored = Counter(
            "r2m_score_items_total",
            "Items scored, by whether policy feedback was used.",
            ["mode"],
            registry=r,
        )
        self.tokens_scored = Counter("r2m_tokens_scored_total", "Backbone tokens scored (unpadded).", registry=r)
        self.batch_requests = Histogram(
            "r2m_batch_requests", "Requests merged into one batch.", buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_items = Histogram("r2m_batch_items", "Items in one batch.", buckets=_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "r2m_batch_tokens", "Backbone tokens in one batch (unpadded).", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.batch_duration = Histogram(
            "r2m_batch_duration_seconds",
            "Time to score one batch (backbone + head).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "r2m_queue_wait_seconds",
            "Time a request waited for its batch to start.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_items = Gauge("r2m_queue_items", "Items waiting for the backbone.", registry=r)
        self.model_load_seconds = Gauge("r2m_model_load_seconds", "Time taken to load the model.", registry=r)
        self.model_ready = Gauge("r2m_model_ready", "1 once the model is loaded and serving.", registry=r)
        self.head_version = Gauge("r2m_head_version", "Head version this replica serves.", registry=r)
        self.non_finite_rewards = Counter(
            "r2m_non_finite_rewards_total", "Rewards that came out NaN or Inf (answered 5xx, never 200).", registry=r
        )
        self.head_reverts = Counter(
            "r2m_head_reverts_total", "Times this replica went back to its last good head after a bad one.", registry=r
        )
        self.preference_batches = Counter(
            "r2m_preference_batches_total", "Preference batches accepted and queued.", registry=r
        )
        self.preference_groups = Counter("r2m_preference_groups_total", "Groups accepted and queued.", registry=r)
        self.preference_pairs = Counter("r2m_preference_pairs_total", "Labelled pairs accepted and queued.", registry=r)
