"""`R2MGRPOTrainer` and `R2MRLOOTrainer`: TRL's trainers with R2M at no extra policy forward, in one process or
several (`accelerate launch`, DDP; docs/integrations.md, "TRL"). Both are one mixin over TRL 1.16's two trainers,
which share the structure this relies on: `_generate_and_score_completions` generates, runs the old-log-prob forward
(RLOO: always) and then `_calculate_rewards`; `_compute_loss` runs the training forward per shuffled micro-batch.

    from r2m.trainer.trl import R2MGRPOTrainer, R2MRewardFunction

    reward = R2MRewardFunction(R2MClient("http://rm-host:8000"))
    trainer = R2MGRPOTrainer(model="my-policy/", reward_funcs=reward, args=GRPOConfig(...), train_dataset=ds)
    trainer.train()   # or: accelerate launch --num_processes 8 train.py

Scoring: a forward hook on the policy's decoder (its output is the last layer's states after the final norm, what
`/score` wants, and nothing of the other layers) records the forward TRL runs for the old log-probs when it runs
one. When it runs none (GRPO at `num_iterations = 1` with transformers generation), the hook records generation's
own forwards instead: the prefill gives the prompt's rows, each decoding step one row more, and one cached decoding
step feeds back the last sampled token, which generation never does (the rows of a one-token step, not a forward
over the sequence). Where neither applies (vLLM without importance sampling, tools, a rollout function, images), the
subclass runs the old-log-prob forward itself, with TRL's own padded tensors, and hands its log-probs to TRL as the
old ones (TRL would take the detached current ones: the same values).

Updates: the same hook records the refreshed states of the last of `num_iterations` training passes over a
generation batch (the paper's "last epoch"), mapped back through TRL's shuffle by an index column; once every row is
in, the groups (`num_generations` rows each) are posted to `/preferences` with the rewards they got.

Several processes: each rank scores its own rows with their states. TRL's sampler cuts the generation batch into one
contiguous slice per rank, so a group may straddle two ranks: the rank that holds a group's first row posts it, with
the rows the others hand it, and each rank posts its groups as one batch `<run_id>-<step>-r<rank>` (the run id is
rank 0's); the worker trains the batches it finds queued together as one update. All ranks score one call with one
head version: they compare versions after scoring (a two-number gather) and the items scored with an older head are
scored again with the newest, pinned by the request's `head_version`.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import torch
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from .trl import R2MRewardFunction, _steps, completion_text, post_groups, prompt_text

__all__ = ["R2MGRPOTrainer", "R2MRLOOTrainer"]

logger = logging.getLogger("r2m.trainer.trl")

INDEX = "r2m_index"  # the column that carries each row's index through TRL's shuffle and split
_NO_VERSION = 2**62  # a rank with no scored item: the low end of its (min, max) head-version span

if TYPE_CHECKING:
    # The mixin only ever runs before a TRL trainer in the MRO, so it is checked as one: GRPOTrainer, which has
    # every attribute and method used here, as RLOOTrainer does (RLOO never reaches the generation-only ones).
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


class _Recorder:
    """A forward hook on the decoder: each output's last hidden state (detached; on the CPU unless `on_device`),
    and the cache the latest forward returned (generation's, with its keyword name)."""

    def __init__(self, on_device: bool = False) -> None:
        self.on_device = on_device
        self.outputs: list[torch.Tensor] = []  # (B, L, D) per forward
        self.cache: Any = None
        self.cache_name = "cache"

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        last = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        last = last.detach()
        self.outputs.append(last if self.on_device else last.cpu())
        for name in ("cache", "past_key_values"):  # transformers 5 names it `cache`, 4 `past_key_values`
            if getattr(output, name, None) is not None:
                self.cache, self.cache_name = getattr(output, name), name
                break


class _R2MTRL(_TRLTrainer):
    """The R2M part of both trainers: an `R2MRewardFunction` gets the hidden states of TRL's own forwards (module
    docstring). Mixed in before the TRL trainer class, so the attributes used here are TRL's.

    Args (besides the TRL trainer's):
        r2m_run_id: the batch-id prefix of the posts (default: random; rank 0's in every process); a post's id is
            `<run_id>-<global step>`, and `<run_id>-<global step>-r<rank>` with several processes.
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
        run_id = r2m_run_id or uuid.uuid4().hex[:16]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            run_id = broadcast_object_list([run_id])[0]  # one run: rank 0's id, the rank in each batch id
        self.r2m_run_id = run_id
        self.r2m_post = r2m_post
        self.r2m_posted: list[dict[str, Any]] = []  # {"step", "batch_ids", "groups"} per post, for inspection
        self._r2m_phase: str | None = None
        self._r2m_own = False  # inside the forward the subclass runs in TRL's place
        self._r2m_scoring_hidden: list[torch.Tensor] | None = None
        self._r2m_own_old: torch.Tensor | None = None
        self._r2m_ids: tuple[list, list] | None = None
        self._r2m_batch: dict[str, Any] | None = None  # the generation batch being trained: texts, rewards, hidden
        self._r2m_train_rows: torch.Tensor | None = None
        self._r2m_warned_generation = False

    # --- the hook -------------------------------------------------------------------------------------------------

    def _r2m_decoder(self) -> torch.nn.Module:
        """The policy's decoder (the base model: its output is the last hidden state after the final norm)."""
        return self._r2m_causal_lm(self.accelerator.unwrap_model(self.model)).base_model

    @staticmethod
    def _r2m_causal_lm(model: Any) -> Any:
        """The transformers causal LM inside an unwrapped policy (PEFT's base model: LoRA layers sit inside it)."""
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @contextmanager
    def _r2m_capture(self, on_device: bool = False) -> Iterator[_Recorder]:
        """Every decoder output during the block (one per chunk TRL forwards, or per generation step)."""
        recorder = _Recorder(on_device)
        handle = self._r2m_decoder().register_forward_hook(recorder)
        try:
            yield recorder
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

    def r2m_newest_head(self, versions: Sequence[int | None]) -> int | None:
        """The head version to score again with when the items of one reward call, over every process, were scored
        by several (the newest of them); None when by one (or none). A collective: every rank calls it as often."""
        known = [v for v in versions if v is not None]
        span = torch.tensor([[min(known, default=_NO_VERSION), max(known, default=-1)]], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            span = self.accelerator.gather(span)  # (N, 2): each rank's lowest and highest
        low, high = int(span[:, 0].min()), int(span[:, 1].max())
        return high if low < high else None

    def _r2m_trl_runs_old_forward(self) -> bool:
        """Whether TRL computes old log-probs in `_generate_and_score_completions` (each trainer says)."""
        raise NotImplementedError

    def _r2m_states_from_generation(self) -> bool:
        """Whether the scoring states come from generate's forwards: TRL runs no old-log-prob forward, and generates
        with transformers' `generate`, one turn (no vLLM, continuous batching, rollout function or tools)."""
        return not self._r2m_trl_runs_old_forward() and not (
            self.use_vllm or self.use_transformers_continuous_batching or self.rollout_func is not None or self.tools
        )

    @property
    def _r2m_steps_per_generation(self) -> int:
        """Optimizer steps per pass over one generation batch (`num_iterations` passes use it)."""
        steps = self.args.steps_per_generation
        assert steps is not None  # the configs' __post_init__ set it (default: gradient_accumulation_steps)
        return steps

    # --- scoring: generation's forwards, TRL's old-log-prob forward, or one of ours in its place -----------------

    def _generate(self, prompts: list) -> Any:
        out = super()._generate(prompts)
        self._r2m_ids = (out[0], out[1])  # prompt ids and completion ids, unpadded: our forward pads them as TRL does
        return out

    def _generate_single_turn(self, prompt_ids: list, images: Any, multimodal_fields: Any,
                              *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        if not (self._r2m_phase == "scoring" and self._r2m_states_from_generation()):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
        with self._r2m_capture(on_device=True) as recorder:
            result = super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
            completion_ids = result[0] if isinstance(result, tuple) else result
            if images is None and not multimodal_fields and recorder.cache is not None:
                self._r2m_close_generation(recorder, prompt_ids, completion_ids)
                self._r2m_scoring_hidden = self._r2m_generation_rows(recorder, prompt_ids, completion_ids)
        if self._r2m_scoring_hidden is None and not self._r2m_warned_generation:
            self._r2m_warned_generation = True
            logger.warning("r2m: generation's forwards do not give every row's states here (images, no cache, or "
                           "an unexpected shape); the scoring states come from one policy forward of ours")  # fmt: skip
        return result

    def _r2m_prompt_layout(self, prompt_ids: list[list[int]]) -> tuple[int, torch.Tensor]:
        """Generation's prompt block as TRL's `_generate_single_turn` builds it: its width and its (B, P) mask."""
        _, mask = _pad(prompt_ids, self._tokenizer.pad_token_id, "left", self.pad_to_multiple_of)
        return mask.shape[1], mask

    def _r2m_close_generation(self, recorder: _Recorder, prompt_ids: list, completion_ids: list) -> None:
        """One cached decoding step over each row's last sampled token, which generation samples but never feeds
        back: its row is the last one a full forward would give. Run under the generation context TRL uses. Under
        ZeRO-3 every rank runs it (a forward there is a collective), even one whose generation already fed that
        token (finished peers keep decoding until all have: their extra rows are dropped); elsewhere it is skipped
        when generation fed it already (a deferred stop check) or did not go as expected."""
        from trl.models import unwrap_model_for_generation

        width, prompt_mask = self._r2m_prompt_layout(prompt_ids)
        new = max((len(c) for c in completion_ids), default=0)
        cached = sum(o.shape[1] for o in recorder.outputs)  # positions generation fed (and cached)
        if cached != width + new - 1 and not self._dist.is_zero3:
            return  # `_r2m_generation_rows` then finds every row, or says it cannot
        pad = self._tokenizer.pad_token_id
        rows = len(completion_ids)
        seq = torch.full((rows, cached + 1), pad, dtype=torch.long)
        seq[:, :width] = _pad(prompt_ids, pad, "left", self.pad_to_multiple_of)[0]
        for b, c in enumerate(completion_ids):
            seq[b, width : width + len(c)] = torch.as_tensor(c[: cached + 1 - width])
        mask = torch.cat([prompt_mask, torch.ones(rows, cached + 1 - width, dtype=torch.long)], dim=1)
        device = self.accelerator.device
        checkpointing = cast(dict | None, self.args.gradient_checkpointing_kwargs)  # a JSON string is parsed by now
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=checkpointing,
            ) as unwrapped,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            model = self._r2m_causal_lm(unwrapped)
            step: dict[str, Any] = {recorder.cache_name: recorder.cache, "attention_mask": mask.to(device)}
            step["use_cache"] = True
            if "position_ids" in inspect.signature(model.forward).parameters:  # generate's own position ids
                step["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0).to(device)
            inputs = model.prepare_inputs_for_generation(seq.to(device), next_sequence_length=1, **step)
            model(**inputs, return_dict=True)

    def _r2m_generation_rows(self, recorder: _Recorder, prompt_ids: list, completion_ids: list) -> list | None:
        """Per row, the states of its prompt and completion tokens from generation's forwards: prefill (B, P, D),
        then one (B, 1, D) per step; None when they do not add up to every row's tokens."""
        width, _ = self._r2m_prompt_layout(prompt_ids)
        new = max((len(c) for c in completion_ids), default=0)
        outputs = recorder.outputs
        rows = len(prompt_ids)
        if not outputs or tuple(outputs[0].shape[:2]) != (rows, width):
            return None
        if any(tuple(o.shape[:2]) != (rows, 1) for o in outputs[1:]) or width + len(outputs) - 1 < width + new:
            return None  # a step of another shape, or fewer positions than prompt + completion
        states = torch.cat(outputs, dim=1)[:, : width + new].cpu()  # steps after the last token (ZeRO-3) dropped
        return [
            torch.cat([states[b, width - len(p) : width], states[b, width : width + len(c)]])
            for b, (p, c) in enumerate(zip(prompt_ids, completion_ids))
        ]

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
        with self._r2m_capture() as recorder:
            result = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, *args, **kwargs)
        rows = self._r2m_rows(recorder.outputs, attention_mask)
        if self._r2m_phase == "scoring":
            self._r2m_scoring_hidden = rows  # TRL's old-log-prob forward, before the ref forward and the rewards
        else:
            assert self._r2m_batch is not None and self._r2m_train_rows is not None
            for i, h in zip(self._r2m_train_rows.tolist(), rows):
                self._r2m_batch["refreshed"][i] = h
        return result

    def _r2m_needs_own_forward(self) -> bool:
        """Whether this rank lacks the scoring states; with states from generation and several processes, whether
        any rank does (then all run the forward: under ZeRO-3 a forward is a collective)."""
        missing = self._r2m_scoring_hidden is None and self._r2m_ids is not None
        if self.accelerator.num_processes > 1 and self._r2m_states_from_generation():
            flag = torch.tensor([int(missing)], device=self.accelerator.device)
            missing = bool(self.accelerator.gather(flag).any())
        return missing

    def _calculate_rewards(self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any) -> Any:
        if self._r2m_phase == "scoring" and self._r2m_needs_own_forward() and self._r2m_ids is not None:
            # No states from TRL's forward or generation's: run the forward TRL skipped (its log-probs become the
            # old ones)
            prompt_ids, completion_ids = self._r2m_ids
            pad_id, multiple = self._tokenizer.pad_token_id, self.pad_to_multiple_of
            p_ids, p_mask = _pad(prompt_ids, pad_id, "left", multiple)
            c_ids, c_mask = _pad(completion_ids, pad_id, "right", multiple)
            device = self.accelerator.device
            ids, mask = torch.cat([p_ids, c_ids], 1).to(device), torch.cat([p_mask, c_mask], 1).to(device)
            self._r2m_own, self._r2m_scoring_hidden = True, None
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
                "rewards": rewards[:, column].tolist(),  # every rank's rows: TRL gathers them
                "first": self.accelerator.process_index * len(prompts),  # this rank's first row among them
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
        """Post the groups whose first row this rank holds, each with all its rows (those of a group that
        straddles two ranks come from the other: every rank takes part in that exchange)."""
        batch, self._r2m_batch = self._r2m_batch, None
        assert batch is not None
        k, n, first = self.num_generations, len(batch["prompts"]), batch["first"]
        rank = self.accelerator.process_index
        rows = {first + i: (batch["prompts"][i], batch["responses"][i], batch["refreshed"][i]) for i in range(n)}

        def owner(row: int) -> int:  # the rank that holds the first row of the row's group
            return (row // k * k) // n

        if n % k:  # a group may straddle ranks: hand its rows to the rank that posts it
            from accelerate.utils import gather_object

            handed = [(j, row) for j, row in rows.items() if owner(j) != rank]
            rows = {j: row for j, row in rows.items() if owner(j) == rank}
            rows.update((j, row) for j, row in gather_object(handed) if owner(j) == rank)
        rewards = batch["rewards"]
        groups = []
        for start in sorted({j // k * k for j in rows if owner(j) == rank}):
            kept = [j for j in range(start, start + k) if rewards[j] == rewards[j]]  # not NaN: the service scored it
            if len(kept) < 2:
                continue
            group: dict[str, Any] = {
                "prompt": rows[start][0],
                "responses": [rows[j][1] for j in kept],
                "rewards": [rewards[j] for j in kept],
            }
            if self.r2m_reward.send_hidden:
                group["hidden"] = [rows[j][2] for j in kept]
            groups.append(group)
        if not groups:
            return
        step, total = batch["step"]
        batch_id = f"{self.r2m_run_id}-{step}"
        if self.accelerator.num_processes > 1:
            batch_id += f"-r{rank}"
        posted = post_groups(self.r2m_reward.client, groups, step, total, batch_id)
        if posted is not None:
            self.r2m_posted.append(posted)


class R2MGRPOTrainer(_R2MTRL, GRPOTrainer):
    """`GRPOTrainer` whose `R2MRewardFunction` gets the hidden states of TRL's own forwards (module docstring).

    Args (besides GRPOTrainer's):
        r2m_run_id: the batch-id prefix of the posts (default: random; rank 0's in every process); a post's id is
            `<run_id>-<global step>`, and `<run_id>-<global step>-r<rank>` with several processes.
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
        r2m_run_id: the batch-id prefix of the posts (default: random; rank 0's in every process); a post's id is
            `<run_id>-<global step>`, and `<run_id>-<global step>-r<rank>` with several processes.
        r2m_post: False: score with hidden states but post nothing (no R2M updates).
    """

    def _r2m_trl_runs_old_forward(self) -> bool:
        return True
