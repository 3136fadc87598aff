"""Section 2, feedback attention per item at the paper's shape beside one read of `h`, fp32 and bf16 `h`.

The paper's shape: T = 700 policy tokens, D_policy = 4096 (a Llama-8B policy), d = 2048. The R2M query is one
token, so the served form (`service/model.py`'s `FeedbackAttention.forward`) folds W_k into the query and applies
W_v after pooling: about two passes over `h`. The baseline is one pass over the same `h` that touches every byte,
in the same run: `h.sum()` (read only) and `h.clone()` (read + write); the ratio uses the faster of the two, so it
is the stricter one. A call also reads the four weight matrices once (W_q, W_k, W_v, W_o: 128 MB in fp32 at this
shape), whatever the batch: `--attn-batch` items share them, and the same call with T = 1 (`weights_only`) shows
that part. The textbook form (project keys and values, then attend) is timed once for context.

bf16 `h` takes the path the service takes on this device (`service/kernels/precision.py`,
R2M_CPU_HALF_HIDDEN=auto): read as it is where the device multiplies bf16 natively, else widened to float32 inside the
call a block of rows at a time (the widening counted in the time). The section records that path and the bf16 time
against the float32 one (target <= 1.5); on a CPU it also times both bf16 paths whichever auto chose, and the upcast
one against float32, so a machine with native bf16 still measures the path one without it takes.
"""

from __future__ import annotations

import torch

from r2m.service.kernels import precision
from r2m.service.model import FeedbackAttention

from ._common import best_time, interleaved, row

RM_DIM = 4096  # a Llama-8B reward model's width (Skywork-Reward-Llama-3.1-8B)
BUNDLED_RM_DIM = 384  # the bundled MiniLM RM's width


def run(opts) -> dict:  # noqa: ANN001
    if opts.quick:
        B, T, P, d, rm = 2, 64, 256, 128, 128
    else:
        B, T, P, d, rm = opts.attn_batch, 700, 4096, 2048, RM_DIM
    device = opts.device
    repeat = 3 if opts.quick else 15
    torch.manual_seed(0)
    attn = FeedbackAttention(rm, P, d, n_heads=1).to(device).eval()
    e = torch.randn(B, rm, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    out: dict = {"items": B, "T": T, "policy_dim": P, "attn_dim": d, "rm_dim": rm, "device": device, "rows": []}
    bf16_path = precision.compute_dtype(torch.bfloat16, device)
    out["bf16_path"] = "as sent" if bf16_path == torch.bfloat16 else "widened to float32 in blocks"
    out["dtype_paths"] = precision.describe() if torch.device(device).type == "cpu" else "as sent (GPU)"
    print(f"  hidden-state dtype path: {out['dtype_paths']}", flush=True)
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            h = torch.randn(B, T, P, device=device).to(dtype)
            t = interleaved(
                {
                    "attention": lambda: attn(e, h, mask),
                    "sum": lambda: h.sum(),
                    "copy": lambda: h.clone(),
                    # T = 1: all four weight matrices are read, `h` hardly; the part of a call a bigger batch amortises
                    "weights_only": lambda: attn(e, h[:, :1], mask[:, :1]),
                },
                repeat,
                device,
            )
            name = str(dtype).removeprefix("torch.")
            read = min(t["sum"], t["copy"])
            r = {
                "h_bytes_per_item": h[0].numel() * h.element_size(),
                "attention_ms_per_item": 1000 * t["attention"] / B,
                "read_sum_ms_per_item": 1000 * t["sum"] / B,
                "read_copy_ms_per_item": 1000 * t["copy"] / B,
                "weights_only_ms_per_item": 1000 * t["weights_only"] / B,
                "attention_minus_weights_vs_read": (t["attention"] - t["weights_only"]) / read,
                "attention_vs_read": t["attention"] / read,
            }
            out[name] = r
            label = name if dtype == torch.float32 else f"{name} ({out['bf16_path']})"
            out["rows"].append(
                row(
                    f"feedback attention per item, h {label}, vs one read of h",
                    r["attention_ms_per_item"],
                    "ms",
                    baseline=1000 * read / B,
                    ratio=r["attention_vs_read"],
                    target="<= 2",
                )
            )
        bf16_vs_fp32 = out["bfloat16"]["attention_ms_per_item"] / out["float32"]["attention_ms_per_item"]
        out["bf16_vs_fp32"] = bf16_vs_fp32
        out["rows"].append(
            row(
                f"feedback attention per item, h bfloat16 ({out['bf16_path']}) vs h float32",
                out["bfloat16"]["attention_ms_per_item"],
                "ms",
                baseline=out["float32"]["attention_ms_per_item"],
                ratio=bf16_vs_fp32,
                target="<= 1.5",
            )
        )
        # Both paths for bf16 h on a CPU, side by side: the one auto chose should be the faster (on a CPU without
        # native bf16 the "as sent" path is the 3-6x slower one; with AVX512-BF16/AMX the upcast costs a copy).
        if torch.device(device).type == "cpu":
            h = torch.randn(B, T, P, device=device).to(torch.bfloat16)
            h32 = h.float()
            paths = {}
            try:
                precision.configure("native")
                paths["native"] = best_time(lambda: attn(e, h, mask), repeat, device) / B
                # The upcast path is the one every CPU without native bf16 takes: against float32 h of the same
                # values, in turns so that the machine's moods (bench/README.md) hit both alike, it says what section
                # 2's bf16 figure is on such a CPU (its kernels are the float32 ones plus the widening, a block of rows
                # at a time).
                precision.configure("upcast")
                both = interleaved({"upcast": lambda: attn(e, h, mask), "float32": lambda: attn(e, h32, mask)}, repeat)
            finally:
                precision.configure("auto")
            paths["upcast"], paths["float32"] = both["upcast"] / B, both["float32"] / B
            auto = "native" if bf16_path == torch.bfloat16 else "upcast"
            out["bf16_paths_ms_per_item"] = {k: 1000 * v for k, v in paths.items() if k != "float32"}
            out["bf16_auto_vs_other"] = paths[auto] / paths["upcast" if auto == "native" else "native"]
            out["bf16_upcast_vs_fp32"] = paths["upcast"] / paths["float32"]
            out["rows"].append(
                row(
                    "bf16 h, the upcast path (a CPU without native bf16 takes it) vs the same values in float32",
                    1000 * paths["upcast"],
                    "ms",
                    baseline=1000 * paths["float32"],
                    ratio=out["bf16_upcast_vs_fp32"],
                    target="<= 1.5",
                )
            )
            out["rows"].append(
                row(
                    f"bf16 h: the path auto chose ({out['bf16_path']}) vs the other one",
                    1000 * paths[auto],
                    "ms",
                    baseline=1000 * paths["upcast" if auto == "native" else "native"],
                    ratio=out["bf16_auto_vs_other"],
                    target="<= 1.1",
                )
            )
        # The bundled RM is 384 wide: a serving head then reads W_q W_k^T and W_v^T W_o^T (fused once per head
        # version) instead of the four matrices. Same h, same batch, fp32.
        small = FeedbackAttention(BUNDLED_RM_DIM if not opts.quick else rm // 2, P, d, n_heads=1).to(device).eval()
        e_small = torch.randn(B, small.w_q.in_features, device=device)
        h = torch.randn(B, T, P, device=device)
        t = interleaved({"attention": lambda: small(e_small, h, mask), "sum": lambda: h.sum()}, repeat, device)
        out["bundled_rm"] = {
            "rm_dim": small.w_q.in_features,
            "fused": small.fused() is not None,
            "attention_ms_per_item": 1000 * t["attention"] / B,
            "attention_vs_read": t["attention"] / t["sum"],
        }
        out["rows"].append(
            row(
                f"feedback attention per item, D_rm={small.w_q.in_features} (bundled RM), h float32, vs one read of h",
                out["bundled_rm"]["attention_ms_per_item"],
                "ms",
                baseline=1000 * t["sum"] / B,
                ratio=out["bundled_rm"]["attention_vs_read"],
                target="<= 2",
            )
        )
        # The textbook form once, fp32 h, for context: what folding W_k and W_v saves.
        h = torch.randn(B, T, P, device=device)
        t_ref = best_time(lambda: attn.forward_reference(e, h, mask), 1 if not opts.quick else 2, device)
        t_fold = best_time(lambda: attn(e, h, mask), repeat, device)
        out["textbook_ms_per_item"] = 1000 * t_ref / B
        out["textbook_vs_folded"] = t_ref / t_fold
        out["rows"].append(
            row(
                "textbook (projected) attention per item, h float32, vs folded",
                out["textbook_ms_per_item"],
                "ms",
                baseline=1000 * t_fold / B,
                ratio=out["textbook_vs_folded"],
            )
        )
    return out
