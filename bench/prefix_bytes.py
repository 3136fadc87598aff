"""Bytes on the wire per scored response, with and without prompt-prefix sharing (issue 8, item 3).

The request bodies are built by the client's own planner and encoder (`R2MClient._plan_score`, `_score_body`), so
the figures are what `R2MClient.score(...)` really sends: binary (safetensors) and JSON (base64), for groups of
K = 4 and K = 8 responses of one prompt, each full sequence = prompt rows + response rows of bf16 hidden states.

Run alone: `.venv/bin/python -m bench.prefix_bytes [--quick]` (prints JSON); `python -m bench` calls `run`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from r2m.client import R2MClient

__all__ = ["run"]

FULL = {"prompt_rows": 192, "response_rows": 64, "policy_dim": 2048}
QUICK = {"prompt_rows": 12, "response_rows": 4, "policy_dim": 32}


def _group(k: int, prompt_rows: int, response_rows: int, policy_dim: int, seed: int = 0) -> list[torch.Tensor]:
    """K full sequences of a causal policy: the same prompt rows, then each response's own rows (bf16)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randn(prompt_rows, policy_dim, generator=g)
    rows = [torch.cat([prompt, torch.randn(response_rows, policy_dim, generator=g)]) for _ in range(k)]
    return [r.to(torch.bfloat16) for r in rows]


def _body_bytes(client: R2MClient, hidden: list[torch.Tensor], share: bool) -> int:
    k = len(hidden)
    chunks = client._plan_score("Summarise the text below.", [f"response {j}" for j in range(k)], hidden, share)
    assert len(chunks) == 1, "one group fits one request"
    body = client._score_body(chunks[0], 10, 100)
    if "content" in body:
        return len(body["content"])
    return len(json.dumps(body["json"], separators=(",", ":")).encode())  # what httpx sends for json=


def run(quick: bool) -> dict[str, Any]:
    """Bytes per scored response for K = 4 and 8, binary and JSON, with and without sharing.

    Returns:
        `{"shape": {...}, "rows": [{"k", "encoding", "bytes_per_response_full", "bytes_per_response_shared",
        "prompt_bytes_per_response", "saving_of_prompt_part", "metadata_overhead_bytes", "target", "met"}, ...]}`;
        the saving is
        `(full - shared) / (K x prompt part)` with the prompt part as encoded (x 4/3 for base64), the target
        `(K - 1) / K`.
    """
    shape = QUICK if quick else FULL
    rows = []
    for k in (4, 8):
        hidden = _group(k, **shape)
        for encoding in ("binary", "json"):
            client = R2MClient("http://127.0.0.1:1", encoding=encoding)
            full = _body_bytes(client, hidden, share=False)
            shared = _body_bytes(client, hidden, share=True)
            client.close()
            prompt_part = shape["prompt_rows"] * shape["policy_dim"] * 2 * (4 / 3 if encoding == "json" else 1)
            saving = (full - shared) / (k * prompt_part)
            target = (k - 1) / k
            rows.append(
                {
                    "k": k,
                    "encoding": encoding,
                    "bytes_per_response_full": full / k,
                    "bytes_per_response_shared": shared / k,
                    "prompt_bytes_per_response": prompt_part,
                    "saving_of_prompt_part": saving,
                    # The few bytes of JSON a shared request adds (`"prefixes"`, each item's `"prefix": i`): the
                    # only reason the saving falls short of exactly (K - 1) / K at full size.
                    "metadata_overhead_bytes": (k - 1) * prompt_part - (full - shared),
                    "target": target,
                    "met": saving >= target - 1e-3,  # met up to that overhead (1e-3 of the prompt part)
                }
            )
    return {"shape": {**shape, "dtype": "bfloat16"}, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    print(json.dumps(run(parser.parse_args().quick), indent=2))


if __name__ == "__main__":
    main()
