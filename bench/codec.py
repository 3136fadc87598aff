"""Section 1, wire codec: binary decode of 16 x 256 x 2048 bf16/fp16 beside a plain memory copy, and JSON base64.

"Decode" is what the server does with a body: parse the safetensors header, then copy each tensor into a torch
tensor (`WireTensor.to_torch`). The baseline copies the same bytes out of the same body buffer into the same
destination tensors with no parsing at all. Both run in turns in one process, so the ratio is side by side.
"""

from __future__ import annotations

import warnings

import torch

from r2m.client.wire import WireTensor, decode_binary, encode_binary, pack_request, tensor_from_json, tensor_to_json

from ._common import interleaved, row


def run(opts) -> dict:  # noqa: ANN001
    n, T, D = (4, 64, 256) if opts.quick else (16, 256, 2048)
    repeat = 5 if opts.quick else 30
    out: dict = {"shape": [n, T, D], "repeat": repeat, "rows": []}
    for dtype in (torch.bfloat16, torch.float16):
        tensors = [torch.randn(T, D).to(dtype) for _ in range(n)]
        items = [{"prompt": "p", "response": "r", "policy_hidden": t} for t in tensors]
        body = encode_binary(*pack_request({"items": items}))
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        dst = [torch.empty(T, D, dtype=dtype) for _ in range(n)]
        with warnings.catch_warnings():  # a read-only view of the body: only ever read, as the decoder's
            warnings.simplefilter("ignore", UserWarning)
            whole = torch.frombuffer(body, dtype=torch.uint8)
        per, start = T * D * 2, len(body) - nbytes
        src = [whole[start + i * per : start + (i + 1) * per] for i in range(n)]
        js = [tensor_to_json(WireTensor.from_array(t)) for t in tensors]

        def decode() -> None:
            _, ts = decode_binary(body)
            for i, t in enumerate(ts.values()):
                t.to_torch(out=dst[i])

        def memcpy() -> None:
            for s, d in zip(src, dst):
                d.view(-1).view(torch.uint8).copy_(s)

        def decode_json() -> None:
            for i, j in enumerate(js):
                tensor_from_json(j).to_torch(out=dst[i])

        t = interleaved({"decode": decode, "memcpy": memcpy}, repeat)
        t_json = interleaved({"json": decode_json}, max(2, repeat // 10))["json"]
        name = str(dtype).removeprefix("torch.")
        out[name] = {
            "bytes": nbytes,
            "binary_decode_GBps": nbytes / t["decode"] / 1e9,
            "memcpy_GBps": nbytes / t["memcpy"] / 1e9,
            "binary_vs_memcpy": t["memcpy"] / t["decode"],
            "json_base64_decode_GBps": nbytes / t_json / 1e9,
        }
        r = out[name]
        out["rows"].append(
            row(
                f"binary decode {name}, vs memcpy",
                r["binary_decode_GBps"],
                "GB/s",
                baseline=r["memcpy_GBps"],
                ratio=r["binary_vs_memcpy"],
                target=">= 0.5",
            )
        )
        out["rows"].append(
            row(
                f"JSON base64 decode {name}, vs memcpy",
                r["json_base64_decode_GBps"],
                "GB/s",
                baseline=r["memcpy_GBps"],
                ratio=r["json_base64_decode_GBps"] / r["memcpy_GBps"],
            )
        )
    return out
