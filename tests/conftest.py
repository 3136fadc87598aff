"""Shared fixtures: tiny reward models built from configs (random weights, real transformers code)."""

from __future__ import annotations

from pathlib import Path

import pytest

WORDS = (
    "the a an is are was be to of and in that it for on with as you do at this but his by from they we "
    "say her she or will my one all would there their what so up out if about who get which go me when "
    "make can like time no just him know take people into year your good some could them see other than "
    "then now look only come its over think also back after use two how our work first well way even new "
    "want because any these give day most us hello world answer question help please thanks sorry yes "
    "python code cook travel math user assistant : . , ?"
).split()


def build_tokenizer(chat_template: str | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
)


def _save_tiny(path: Path, arch: str, chat_template: str | None) -> Path:
    import torch
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    tok = build_tokenizer(chat_template)
    torch.manual_seed(0)
    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=1,
        pad_token_id=0,
        max_position_embeddings=128,
    )
    if arch == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(num_key_value_heads=2, **common))
    else:
        model = GPTNeoXForSequenceClassification(GPTNeoXConfig(**common))
    # Random init leaves the score layer near zero; widen it so rewards differ visibly between texts.
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_policy(path: Path, hidden: int = 32, chat_template: str | None = None) -> Path:
    """A tiny random Llama causal LM and its word-level tokenizer, saved like a user's checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(chat_template)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-style sequence-classification RM with a chat template."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama-rm"), "llama", CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_neox_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-NeoX (Pythia) style sequence-classification RM without a chat template."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-neox-rm"), "neox", None)
