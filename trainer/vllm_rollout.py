"""Rollouts with vLLM on the training GPU (`pip install -e ".[vllm]"` in the checkout, then `r2m train --rollout vllm`).

vLLM only samples the token ids. Everything R2M needs from the policy (old log-probs and the last-layer hidden
states) still comes from the trainer's own forward pass over prompt + response, the same pass as with Hugging Face
`generate`, so the reward service sees the hidden states of the policy being trained, never vLLM's.

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) on the same GPU as the policy, so the weight
sync after each policy update hands the parameter tensors over by reference through `LLM.collective_rpc` and
`WeightSync`, a worker extension (vLLM's `worker_extension_cls`); vLLM's prefix cache is reset after each sync.
Matched against vLLM's offline `LLM` API: `LLM(worker_extension_cls=...)`, `LLM.collective_rpc`,
`LLM.reset_prefix_cache`, `SamplingParams(n, temperature, top_p, top_k, max_tokens, seed, stop_token_ids)` and
`LLM.generate([{"prompt_token_ids": ...}])` -> `RequestOutput.outputs[i].token_ids`, as TRL's colocated vLLM
generation uses them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

__all__ = ["VLLMRollout", "WeightSync", "pack_responses", "unpadded"]


class WeightSync:
    """Mixed into vLLM's GPU worker (`worker_extension_cls`): loads named tensors into the served model."""

    def r2m_load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.model_runner.model.load_weights(weights=named)  # type: ignore[attr-defined]


class VLLMRollout:
    """Samples K responses per prompt with a vLLM copy of the policy that follows the trained weights.

    Args:
        policy: the policy's folder or hub id (the same one the trainer loads).
        dtype: "float32", "bfloat16" or "float16", as the trainer's policy.
        seed: vLLM's engine seed; each call also passes a per-step sampling seed.
        max_model_len: longest prompt + response in tokens.
        gpu_memory_utilization: share of the GPU vLLM may take (weights + KV cache); the rest is for training.
    """

    def __init__(
        self, policy: str, *, dtype: str, seed: int, max_model_len: int, gpu_memory_utilization: float = 0.3
    ) -> None:
        # In-process engine: collective_rpc then calls the worker directly and tensors travel by reference.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ImportError(
                'rollout="vllm" needs vLLM on a CUDA machine: pip install -e ".[vllm]" in the r2m checkout'
            ) from exc
        self.llm = LLM(
            model=policy,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            worker_extension_cls=f"{__name__}.WeightSync",
        )

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the trained policy's parameters into vLLM (call after every optimizer step, before sampling)."""
        named = [(name, p.detach()) for name, p in model.named_parameters()]
        self.llm.collective_rpc("r2m_load_weights", args=(named,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        eos_ids: Sequence[int],
        seed: int,
    ) -> list[list[int]]:
        """`n` response token-id lists per prompt, prompt-major (prompt 0's n responses first)."""
        from vllm import SamplingParams

        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            top_k=-1,  # the full distribution, the one the trainer computes log-probs on
            max_tokens=max_tokens,
            seed=seed,
            stop_token_ids=list(eos_ids),
        )
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params, use_tqdm=False)
        return [list(o.token_ids) for out in outputs for o in out.outputs]


def pack_responses(
    responses: Sequence[Sequence[int]], pad_id: int, eos_ids: Sequence[int], max_new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad response token ids into `(B, R)` like Hugging Face `generate` output after the prompt, with a
    `(B, R)` mask of real tokens: a response ends at (and keeps) its first EOS, and the batch is only as wide as its
    longest response (R >= 1)."""
    eos = set(eos_ids)
    trimmed = []
    for ids in responses:
        ids = list(ids)[:max_new_tokens]
        cut = next((i for i, t in enumerate(ids) if t in eos), None)
        trimmed.append(ids if cut is None else ids[: cut + 1])
    width = max(1, max((len(ids) for ids in trimmed), default=1))
    out = torch.full((len(trimmed), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(trimmed), width), dtype=torch.long)
    for b, ids in enumerate(trimmed):
        if ids:
            out[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[b, : len(ids)] = 1
    return out, mask


def unpadded(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """The real tokens of each left-padded prompt row (what vLLM takes)."""
    return [row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_mask)]
