"""Tiny word-level Llama models built from a config (random weights, no hub download): the policy of `r2m demo`
and of the over-optimization benchmark, and the policies and reward models of the tests and the bench.

    tok = word_tokenizer(["how", "do", "i", "boil", "an", "egg", "?"], chat_template=ANSWER_TEMPLATE)
    policy = tiny_llama(tok, width=64, seed=0)          # a LlamaForCausalLM; save_pretrained it like any policy
    config = llama_config(tok, width=32, num_labels=1)  # or any Llama head (LlamaForSequenceClassification: an RM)

A word-level vocabulary keeps the model tiny and its samples readable words rather than sub-word fragments.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["ANSWER_TEMPLATE", "SPECIAL_TOKENS", "llama_config", "tiny_llama", "word_tokenizer"]

SPECIAL_TOKENS = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
# A policy answers after this marker: the template renders "<s> {prompt} answer :".
ANSWER_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}answer :{% endif %}"
)


def word_tokenizer(
    words: Iterable[str], *, chat_template: str | None = None, lowercase: bool = False, split_punctuation: bool = True
) -> Any:
    """A `PreTrainedTokenizerFast` over `SPECIAL_TOKENS` and then `words` (in order, duplicates once).

    `split_punctuation`: split "egg?" into "egg" and "?" (the `Whitespace` pre-tokenizer) or only at spaces
    (`WhitespaceSplit`); `lowercase`: normalise the text to lower case first.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIAL_TOKENS)
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    if lowercase:
        core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template:
        tok.chat_template = chat_template
    return tok


def llama_config(
    tokenizer: Any,
    *,
    width: int,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_positions: int = 128,
    **extra: Any,
) -> Any:
    """A `LlamaConfig` sized for `tokenizer`, its special-token ids set; `extra` goes to LlamaConfig as it is
    (e.g. `num_labels=1`, `tie_word_embeddings=True`)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=intermediate or 2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def tiny_llama(tokenizer: Any, *, seed: int = 0, **config: Any) -> Any:
    """A `LlamaForCausalLM` with seeded random weights (`config`: `llama_config`'s arguments)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(tokenizer, **config))
