"""GRPO / RLOO on a Hugging Face causal LM, with rewards (and R2M updates) from the r2m service.

    r2m serve &                                   # embedded service; R2M_POLICY_DIM = the policy's hidden size
    r2m train --policy my-policy/ --steps 100 --reward-mode r2m --out-dir runs/r2m

One RL step t, as in docs/method.md:
  1. rollout: K responses per prompt with HF `generate`;
  2. policy forward: ONE pass of the sampling policy over query + response gives the old log-probs and the
     last-layer hidden states h (the reference policy's log-probs come from its own pass);
  3. score: `/score` with h (per reward mode), step t of T;
  4. advantage: GRPO (r - mean) / (std + eps) or RLOO (r - mean of the other K-1) inside each group;
  5. update: k epochs of the clipped token-level policy gradient + kl_coef * KL(policy || reference), AdamW,
     one optimizer step per epoch (micro-batches accumulate gradients);
  6. the LAST epoch's forward pass also returns hidden states h' (output_hidden_states=True, no extra pass);
  7. r2m post: every group (prompt, K responses, K h', its rewards) goes to `/preferences`; in the `r2m-pairs`
     mode (ours) labelled pairs from a file go instead, each replayed through the updated policy by teacher
     forcing for its hidden states.

Which parameters h' belong to: the last epoch's forward runs before that epoch's optimizer step, so h' are the
hidden states of the policy after k-1 updates of this step (for the paper's k = 2: after the first epoch's step),
not of the policy after the k-th step. That is the paper's "refreshed by the last policy epoch, for free"; the
e2e test pins it exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

from .config import REWARD_MODES, TrainConfig, load_pairs, load_prompts
from .judge import SERVICE, choose_pairs, label_pairs, load_judge
from .local import LocalFeedbackClient, local_feedback_default
from .vllm_rollout import VLLMRollout, pack_responses, unpadded

__all__ = [
    "FEEDBACK",
    "Feedback",
    "GRPOTrainer",
    "Rollout",
    "SetupError",
    "check_service",
    "default_client",
    "group_advantages",
    "noise_like",
    "policy_hidden_size",
    "preflight",
    "sequence_forward",
    "train",
]

log = logging.getLogger("r2m.trainer")

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
ADV_EPS = 1e-4  # GRPO std floor: a group whose K rewards tie gets zero advantages, not NaN

HiddenKind = Literal["policy", "noise"] | None


class Feedback(NamedTuple):
    """What a reward mode sends in the place of hidden states: "policy" (the policy's last-layer hidden states),
    "noise" (Gaussian noise shaped like them, `noise_like`: the paper's noise-feedback arm) or None (nothing)."""

    score: HiddenKind  # with /score: h, the sampling policy's
    post: HiddenKind  # with the groups and judge pairs posted to /preferences: h', the last policy epoch's


# The one place the loop tells the reward modes apart; what each one posts is TrainConfig's posts_groups,
# posts_pairs and posts_judged (r2m-pairs posts labelled pairs replayed through the updated policy, `post_pairs`).
FEEDBACK: dict[str, Feedback] = {
    "vanilla": Feedback(score=None, post=None),
    "r2m": Feedback(score="policy", post="policy"),
    "r2m-frozen": Feedback(score="policy", post=None),
    "r2m-noise": Feedback(score="noise", post="noise"),
    "head-only": Feedback(score=None, post=None),
    "r2m-pairs": Feedback(score="policy", post=None),
    "r2m-judge": Feedback(score="policy", post="policy"),
    "head-judge": Feedback(score=None, post=None),
}
assert FEEDBACK.keys() == set(REWARD_MODES)


@dataclass
class Rollout:
    """One step's sampled batch: B = P * K sequences, group i owning rows i*K .. i*K+K-1."""

    group_prompts: list[str]  # (P,) the plain prompts, as the service wants them
    prompts: list[str]  # (B,) the prompt of each sequence
    responses: list[str]  # (B,) decoded responses, special tokens dropped
    sequences: torch.Tensor  # (B, L) left-padded prompt + right-padded response token ids
    attention_mask: torch.Tensor  # (B, L) 1 on real prompt and response tokens (the response up to its EOS)
    prompt_len: int  # width of the padded prompt block; responses start at column prompt_len
    response_mask: torch.Tensor  # (B, R) 1 on response tokens, R = L - prompt_len


def group_advantages(rewards: torch.Tensor, group_size: int, kind: str) -> torch.Tensor:
    """Advantages inside each group of K consecutive rewards: (B,) -> (B,)."""
    r = rewards.view(-1, group_size)  # (P, K)
    if kind == "grpo":
        adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + ADV_EPS)
    elif kind == "rloo":
        adv = r - (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    else:
        raise ValueError(f"advantage={kind!r}: choose grpo or rloo")
    return adv.reshape(-1)


def sequence_forward(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    temperature: float = 1.0,
    hidden: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """One forward pass over prompt + response: token log-probs of the response and, with `hidden`, the last-layer
    hidden states of every sequence's real tokens (query + response, padding sliced away), detached.

    Returns:
        logp: (B, R) log pi(y_t | x, y_<t) at the sampling temperature (as in TRL), R = L - prompt_len.
        hidden: B tensors (T_b, D), or None.
    """
    # Positions count real tokens only, as `generate` does for left-padded prompts.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=hidden,
        use_cache=False,
    )
    logits = out.logits[:, prompt_len - 1 : -1].float() / temperature  # (B, R, V): position p predicts token p+1
    targets = sequences[:, prompt_len:]  # (B, R)
    logp = torch.gather(F.log_softmax(logits, dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    states = None
    if hidden:
        last = out.hidden_states[-1].detach()  # (B, L, D)
        keep = attention_mask.bool()
        states = [last[b, keep[b]] for b in range(last.shape[0])]  # B x (T_b, D)
    return logp, states


def _chunks(n: int, size: int) -> Iterator[slice]:
    size = size or n
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def noise_like(hidden: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """Gaussian noise with each tensor's own mean and std and shape: the paper's "noise feedback" arm."""
    out = []
    for h in hidden:
        hf = h.float()
        z = torch.randn(h.shape, generator=generator, dtype=torch.float32)
        out.append((z * hf.std() + hf.mean()).to(h.dtype))
    return out


def _feedback(kind: HiddenKind, hidden: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor] | None:
    """What goes out in the place of `hidden` for a `Feedback` kind."""
    if kind == "policy":
        return hidden
    if kind == "noise":
        return noise_like(hidden, generator)
    return None


class _Losses(NamedTuple):
    """The last policy epoch's figures: token means over the step's batch, and the gradient norm before clipping."""

    policy: float
    kl: float
    clipfrac: float
    total: float
    grad_norm: float


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[f"time/{name}"] = time.perf_counter() - start


class GRPOTrainer:
    """The loop of the module docstring. `client` defaults to an `R2MClient` on `config.server_url`; pass your own
    (any object with `score`, `post_preferences`, `current_head`) to record or fake the service."""

    def __init__(self, config: TrainConfig, client: Any = None, judge: Any = None) -> None:
        # ---------------------------------------------------------------------------------------------- setup --
        self.config = c = config
        self.out_dir = Path(c.out_dir)
        if c.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(c.device)
        self.prompts = load_prompts(c.prompts)
        self.pairs = load_pairs(c.pairs) if c.posts_pairs and c.pairs else []  # r2m-pairs: labelled pairs to replay
        # r2m-judge / head-judge: a callable given here (the benchmark's), else the one --judge names
        if judge is None and c.posts_judged:
            assert c.judge is not None  # TrainConfig asks the judge modes for one
            judge = load_judge(c.judge)
        self.judge = judge

        checkpoint = self._checkpoint_to_resume()
        self._load_policy(str(checkpoint / "policy") if checkpoint else c.policy)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.start_step = 0
        if checkpoint is not None:
            state = torch.load(checkpoint / "optimizer.pt", map_location=self.device, weights_only=True)
            self.optimizer.load_state_dict(state)
            self.start_step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
            log.info("resumed from %s at step %d", checkpoint, self.start_step)
        # out_dir is written only once the policy has loaded: a run that cannot start leaves nothing behind.
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # One id per run, kept in out_dir: a resumed step that posts its groups again reuses the step's batch id,
        # which the service trains only once; a new run in a fresh out_dir gets new ids.
        run_id_path = self.out_dir / "run_id"
        if not run_id_path.exists() or checkpoint is None:
            run_id_path.write_text(uuid.uuid4().hex[:16])
        self.run_id = run_id_path.read_text().strip()

        self.client = client = default_client(c) if client is None else client
        local = c.local_feedback == "on" or (c.local_feedback == "auto" and local_feedback_default(self.device))
        # Scoring with hidden states goes through the local-feedback wrapper when on; everything else as it is.
        self.feedback_client = LocalFeedbackClient(client, self.device) if local and c.sends_hidden else client
        self.batch: Rollout | None = None  # the latest step's rollout, for callers that inspect a step

    def _checkpoint_to_resume(self) -> Path | None:
        """The latest checkpoint in out_dir when resuming (None: a fresh run). Refuses to write over an earlier
        run's checkpoints without `resume`, or to resume one with other settings."""
        c = self.config
        checkpoint = self.latest_checkpoint()
        if checkpoint is not None and not c.resume:
            raise SetupError(
                f"out_dir={c.out_dir!r} holds checkpoints of an earlier run; pass resume=True (--resume) to continue "
                "it, or choose another out_dir"
            )
        if c.resume and checkpoint is None:
            log.warning("resume: no checkpoint in %s, starting at step 0", self.out_dir / CHECKPOINTS)
        if checkpoint is not None:
            saved = TrainConfig.load(checkpoint / "config.json")
            if diff := c.differences(saved):
                raise SetupError(
                    f"resume: settings {', '.join(diff)} differ from the checkpoint's {checkpoint / 'config.json'}; "
                    "resume with the same config (or a new out_dir)"
                )
        return checkpoint

    def _load_policy(self, policy_path: str) -> None:
        """The tokenizer, the policy (from `policy_path`: config.policy or a checkpoint's), the frozen reference
        (always config.policy), the end-of-sequence ids, and the vLLM engine of rollout='vllm'."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        c = self.config
        dtype = getattr(torch, c.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(c.policy)
        self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to), whose typeshed signature still
        # takes the unbound `self`: mypy reads the device as the model (arg-type).
        self.policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype).to(self.device)  # type: ignore[arg-type]
        # eval(): dropout off, so the old and the new log-probs of one token are comparable (as in TRL).
        self.policy.eval()
        reference = AutoModelForCausalLM.from_pretrained(c.policy, dtype=dtype).to(self.device)  # type: ignore[arg-type]
        self.reference = reference.eval()
        self.reference.requires_grad_(False)
        eos = self.policy.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos], device=self.device)
        self.vllm: VLLMRollout | None = None
        if c.rollout == "vllm":
            if self.device.type != "cuda":
                raise ValueError(f"rollout='vllm' needs a CUDA device; this run is on {self.device}")
            self.vllm = VLLMRollout(
                policy_path,
                dtype=c.dtype,
                seed=c.seed,
                max_model_len=c.max_prompt_tokens + c.max_new_tokens,
                gpu_memory_utilization=c.vllm_gpu_memory_utilization,
            )

    # ---------------------------------------------------------------------------------------------------- loop --
    def run(self) -> dict[str, Any]:
        """Train from `start_step` to `config.steps`; returns the last step's metrics."""
        from tqdm.auto import tqdm

        c = self.config
        metrics_path = self.out_dir / METRICS
        self._trim_metrics(metrics_path)
        last: dict[str, Any] = {}
        bar = tqdm(range(self.start_step, c.steps), initial=self.start_step, total=c.steps, disable=not c.progress)
        for t in bar:
            last = self.train_step(t)
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(last) + "\n")
            bar.set_postfix(
                {"reward": f"{last['rewards/mean']:.3f}", "kl": f"{last['kl']:.4f}", "head": last["head_version"]}
            )
            done = t + 1
            if (c.save_every and done % c.save_every == 0) or done == c.steps:
                self.save_checkpoint(done)
        return last

    def train_step(self, t: int) -> dict[str, Any]:
        """One RL step t (0-based; the service's omega schedule sees step t of total_steps T)."""
        c = self.config
        feedback = FEEDBACK[c.reward_mode]
        torch.manual_seed(c.seed + t)  # per-step seeding: a resumed run samples what the uninterrupted one would
        noise_gen = torch.Generator().manual_seed(c.seed + t)  # r2m-noise: the noise for /score, then for the posts
        w_step = min(t, c.schedule_steps)  # the omega schedule's t: past its T the floor Omega holds
        timer = _Timer(self.device)

        # -------------------------------------------------------------------------------------------- rollout --
        with timer("rollout"):
            batch = self.rollout(t)
        self.batch = batch

        # --------------------------------------------------- policy forward: old log-probs and hidden states h --
        with timer("policy_forward"):
            old_logp, ref_logp, hidden = self.policy_forward(batch)

        # ---------------------------------------------------------------------------------------------- score --
        with timer("score"):
            result = self.feedback_client.score(
                batch.prompts,
                batch.responses,
                hidden=_feedback(feedback.score, hidden, noise_gen),
                step=w_step,
                total_steps=c.schedule_steps,
            )
            rewards = torch.tensor(result.rewards, dtype=torch.float32)  # (B,)
        watch = self.plain_rewards(batch) if c.log_plain_rewards else {}  # not timed: not part of the RL step

        # ------------------------------------------------------------------------------------------ advantage --
        adv = group_advantages(rewards, c.group_size, c.advantage).to(self.device)  # (B,)

        # --------------------------------------------------------------------------------------------- update --
        with timer("update"):
            losses, refreshed = self.update(batch, old_logp, ref_logp, adv, keep_hidden=feedback.post is not None)

        # ------------------------------------------------------------------------------------------ r2m post --
        with timer("r2m_post"):
            posted, pairs_posted = self.post(t, batch, result.rewards, _feedback(feedback.post, refreshed, noise_gen))

        # ------------------------------------------------------------------------------------------------ log --
        group_std = rewards.view(-1, c.group_size).std(dim=1)
        return {
            "step": t,
            "rewards": result.rewards,
            "rewards/mean": rewards.mean().item(),
            "rewards/std": rewards.std().item(),
            "rewards/group_std_mean": group_std.mean().item(),
            "advantages/abs_mean": adv.abs().mean().item(),
            "kl": losses.kl,
            "losses/policy": losses.policy,
            "losses/total": losses.total,
            "policy/clipfrac": losses.clipfrac,
            "policy/grad_norm": losses.grad_norm,
            "response_length/mean": batch.response_mask.float().sum(1).mean().item(),
            "head_version": result.head_version,
            "omega": result.omega,
            "r2m/groups_posted": posted,
            "r2m/pairs_posted": pairs_posted,
            **watch,
            **(self.judge_stats if c.posts_judged else {}),
            **timer.seconds,
        }

    # --------------------------------------------------------------------------------------- the step's phases --
    @torch.no_grad()
    def policy_forward(self, batch: Rollout) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The sampling policy's log-probs (the old ones of the ratio) and, when the mode sends them, its hidden
        states h; the reference policy's log-probs. Returns (B, R), (B, R), and B tensors (T_b, D) on the CPU (they
        go out over HTTP) or an empty list."""
        c = self.config
        old_logp: list[torch.Tensor] = []
        ref_logp: list[torch.Tensor] = []
        hidden: list[torch.Tensor] = []
        for s in _chunks(c.batch_size, c.micro_batch_size):
            sequences, attention_mask = batch.sequences[s], batch.attention_mask[s]
            lp, h = sequence_forward(
                self.policy, sequences, attention_mask, batch.prompt_len, c.temperature, hidden=c.sends_hidden
            )
            old_logp.append(lp)
            hidden.extend(x.cpu() for x in h or [])
            rlp, _ = sequence_forward(self.reference, sequences, attention_mask, batch.prompt_len, c.temperature)
            ref_logp.append(rlp)
        return torch.cat(old_logp), torch.cat(ref_logp), hidden

    def plain_rewards(self, batch: Rollout) -> dict[str, Any]:
        """The same samples scored by the plain RM (no hidden states: w = 1), and the served head's guard figures:
        whether a rising reward is the policy getting better or the head inflating (`log_plain_rewards`)."""
        plain = self.client.score(batch.prompts, batch.responses)
        guard = self.client.current_head().get("guard") or {}
        return {
            "rewards/plain_mean": sum(plain.rewards) / len(plain.rewards),
            **{f"guard/{k}": guard[k] for k in ("mean_shift", "spread_ratio", "rank_agreement") if k in guard},
        }

    def update(
        self, batch: Rollout, old_logp: torch.Tensor, ref_logp: torch.Tensor, adv: torch.Tensor, keep_hidden: bool
    ) -> tuple[_Losses, list[torch.Tensor]]:
        """k policy epochs over the step's batch: the clipped token-level policy gradient + kl_coef * KL(policy ||
        reference), micro-batches accumulating into one optimizer step per epoch. Returns the last epoch's figures
        and, with `keep_hidden`, the hidden states h' of its forward (on the CPU; see the module docstring for
        which parameters they belong to), else an empty list."""
        c = self.config
        mask = batch.response_mask.float()  # (B, R)
        n_tokens = mask.sum().clamp(min=1)
        refreshed: list[torch.Tensor] = []
        for epoch in range(c.policy_epochs):
            last_epoch = epoch == c.policy_epochs - 1
            stats = torch.zeros(4, device=self.device)  # pg loss, kl, clipped tokens, total loss (token sums)
            for s in _chunks(c.batch_size, c.micro_batch_size):
                logp, h = sequence_forward(
                    self.policy,
                    batch.sequences[s],
                    batch.attention_mask[s],
                    batch.prompt_len,
                    c.temperature,
                    hidden=last_epoch and keep_hidden,
                )
                if h:
                    refreshed.extend(x.cpu() for x in h)  # h': this forward's parameters (before the step)
                m = mask[s]
                ratio = torch.exp(logp - old_logp[s])  # (b, R)
                a = adv[s].unsqueeze(1)  # (b, 1)
                pg = torch.max(-a * ratio, -a * ratio.clamp(1 - c.clip_eps, 1 + c.clip_eps))
                log_r = ref_logp[s] - logp
                kl = torch.exp(log_r) - log_r - 1  # k3 estimator of KL(pi || pi_ref), >= 0
                loss_tok = pg + c.kl_coef * kl
                loss = (loss_tok * m).sum() / n_tokens  # token-level mean over the whole step's batch
                loss.backward()
                clipped = ((ratio - 1).abs() > c.clip_eps).float()
                stats += torch.stack(
                    [(pg * m).sum(), (kl * m).sum(), (clipped * m).sum(), (loss_tok * m).sum()]
                ).detach()
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
                if c.max_grad_norm > 0
                else torch.tensor(float("nan"))
            )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        pg_loss, kl_mean, clipfrac, total_loss = (stats / n_tokens).tolist()
        return _Losses(pg_loss, kl_mean, clipfrac, total_loss, float(grad_norm)), refreshed

    def post(
        self, t: int, batch: Rollout, rewards: Sequence[float], hidden: list[torch.Tensor] | None
    ) -> tuple[int, int]:
        """Step t's preferences, as the mode says: labelled pairs (r2m-pairs), judge-labelled pairs and the groups,
        the last two with `hidden` (`Feedback.post`) in one post. Returns (groups posted, pairs posted)."""
        c = self.config
        pairs_posted = self.post_pairs(t) if c.posts_pairs else 0
        judged = self.judge_pairs(t, batch, rewards, hidden) if c.posts_judged else []
        groups = self.groups(batch, rewards, hidden) if c.posts_groups else []
        if not (groups or judged):
            return 0, pairs_posted
        answer = self.client.post_preferences(
            groups=groups or None,
            pairs=judged or None,
            step=min(t, c.schedule_steps),
            total_steps=c.schedule_steps,
            batch_id=f"{self.run_id}-s{t:06d}",
        )
        return answer.groups, pairs_posted + answer.pairs

    # ------------------------------------------------------------------------------------------------ rollout --
    def rollout(self, t: int) -> Rollout:
        """Sample `prompts_per_step` prompts (seeded by seed + t) and K responses each."""
        c = self.config
        pick = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(c.seed + t))
        group_prompts = [self.prompts[i] for i in pick[: c.prompts_per_step].tolist()]
        if len(group_prompts) < c.prompts_per_step:  # fewer prompts than a step wants: cycle through them
            reps = math.ceil(c.prompts_per_step / len(group_prompts))
            group_prompts = (group_prompts * reps)[: c.prompts_per_step]
        tok = self.tokenizer
        enc = self.encode_prompts(group_prompts)
        prompt_ids = enc["input_ids"].repeat_interleave(c.group_size, dim=0).to(self.device)  # (B, P)
        prompt_mask = enc["attention_mask"].repeat_interleave(c.group_size, dim=0).to(self.device)
        prompt_len = prompt_ids.shape[1]
        if self.vllm is not None:  # vLLM samples token ids only, from weights synced with the policy being trained
            self.vllm.sync_weights(self.policy)
            sampled = self.vllm.generate(
                unpadded(enc["input_ids"], enc["attention_mask"]),
                n=c.group_size,
                temperature=c.temperature,
                top_p=c.top_p,
                max_tokens=c.max_new_tokens,
                eos_ids=self.eos_ids.tolist(),
                seed=c.seed + t,
            )
            response, response_mask = (
                x.to(self.device)
                for x in pack_responses(sampled, tok.pad_token_id, self.eos_ids.tolist(), c.max_new_tokens)
            )
            sequences = torch.cat([prompt_ids, response], dim=1)  # (B, L)
        else:
            with torch.no_grad():
                sequences = self.policy.generate(
                    input_ids=prompt_ids,
                    attention_mask=prompt_mask,
                    do_sample=True,
                    temperature=c.temperature,
                    top_p=c.top_p,
                    top_k=0,  # sample from the full distribution, the one the log-probs are computed on
                    max_new_tokens=c.max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=self.eos_ids.tolist(),
                )  # (B, L)
            response = sequences[:, prompt_len:]  # (B, R)
            # A response is its tokens up to and including the first EOS; what follows is padding.
            is_eos = torch.isin(response, self.eos_ids)
            after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
            response_mask = (~after_eos).long()
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
        responses = tok.batch_decode(
            [response[b][response_mask[b].bool()].tolist() for b in range(len(response))], skip_special_tokens=True
        )
        return Rollout(
            group_prompts=group_prompts,
            prompts=[p for p in group_prompts for _ in range(c.group_size)],
            responses=responses,
            sequences=sequences,
            attention_mask=attention_mask,
            prompt_len=prompt_len,
            response_mask=response_mask,
        )

    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        """Left-padded prompt token ids and mask, through the tokenizer's chat template when it has one."""
        c, tok = self.config, self.tokenizer
        if tok.chat_template:
            texts = [
                tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts
            ]
            return tok(
                texts,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=c.max_prompt_tokens,
                add_special_tokens=False,
            )
        return tok(list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=c.max_prompt_tokens)

    # ------------------------------------------------------------------------------------------- what is posted --
    def groups(
        self, batch: Rollout, rewards: Sequence[float], hidden: Sequence[torch.Tensor] | None
    ) -> list[dict[str, Any]]:
        """The step's groups for the in-group pseudo-labels: a prompt, its K responses and their rewards, with their
        hidden states when `hidden` is given."""
        k = self.config.group_size
        out = []
        for i, prompt in enumerate(batch.group_prompts):
            rows = range(i * k, (i + 1) * k)
            group: dict[str, Any] = {
                "prompt": prompt,
                "responses": [batch.responses[r] for r in rows],
                "rewards": [rewards[r] for r in rows],
            }
            if hidden is not None:
                group["hidden"] = [hidden[r] for r in rows]
            out.append(group)
        return out

    @torch.no_grad()
    def replay(self, prompts: Sequence[str], responses: Sequence[str]) -> list[torch.Tensor]:
        """Teacher forcing: the current policy's last-layer hidden states over each prompt + response + end token
        (real tokens only, as `sequence_forward` returns them), one no-grad forward; B tensors (T_b, D) on CPU."""
        c, tok = self.config, self.tokenizer
        enc = self.encode_prompts(prompts)
        eos = int(self.eos_ids[0])
        ids = [[*x, eos] for x in tok(list(responses), add_special_tokens=False)["input_ids"]]  # not truncated
        width = max(len(x) for x in ids)
        response = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
        response_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for b, x in enumerate(ids):
            response[b, : len(x)] = torch.tensor(x)
            response_mask[b, : len(x)] = 1
        sequences = torch.cat([enc["input_ids"], response], dim=1).to(self.device)
        attention_mask = torch.cat([enc["attention_mask"], response_mask], dim=1).to(self.device)
        hidden: list[torch.Tensor] = []
        for s in _chunks(len(ids), c.micro_batch_size):
            _, h = sequence_forward(
                self.policy, sequences[s], attention_mask[s], enc["input_ids"].shape[1], c.temperature, hidden=True
            )
            hidden.extend(x.cpu() for x in h or [])
        return hidden

    def post_pairs(self, t: int) -> int:
        """Post `pairs_per_step` labelled pairs (drawn with seed + t) with the updated policy's hidden states."""
        c = self.config
        pick = torch.randperm(len(self.pairs), generator=torch.Generator().manual_seed(c.seed + t))
        rows = [self.pairs[i] for i in pick[: c.pairs_per_step].tolist()]
        prompts = [r["prompt"] for r in rows]
        hidden = self.replay(prompts * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
        n = len(rows)
        pairs = [{**r, "chosen_hidden": hidden[i], "rejected_hidden": hidden[n + i]} for i, r in enumerate(rows)]
        return self.client.post_preferences(
            pairs=pairs,
            step=min(t, c.schedule_steps),
            total_steps=c.schedule_steps,
            batch_id=f"{self.run_id}-s{t:06d}",
        ).pairs

    def judge_pairs(
        self, t: int, batch: Rollout, rewards: Sequence[float], hidden: Sequence[torch.Tensor] | None
    ) -> list[dict[str, Any]]:
        """The step's judge-labelled pairs (r2m.trainer.judge): `judge_pairs_per_step` picked from its groups,
        each with the last epoch's hidden states of both responses when `hidden` is given."""
        c = self.config
        picks = choose_pairs(rewards, c.group_size, c.judge_pairs_per_step, torch.Generator().manual_seed(c.seed + t))
        labelled = label_pairs(self.judge, batch.prompts, batch.responses, picks)
        self.judge_stats = {
            "judge/labels": len(labelled),
            "judge/agrees_with_rm": sum(rewards[i] > rewards[j] for i, j in labelled) / max(len(labelled), 1),
        }
        out = []
        for i, j in labelled:
            pair: dict[str, Any] = {"prompt": batch.prompts[i], "chosen": batch.responses[i],
                                    "rejected": batch.responses[j]}  # fmt: skip
            if hidden is not None:
                pair |= {"chosen_hidden": hidden[i], "rejected_hidden": hidden[j]}
            out.append(pair)
        return out

    # -------------------------------------------------------------------------------------------- checkpoints --
    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (one whose trainer_state.json was written) in out_dir, or None."""
        root = self.out_dir / CHECKPOINTS
        done = [p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()] if root.is_dir() else []
        return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)

    def save_checkpoint(self, step: int) -> Path:
        """policy/ (save_pretrained, safetensors) + tokenizer, optimizer.pt (tensors and plain values only: loads
        with weights_only=True), config.json (the TrainConfig), trainer_state.json (written last: marks it done)."""
        path = self.out_dir / CHECKPOINTS / f"step-{step:06d}"
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.policy.save_pretrained(tmp / "policy", safe_serialization=True)
        self.tokenizer.save_pretrained(tmp / "policy")
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        self.config.save(tmp / "config.json")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}) + "\n")
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        return path

    def _trim_metrics(self, path: Path) -> None:
        """A fresh run starts an empty log; a resumed one drops lines of steps it is about to redo."""
        if not path.exists():
            return
        keep = []
        if self.start_step > 0:
            keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < self.start_step]
        path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()


# ------------------------------------------------------------------------------- checks before a run spends --


class SetupError(ValueError):
    """A run that cannot start, found before weights load, anything is generated or out_dir is written; the
    message says which setting to change (`r2m train` prints it as its one line)."""


# A Hugging Face hub id: `name` or `owner/name` (huggingface_hub's rule, roughly); a path like ./x or a/b/c is none.
_HUB_ID = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")


def default_client(config: TrainConfig) -> Any:
    """The `R2MClient` of `config.server_url`, with its key (or R2M_API_KEY's)."""
    from r2m.client import R2MClient

    return R2MClient(config.server_url, api_key=config.api_key or os.environ.get("R2M_API_KEY") or None)


def policy_hidden_size(policy: str) -> int:
    """The policy's hidden size (the width of the hidden states it sends), from its config.json alone: a local
    folder's, or a hub id's from the hub or the local cache."""
    from transformers import AutoConfig

    path = Path(policy)
    if not path.exists() and not _HUB_ID.fullmatch(policy):
        raise SetupError(f"policy={policy!r}: no such folder (give a causal LM's folder or a hub id)")
    if path.exists() and not (path / "config.json").is_file():
        raise SetupError(f"policy={policy!r}: no config.json there (give a folder written by save_pretrained)")
    try:
        config = AutoConfig.from_pretrained(policy)
    except (OSError, ValueError) as exc:
        if path.exists():
            raise SetupError(f"policy={policy!r}: its config.json does not load ({_first_line(exc)})") from None
        raise SetupError(
            f"policy={policy!r}: no such folder, and no model of that id this machine can fetch from the Hugging "
            f"Face hub ({_first_line(exc)})"
        ) from None
    width = getattr(config.get_text_config(), "hidden_size", None)
    if not isinstance(width, int):
        raise SetupError(f"policy={policy!r}: its config.json gives no hidden_size")
    return width


def check_service(config: TrainConfig, client: Any, hidden_size: int) -> dict[str, Any] | None:
    """GET /info: the service answers, takes hidden states of the policy's width when the run sends them, and has
    a judge when the run leaves the judging to it. Returns the service's info (None for a client without `info`,
    such as a test's stand-in)."""
    from r2m.client import AuthenticationError, R2MError, ServiceUnavailable, Timeout, TransportError

    if not hasattr(client, "info"):
        return None
    url = getattr(client, "base_url", config.server_url)
    try:
        info: dict[str, Any] = client.info()
    except (TransportError, Timeout) as exc:
        raise SetupError(
            f"no r2m service at {url} ({_first_line(exc.__cause__ or exc)}): start one with "
            f"`R2M_POLICY_DIM={hidden_size} r2m serve`, or give --server-url"
        ) from None
    except AuthenticationError as exc:
        raise SetupError(f"the service at {url} refused the key ({exc.status_code}): set R2M_API_KEY") from None
    except ServiceUnavailable as exc:
        raise SetupError(f"the service at {url} is not ready ({exc.status_code}): wait for GET /readyz") from None
    except R2MError as exc:
        raise SetupError(f"GET {url}/info failed ({_first_line(exc)}): is --server-url an r2m service?") from None
    served = info.get("policy_dim")
    if config.sends_hidden and served != hidden_size:
        raise SetupError(
            f"the service at {url} takes hidden states of width R2M_POLICY_DIM={served}, but the policy "
            f"{config.policy!r} has hidden size {hidden_size}: restart the service with R2M_POLICY_DIM={hidden_size}"
        )
    if config.judge == SERVICE and config.reward_mode in ("r2m-judge", "head-judge") and not info.get("judge"):
        raise SetupError(
            f"judge='service': the service at {url} has no judge; start it with R2M_JUDGE set, or give --judge "
            "module:function, a URL or openai:<base_url> to judge in the trainer"
        )
    return info


def preflight(config: TrainConfig, client: Any) -> None:
    """What `train` checks before it spends: the policy's config.json is there and the service can serve the run
    (`check_service`). Reads the policy's config only; loads no weights, writes nothing. Raises SetupError."""
    check_service(config, client, policy_hidden_size(config.policy))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def train(config: TrainConfig, client: Any = None) -> dict[str, Any]:
    """Check the policy and the service (`preflight`), then run a whole training (or resume one); returns the
    last step's metrics. Raises SetupError, before anything is loaded or written, when the run cannot start."""
    own = client is None
    client = default_client(config) if own else client
    try:
        preflight(config, client)
        trainer = GRPOTrainer(config, client)
        return trainer.run()
    finally:
        if own:
            client.close()
