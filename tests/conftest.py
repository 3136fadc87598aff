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
    from r2m.trainer.tiny import word_tokenizer

    return word_tokenizer(WORDS, chat_template=chat_template)


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
)


def _save_tiny(path: Path, arch: str, chat_template: str | None) -> Path:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification, LlamaForSequenceClassification

    from r2m.trainer.tiny import llama_config

    tok = build_tokenizer(chat_template)
    torch.manual_seed(0)
    if arch == "llama":
        config = llama_config(tok, width=32, intermediate=64, num_labels=1)  # pad id 0: the tokenizer's
        model = LlamaForSequenceClassification(config)
    else:
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
        model = GPTNeoXForSequenceClassification(GPTNeoXConfig(**common))
    # Random init leaves the score layer near zero; widen it so rewards differ visibly between texts.
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_policy(path: Path, hidden: int = 32, chat_template: str | None = None) -> Path:
    """A tiny random Llama causal LM and its word-level tokenizer, saved like a user's checkpoint."""
    from r2m.trainer.tiny import tiny_llama

    tok = build_tokenizer(chat_template)
    tiny_llama(tok, width=hidden, intermediate=64, seed=0).save_pretrained(path)
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
