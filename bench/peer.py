"""Section 8, a real peer in the same run: OpenRLHF's own `serve_rm` and `r2m serve` on the same model.

The model: a small Llama-style `LlamaForSequenceClassification` (MiniLM-sized: hidden 384, 6 layers) built here from
a config with seeded random weights, saved float32 with `save_pretrained`, with a word-level tokenizer whose chat
template wraps the turns in `<s> ... </s>`. Both servers can load it as it is: `serve_rm` builds its
`RewardModel` (the Llama base + a bias-free linear value head named `score`, read at the last non-pad token), and r2m
loads it as a sequence-classification RM (the same base, the same `score` layer, the same token).

The samples: OpenRLHF's client sends the full templated text (prompt + response, rendered with the chat template)
as `query`; `serve_rm` tokenizes it with `add_special_tokens=False`, and so does r2m's `/get_reward` on a decoder RM
(R2M_GET_REWARD_SPECIAL_TOKENS=auto); the section checks that both give the same token ids for every sample.

The client: OpenRLHF's own remote-RM request function, `SingleTurnAgentExecutor._fetch_rewards_via_http` from the
installed wheel (`openrlhf/utils/agent.py`, loaded by path as tests/integration/test_openrlhf.py does), one sample
per request, 64 in flight, against each server's `/get_reward` in turn.

`serve_rm` needs, besides the wheel (installed --no-deps), the parts of OpenRLHF's declared dependencies on its
import path: deepspeed, peft, pylatexenc (the `test` extra), and flash_attn, which has no CPU build and is used for
sample packing only: `bench/peer_stubs/flash_attn` is an import stand-in put on the subprocess's PYTHONPATH.
`serve_rm` runs its model in bf16 (its `--ds.param_dtype` offers bf16 or fp16 only), so r2m serves it in the same
dtype here (`--peer-dtype`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

from r2m.service.launch import free_port, http_ready, spawn, wait_until

from ._common import CpuMeter, Unavailable, row, start_r2m

HERE = Path(__file__).resolve().parent
STUBS = HERE / "peer_stubs"
IN_FLIGHT = 64
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
)
# The peer's import path, beyond what r2m itself needs (see the module docstring).
PEER_MODULES = {
    "openrlhf": "openrlhf==0.11.2 --no-deps",
    "deepspeed": "deepspeed",
    "peft": "peft",
    "pylatexenc": "pylatexenc",
    "aiohttp": "aiohttp",
}


def _words(n: int) -> list[str]:
    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(letters) for _ in range(rng.randint(2, 8))))
    return sorted(out)


def build_model(path: Path, quick: bool, seed: int = 0) -> Path:
    """A seeded random Llama sequence-classification RM and its word-level chat tokenizer, saved to `path`."""
    import torch
    from transformers import LlamaForSequenceClassification

    from r2m.trainer.tiny import llama_config, word_tokenizer

    fast = word_tokenizer(
        ["user", "assistant", ":", *_words(2000)], chat_template=CHAT_TEMPLATE, split_punctuation=False
    )
    hidden, layers, heads = (64, 2, 4) if quick else (384, 6, 6)
    config = llama_config(
        fast,
        width=hidden,
        layers=layers,
        heads=heads,
        kv_heads=heads,
        intermediate=4 * hidden,
        max_positions=1024,
        num_labels=1,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    # The default init (std 0.02) leaves the score layer near zero: rewards would differ from text to text by
    # less than bf16 rounding. A unit-variance score layer spreads them to a few units.
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0 / math.sqrt(hidden) * 4)
    model.to(torch.float32).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def samples(path: Path, n: int, seed: int = 2) -> list[tuple[str, str, str]]:
    """`n` (prompt, response, templated full text) of 10-60 + 20-200 random words, as OpenRLHF would send."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    words = _words(2000)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choices(words, k=rng.randint(10, 60)))
        response = " ".join(rng.choices(words, k=rng.randint(20, 200)))
        conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        out.append((prompt, response, tok.apply_chat_template(conv, tokenize=False)))
    return out


def _load_by_path(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OPENRLHF_LOGGING = "openrlhf.utils.logging_utils"


def load_openrlhf_agent() -> ModuleType:
    """`openrlhf/utils/agent.py` (its remote-RM client) from the installed wheel, unmodified, loaded by path:
    `import openrlhf.utils` pulls in the math grader's dependencies. Its one import, `OPENRLHF_LOGGING`, is
    OpenRLHF's own file too, put into sys.modules the same way (unless already there)."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("openrlhf is not installed: pip install openrlhf==0.11.2 --no-deps")
    root = Path(spec.origin).parent
    sys.modules.setdefault(OPENRLHF_LOGGING, _load_by_path(OPENRLHF_LOGGING, root / "utils" / "logging_utils.py"))
    return _load_by_path("openrlhf_utils_agent", root / "utils" / "agent.py")


def openrlhf_executor_class() -> type:
    """`SingleTurnAgentExecutor` from the installed wheel, unmodified."""
    return load_openrlhf_agent().SingleTurnAgentExecutor


def drive(url: str, queries: list[tuple[str, str, str]], in_flight: int) -> tuple[list[float], float]:
    """Every sample once through OpenRLHF's remote-RM request, `in_flight` at a time; (rewards, seconds)."""
    executor = openrlhf_executor_class()(remote_rm_url=f"{url}/get_reward")
    rewards: list[float] = [math.nan] * len(queries)

    async def main() -> float:
        sem = asyncio.Semaphore(in_flight)

        async def one(i: int) -> None:
            prompt, _, text = queries[i]
            async with sem:
                info = (await executor._fetch_rewards_via_http([text], [prompt], [None]))[0]
            r = info["rewards"]
            rewards[i] = float(r[0] if isinstance(r, list) else r)

        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(queries))))
        return time.perf_counter() - t

    seconds = asyncio.run(main())
    return rewards, seconds


def pearson(a: list[float], b: list[float]) -> float:
    return float(statistics.correlation(a, b)) if len(a) > 1 else math.nan


def reference_rewards(path: Path, texts: list[str]) -> list[float]:
    """float32 transformers rewards, one text at a time (no padding): what both servers approximate."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for t in texts:
            ids = tok(t, add_special_tokens=False, return_tensors="pt")
            out.append(float(model(**ids).logits[0, 0]))
    return out


def same_tokens(path: Path, texts: list[str]) -> float:
    """Share of texts that r2m's `/get_reward` and `serve_rm` turn into identical token ids."""
    from transformers import AutoTokenizer

    from r2m.service.backbone import load_backbone

    backbone = load_backbone(str(path), device="cpu", dtype="float32")
    tok = AutoTokenizer.from_pretrained(path)  # serve_rm: tokenizer(texts, add_special_tokens=False)
    same = sum(backbone.encode_text(t).input_ids == tok(t, add_special_tokens=False)["input_ids"] for t in texts)
    return same / len(texts)


def wrap_tokenizer(src: Path, dst: Path, single: str | None) -> Path:
    """A copy of the RM at `src` whose tokenizer wraps every text as `single` by default (a `TemplateProcessing`
    such as "<s> $A </s>"; None: adds nothing), as many real RM tokenizers do."""
    import shutil

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    shutil.copytree(src, dst, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(src)
    if single is not None:
        specials = [(t, tok.convert_tokens_to_ids(t)) for t in (tok.bos_token, tok.eos_token) if t in single.split()]
        tok._tokenizer.post_processor = TemplateProcessing(single=single, special_tokens=specials)
    tok.save_pretrained(dst)
    return dst


def serve_rm_reference(models: list[Path], texts: list[str], tmp: Path) -> dict[str, dict]:
    """`bench.serve_rm_probe` in a subprocess (the flash_attn stand-in on its path): serve_rm's own token ids and
    float32 rewards for `texts` on each model, as {str(model): {"input_ids": [[...]], "rewards": [...]}}."""
    import json
    import subprocess

    tmp.mkdir(parents=True, exist_ok=True)
    texts_path, out_path = tmp / "serve_rm_texts.json", tmp / "serve_rm_out.json"
    texts_path.write_text(json.dumps(texts))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(STUBS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "bench.serve_rm_probe", str(texts_path), str(out_path), *map(str, models)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=HERE.parent)
    if done.returncode != 0:
        raise RuntimeError(f"serve_rm probe failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(out_path.read_text())


WRAPPING = "<s> $A </s>"  # what the second model's tokenizer adds to every text by default


def wrapped_agreement(model_dir: Path, queries: list[tuple[str, str, str]], tmp: Path, r2m_env: dict) -> dict:
    """The same model with a tokenizer that adds BOS and EOS by default: serve_rm's own tokenization and float32
    rewards (`serve_rm_reference`) against r2m's `/get_reward` in float32 through OpenRLHF's client."""
    wrapped = wrap_tokenizer(model_dir, tmp / "peer-model-wrapped", WRAPPING)
    texts = [q[2] for q in queries]
    ref = serve_rm_reference([wrapped], texts, tmp / "serve_rm-probe")[str(wrapped)]
    r2m = start_r2m(tmp, {**r2m_env, "R2M_MODEL": str(wrapped), "R2M_DTYPE": "float32"}, "peer-r2m-wrapped")
    try:
        got, _ = drive(r2m.url, queries, IN_FLIGHT)
    finally:
        r2m.stop()
    from r2m.service.backbone import load_backbone

    backbone = load_backbone(str(wrapped), device="cpu", dtype="float32")
    same = sum(backbone.encode_text(t).input_ids == ids for t, ids in zip(texts, ref["input_ids"])) / len(texts)
    out = {"post_processor": WRAPPING, "same_tokens": same, "pearson": pearson(got, ref["rewards"]),
           "max_abs_diff": max(abs(a - b) for a, b in zip(got, ref["rewards"]))}  # fmt: skip
    print(
        f"  peer, wrapping tokenizer: same tokens {same:.3f}, max |reward diff| {out['max_abs_diff']:.2e}", flush=True
    )
    return out


def check_available() -> None:
    missing = [m for m in PEER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        hint = ", ".join(PEER_MODULES[m] for m in missing)
        raise Unavailable(
            f"OpenRLHF's serve_rm needs {', '.join(missing)} here: pip install {hint} "
            "(pip install -e '.[test]' and the Makefile's --no-deps openrlhf)"
        )


def run(opts) -> dict:  # noqa: ANN001
    check_available()
    tmp = Path(opts.tmp)
    model_dir = build_model(tmp / "peer-model", opts.quick)
    n = 32 if opts.quick else opts.peer_samples
    rounds = 1 if opts.quick else opts.rounds
    queries = samples(model_dir, n)
    texts = [q[2] for q in queries]
    port = free_port()
    env = {"PYTHONPATH": os.pathsep.join([str(STUBS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [
        sys.executable, "-m", "openrlhf.cli.serve_rm",
        "--reward.model_name_or_path", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port),
        "--ds.attn_implementation", "sdpa",  # flash_attention_2 (its default) needs CUDA
        "--ds.param_dtype", "bf16",
        "--data.max_len", "2048",
    ]  # fmt: skip
    ready_url = f"http://127.0.0.1:{port}/docs"  # serve_rm has no health route; FastAPI's docs page answers
    peer = spawn("serve_rm", cmd, tmp / f"serve_rm-{port}.log", env)
    peer.url = f"http://127.0.0.1:{port}"
    r2m = None
    try:
        r2m_env = {
            "R2M_MODEL": str(model_dir),
            "R2M_DEVICE": opts.device,
            "R2M_DTYPE": opts.peer_dtype,
            "R2M_EMBEDDED_WORKER": "false",
            "R2M_MAX_ITEMS_PER_REQUEST": "1024",
        }
        r2m = start_r2m(tmp, r2m_env, "peer-r2m")  # loads while serve_rm does
        wait_until(peer, http_ready(ready_url), 240)
        servers = {"r2m": r2m.url, "serve_rm": peer.url}
        for url in servers.values():  # warm: first-call costs out of the timings
            drive(url, queries[: min(16, n)], IN_FLIGHT)
        meters = {"r2m": CpuMeter(r2m.proc.pid), "serve_rm": CpuMeter(peer.proc.pid)}
        per: dict[str, list[float]] = {k: [] for k in servers}
        cpu: dict[str, list[dict]] = {k: [] for k in servers}
        rewards: dict[str, list[float]] = {}
        for _ in range(rounds):
            for name, url in servers.items():
                meters[name].start()
                got, seconds = drive(url, queries, IN_FLIGHT)
                cpu[name].append(meters[name].stop(n))
                per[name].append(n / seconds)
                rewards[name] = got
        for name in servers:
            if any(math.isnan(r) for r in rewards[name]):
                raise RuntimeError(f"{name} left some samples without a reward (see its log)")
        out: dict = {
            "model": {"arch": "LlamaForSequenceClassification", "quick": opts.quick, "path_note": "temp dir"},
            "samples": n,
            "in_flight": IN_FLIGHT,
            "rounds": rounds,
            "r2m_dtype": opts.peer_dtype,
            "serve_rm_dtype": "bfloat16",
            "r2m_seq_per_s": statistics.median(per["r2m"]),
            "serve_rm_seq_per_s": statistics.median(per["serve_rm"]),
            "round_seq_per_s": per,
            "cpu_ms_per_request": {k: {m: statistics.median(c[m] for c in v) for m in v[0]} for k, v in cpu.items()},
            "same_tokens": same_tokens(model_dir, texts),
        }
        out["throughput_ratio"] = out["r2m_seq_per_s"] / out["serve_rm_seq_per_s"]
        out["reward_pearson"] = pearson(rewards["r2m"], rewards["serve_rm"])
        out["max_abs_reward_diff"] = max(abs(a - b) for a, b in zip(rewards["r2m"], rewards["serve_rm"]))
        ref = reference_rewards(model_dir, texts)
        out["reward_std_fp32"] = statistics.pstdev(ref)
        out["pearson_vs_fp32"] = {k: pearson(rewards[k], ref) for k in servers}
        out["max_abs_diff_vs_fp32"] = {k: max(abs(a - b) for a, b in zip(rewards[k], ref)) for k in servers}
        print(
            f"  peer: r2m {out['r2m_seq_per_s']:.1f} seq/s, serve_rm {out['serve_rm_seq_per_s']:.1f} seq/s, "
            f"ratio {out['throughput_ratio']:.2f}, pearson {out['reward_pearson']:.4f}",
            flush=True,
        )
        out["wrapping_tokenizer"] = wrapped_agreement(model_dir, queries, tmp, r2m_env)
        out["rows"] = [
            row(
                f"/get_reward vs OpenRLHF serve_rm, {IN_FLIGHT} in flight, 1 sample/request",
                out["r2m_seq_per_s"],
                "seq/s",
                baseline=out["serve_rm_seq_per_s"],
                ratio=out["throughput_ratio"],
                target=">= 1.6",
            ),
            row("reward agreement with serve_rm (Pearson r)", out["reward_pearson"], "", target="> 0.98"),
            row(
                f"reward agreement with serve_rm, RM tokenizer wrapping {WRAPPING!r}, float32 (max |diff|)",
                out["wrapping_tokenizer"]["max_abs_diff"],
                "",
                target="< 1e-4",
            ),
        ]
        return out
    finally:
        if r2m is not None:
            r2m.stop()
        peer.stop()
