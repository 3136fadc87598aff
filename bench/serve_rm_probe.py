"""OpenRLHF's own `serve_rm` reward proxy, from the installed wheel, run in this process on some models and texts:
the token ids its `tokenize_fn` makes and the rewards its `get_reward` returns (one left-padded batch, as it serves),
with the model in float32 (serve_rm itself offers bf16 or fp16 only: its model is cast and the checkpoint's float32
weights loaded back), so that another server's float32 rewards compare to float tolerance. Needs `bench/peer_stubs`
on PYTHONPATH (the flash_attn import stand-in); `bench.peer.serve_rm_reference` runs it so.

    python -m bench.serve_rm_probe TEXTS.json OUT.json MODEL_DIR [MODEL_DIR ...]

OUT.json: {model_dir: {"input_ids": [[...] per text, padding dropped], "rewards": [...]}}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace


def probe(model_dir: str, texts: list[str]) -> dict:
    from openrlhf.cli.serve_rm import RewardModelProxy

    args = SimpleNamespace(
        reward=SimpleNamespace(model_name_or_path=model_dir, normalize_enable=False),
        ds=SimpleNamespace(attn_implementation="sdpa", experts_implementation=None, param_dtype="bf16",
                           load_in_4bit=False, value_head_prefix="score", packing_samples=False),
        data=SimpleNamespace(max_len=2048, disable_fast_tokenizer=False),
        batch_size=None,
    )  # fmt: skip
    proxy = RewardModelProxy(args)  # serve_rm's own __init__: its RewardModel and its tokenizer set-up
    # serve_rm loads in bf16 or fp16 only: cast its model to float32 and load the checkpoint's float32 weights back
    # (a cast alone keeps the bf16-rounded values, about 1% off in reward).
    from safetensors.torch import load_file

    model = proxy.reward_model.float()
    missing, unexpected = model.load_state_dict(load_file(str(Path(model_dir) / "model.safetensors")), strict=False)
    if unexpected or set(missing) - {"mean", "std"}:  # RewardModel's normalisation buffers are not in a checkpoint
        raise RuntimeError(f"checkpoint keys do not match serve_rm's model: missing {missing}, unexpected {unexpected}")
    batch = proxy.tokenize_fn(texts, device="cpu")
    ids = [[i for i, m in zip(row, mask) if m] for row, mask in zip(batch["input_ids"].tolist(),
                                                                   batch["attention_mask"].tolist())]  # fmt: skip
    return {"input_ids": ids, "rewards": [float(r) for r in proxy.get_reward(texts)]}


def main(argv: list[str]) -> int:
    texts_path, out_path, *models = argv
    texts = json.loads(Path(texts_path).read_text())
    Path(out_path).write_text(json.dumps({m: probe(m, texts) for m in models}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
