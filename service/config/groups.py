"""The settings' groups: one `--help` section and one docs/settings.md table each, in the class's order (a test
checks that the groups and `ServiceSettings` list the same fields in the same order), and the settings only a
replica reads."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["REPLICA_ONLY", "SETTINGS_GROUPS", "SettingsGroup"]


class SettingsGroup(NamedTuple):
    description: str
    fields: tuple[str, ...]  # in the class's order


# The class below lists its fields group by group, under a banner each; a new group is one more entry here (a test
# checks that the groups and the class list the same fields in the same order).
SETTINGS_GROUPS: dict[str, SettingsGroup] = {
    "model": SettingsGroup(
        "The reward model, its feedback head and where they run; model, widths and seed are the same on every "
        "replica and worker.",
        ("model", "policy_dim", "attn_dim", "attn_heads", "omega_floor", "seed", "attn_init", "attn_init_scale",
         "ensemble", "aggregation", "uwo_lambda", "ensemble_members", "device", "dtype", "cpu_half_hidden",
         "get_reward_special_tokens"),
    ),
    "limits": SettingsGroup(
        "What one process takes on: request sizes, batching, queues and the memory of its caches.",
        ("max_tokens", "max_hidden_tokens", "max_hidden_abs", "max_items_per_request", "max_batch_tokens",
         "batch_wait_ms", "max_queue_items", "max_request_bytes", "max_inflight_bytes", "inflight_wait_s",
         "cache_mb", "rte_cache_mb", "embed_cache_mb", "guard_canary_mb"),
    ),
    "store": SettingsGroup(
        "Redis: the preference stream and head store that replicas and workers share.",
        ("redis_url", "redis_prefix", "head_keep", "head_poll_s", "optimizer_save_s"),
    ),
    "update": SettingsGroup(
        "The R2M update (GREBT) run on each preference batch, and its retries.",
        ("train_lr", "train_lr_score", "train_steps", "train_weight_decay", "train_max_grad_norm", "grebt_alpha",
         "rank_by", "worker_max_batches", "worker_claim_idle_ms", "worker_max_attempts"),
    ),
    "guard": SettingsGroup(
        "The check of each candidate head on a canary of trained items before it is published.",
        ("guard", "guard_max_mean_shift", "guard_max_spread_ratio", "guard_min_rank_agreement", "guard_min_items",
         "guard_canary_size"),
    ),
    "judge": SettingsGroup(
        "The outside judge the worker asks to label pairs from the posted groups (docs/judge.md).",
        ("judge", "judge_model", "judge_api_key_env", "judge_pairs", "judge_template", "judge_both_orders",
         "judge_with_pseudo_labels", "judge_max_tokens", "judge_timeout_s", "judge_deadline_s", "judge_retries",
         "judge_rpm", "judge_tpm", "judge_concurrency"),
    ),
    "process": SettingsGroup(
        "Address, logging, shutdown and auth of the processes.",
        ("host", "port", "log_level", "drain_timeout_s", "keep_alive_s", "api_key", "embedded_worker",
         "worker_metrics_port"),
    ),
}  # fmt: skip

# What only a replica reads (its HTTP edge, batcher and /embed cache). `r2m worker` has no flag for these but accepts
# their R2M_* variables: replicas and workers share one env file.
REPLICA_ONLY = frozenset({
    "get_reward_special_tokens", "max_tokens", "max_hidden_tokens", "max_hidden_abs", "max_items_per_request",
    "batch_wait_ms", "max_queue_items", "max_request_bytes", "max_inflight_bytes", "inflight_wait_s",
    "embed_cache_mb", "head_poll_s", "port", "drain_timeout_s", "keep_alive_s", "api_key", "embedded_worker",
})  # fmt: skip
