"""`r2m demo`: the whole R2M loop on a laptop, in one command, under a minute on 2 CPU cores.

    .venv/bin/r2m demo                          # 30 steps; writes runs/demo/metrics.jsonl and runs/demo/demo.png
    .venv/bin/r2m demo --steps 3 --out-dir /tmp/demo

What it does, top to bottom:
  1. policy: a tiny Llama (2 layers, width 64) over a word-level vocabulary built from the bundled prompts and the
     synthetic preference set, warmed up for a few seconds on that set's good answers (no hub download), saved to
     OUT_DIR/policy/;
  2. service: `r2m serve` in embedded mode (queue, head store and update worker in-process) on a free loopback
     port, with R2M_POLICY_DIM = the policy's width; its log goes to OUT_DIR/server.log;
  3. train: GRPO against it on the bundled prompts, one line per step (reward, in-group reward spread, head version,
     omega), OUT_DIR/metrics.jsonl as `r2m train` writes it;
  4. report: OUT_DIR/demo.png (the curves), the per-phase time split and the wall time. The service stops at the
     end, on errors and on Ctrl-C.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import torch

from r2m.data import generate_preferences, load_prompts
from r2m.service.launch import start_server

from .config import RewardMode, TrainConfig
from .tiny import ANSWER_TEMPLATE, tiny_llama, word_tokenizer

__all__ = ["DemoConfig", "build_policy", "plot_metrics", "run_demo"]

PHASES = ("rollout", "policy_forward", "score", "update", "r2m_post")
POLICY_WIDTH = 64


@dataclass
class DemoConfig:
    """The demo's few knobs; everything else is a TrainConfig / ServiceSettings default tuned for 2 CPU cores."""

    steps: int = 30  # RL steps T
    out_dir: str = "runs/demo"
    reward_mode: RewardMode = "r2m"
    prompts_per_step: int = 4
    group_size: int = 4
    max_new_tokens: int = 16
    lr: float = 5e-4  # policy AdamW lr: a ~200k-parameter model, not an 8B one
    warmup_steps: int = 200  # SFT steps on good answers before RL (0: RL from random weights)
    service_lr: float = 1e-4  # R2M update lr (R2M_TRAIN_LR)
    seed: int = 0
    ready_timeout_s: float = 120.0


# --- 1. the policy ------------------------------------------------------------------------------------------------


def _warmup_texts(seed: int) -> tuple[list[str], list[str]]:
    """(prompts, good answers) of the synthetic preference set: the SFT data and, with the bundled prompts, the
    vocabulary."""
    rows = generate_preferences(300, seed=seed)
    return [r["prompt"] for r in rows], [r["chosen"] for r in rows]


def build_policy(path: str | Path, *, warmup_steps: int = 200, seed: int = 0, log: TextIO = sys.stdout) -> Path:
    """A tiny causal LM and its tokenizer, saved with save_pretrained to `path` (loads by path like any policy).

    A word-level vocabulary (~2k words, lower case) keeps the model tiny and its samples readable words rather
    than WordPiece fragments; the warm-up makes them answer-like, so the reward curve starts somewhere meaningful.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo prints its own lines

    path = Path(path)
    prompts, answers = _warmup_texts(seed)
    words: dict[str, None] = {}
    for text in [*load_prompts("default"), *prompts, *answers, "answer :"]:
        for w in re.findall(r"\w+|[^\w\s]", text.lower()):  # what the Whitespace pre-tokenizer splits into
            words.setdefault(w, None)
    tok = word_tokenizer(words, chat_template=ANSWER_TEMPLATE, lowercase=True)
    model = tiny_llama(tok, width=POLICY_WIDTH, kv_heads=2, max_positions=256, tie_word_embeddings=True, seed=seed)

    # ------------------------------------------------------------------- warm-up: SFT on the good answers --
    if warmup_steps:
        start = time.perf_counter()
        texts = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            + f" {a} </s>"
            for p, a in zip(prompts, answers)
        ]
        tok.padding_side = "right"
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=96, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for i in range(warmup_steps):
            rows = torch.randint(len(texts), (32,), generator=gen)
            loss = model(
                input_ids=enc["input_ids"][rows], attention_mask=enc["attention_mask"][rows], labels=labels[rows]
            ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i == 0 or i + 1 == warmup_steps:
                print(f"  warm-up step {i + 1:3d}/{warmup_steps}: SFT loss {loss.item():.2f}", file=log, flush=True)
        model.eval()
        print(f"  warm-up took {time.perf_counter() - start:.1f} s", file=log, flush=True)
    tok.padding_side = "left"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# --- 2. the service -----------------------------------------------------------------------------------------------


@contextmanager
def embedded_service(log_dir: Path, policy_dim: int, train_lr: float = 1e-4, timeout_s: float = 120.0) -> Iterator[str]:
    """`r2m serve` (embedded: no Redis) as a child process on a free loopback port; yields its URL, stops it after.
    The user's R2M_* settings (a Redis URL, an 8B model, a key) are for their own server, not this one."""
    env = dict(
        R2M_MODEL="default",
        R2M_DEVICE="cpu",
        R2M_POLICY_DIM=str(policy_dim),
        R2M_ATTN_DIM="64",  # paper: 2048; a CPU demo's policy is 64 wide, and the update must take milliseconds
        R2M_TRAIN_LR=str(train_lr),  # paper: 1e-6 for 8B models over hundreds of steps; the demo has a few dozen
        R2M_TRAIN_STEPS="3",
        R2M_HEAD_POLL_S="0.2",
        OMP_NUM_THREADS="1",  # 2 cores: one for the service (RM forward, updates), one for the trainer
    )
    with start_server(log_dir, env, timeout=timeout_s, clean_env=True, log_file="server.log") as server:
        yield server.url


# --- 3. GRPO ------------------------------------------------------------------------------------------------------


class _Trained(NamedTuple):
    metrics: list[dict[str, Any]]  # one dict per step, as GRPOTrainer.train_step returns them
    metrics_path: Path
    last_refusal: dict[str, Any] | None  # the head guard's last refused update (/heads/current), if any
    dead_letters: int  # batches the service gave up on


def _grpo(c: DemoConfig, policy: Path, url: str, out: Path, say: Callable[[str], None]) -> _Trained:
    """`c.steps` GRPO steps against the service at `url`, one line per step, metrics.jsonl as `r2m train` writes it."""
    from .grpo import METRICS, GRPOTrainer

    train_config = TrainConfig(
        policy=str(policy),
        prompts="default",
        server_url=url,
        steps=c.steps,
        prompts_per_step=c.prompts_per_step,
        group_size=c.group_size,
        max_new_tokens=c.max_new_tokens,
        lr=c.lr,
        kl_coef=0.01,
        reward_mode=c.reward_mode,
        seed=c.seed,
        out_dir=str(out),
        device="cpu",
        progress=False,
        log_plain_rewards=True,  # a rise of the optimised reward alone may be the head inflating
    )
    trainer = GRPOTrainer(train_config)
    metrics_path = out / METRICS
    metrics_path.write_text("")
    metrics: list[dict[str, Any]] = []
    try:
        for t in range(c.steps):
            m = trainer.train_step(t)
            metrics.append(m)
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(m) + "\n")
            step_s = sum(m[f"time/{p}"] for p in PHASES)
            say(
                f"  step {t + 1:3d}/{c.steps}  reward {m['rewards/mean']:+.3f}  "
                f"in-group std {m['rewards/group_std_mean']:.3f}  head v{m['head_version']}  "
                f"omega {m['omega']:.2f}  kl {m['kl']:.4f}  {step_s:.1f} s"
            )
            say(f"      plain RM {m['rewards/plain_mean']:+.3f}  {_guard_text(m)}")
            if t == 0 or t + 1 == c.steps:
                assert trainer.batch is not None
                say(f"      sample: {trainer.batch.group_prompts[0]!r} -> {trainer.batch.responses[0]!r}")
        head = trainer.client.current_head()
        dead = len(trainer.client.request("GET", "/preferences/dead-letters").json()["dead_letters"])
    finally:
        trainer.close()
    return _Trained(metrics, metrics_path, head.get("last_refusal"), dead)


# --- 4. the report ------------------------------------------------------------------------------------------------


def plot_metrics(metrics: list[dict[str, Any]], path: str | Path, title: str = "r2m demo") -> Path:
    """Reward mean, in-group reward std, and head version / omega against the RL step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps = [m["step"] + 1 for m in metrics]
    fig, (ax_r, ax_s, ax_h) = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    ax_r.plot(steps, [m["rewards/mean"] for m in metrics], marker=".", color="tab:blue", label="optimised (R2M head)")
    if all("rewards/plain_mean" in m for m in metrics):
        plain = [m["rewards/plain_mean"] for m in metrics]
        ax_r.plot(steps, plain, marker=".", color="tab:red", label="plain RM, same samples (w = 1)")
        ax_r.legend(loc="best", fontsize=8)
    ax_r.set(title="reward (batch mean)", xlabel="RL step", ylabel="reward")
    ax_s.plot(steps, [m["rewards/group_std_mean"] for m in metrics], marker=".", color="tab:orange")
    ax_s.set(title="reward spread inside groups (mean std)", xlabel="RL step", ylabel="std")
    ax_h.step(steps, [m["head_version"] for m in metrics], where="post", color="tab:green", label="head version")
    ax_h.set(title="R2M head version and omega", xlabel="RL step", ylabel="head version")
    ax_o = ax_h.twinx()
    ax_o.plot(steps, [m["omega"] for m in metrics], linestyle="--", color="tab:gray", label="omega w(t)")
    ax_o.set(ylabel="omega", ylim=(0, 1.05))
    lines = ax_h.get_lines() + ax_o.get_lines()
    ax_h.legend(lines, [str(x.get_label()) for x in lines], loc="lower right")
    for ax in (ax_r, ax_s, ax_h):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _guard_text(m: dict[str, Any]) -> str:
    if "guard/mean_shift" not in m:
        return "guard: no figures yet"
    return (
        f"guard: shift {m['guard/mean_shift']:+.2f} plain stds, spread x{m['guard/spread_ratio']:.2f}, "
        f"rank {m['guard/rank_agreement']:.2f} vs plain RM"
    )


def _time_split(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per step of each phase."""
    return {p: sum(m.get(f"time/{p}", 0.0) for m in metrics) / max(len(metrics), 1) for p in PHASES}


def _report(c: DemoConfig, run: _Trained, out: Path, say: Callable[[str], None]) -> tuple[Path, dict[str, float]]:
    """The plot, and the run's summary lines: first and last step, the head's guard, the time split per phase."""
    metrics = run.metrics
    plot = plot_metrics(metrics, out / "demo.png", title=f"r2m demo: GRPO, reward mode {c.reward_mode}")
    split = _time_split(metrics)
    step_s = sum(split.values()) or 1.0
    first, last = metrics[0], metrics[-1]
    say(
        f"  reward {first['rewards/mean']:+.3f} -> {last['rewards/mean']:+.3f} (optimised), "
        f"plain RM on the same samples {first['rewards/plain_mean']:+.3f} -> {last['rewards/plain_mean']:+.3f}, "
        f"head v{first['head_version']} -> v{last['head_version']}, omega {first['omega']:.2f} -> {last['omega']:.2f}"
    )
    say(
        f"  head {_guard_text(last)}; {run.dead_letters} batch(es) given up on"
        + (f"; last refusal: {run.last_refusal['reason']}" if run.last_refusal else "; no update refused")
    )
    say(
        "  time per step (mean): "
        + ", ".join(f"{p} {split[p]:.2f} s" for p in PHASES)
        + f"; total {step_s:.2f} s, of which R2M post {100 * split['r2m_post'] / step_s:.0f}%"
    )
    say(f"  metrics: {run.metrics_path}")
    say(f"  plot:    {plot}")
    return plot, split


# --- the demo -----------------------------------------------------------------------------------------------------


def run_demo(config: DemoConfig | None = None, log: TextIO = sys.stdout) -> dict[str, Any]:
    """Policy, service, GRPO, plot (the module docstring); returns {"metrics", "plot", "wall_s", "time_split"}."""
    c = config or DemoConfig()
    start = time.perf_counter()
    torch.set_num_threads(1)  # the other core is the service's
    out = Path(c.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(msg, file=log, flush=True)

    say(f"[1/4] tiny policy (Llama, 2 layers, width {POLICY_WIDTH}) -> {out / 'policy'}")
    policy = build_policy(out / "policy", warmup_steps=c.warmup_steps, seed=c.seed, log=log)

    say(f"[2/4] r2m serve (embedded: queue, head store and update worker in-process); log -> {out / 'server.log'}")
    with embedded_service(out, POLICY_WIDTH, c.service_lr, c.ready_timeout_s) as url:
        say(f"  ready at {url} after {time.perf_counter() - start:.1f} s")
        say(
            f"[3/4] GRPO, reward mode {c.reward_mode}: {c.steps} steps x {c.prompts_per_step} prompts x "
            f"{c.group_size} responses (<= {c.max_new_tokens} tokens)"
        )
        run = _grpo(c, policy, url, out, say)

    say("[4/4] report")
    plot, split = _report(c, run, out, say)
    wall = time.perf_counter() - start
    say(f"  done in {wall:.0f} s")
    return {"metrics": run.metrics, "plot": plot, "wall_s": wall, "time_split": split}
