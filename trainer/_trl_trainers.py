"""`R2MGRPOTrainer` and `R2MRLOOTrainer`: TRL's trainers with R2M at no extra policy forward (docs/integrations.md,
"TRL"). Both are one mixin over TRL 1.16's two trainers, which share the structure this relies on:
`_generate_and_score_completions` runs the old-log-prob forward (RLOO: always) before `_calculate_rewards`, and
`_compute_loss` runs the training forward per shuffled micro-batch.

    from r2m.trainer.trl import R2MGRPOTrainer, R2MRewardFunction

    reward = R2MRewardFunction(R2MClient("http://rm-host:8000"))
    trainer = R2MGRPOTrainer(model="my-policy/", reward_funcs=reward, args=GRPOConfig(num_iterations=2, ...),
                             train_dataset=ds)
    trainer.train()

Scoring: a forward hook on the policy's decoder (its output after the final norm, what `/score` wants) records the
hidden states of the forward TRL already runs for the old log-probs, and the reward function sends those. When TRL
runs no policy forward before the rewards (one iteration per generation batch, no vLLM importance sampling), the
subclass runs that forward itself, with TRL's own padded tensors, and hands its log-probs to TRL as the old log-probs
(which TRL would otherwise take as the detached current ones: the same values), so the step costs at most one
forward more than plain TRL. Updates: the same hook records the refreshed hidden states of the last of
`num_iterations` training passes over a generation batch (the paper's "last epoch"), mapped back through TRL's
shuffle by an index column, and the groups (`num_generations` rows each) are posted to `/preferences` with the
rewards they got once every row is in: no forward of its own. One process (no multi-GPU data parallelism).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from .trl import R2MRewardFunction, _steps, completion_text, post_groups, prompt_text

__all__ = ["R2MGRPOTrainer", "R2MRLOOTrainer"]


INDEX = "r2m_index"  # the column that carries each row's index through TRL's shuffle and split

if TYPE_CHECKING:
    # The mixin only ever runs before a TRL trainer in the MRO, so it is checked as one: GRPOTrainer, which has
    # every attribute and method used here, as RLOOTrainer does.
    _TRLTrainer = GRPOTrainer
else:
    _TRLTrainer = object


def _pad(rows: list[list[int]], value: int, side: str, multiple: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask padded as TRL pads them (`trl.trainer.utils.pad`)."""
    from trl.trainer.utils import pad

    ids = [torch.tensor(r) for r in rows]
    masks = [torch.ones_like(t, dtype=torch.long) for t in ids]
    return (
        pad(ids, padding_value=value, padding_side=side, pad_to_multiple_of=multiple),
        pad(masks, padding_value=0, padding_side=side, pad_to_multiple_of=multiple),
    )


class _R2MTRL(_TRLTrainer):
    """The R2M part of both trainers: an `R2MRewardFunction` gets the hidden states of TRL's own forwards (module
    docstring). Mixed in before the TRL trainer class, so the attributes used here are TRL's.

    Args (besides the TRL trainer's):
        r2m_run_id: the batch-id prefix of the posts (default: random); a post's id is `<run_id>-<global step>`.
        r2m_post: False: score with hidden states but post nothing (no R2M updates).
    """

    # TRL's attributes as they are once its trainer is built. Trainer annotates `args` as its TrainingArguments and
    # `model` as optional; TRL's configs annotate the settings their __post_init__ resolves ("auto", None, a JSON
    # string), which the trainers copy, with the unresolved types too.
    args: GRPOConfig | RLOOConfig
    model: torch.nn.Module
    num_generations: int
    pad_to_multiple_of: int | None
    chat_template_kwargs: dict[str, Any]

    def __init__(self, *args: Any, r2m_run_id: str | None = None, r2m_post: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        found = [f for f in self.reward_funcs if isinstance(f, R2MRewardFunction)]
        if not found:
            raise ValueError("R2MGRPOTrainer needs an R2MRewardFunction among reward_funcs")
        self.r2m_reward = found[0]
        self.r2m_reward.hidden_source = self
        self.r2m_reward.model = self.model  # for eval generations (scored with their own forward, never posted)
        self.r2m_reward.tokenizer = self.processing_class
        self.r2m_reward.chat_template_kwargs = {
            **(self.chat_template_kwargs or {}),
            **self.r2m_reward.chat_template_kwargs,
        }
        self.r2m_run_id = r2m_run_id or uuid.uuid4().hex[:16]
        self.r2m_post = r2m_post
        self.r2m_posted: list[dict[str, Any]] = []  # {"step", "batch_ids", "groups"} per post, for inspection
        self._r2m_phase: str | None = None
        self._r2m_own = False  # inside the forward the subclass runs in TRL's place
        self._r2m_scoring_hidden: list[torch.Tensor] | None = None
        self._r2m_own_old: torch.Tensor | None = None
        self._r2m_ids: tuple[list, list] | None = None
        self._r2m_batch: dict[str, Any] | None = None  # the generation batch being trained: texts, rewards, hidden
        self._r2m_train_rows: torch.Tensor | None = None

    # --- the hook -------------------------------------------------------------------------------------------------

    def _r2m_decoder(self) -> torch.nn.Module:
        """The policy's decoder (the base model: its output is the last hidden state after the final norm)."""
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        return model.base_model

    @contextmanager
    def _r2m_capture(self) -> Iterator[list[torch.Tensor]]:
        """Every decoder output during the block (one per chunk TRL forwards), detached, on the CPU."""
        outputs: list[torch.Tensor] = []

        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            last = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            outputs.append(last.detach().cpu())

        handle = self._r2m_decoder().register_forward_hook(hook)
        try:
            yield outputs
        finally:
            handle.remove()

    @staticmethod
    def _r2m_rows(outputs: list[torch.Tensor], attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Per row, the hidden states of its real tokens (padding of either side dropped): (T_b, D) tensors."""
        last = torch.cat(outputs, dim=0)  # (B, L, D)
        mask = attention_mask.bool().cpu()
        return [last[b][mask[b]] for b in range(last.shape[0])]

    def take_scoring_hidden(self) -> list[torch.Tensor] | None:
        """The hidden states captured for the rows being scored (the reward function calls this once per batch)."""
        hidden, self._r2m_scoring_hidden = self._r2m_scoring_hidden, None
        return hidden

    def _r2m_trl_runs_old_forward(self) -> bool:
        """Whether TRL computes old log-probs in `_generate_and_score_completions` (each trainer says)."""
        raise NotImplementedError

    @property
    def _r2m_steps_per_generation(self) -> int:
        """Optimizer steps per pass over one generation batch (`num_iterations` passes use it)."""
        steps = self.args.steps_per_generation
        assert steps is not None  # the configs' __post_init__ set it (default: gradient_accumulation_steps)
        return steps

    # --- scoring: TRL's old-log-prob forward, or one of ours in its place ----------------------------------------

    def _generate(self, prompts: list) -> Any:
        out = super()._generate(prompts)
        self._r2m_ids = (out[0], out[1])  # prompt ids and completion ids, unpadded: our forward pads them as TRL does
        return out

    def _get_per_token_logps_and_entropies(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                           *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        # Scoring: TRL's old-log-prob forward is the first policy forward of the phase when TRL runs one; otherwise
        # ours (`_r2m_own`). Never the reference forward, which under PEFT is the policy with its adapter disabled.
        capture = (
            self._r2m_phase == "scoring"
            and model is self.model
            and self._r2m_scoring_hidden is None
            and (self._r2m_own or self._r2m_trl_runs_old_forward())
        ) or self._r2m_phase == "train_last"
        if not capture:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, *args, **kwargs)
        with self._r2m_capture() as outputs:
            result = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, *args, **kwargs)
        rows = self._r2m_rows(outputs, attention_mask)
        if self._r2m_phase == "scoring":
            self._r2m_scoring_hidden = rows  # TRL's old-log-prob forward, before the ref forward and the rewards
        else:
            assert self._r2m_batch is not None and self._r2m_train_rows is not None
            for i, h in zip(self._r2m_train_rows.tolist(), rows):
                self._r2m_batch["refreshed"][i] = h
        return result

    def _calculate_rewards(self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any) -> Any:
        if self._r2m_phase == "scoring" and self._r2m_scoring_hidden is None and self._r2m_ids is not None:
            # TRL ran no policy forward before the rewards: run the one it skipped (its log-probs become the old ones)
            prompt_ids, completion_ids = self._r2m_ids
            pad_id, multiple = self._tokenizer.pad_token_id, self.pad_to_multiple_of
            p_ids, p_mask = _pad(prompt_ids, pad_id, "left", multiple)
            c_ids, c_mask = _pad(completion_ids, pad_id, "right", multiple)
            device = self.accelerator.device
            ids, mask = torch.cat([p_ids, c_ids], 1).to(device), torch.cat([p_mask, c_mask], 1).to(device)
            self._r2m_own = True
            try:
                with torch.no_grad():
                    self._r2m_own_old, _, _ = self._get_per_token_logps_and_entropies(
                        self.model, ids, mask, c_ids.size(1), batch_size=self.args.per_device_train_batch_size
                    )
            finally:
                self._r2m_own = False
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._r2m_phase == "scoring":
            column = self.reward_funcs.index(self.r2m_reward)
            self._r2m_batch = {
                "prompts": [prompt_text(p) for p in prompts],
                "responses": [completion_text(c) for c in completions],
                "rewards": rewards[:, column].tolist(),
                "refreshed": [None] * len(prompts),
                "step": _steps(self.state),
            }
        return rewards

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        if not self.model.training:  # eval: the reward function's own forward, nothing posted
            return super()._generate_and_score_completions(inputs)
        self._r2m_phase, self._r2m_scoring_hidden, self._r2m_own_old = "scoring", None, None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._r2m_phase, self._r2m_ids = None, None
        if self._r2m_own_old is not None and "old_per_token_logps" not in output:
            output["old_per_token_logps"] = self._r2m_own_old
        self._r2m_own_old = None
        output[INDEX] = torch.arange(output["prompt_ids"].size(0), device=output["prompt_ids"].device)
        return output

    # --- updates: the last iteration's training forward -----------------------------------------------------------

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Any:
        per_pass = self._r2m_steps_per_generation
        last = (self._step % (per_pass * self.num_iterations)) // per_pass == self.num_iterations - 1
        if not (last and self.r2m_post and INDEX in inputs and self._r2m_batch is not None):
            return super()._compute_loss(model, inputs)
        self._r2m_phase, self._r2m_train_rows = "train_last", inputs[INDEX]
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._r2m_phase, self._r2m_train_rows = None, None
            if all(h is not None for h in self._r2m_batch["refreshed"]):
                self._r2m_post_batch()

    def _r2m_post_batch(self) -> None:
        batch, self._r2m_batch = self._r2m_batch, None
        assert batch is not None
        k = self.num_generations
        groups = []
        for g in range(len(batch["prompts"]) // k):
            rows = range(g * k, (g + 1) * k)
            kept = [r for r in rows if batch["rewards"][r] == batch["rewards"][r]]  # not NaN: the service scored it
            if len(kept) < 2:
                continue
            group: dict[str, Any] = {
                "prompt": batch["prompts"][rows[0]],
                "responses": [batch["responses"][r] for r in kept],
                "rewards": [batch["rewards"][r] for r in kept],
            }
            if self.r2m_reward.send_hidden:
                group["hidden"] = [batch["refreshed"][r] for r in kept]
            groups.append(group)
        if not groups:
            return
        step, total = batch["step"]
        posted = post_groups(self.r2m_reward.client, groups, step, total, f"{self.r2m_run_id}-{step}")
        if posted is not None:
            self.r2m_posted.append(posted)


class R2MGRPOTrainer(_R2MTRL, GRPOTrainer):
    """`GRPOTrainer` whose `R2MRewardFunction` gets the hidden states of TRL's own forwards (module docstring).

    Args (besides GRPOTrainer's):
        r2m_run_id: the batch-id prefix of the posts (default: random); a post's id is `<run_id>-<global step>`.
        r2m_post: False: score with hidden states but post nothing (no R2M updates).
    """

    def _r2m_trl_runs_old_forward(self) -> bool:
        """TRL 1.16's condition for computing old log-probs in `GRPOTrainer._generate_and_score_completions`."""
        generate_every = self._r2m_steps_per_generation * self.num_iterations
        return bool(
            self.args.gradient_accumulation_steps % generate_every != 0
            or (self.use_vllm and self.vllm_importance_sampling_correction)
        )


# The mixin is checked as a GRPOTrainer (`_TRLTrainer`), whose methods TRL types differently from RLOOTrainer's.
class R2MRLOOTrainer(_R2MTRL, RLOOTrainer):  # type: ignore[misc]
    """`RLOOTrainer` whose `R2MRewardFunction` gets the hidden states of TRL's own forwards (module docstring). RLOO
    always runs the old-log-prob forward (its KL term is in the reward), so scoring never adds one.

    Args (besides RLOOTrainer's):
        r2m_run_id: the batch-id prefix of the posts (default: random); a post's id is `<run_id>-<global step>`.
        r2m_post: False: score with hidden states but post nothing (no R2M updates).
    """

    def _r2m_trl_runs_old_forward(self) -> bool:
        return True
