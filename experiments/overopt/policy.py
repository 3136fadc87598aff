"""The policy: a small word-level Llama fitted by SFT on templated answers, saved like any HF checkpoint."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from r2m.trainer.tiny import ANSWER_TEMPLATE, tiny_llama, word_tokenizer

from .task import TRAIN_PROMPTS, sample_answer, vocabulary

__all__ = ["build_sft_policy"]


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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    # The task's texts are space-separated words: split at spaces only.
    tok = word_tokenizer(vocabulary(), chat_template=ANSWER_TEMPLATE, split_punctuation=False)
    model = tiny_llama(
        tok, width=width, layers=layers, kv_heads=4, max_positions=128, tie_word_embeddings=True, seed=seed
    )

    rng = random.Random(seed)
    texts = []
    for _ in range(n_answers):
        prompt = rng.choice(TRAIN_PROMPTS)  # the evaluation prompts stay unseen
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
