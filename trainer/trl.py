"""TRL adapter: the r2m service as a reward function of TRL's `GRPOTrainer` / `RLOOTrainer`, with R2M updates.

First choice, no extra policy forward (the hidden states come from TRL's and generation's own forwards), in one
process or several (`accelerate launch --num_processes N train.py`):

    from trl import GRPOConfig
    from r2m.client import R2MClient
    from r2m.trainer.trl import R2MGRPOTrainer, R2MRewardFunction

    reward = R2MRewardFunction(R2MClient("http://127.0.0.1:8000"))
    trainer = R2MGRPOTrainer(model=policy, reward_funcs=reward, args=GRPOConfig(...),
                             train_dataset=ds)  # or R2MRLOOTrainer with RLOOConfig
    trainer.train()

Fallback, for a trainer you cannot subclass: plain `GRPOTrainer(..., reward_funcs=reward,
callbacks=[R2MPreferenceCallback(reward)])`. There the reward function runs one extra no-grad policy forward per
scored batch for the hidden states and the callback one per optimizer step for the refreshed ones.

Start the service with `R2M_POLICY_DIM` = the policy's hidden size. This module needs torch and transformers but never
imports trl (the two trainers are built on first use). A sample the service cannot score gets `None`, never 0. The
TRL 1.16.0 contract matched, and what each configuration costs: docs/integrations.md, "TRL".
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback

from r2m.client import AuthenticationError, InvalidRequest, R2MClient, R2MError, StaleHead

__all__ = [  # noqa: F822 - the two trainers: __getattr__
    "R2MGRPOTrainer",
    "R2MPreferenceCallback",
    "R2MRLOOTrainer",
    "R2MRewardFunction",
    "completion_text",
    "prompt_text",
]


def __getattr__(name: str) -> Any:
    """The two trainers are built on first use (they subclass trl's; this module never imports trl)."""
    if name in ("R2MGRPOTrainer", "R2MRLOOTrainer"):
        from . import _trl_trainers

        return getattr(_trl_trainers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


logger = logging.getLogger(__name__)

HEAD_ROUNDS = 3  # rescorings per reward call before its items' head versions are left as they are (logged)


def prompt_text(prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """The reward model's prompt: the string itself, or a conversation's last user message."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            return _content_text(message.get("content"))
    return _content_text(prompt[-1].get("content")) if prompt else ""


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """The reward model's response: the string itself, or the assistant messages' text of a conversational one."""
    if isinstance(completion, str):
        return completion
    parts = [_content_text(m.get("content")) for m in completion if m.get("role", "assistant") == "assistant"]
    return "\n".join(p for p in parts if p)


def _content_text(content: Any) -> str:
    """A message's text: a string, or the `text` parts of a multimodal content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return "" if content is None else str(content)


@dataclass
class _Scored:
    """One scored completion, kept until the callback posts it: texts, the token ids it refreshes, the reward."""

    prompt: str
    response: str
    ids: list[int]  # prompt + completion token ids, no padding
    reward: float


class R2MRewardFunction:
    """A TRL reward function `f(prompts, completions, completion_ids, **kwargs) -> list[float | None]` on r2m.

    Args:
        client: the `R2MClient` to score with (its retries and timeouts apply).
        model: the policy; usually set by `R2MPreferenceCallback.on_train_begin`. Without it (or without
            `tokenizer` or `completion_ids`) items are scored without hidden states (the plain reward model).
        tokenizer: the policy's tokenizer (TRL's `processing_class`); set by the callback too.
        send_hidden: False scores every item as the plain reward model would (no extra forward).
        forward_batch_size: sequences per no-grad policy forward (bounds its memory).
        chat_template_kwargs: extra `apply_chat_template` arguments, as `GRPOConfig.chat_template_kwargs`.
        local_feedback: compute the feedback attention next to the policy (`r2m.trainer.local`): True, False, or
            None (the default: on when the policy runs on a GPU, off on a CPU).

    Example:
        >>> reward = R2MRewardFunction(R2MClient("http://127.0.0.1:8000"))
        >>> GRPOTrainer(model=..., reward_funcs=reward, callbacks=[R2MPreferenceCallback(reward)], ...)
    """

    __name__ = "r2m"  # TRL logs rewards under `rewards/<__name__>/mean`

    def __init__(
        self,
        client: R2MClient,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        send_hidden: bool = True,
        forward_batch_size: int = 16,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        local_feedback: bool | None = None,
    ) -> None:
        if forward_batch_size < 1:
            raise ValueError(f"forward_batch_size must be >= 1, got {forward_batch_size}")
        self.client = client
        self.model = model
        self.tokenizer = tokenizer
        self.send_hidden = send_hidden
        self.forward_batch_size = forward_batch_size
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.local_feedback = local_feedback
        self._feedback_client: Any = None  # decided at the first scoring with hidden states
        self._scored: list[_Scored] = []
        # Set by R2MGRPOTrainer: it captures the hidden states from TRL's own forward and hands them over here, and
        # keeps the head versions of one call equal over its processes (`r2m_newest_head`).
        self.hidden_source: Any = None
        self.score_log: list[dict[str, Any]] = []  # {"step", "head_versions", "rescored"} per call, for inspection

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        trainer_state: Any = None,
        **kwargs: Any,
    ) -> list[float | None]:
        step, total_steps = _steps(trainer_state)
        texts = [prompt_text(p) for p in prompts]
        responses = [completion_text(c) for c in completions]
        ids: list[list[int]] | None = None
        hidden: list[torch.Tensor] | None = None
        captured = self.hidden_source.take_scoring_hidden() if self.hidden_source is not None else None
        if captured is not None:  # from TRL's own forward (R2MGRPOTrainer): no forward here, nothing kept to post
            hidden = captured if self.send_hidden else None
            return self._rewards(texts, responses, hidden, step, total_steps)
        if self.send_hidden and self.model is not None and self.tokenizer is not None and completion_ids is not None:
            ids = [p + list(c) for p, c in zip(self._prompt_ids(prompts), completion_ids)]
            hidden = policy_hidden(self.model, ids, self.pad_id, self.forward_batch_size)
        rewards = self._rewards(texts, responses, hidden, step, total_steps)
        # Only training rollouts feed the R2M update; TRL also scores eval generations (model in eval mode).
        if ids is not None and self.model is not None and self.model.training:
            self._scored.extend(
                _Scored(p, r, i, w) for p, r, i, w in zip(texts, responses, ids, rewards) if w is not None
            )
        return rewards

    def _scoring_client(self) -> Any:
        """The client that scores with hidden states: a `LocalFeedbackClient` on the policy's device when local
        feedback is on (decided once, from `local_feedback` or the policy's device), else the client itself."""
        if self._feedback_client is None:
            from .local import LocalFeedbackClient, local_feedback_default

            device = next(self.model.parameters()).device if self.model is not None else torch.device("cpu")
            on = local_feedback_default(device) if self.local_feedback is None else self.local_feedback
            self._feedback_client = LocalFeedbackClient(self.client, device) if on else self.client
        return self._feedback_client

    @property
    def pad_id(self) -> int:
        """The policy tokenizer's pad id (0 without one: padded positions are masked and sliced away anyway)."""
        tok = getattr(self.tokenizer, "tokenizer", self.tokenizer)  # a multimodal processor wraps its tokenizer
        return getattr(tok, "pad_token_id", None) or 0

    def pop_scored(self) -> list[_Scored]:
        """The completions scored since the last call (the callback posts them after the optimizer step)."""
        scored, self._scored = self._scored, []
        return scored

    def _prompt_ids(self, prompts: Sequence[Any]) -> list[list[int]]:
        """Token ids of each prompt, as TRL's `GRPOTrainer._tokenize_prompts` makes them."""
        tok = getattr(self.tokenizer, "tokenizer", self.tokenizer)  # a multimodal processor wraps its tokenizer
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append(list(tok(text=p)["input_ids"]))
            else:
                enc = tok.apply_chat_template(
                    p, add_generation_prompt=True, tokenize=True, return_dict=True, **self.chat_template_kwargs
                )
                out.append(list(enc["input_ids"]))
        return out

    def _rewards(
        self, prompts: list[str], responses: list[str], hidden: list[torch.Tensor] | None, step: int, total: int
    ) -> list[float | None]:
        """The service's rewards for one call; under an R2M trainer, all from one head version over every process."""
        rewards, versions = self._score(prompts, responses, hidden, step, total)
        rescored = 0
        newest = getattr(self.hidden_source, "r2m_newest_head", None)
        if newest is not None:
            rescored = self._one_head(newest, rewards, versions, prompts, responses, hidden, step, total)
        self.score_log.append({"step": step, "head_versions": versions, "rescored": rescored})
        return rewards

    def _one_head(
        self,
        newest: Any,
        rewards: list[float | None],
        versions: list[int | None],
        prompts: list[str],
        responses: list[str],
        hidden: list[torch.Tensor] | None,
        step: int,
        total: int,
    ) -> int:
        """Score again, pinned to the newest head version among them, the items an older head scored, until every
        item of the call carries one version over all processes (a head swap can fall between two ranks' requests,
        or between the chunks of one). `newest(versions)` is the trainer's collective: the version to move to, or
        None. Updates `rewards` and `versions` in place; returns the number of items scored again."""
        rescored = 0
        for attempt in range(HEAD_ROUNDS + 1):
            target = newest(versions)  # every rank calls it as often: it breaks out of this loop with the others
            if target is None:
                break
            if attempt == HEAD_ROUNDS:
                mine = sorted({v for v in versions if v is not None})
                logger.warning(
                    "r2m: the rewards of step %d still come from several head versions (here %s, newest %d) after "
                    "%d rescorings; training on them",
                    step,
                    mine,
                    target,
                    HEAD_ROUNDS,
                )
                break
            stale = [i for i, v in enumerate(versions) if v is not None and v != target]
            if not stale:
                continue
            again, seen = self._score(
                [prompts[i] for i in stale],
                [responses[i] for i in stale],
                None if hidden is None else [hidden[i] for i in stale],
                step,
                total,
                head_version=target,
            )
            for i, r, v in zip(stale, again, seen):
                if r is not None:  # a failed rescoring keeps the reward of the older head
                    rewards[i], versions[i] = r, v
            rescored += len(stale)
        return rescored

    def _score(
        self,
        prompts: list[str],
        responses: list[str],
        hidden: list[torch.Tensor] | None,
        step: int,
        total: int,
        head_version: int | None = None,
    ) -> tuple[list[float | None], list[int | None]]:
        """The service's rewards and the head version behind each; None for each item it rejected or could not be
        reached for (logged). `head_version`: that head, unless the replica has moved past it (then its own)."""
        client = self.client if hidden is None else self._scoring_client()
        try:
            return _score_call(client, prompts, responses, hidden, step, total, head_version)
        except AuthenticationError:
            raise
        except InvalidRequest as exc:
            logger.warning("r2m rejected a batch of %d items (%s); scoring them one by one", len(prompts), exc)
        except R2MError as exc:
            logger.error("r2m could not score %d items, their rewards are None: %s", len(prompts), exc)
            return [None] * len(prompts), [None] * len(prompts)
        rewards: list[float | None] = []
        versions: list[int | None] = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            h = None if hidden is None else [hidden[i]]
            try:
                one, version = _score_call(client, [p], [r], h, step, total, head_version)
            except AuthenticationError:
                raise
            except R2MError as exc:
                logger.warning("r2m could not score item %d, its reward is None: %s", i, exc)
                one, version = [None], [None]
            rewards += one
            versions += version
        return rewards, versions


class R2MPreferenceCallback(TrainerCallback):
    """Hands the policy to an `R2MRewardFunction` and posts each step's groups to `/preferences` after the update.

    After each optimizer step it takes the completions the reward function scored since its last post (with
    `steps_per_generation > 1` one generation batch serves several steps: it is posted after the first of them),
    recomputes their hidden states with the updated policy (one no-grad forward), groups them by prompt (TRL makes
    `num_generations` completions per prompt; groups with fewer than 2 scored completions are dropped) and posts
    them with their rewards, `step=state.global_step`, `total_steps=state.max_steps` and the batch id
    `<run_id>-<step>` (a retried post is trained once; `<run_id>-<step>-r<rank>` with several processes, each
    posting the groups it scored: a group split between two processes goes as its parts, a part of one row is
    dropped; `R2MGRPOTrainer` posts it whole).
    A failed post is logged and training goes on.

    Args:
        reward_fn: the `R2MRewardFunction` given to `GRPOTrainer(reward_funcs=...)`.
        run_id: the batch-id prefix, unique per run (default: random).
        send_hidden: False posts the groups without hidden states (head-only updates, no forward).
    """

    def __init__(self, reward_fn: R2MRewardFunction, *, run_id: str | None = None, send_hidden: bool = True) -> None:
        self.reward_fn = reward_fn
        self.run_id = run_id or uuid.uuid4().hex[:16]
        self.send_hidden = send_hidden
        self.posted: list[dict[str, Any]] = []  # {"step", "batch_ids", "groups"} per post, for inspection

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if kwargs.get("model") is not None:
            self.reward_fn.model = kwargs["model"]
        if kwargs.get("processing_class") is not None and self.reward_fn.tokenizer is None:
            self.reward_fn.tokenizer = kwargs["processing_class"]
        self.reward_fn.chat_template_kwargs = {
            **(getattr(args, "chat_template_kwargs", None) or {}),
            **self.reward_fn.chat_template_kwargs,
        }

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        scored = self.reward_fn.pop_scored()
        by_prompt: dict[str, list[_Scored]] = defaultdict(list)
        for s in scored:
            by_prompt[s.prompt].append(s)
        members = [g for g in by_prompt.values() if len(g) >= 2]
        if not members:
            return
        model = kwargs.get("model") or self.reward_fn.model
        hidden: list[torch.Tensor] | None = None
        if self.send_hidden and model is not None:
            flat = [s.ids for g in members for s in g]
            hidden = policy_hidden(model, flat, self.reward_fn.pad_id, self.reward_fn.forward_batch_size)
        groups, k = [], 0
        for g in members:
            group: dict[str, Any] = {
                "prompt": g[0].prompt,
                "responses": [s.response for s in g],
                "rewards": [s.reward for s in g],
            }
            if hidden is not None:
                group["hidden"] = hidden[k : k + len(g)]
            k += len(g)
            groups.append(group)
        step, total_steps = _steps(state)
        batch_id = f"{self.run_id}-{step}"
        if getattr(args, "world_size", 1) > 1:  # each process posts what it scored: one batch id per rank
            batch_id += f"-r{args.process_index}"
        posted = post_groups(self.reward_fn.client, groups, step, total_steps, batch_id)
        if posted is not None:
            self.posted.append(posted)


@torch.no_grad()
def policy_hidden(model: torch.nn.Module, ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16):
    """The policy's last-layer hidden states over each token-id sequence, padding sliced away: a list of (T_i, D)
    CPU tensors in the model's dtype. One no-grad forward per `batch_size` sequences, right-padded."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        lengths = [len(x) for x in chunk]
        seq = torch.full((len(chunk), max(lengths)), pad_id, dtype=torch.long)
        for b, x in enumerate(chunk):
            seq[b, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
        mask = (torch.arange(seq.shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
        res = model(
            input_ids=seq.to(device), attention_mask=mask.to(device), output_hidden_states=True, use_cache=False
        )
        last = res.hidden_states[-1]  # (B, L, D)
        out.extend(last[b, :n].detach().cpu() for b, n in enumerate(lengths))  # right padding: real tokens first
    return out


def _score_call(
    client: Any,
    prompts: list[str],
    responses: list[str],
    hidden: list[torch.Tensor] | None,
    step: int,
    total: int,
    head_version: int | None,
) -> tuple[list[float | None], list[int | None]]:
    """One `score` call: (rewards, the head version of each). Pinned to `head_version` when given; a replica that
    serves another by then (409) scores with its own, and the caller's next round agrees on that one."""
    pin: dict[str, Any] = {} if head_version is None else {"head_version": head_version}  # older clients lack it
    try:
        result = client.score(prompts, responses, hidden=hidden, step=step, total_steps=total, **pin)
    except StaleHead:
        if head_version is None:
            raise
        result = client.score(prompts, responses, hidden=hidden, step=step, total_steps=total)
    return list(result.rewards), list(result.head_versions)


def post_groups(client: Any, groups: list[dict], step: int, total_steps: int, batch_id: str) -> dict | None:
    """Post one step's groups to /preferences; the record of what was queued, or None (logged once, by the process
    that posted) when it failed: a failed post costs that batch's update, never the RL run."""
    try:
        result = client.post_preferences(groups, step=step, total_steps=total_steps, batch_id=batch_id)
    except R2MError as exc:
        logger.error(
            "r2m: the preferences of step %d (batch %s, %d groups) were not queued: %s",
            step,
            batch_id,
            len(groups),
            exc,
        )
        return None
    return {"step": step, "batch_ids": result.batch_ids, "groups": groups}


def _steps(state: Any) -> tuple[int, int]:
    """(step, total_steps) for the omega schedule from a `TrainerState` (global_step, max_steps); (0, 1) without."""
    if state is None:
        return 0, 1
    step = int(getattr(state, "global_step", 0) or 0)
    total = max(int(getattr(state, "max_steps", 0) or 0), step, 1)
    return step, total
