"""The vLLM rollout's own logic, without a GPU: what it asks vLLM for, and how it lays out what comes back.

vLLM itself cannot run here (no CUDA); a stand-in `vllm` module records the calls the real API would receive.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

from r2m.trainer.vllm_rollout import VLLMRollout, WeightSync, pack_responses, unpadded


def test_pack_responses_cuts_at_the_first_eos_and_right_pads() -> None:
    ids, mask = pack_responses([[5, 6, 2, 7], [8], [9, 9, 9, 9, 9]], pad_id=0, eos_ids=[2], max_new_tokens=4)
    assert ids.tolist() == [[5, 6, 2, 0], [8, 0, 0, 0], [9, 9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    ids, mask = pack_responses([[2], [3, 2]], pad_id=0, eos_ids=[2, 3], max_new_tokens=8)
    assert ids.tolist() == [[2], [3]] and mask.tolist() == [[1], [1]]


def test_unpadded_drops_left_padding() -> None:
    prompt = torch.tensor([[0, 0, 4, 5], [6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert unpadded(prompt, mask) == [[4, 5], [6, 7, 8, 9]]


@dataclass
class _Completion:
    token_ids: list[int]


@dataclass
class _RequestOutput:
    outputs: list[_Completion]


@dataclass
class _FakeLLM:
    kwargs: dict
    calls: list = field(default_factory=list)

    def generate(self, prompts, params, use_tqdm=True):  # noqa: ANN001, ANN201
        self.calls.append(("generate", prompts, params))
        return [
            _RequestOutput([_Completion([p["prompt_token_ids"][-1] + j]) for j in range(params.n)]) for p in prompts
        ]

    def collective_rpc(self, method, args=()):  # noqa: ANN001, ANN201
        self.calls.append(("rpc", method, args))

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset",))


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    mod = types.ModuleType("vllm")
    mod.LLM = lambda **kw: _FakeLLM(kw)  # type: ignore[attr-defined]
    mod.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    return mod


def test_rollout_asks_vllm_for_k_samples_per_prompt_from_the_full_distribution(fake_vllm) -> None:  # noqa: ANN001
    import os

    roll = VLLMRollout("my-policy", dtype="bfloat16", seed=3, max_model_len=320)
    llm = roll.llm
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0", "weights are handed over in-process"
    assert llm.kwargs["model"] == "my-policy" and llm.kwargs["worker_extension_cls"].endswith(".WeightSync")
    out = roll.generate([[1, 2], [7]], n=3, temperature=0.7, top_p=0.9, max_tokens=16, eos_ids=[2], seed=11)
    assert out == [[2], [3], [4], [7], [8], [9]], "prompt-major: prompt 0's K responses first"
    ((_, prompts, params),) = llm.calls
    assert prompts == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [7]}]
    assert (params.n, params.temperature, params.top_p, params.top_k, params.max_tokens, params.seed) == (
        3,
        0.7,
        0.9,
        -1,
        16,
        11,
    )
    assert params.stop_token_ids == [2]


def test_weight_sync_hands_every_parameter_over_and_drops_the_prefix_cache(fake_vllm) -> None:  # noqa: ANN001
    roll = VLLMRollout("my-policy", dtype="float32", seed=0, max_model_len=64)
    policy = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    roll.sync_weights(policy)
    (kind, method, (named,)), reset = roll.llm.calls
    assert (kind, method, reset) == ("rpc", "r2m_load_weights", ("reset",))
    assert [n for n, _ in named] == [n for n, _ in policy.named_parameters()]
    assert all(t.data_ptr() == p.data_ptr() for (_, t), p in zip(named, policy.parameters())), "no copies"

    loaded = []
    worker = WeightSync()
    worker.model_runner = types.SimpleNamespace(  # type: ignore[attr-defined]
        model=types.SimpleNamespace(load_weights=lambda weights: loaded.extend(weights))
    )
    worker.r2m_load_weights(named)
    assert [n for n, _ in loaded] == [n for n, _ in named]


def test_a_clear_error_without_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[vllm\]"'):
        VLLMRollout("p", dtype="float32", seed=0, max_model_len=8)


def test_the_trainer_builds_its_batch_from_vllm_samples_and_syncs_first(tmp_path) -> None:  # noqa: ANN001
    """rollout='vllm' swaps only the sampler: the batch layout (left-padded prompt block, right-padded responses cut
    at EOS, masks) is the one the trainer's own forward reads, and the weights are synced before every sampling."""
    from r2m.trainer.config import TrainConfig
    from r2m.trainer.grpo import GRPOTrainer
    from tests.conftest import save_tiny_policy

    policy = save_tiny_policy(tmp_path / "policy")
    trainer = GRPOTrainer(
        TrainConfig(
            policy=str(policy),
            out_dir=str(tmp_path / "run"),
            device="cpu",
            prompts_per_step=2,
            group_size=2,
            max_new_tokens=4,
            progress=False,
        )
    )
    eos = int(trainer.eos_ids[0])
    events: list = []

    class _Sampler:
        def sync_weights(self, model) -> None:  # noqa: ANN001
            events.append(("sync", model is trainer.policy))

        def generate(self, prompts, **kw):  # noqa: ANN001, ANN003, ANN201
            events.append(("generate", prompts, kw))
            return [[7, eos, 9], [7, 8, 9, 10, 11], [eos], [8]]

    trainer.vllm = _Sampler()
    batch = trainer.rollout(0)
    assert events[0] == ("sync", True) and events[1][0] == "generate"
    prompts, kw = events[1][1], events[1][2]
    assert len(prompts) == 2 and all(isinstance(p, list) and p for p in prompts), "unpadded prompt ids per group"
    assert (kw["n"], kw["max_tokens"], kw["seed"]) == (2, 4, 0)
    P = batch.prompt_len
    assert batch.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]]
    assert torch.equal(batch.attention_mask[:, P:], batch.response_mask)
    assert batch.sequences[:, P:][batch.response_mask.bool()].tolist() == [7, eos, 7, 8, 9, 10, eos, 8]


def test_vllm_rollout_is_refused_on_cpu(tmp_path) -> None:  # noqa: ANN001
    from r2m.trainer.config import TrainConfig

    with pytest.raises(ValueError, match="CUDA"):
        TrainConfig(policy="p", device="cpu", rollout="vllm")
