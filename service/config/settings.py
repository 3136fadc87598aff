"""Service configuration: one settings class, read from `R2M_*` environment variables (or a `.env` file), its
fields in the groups of `groups.SETTINGS_GROUPS` (a banner comment each)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .defaults import CACHE_SHARES, cache_share, default_inflight_bytes, deprecated

__all__ = ["ServiceSettings", "isolated_settings"]


class ServiceSettings(BaseSettings):
    """Every knob of the reward server and worker. `--help` and docs/settings.md are made from these descriptions."""

    model_config = SettingsConfigDict(env_prefix="R2M_", env_file=".env", extra="ignore")

    # --- model -------------------------------------------------------------------------------------------------
    model: str = Field(
        "default",
        description="Reward model: `default` (bundled MiniLM RM, offline), an r2m encoder-RM folder, or a Hugging "
        "Face sequence-classification RM (local path or hub id, e.g. Skywork/Skywork-Reward-V2-Llama-3.1-8B).",
    )
    policy_dim: int = Field(2048, ge=1, description="Width D_policy of the policy's last-layer hidden states.")
    attn_dim: int = Field(2048, ge=1, description="Internal width d of the feedback cross-attention (paper: 2048).")
    attn_heads: int = Field(1, ge=1, description="Heads of the feedback cross-attention (paper: 1).")
    omega_floor: float = Field(0.6, ge=0.0, le=1.0, description="Floor Omega of the w(t) schedule (paper: 0.6-0.7).")
    seed: int = Field(0, description="Seed of the initial feedback attention; equal on every replica.")
    attn_init: Literal["scaled", "plain", "zero"] = Field(
        "scaled",
        description="How the feedback read-out starts: `scaled` (its norm R2M_ATTN_INIT_SCALE times the RTE's, for "
        "hidden states of unit RMS, on any backbone), `plain` (PyTorch's default init: on the bundled encoder the "
        "untrained read-out outweighs the RTE), `zero` (W_o = 0: the untrained reward is w times the plain RM's).",
    )
    attn_init_scale: float = Field(
        0.1, gt=0, description="With R2M_ATTN_INIT=scaled: the initial read-out's norm over the RTE's typical norm."
    )
    ensemble: int = Field(
        1,
        ge=1,
        description="Score-layer members on the one frozen backbone (1: a single head, as without ensembles). N > 1 "
        "needs N fitted members (`r2m fit-rm --ensemble N`; the bundled default ships 5); /score then returns the "
        "aggregated reward and each item's uncertainty (the members' std).",
    )
    aggregation: Literal["mean", "uwo", "min"] = Field(
        "uwo",
        description="How an ensemble's members make one reward: `mean`, `uwo` (mean - R2M_UWO_LAMBDA x the "
        "members' variance, Coste et al.'s uncertainty-weighted optimisation) or `min` (worst case).",
    )
    uwo_lambda: float = Field(1.0, ge=0, description="With R2M_AGGREGATION=uwo: the weight of the members' variance.")
    ensemble_members: str | None = Field(
        None,
        description="The fitted members (a r2m_members.safetensors file, or a folder with one) for R2M_ENSEMBLE > 1; "
        "default: the model folder's own (the bundled default has one). A hub RM needs this set.",
    )
    device: str = Field("auto", description="`auto` (cuda when available), `cpu`, `cuda`, `cuda:N`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description=(
            "Backbone dtype. `auto`: a Hugging Face RM runs in its checkpoint's saved dtype (as plain "
            "transformers does); the bundled default and r2m encoder RMs run bfloat16 on CUDA, float32 on CPU. "
            "`bfloat16` on a CPU with native bf16 (AVX512-BF16/AMX) runs the default RM ~1.5-1.9x faster, with "
            "rewards within 0.15 (max) / 0.03 (mean) abs of float32 (correlation > 0.9999), but a text's reward "
            "then moves by up to ~0.04 with its batch-mates."
        ),
    )
    cpu_half_hidden: Literal["auto", "native", "upcast"] = Field(
        "auto",
        description="How the feedback attention reads bfloat16/float16 hidden states on a CPU. native: as sent; "
        "upcast: widened to float32 inside the attention, a block of rows at a time (5-10x faster on a CPU without "
        "native half-precision matmuls); auto: upcast unless the CPU flags show avx512_bf16/amx_bf16 (bf16) or "
        "avx512_fp16/amx_fp16 (fp16), measured once where the flags are unreadable or ONEDNN_MAX_CPU_ISA caps the "
        "instruction set. The choice is logged at start. GPUs read half precision as sent.",
    )
    get_reward_special_tokens: Literal["auto", "none", "tokenizer"] = Field(
        "auto",
        description="How /get_reward tokenizes a query (a text the policy's chat template already rendered). none: "
        "add_special_tokens=False, exactly as OpenRLHF's serve_rm; tokenizer: the RM tokenizer's defaults, a doubled "
        "BOS dropped; auto: none for a decoder RM, tokenizer for an encoder (which needs its [CLS] ... [SEP]).",
    )

    # --- limits ------------------------------------------------------------------------------------------------
    max_tokens: int | None = Field(
        None, ge=1, description="Longest RM input in tokens; default and cap: the model's own context length."
    )
    max_hidden_tokens: int = Field(8192, ge=1, description="Most hidden-state rows (T) per item.")
    max_hidden_abs: float = Field(
        1e4,
        gt=0,
        allow_inf_nan=False,
        description="Largest magnitude of a hidden-state value (422 beyond). A decoder's last-layer states after its "
        "final norm stay below about sqrt(D_policy) times its largest norm weight (tens to a few hundred); values "
        "near the float32 limit pass a finiteness check but overflow inside the attention.",
    )
    max_items_per_request: int = Field(1024, ge=1, description="Most items in one /score request.")
    max_batch_tokens: int = Field(16384, ge=1, description="Token budget (padded) of one backbone forward.")
    batch_wait_ms: float = Field(
        2.0,
        ge=0.0,
        description="How long the batcher waits for more requests before running a partial batch.",
    )
    max_queue_items: int = Field(
        8192, ge=1, description="Items waiting for the backbone beyond which /score answers 503."
    )
    max_request_bytes: int = Field(512 * 2**20, ge=1024, description="Largest request body in bytes (413 beyond).")
    max_inflight_bytes: int = Field(
        default_factory=lambda: default_inflight_bytes(),
        ge=2**20,
        description="Memory the requests in flight may hold on a replica, 3 bytes per body byte (the body, its "
        "decoded tensors, their padded batch); a request that does not fit waits R2M_INFLIGHT_WAIT_S, then gets "
        "503 with Retry-After. Default: a quarter of this machine's memory, at most 8 GiB.",
    )
    inflight_wait_s: float = Field(
        2.0, ge=0, description="How long a request waits for room in R2M_MAX_INFLIGHT_BYTES before its 503."
    )
    cache_mb: int = Field(
        832,
        ge=0,
        description="Memory for the caches in MiB, split 8 : 4 : 1 between the worker's reward-token-embedding "
        "cache, the guard's canary and a replica's /embed cache (512, 256 and 64 MiB of the default). A worker holds "
        "the first two, a replica (with Redis) the third, `r2m serve` in embedded mode all three.",
    )
    rte_cache_mb: int = Field(
        default_factory=lambda data: cache_share(data, "rte_cache_mb"),
        ge=0,
        description="Deprecated, set R2M_CACHE_MB: memory for the worker's reward-token-embedding cache in MiB "
        "(default: 8/13 of R2M_CACHE_MB).",
    )
    embed_cache_mb: int = Field(
        default_factory=lambda data: cache_share(data, "embed_cache_mb"),
        ge=0,
        description="Deprecated, set R2M_CACHE_MB: memory for a replica's cache of the RTEs /embed returned, so that "
        "the /score with local read-outs that follows skips the backbone (a miss recomputes them: slower, same "
        "rewards), in MiB (default: 1/13 of R2M_CACHE_MB).",
    )
    guard_canary_mb: int = Field(
        default_factory=lambda data: cache_share(data, "guard_canary_mb"),
        ge=0,
        description="Deprecated, set R2M_CACHE_MB: memory for the guard's canary items (their hidden states) in MiB "
        "(default: 4/13 of R2M_CACHE_MB).",
    )

    # --- store -------------------------------------------------------------------------------------------------
    redis_url: str | None = Field(
        None,
        description="Redis for the preference stream, head store and swap notices (e.g. redis://redis:6379/0); "
        "unset: an in-process queue and worker (embedded mode).",
    )
    redis_prefix: str = Field("r2m", description="Prefix of every Redis key, so several deployments can share one.")
    head_keep: int = Field(5, ge=1, description="Head versions kept in the store (rollback targets).")
    head_poll_s: float = Field(
        2.0, gt=0, description="How often a replica checks the store for a version it missed a notice for."
    )
    optimizer_save_s: float = Field(
        30.0,
        ge=0,
        description="Seconds between the worker's writes of its optimizer state (AdamW's moments, twice the head's "
        "float32 bytes) to the store, what a restarted or second worker resumes from; 0: with every version. A "
        "worker that stops writes it on its way out; one that dies loses at most this much of it.",
    )

    # --- update ------------------------------------------------------------------------------------------------
    train_lr: float = Field(
        1e-6, gt=0, description="Learning rate of the R2M update (paper: 1e-6 dialogue, 5e-7 TL;DR)."
    )
    train_lr_score: float | None = Field(
        None,
        gt=0,
        description="Learning rate of the score layer phi alone (its own AdamW group); unset: R2M_TRAIN_LR for the "
        "whole head. phi is one D_rm vector and moves far less than the attention at the same rate.",
    )
    train_steps: int = Field(1, ge=1, description="Optimizer steps per update (per preference batch).")
    train_weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of the R2M update.")
    train_max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip of the R2M update.")
    grebt_alpha: float = Field(0.3, ge=0.0, le=1.0, description="Weight alpha of the group reward entropy term.")
    rank_by: Literal["recomputed", "given"] = Field(
        "recomputed",
        description="Pick each group's best/worst pair by the recomputed rewards (default) or by the rewards sent.",
    )
    worker_max_batches: int = Field(16, ge=1, description="Queued batches one update may merge.")
    worker_claim_idle_ms: int = Field(
        30000, ge=1, description="A batch pending this long with a dead worker is taken over (XAUTOCLAIM)."
    )
    worker_max_attempts: int = Field(
        3,
        ge=1,
        description="Failed or refused updates of a batch before it goes to the dead-letter stream (with its reason).",
    )

    # --- guard -------------------------------------------------------------------------------------------------
    guard: bool = Field(
        True,
        description="Check each candidate head on a canary of recently trained items before publishing it (the "
        "R2M_GUARD_* bounds); off: only the finiteness checks.",
    )
    guard_max_mean_shift: float = Field(
        3.0,
        gt=0,
        description="Largest |mean reward shift| of a candidate head from the plain RM on the canary, in plain-RM "
        "reward stds.",
    )
    guard_max_spread_ratio: float = Field(
        4.0,
        ge=1,
        description="Largest ratio (either way) of a candidate head's reward std to the plain RM's on the canary.",
    )
    guard_min_rank_agreement: float = Field(
        0.3,
        ge=-1,
        le=1,
        description="Lowest Spearman correlation of a candidate head's rewards with the plain RM's on the canary.",
    )
    guard_min_items: int = Field(16, ge=2, description="Canary items below which the guard only records its figures.")
    guard_canary_size: int = Field(256, ge=2, description="Recently trained items the guard keeps (a reservoir).")

    # --- judge -------------------------------------------------------------------------------------------------
    judge: str | None = Field(
        None,
        description="Who labels pairs from the posted groups: `openai:<base_url>` (an OpenAI-compatible chat "
        "endpoint: vLLM, SGLang, TGI, `transformers serve`, a hosted API; e.g. openai:http://vllm:8000/v1), an "
        "`http(s)://` judge of r2m's pairwise protocol, or `module:function` (a Python callable). Unset: no judge, "
        "the paper's in-group pseudo-labels only.",
    )
    judge_model: str | None = Field(
        None, description="With an `openai:` judge: the model name its server serves (required there)."
    )
    judge_api_key_env: str = Field(
        "R2M_JUDGE_API_KEY",
        description="The environment variable holding the `openai:` judge's API key, sent as a Bearer token "
        "(never logged or shown); unset variable: no key is sent (a local vLLM needs none).",
    )
    judge_pairs: int = Field(
        16,
        ge=1,
        description="Pairs the judge labels per preference batch (per RL step): each picked group's best- against "
        "its worst-scored response by the rewards the worker recomputes, then other pairs of the same groups.",
    )
    judge_template: str | None = Field(
        None,
        description="A text file with the `openai:` judge's pairwise prompt, holding {prompt}, {response_a} and "
        "{response_b}; unset: the template shipped with r2m.",
    )
    judge_both_orders: bool = Field(
        True,
        description="Ask the `openai:` judge each pair in both orders, against position bias; orders that disagree "
        "are an abstention. Doubles the calls.",
    )
    judge_with_pseudo_labels: bool = Field(
        False,
        description="With a judge: also train the paper's in-group pseudo-labels (GREBT) beside the judge's labels. "
        "Off: the judge's labels alone, which is what beat vanilla RL on r2m's own benchmark (docs/judge.md).",
    )
    judge_max_tokens: int = Field(
        4, ge=1, description="Completion tokens an `openai:` judge call may produce (the verdict is one letter)."
    )
    judge_timeout_s: float = Field(30.0, gt=0, description="Timeout of one judge request, in seconds.")
    judge_deadline_s: float = Field(
        20.0,
        gt=0,
        description="Most seconds the judge may take for one update; pairs not labelled by then count as failed and "
        "the update trains on what it has. Keep it below R2M_WORKER_CLAIM_IDLE_MS, after which another worker "
        "takes the batch over.",
    )
    judge_retries: int = Field(
        3, ge=0, description="Retries of a judge request on 429, 5xx and connection errors (exponential backoff, "
        "honouring Retry-After).",
    )
    judge_rpm: int = Field(0, ge=0, description="Judge requests per minute this process sends at most (0: no limit).")
    judge_tpm: int = Field(
        0, ge=0, description="Judge tokens (prompt + completion) per minute this process spends at most (0: no limit)."
    )
    judge_concurrency: int = Field(8, ge=1, description="Judge requests (or Python judge calls) in flight at once.")

    # --- process -----------------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address `r2m serve` binds (and `r2m worker`'s /metrics).")
    port: int = Field(8000, ge=0, le=65535, description="Port `r2m serve` binds.")
    log_level: str = Field("info", description="Log level of the server or worker.")
    drain_timeout_s: float = Field(
        30.0,
        gt=0,
        description="On SIGTERM `r2m serve` stops accepting, answers what it accepted (503 with Retry-After for what "
        "cannot finish in time), and exits within this many seconds and one more (Kubernetes: keep "
        "terminationGracePeriodSeconds above it).",
    )
    keep_alive_s: float = Field(
        75.0,
        gt=0,
        description="How long `r2m serve` keeps an idle connection open. Longer than the client pools' own expiry "
        "(httpx 5 s, aiohttp 15 s, load balancers 60 s), so that a client never sends on a connection the server "
        "is closing; an equal expiry on both ends races, and the loser's request fails.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="When set, every route but /healthz, /readyz and /metrics needs `Authorization: Bearer`.",
    )
    embedded_worker: bool = Field(
        True, description="Without R2M_REDIS_URL, run the update worker inside `r2m serve` (embedded mode)."
    )
    worker_metrics_port: int = Field(9101, ge=0, le=65535, description="Port of `r2m worker`'s /metrics (0: none).")

    @field_validator("api_key")
    @classmethod
    def _no_empty_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value():
            return None  # R2M_API_KEY= (empty) means no auth, not "the empty key"
        return v

    @model_validator(mode="after")
    def _check_heads(self) -> ServiceSettings:
        if self.attn_dim % self.attn_heads:
            raise ValueError(f"R2M_ATTN_DIM={self.attn_dim} must be divisible by R2M_ATTN_HEADS={self.attn_heads}")
        return self

    @model_validator(mode="after")
    def _check_judge(self) -> ServiceSettings:
        spec = self.judge
        if spec is None:
            return self
        if spec.startswith("openai:"):
            if not spec.removeprefix("openai:").startswith(("http://", "https://")):
                raise ValueError(f"R2M_JUDGE={spec!r}: give openai:<base_url>, e.g. openai:http://vllm-host:8000/v1")
            if not self.judge_model:
                raise ValueError("R2M_JUDGE_MODEL: the openai: judge needs the model name its server serves")
        elif not spec.startswith(("http://", "https://")):
            module, sep, name = spec.partition(":")
            if not (sep and module and name):
                raise ValueError(
                    f"R2M_JUDGE={spec!r}: give openai:<base_url>, an http(s):// judge URL or module:function"
                )
        if self.judge_deadline_s * 1000 >= self.worker_claim_idle_ms:
            raise ValueError(
                f"R2M_JUDGE_DEADLINE_S={self.judge_deadline_s} must stay below R2M_WORKER_CLAIM_IDLE_MS="
                f"{self.worker_claim_idle_ms} ms, or another worker takes a batch over while it is being judged"
            )
        return self

    @model_validator(mode="after")
    def _warn_cache_overrides(self) -> ServiceSettings:
        for name in sorted(self.model_fields_set & CACHE_SHARES.keys()):
            deprecated(name)
        return self


class _InitOnly(ServiceSettings):
    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **others):  # type: ignore[override]  # noqa: ANN001, ANN003, ANN206
        return (init_settings,)


def isolated_settings(**values: object) -> ServiceSettings:
    """Settings from `values` and the defaults only: no R2M_* variable and no .env file reaches them (a server that
    a program starts for itself, such as the benchmark's, must not pick up the user's own settings)."""
    return _InitOnly(**values)  # type: ignore[arg-type]
