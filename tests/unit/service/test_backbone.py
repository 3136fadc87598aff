"""Reward models load and score through one code path, and match plain transformers exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from r2m.service import device as device_module
from r2m.service.backbone import load_backbone, pool
from r2m.service.device import cpu_has_native_bf16, resolve_dtype
from r2m.service.engine import PreparedItem, ScoringEngine
from r2m.service.model import HeadConfig

PAIRS = [
    ("hello what is the answer", "the answer is good"),
    ("help me cook", "you can cook with some water and time"),
    ("how do i code in python", "no"),
]


def _plain_rewards(path: Path, chat: bool) -> list[float]:
    """What a user gets from plain transformers, one text at a time, no padding."""
    tok = AutoTokenizer.from_pretrained(path)
    rm = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    for prompt, response in PAIRS:
        if chat:
            conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            ids = tok.apply_chat_template(conv, tokenize=True, return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(prompt + response, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out.append(rm(input_ids=ids).logits[0, 0].item())
    return out


@pytest.mark.parametrize(("fixture", "chat"), [("tiny_llama_rm", True), ("tiny_neox_rm", False)])
def test_reward_at_t0_equals_plain_transformers(fixture: str, chat: bool, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    backbone = load_backbone(str(path), device="cpu", dtype="float32")
    assert backbone.kind == "sequence-classification" and backbone.rm_dim == 32
    model = ScoringEngine(backbone, HeadConfig(rm_dim=32, policy_dim=16, attn_dim=8))
    hidden = torch.randn(5, 16)
    # Batched (padded) scoring, with hidden states at w = 1 and without: both are the plain RM's reward.
    items = [PreparedItem(backbone.encode(p, r), hidden if i % 2 else None, 1.0) for i, (p, r) in enumerate(PAIRS)]
    rewards = model.score(items).tolist()
    expected = _plain_rewards(path, chat)
    assert rewards == pytest.approx(expected, abs=1e-5)
    assert len(set(round(r, 4) for r in expected)) == len(expected), "texts should get different rewards"
    # Feedback at w < 1 moves the reward away from the plain one.
    moved = model.score([PreparedItem(items[0].encoded, hidden, 0.6)]).item()
    assert abs(moved - expected[0]) > 1e-4


def test_chat_template_is_used_when_present(tiny_llama_rm: Path) -> None:
    backbone = load_backbone(str(tiny_llama_rm), device="cpu", dtype="float32")
    ids = backbone.encode("hello", "world").input_ids
    text = backbone.tokenizer.decode(ids)
    assert text.startswith("<s>") and "user" in text and "assistant" in text


def test_reward_token_is_the_last_real_token_for_left_and_right_padding() -> None:
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(pool(hidden, right, "last", False), torch.stack([hidden[0, 1], hidden[1, 3]]))
    torch.testing.assert_close(pool(hidden, left, "last", False), torch.stack([hidden[0, 3], hidden[1, 3]]))
    mean = pool(hidden, right, "mean", False)
    torch.testing.assert_close(mean[0], hidden[0, :2].mean(0))


def test_default_model_is_the_minilm_rm_and_ranks_a_helpful_answer_first() -> None:
    backbone = load_backbone("default", device="cpu", dtype="float32")
    assert backbone.kind == "encoder" and backbone.rm_dim == 384
    model = ScoringEngine(backbone, HeadConfig(rm_dim=384, policy_dim=8, attn_dim=8, score_bias=True))
    prompt = "How do I boil an egg?"
    good = (
        "Place the egg in a pot of cold water, bring it to a boil, then simmer for 9 minutes and cool it in "
        "ice water before peeling."
    )
    bad = ["I don't know, figure it out yourself.", "Paris is the capital of France."]
    rewards = model.score([PreparedItem(backbone.encode(prompt, r), None, 1.0) for r in [good, *bad]]).tolist()
    assert rewards[0] > max(rewards[1:]), rewards
    # The RTE is the mean-pooled, L2-normalised MiniLM embedding, as the encoder was trained.
    rte = backbone.embed([backbone.encode(prompt, good)])
    assert rte.norm(dim=-1).item() == pytest.approx(1.0, abs=1e-5)


def test_unsupported_reward_models_fail_clearly(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
            num_labels=1,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="linear `score` layer"):
        load_backbone(str(tmp_path), device="cpu", dtype="float32")


# --- dtype: R2M_DTYPE=auto ------------------------------------------------------------------------------------------


def test_auto_dtype_is_the_checkpoints_for_hf_rms_and_float32_for_encoders_on_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, "sequence-classification") is None  # the checkpoint's own
    for native in (True, False):  # bf16 on CPU is opt-in: it makes a reward depend on its batch-mates (README)
        monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu, "sequence-classification") == torch.bfloat16
    with pytest.raises(ValueError, match="auto, float32"):
        resolve_dtype("int8", cpu)


def test_a_float32_checkpoint_stays_float32_under_auto(tiny_llama_rm: Path) -> None:
    backbone = load_backbone(str(tiny_llama_rm), device="cpu", dtype="auto")
    assert backbone.dtype == torch.float32 and next(backbone.model.parameters()).dtype == torch.float32


def test_native_bf16_detection_agrees_with_the_cpu_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if flags:
        assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_bf16_default_backbone_rewards_are_within_the_documented_tolerance() -> None:
    """README (R2M_DTYPE): bf16 vs float32 on the default RM, max |diff| < 0.15, mean < 0.03, correlation > 0.9999."""
    from r2m.data import generate_preferences

    pairs = generate_preferences(48, seed=4242)
    rewards = {}
    for dtype in ("float32", "bfloat16"):
        bb = load_backbone("default", device="cpu", dtype=dtype)
        encoded = [bb.encode(p["prompt"], r) for p in pairs for r in (p["chosen"], p["rejected"])]
        rewards[dtype] = bb.plain_reward(bb.embed(encoded)).double()
    diff = (rewards["float32"] - rewards["bfloat16"]).abs()
    assert float(diff.max()) < 0.15 and float(diff.mean()) < 0.03
    assert float(torch.corrcoef(torch.stack(list(rewards.values())))[0, 1]) > 0.9999
    assert float(diff.max()) > 0, "the bf16 backbone really ran in bf16"
