"""The policy: a small word-level Llama fitted by SFT on templated answers, saved like any HF checkpoint."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from r2m.trainer.demo import CHAT_TEMPLATE

from .task import PROMPTS, sample_answer, vocabulary

__all__ = ["build_sft_policy"]


def _tokenizer():  # noqa: ANN202 - a PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for w in vocabulary():
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # the task's texts are space-separated words
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.chat_template = CHAT_TEMPLATE  # "<s> {prompt} answer :"
    return tok


def build_sft_policy(
    path: Path,
    *,
    width: int,
    layers: int,
    n_answers: int,
    sft_steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int,
    say: Callable[[str], None] = print,
) -> dict:
    """Write the SFT policy to `path`; returns {"params", "sft_loss", "seconds"}."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    tok = _tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)

    rng = random.Random(seed)
    texts = []
    for _ in range(n_answers):
        prompt = rng.choice(PROMPTS)
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        texts.append(f"{rendered} {sample_answer(prompt, rng)} </s>")
    tok.padding_side = "right"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    # Only the answer is learnt: the prompt part (up to and including "answer :") is masked out of the loss.
    colon = tok.convert_tokens_to_ids(":")
    first_answer = (enc["input_ids"] == colon).int().argmax(dim=1) + 1  # (N,)
    labels[torch.arange(labels.shape[1]).unsqueeze(0) < first_answer.unsqueeze(1)] = -100

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, sft_steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for i in range(sft_steps):
        rows = torch.randint(len(texts), (batch_size,), generator=gen)
        loss = model(
            input_ids=enc["input_ids"][rows], attention_mask=enc["attention_mask"][rows], labels=labels[rows]
        ).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (i + 1) % max(1, sft_steps // 4) == 0:
            say(f"  SFT step {i + 1}/{sft_steps}: loss {loss.item():.3f}")
    model.eval()
    tok.padding_side = "left"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "sft_loss": loss.item(),
        "seconds": round(time.perf_counter() - started, 1),
    }
