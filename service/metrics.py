"""Every Prometheus metric of r2m, declared here: a server replica's (`ServiceMetrics`, its head sync included) and
the update worker's (`WorkerMetrics`). Each app owns its registry, so several apps can live in one process (tests)
without colliding; names are namespaced `r2m_*`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["FAILURE_REASONS", "JUDGE_OUTCOMES", "JUDGE_PAIR_RESULTS", "JUDGE_UPDATE_RESULTS", "ServiceMetrics",
           "WorkerMetrics"]

# Why an update was refused or a batch given up on: the label values of the refusal and dead-letter counters, all
# exported from the start (at 0) so that dashboards and alerts see them before the first failure.
FAILURE_REASONS = (
    "non_finite_loss",
    "non_finite_weights",
    "non_finite_reward",
    "guard_scale",
    "guard_spread",
    "guard_rank",
    "update_error",
    "undecodable",
    "judge_unavailable",
    "store_full",
)

# A judge request's outcome: a verdict (ok), the judge's own abstention, an answer that holds no verdict (garbage),
# a failure (error: connection, timeout, 4xx/5xx) or a 429 or the client-side rate limit's refusal (rate_limited).
JUDGE_OUTCOMES = ("ok", "abstain", "garbage", "error", "rate_limited")
# What became of a pair the judge was asked about, and of an update with a judge.
JUDGE_PAIR_RESULTS = ("labelled", "abstained", "failed")
JUDGE_UPDATE_RESULTS = ("trained", "pseudo_labels_only", "nothing_to_train", "judge_unavailable")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class ServiceMetrics:
    """A replica's metrics: requests, batches, its head and the swaps, the safety nets, the preferences it queued."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests(self.registry)
        self._batches(self.registry)
        self._heads(self.registry)
        self._safety(self.registry)

    def _requests(self, r: CollectorRegistry) -> None:
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
        self.preference_batches = Counter(
            "r2m_preference_batches_total", "Preference batches accepted and queued.", registry=r
        )
        self.preference_groups = Counter("r2m_preference_groups_total", "Groups accepted and queued.", registry=r)
        self.preference_pairs = Counter("r2m_preference_pairs_total", "Labelled pairs accepted and queued.", registry=r)

    def _batches(self, r: CollectorRegistry) -> None:
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

    def _heads(self, r: CollectorRegistry) -> None:
        self.model_load_seconds = Gauge("r2m_model_load_seconds", "Time taken to load the model.", registry=r)
        self.model_ready = Gauge("r2m_model_ready", "1 once the model is loaded and serving.", registry=r)
        self.head_version = Gauge("r2m_head_version", "Head version this replica serves.", registry=r)
        self.head_swaps = Counter("r2m_head_swaps_total", "Head versions swapped in by this replica.", registry=r)
        self.head_load_failures = Counter(
            "r2m_head_load_failures_total", "Head versions that could not be loaded (hash, config).", registry=r
        )
        self.head_swap_seconds = Histogram(
            "r2m_head_swap_duration_seconds",
            "Time to fetch, check and install a head version.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.head_swap_phase_seconds = Histogram(
            "r2m_head_swap_phase_seconds",
            "Where a swap's time goes: notice (publication to load start), fetch, hash, load (decode and checks), "
            "install.",
            ["phase"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.head_swap_latency = Histogram(
            "r2m_head_swap_latency_seconds",
            "From a version's publication to this replica serving it.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )

    def _safety(self, r: CollectorRegistry) -> None:
        self.reward_uncertainty = Histogram(
            "r2m_reward_uncertainty",
            "An ensemble's per-item uncertainty (the members' reward std).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.inflight_bytes = Gauge(
            "r2m_inflight_bytes", "Request bytes held against R2M_MAX_INFLIGHT_BYTES (3 per body byte).", registry=r
        )
        self.inflight_rejections = Counter(
            "r2m_inflight_rejections_total", "Requests answered 503 because the in-flight budget was full.", registry=r
        )
        self.non_finite_rewards = Counter(
            "r2m_non_finite_rewards_total", "Rewards that came out NaN or Inf (answered 5xx, never 200).", registry=r
        )
        self.head_reverts = Counter(
            "r2m_head_reverts_total", "Times this replica went back to its last good head after a bad one.", registry=r
        )
        self.stale_head_requests = Counter(
            "r2m_stale_head_requests_total",
            "/score requests with local read-outs of another head than the served one (answered 409).",
            registry=r,
        )
        self.embed_cache = Counter(
            "r2m_embed_cache_total",
            "RTEs a /score with local read-outs found in the replica's /embed cache (hit) or recomputed (miss).",
            ["result"],
            registry=r,
        )
        for result in ("hit", "miss"):
            self.embed_cache.labels(result=result)


class WorkerMetrics:
    """The update worker's metrics (`r2m worker` on its own port; in embedded mode, in the server's registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.batches = Counter("r2m_worker_batches_total", "Preference batches trained into a version.", registry=r)
        self.skipped = Counter(
            "r2m_worker_batches_skipped_total", "Batches skipped: already part of a published version.", registry=r
        )
        self.dead_letters = Counter(
            "r2m_dead_letters_total",
            "Batches moved to the dead-letter stream, by reason (undecodable, update_error, non_finite_*, guard_*).",
            ["reason"],
            registry=r,
        )
        self.dead_letter_queue = Gauge("r2m_queue_dead_letters", "Batches in the dead-letter stream.", registry=r)
        self.guard_mean_shift = Gauge(
            "r2m_guard_mean_shift",
            "Published head vs the plain RM on the canary: mean shift in plain stds.",
            registry=r,
        )
        self.guard_spread_ratio = Gauge(
            "r2m_guard_spread_ratio", "Published head vs the plain RM on the canary: reward std ratio.", registry=r
        )
        self.guard_rank_agreement = Gauge(
            "r2m_guard_rank_agreement", "Published head vs the plain RM on the canary: Spearman rank.", registry=r
        )
        self.guard_canary_items = Gauge("r2m_guard_canary_items", "Canary items of the last guard check.", registry=r)
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
        self.store_bytes = Gauge(
            "r2m_head_store_bytes",
            "Bytes the head store holds after the last publish, by part: weights, serving (the kept versions' masters "
            "and serving copies), meta, optimizer (the newest version's); in Redis as Redis counts them.",
            ["part"],
            registry=r,
        )
        self.queue_length = Gauge("r2m_queue_length", "Batches in the preference stream.", registry=r)
        self.queue_pending = Gauge("r2m_queue_pending", "Batches delivered to a worker, not acknowledged.", registry=r)
        self.queue_lag = Gauge("r2m_queue_lag", "Batches not yet delivered to any worker.", registry=r)
        self.cache_hits = Counter("r2m_rte_cache_hits_total", "RTE cache hits.", registry=r)
        self.cache_misses = Counter("r2m_rte_cache_misses_total", "RTE cache misses.", registry=r)
        for reason in FAILURE_REASONS:
            self.refused.labels(reason)
            self.dead_letters.labels(reason)
        self._judge(r)

    def _judge(self, r: CollectorRegistry) -> None:
        self.judge_requests = Counter(
            "r2m_judge_requests_total",
            "Judge requests (an HTTP call, or one call of a Python judge) by outcome: ok, abstain, garbage, error, "
            "rate_limited.",
            ["outcome"],
            registry=r,
        )
        self.judge_latency = Histogram(
            "r2m_judge_request_duration_seconds", "Time of one judge request.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.judge_tokens = Counter(
            "r2m_judge_tokens_total", "Tokens an OpenAI-compatible judge reported using, by kind.", ["kind"], registry=r
        )
        self.judge_pairs = Counter(
            "r2m_judge_pairs_total", "Pairs the judge was asked about, by result.", ["result"], registry=r
        )
        self.judge_cached = Counter(
            "r2m_judge_cached_pairs_total",
            "Pairs answered from the verdicts already paid for (a retried or re-merged batch).",
            registry=r,
        )
        self.judge_order_disagreements = Counter(
            "r2m_judge_order_disagreements_total",
            "Pairs whose two orders got opposite verdicts (position bias; counted as abstentions).",
            registry=r,
        )
        self.judge_batch_labels = Histogram(
            "r2m_judge_batch_labels", "Judge labels per preference batch.", buckets=_SIZE_BUCKETS, registry=r
        )
        self.judge_batch_abstentions = Histogram(
            "r2m_judge_batch_abstentions", "Judge abstentions per preference batch.", buckets=_SIZE_BUCKETS, registry=r
        )
        self.judge_surprises = Counter(
            "r2m_judge_surprises_total",
            "Labelled pairs where the judge prefers the response the served head scored lower (over "
            "r2m_judge_pairs_total{result=\"labelled\"}: the reward model's surprise rate).",
            registry=r,
        )
        self.judge_surprise_rate = Gauge(
            "r2m_judge_surprise_rate", "The last update's share of labels against the served head's order.", registry=r
        )
        self.judge_updates = Counter(
            "r2m_judge_updates_total",
            "Updates with a judge, by result: trained (on judge labels), pseudo_labels_only (judge failed, "
            "pseudo-labels trained), nothing_to_train (every pair abstained: acknowledged, no version), "
            "judge_unavailable (refused: retried, then a dead letter).",
            ["result"],
            registry=r,
        )
        for outcome in JUDGE_OUTCOMES:
            self.judge_requests.labels(outcome)
        for kind in ("prompt", "completion"):
            self.judge_tokens.labels(kind)
        for result in JUDGE_PAIR_RESULTS:
            self.judge_pairs.labels(result)
        for result in JUDGE_UPDATE_RESULTS:
            self.judge_updates.labels(result)
