"""Feedback at the policy (the R2M paper's section 6.1): the feedback attention runs next to the policy, so `/score`
carries rm_dim numbers per response instead of the policy's T x D_policy hidden states.

    from r2m.client import R2MClient
    from r2m.trainer.local import LocalFeedbackClient

    rm = LocalFeedbackClient(R2MClient("http://rm-host:8000"), device="cuda")
    result = rm.score(prompts, responses, hidden=hidden, step=t, total_steps=T)   # as R2MClient.score

One scored batch is two round trips: `POST /embed` returns the reward model's embeddings e (and the head version
the replica serves), this class computes the read-outs `a = attention(e, h)` with that version's weights (fetched
once per version from `GET /heads/{v}?copy=serving`, the copy replicas score with) on `device`, and `POST /score`
sends them with that version. A replica that serves another version by then answers 409; the client fetches that
version and recomputes the read-outs from the same e and h, so every reward is computed by one head. Everything
else (`post_preferences`, `current_head`, ...) goes to the wrapped client as it is: the update path still needs the
refreshed hidden states.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from collections.abc import Sequence
from typing import Any

import torch

from r2m.client import R2MClient, ScoreResult, StaleHead
from r2m.service import precision
from r2m.service.engine import pad_hidden
from r2m.service.headcodec import head_from_bytes
from r2m.service.model import HeadConfig, R2MHead

__all__ = ["LocalFeedbackClient", "local_feedback_default"]

log = logging.getLogger("r2m.trainer.local")


def local_feedback_default(policy_device: torch.device | str) -> bool:
    """The default of the trainers' local-feedback setting: on where the policy runs on a GPU (the attention is a
    rounding error next to its forward there, and the network is what is scarce); off on a CPU, where the
    trainer's cores would do the server's work and one request becomes two."""
    return torch.device(policy_device).type == "cuda"


def _config_of(blob: bytes) -> HeadConfig:
    (n,) = struct.unpack("<Q", blob[:8])
    meta = json.loads(blob[8 : 8 + n]).get("__metadata__") or {}
    return HeadConfig(**json.loads(meta["config"]))


class LocalFeedbackClient:
    """`R2MClient.score` with the feedback attention computed here (module docstring).

    Args:
        client: the `R2MClient` to wrap (its retries, key and timeouts apply).
        device: where the read-outs are computed (the policy's device).
        max_stale_retries: how many 409s one call may meet (swaps in a row) before it raises `StaleHead`.
        chunk_rows: items per attention call (bounds the padded hidden-state batch on the device).
    """

    def __init__(
        self, client: R2MClient, device: torch.device | str = "cpu", max_stale_retries: int = 5, chunk_rows: int = 64
    ) -> None:
        self.client = client
        self.device = torch.device(device)
        self.max_stale_retries = max_stale_retries
        self.chunk_rows = chunk_rows
        self.stale_retries = 0  # 409s met so far (each a swap between /embed and /score, or across replicas)
        self.heads_fetched = 0
        self._heads: dict[int, R2MHead] = {}
        self._lock = threading.Lock()
        log.info("local feedback on %s; hidden states on the CPU: %s", self.device, precision.describe())

    def __getattr__(self, name: str) -> Any:  # post_preferences, current_head, close, ... as the wrapped client's
        return getattr(self.client, name)

    def __enter__(self) -> LocalFeedbackClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.client.close()

    def head(self, version: int) -> R2MHead:
        """Head `version` as the replicas serve it, on `device`: fetched once, the two latest kept."""
        with self._lock:
            head = self._heads.get(version)
            if head is not None:
                return head
        blob = self.client.head_weights(version, copy="serving")
        head = head_from_bytes(blob, _config_of(blob)).to(self.device).eval().requires_grad_(False)
        with self._lock:
            self._heads[version] = head
            for old in sorted(self._heads)[:-2]:
                del self._heads[old]
            self.heads_fetched += 1
        return head

    @torch.inference_mode()
    def readouts(self, version: int, e: torch.Tensor, hidden: Sequence[torch.Tensor | None]) -> list:
        """Read-outs `(rm_dim,)` float32 numpy arrays (None where `hidden` is None) of head `version`."""
        attention = self.head(version).attention
        out: list = [None] * len(hidden)
        rows = [i for i, h in enumerate(hidden) if h is not None]
        for start in range(0, len(rows), self.chunk_rows):
            idx = rows[start : start + self.chunk_rows]
            h, mask = pad_hidden([torch.as_tensor(hidden[i]).to(self.device) for i in idx], None, self.device)
            a = attention(e[idx].to(self.device), h, mask).float().cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = a[j]
        return out

    def score(
        self,
        prompts: str | Sequence[str],
        responses: Sequence[str],
        hidden: Sequence[Any | None] | None = None,
        *,
        step: int = 0,
        total_steps: int = 1,
        return_members: bool = False,
        **_: Any,
    ) -> ScoreResult:
        """As `R2MClient.score`; responses with hidden states get local read-outs. Prefix sharing does not apply
        (no hidden states travel)."""
        if hidden is None or all(h is None for h in hidden):
            return self.client.score(prompts, responses, step=step, total_steps=total_steps,
                                     return_members=return_members)  # fmt: skip
        emb = self.client.embed(prompts, responses)
        e = torch.from_numpy(emb.embeddings)
        version = emb.head_version
        for attempt in range(self.max_stale_retries + 1):
            readouts = self.readouts(version, e, list(hidden))
            try:
                return self.client.score(prompts, responses, readouts=readouts, head_version=version, step=step,
                                         total_steps=total_steps, return_members=return_members)  # fmt: skip
            except StaleHead as exc:
                if attempt == self.max_stale_retries:
                    raise
                self.stale_retries += 1
                log.info("head moved from %d to %d between /embed and /score; recomputing", version, exc.head_version)
                version = exc.head_version
        raise AssertionError("unreachable")
