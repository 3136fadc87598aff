"""Feedback at the policy (the R2M paper's section 6.1): the feedback attention runs next to the policy, so no
hidden states cross the network: the scoring path carries texts out and rm_dim numbers back.

    from r2m.client import R2MClient
    from r2m.trainer.local import LocalFeedbackClient

    rm = LocalFeedbackClient(R2MClient("http://rm-host:8000"), device="cuda")
    result = rm.score(prompts, responses, hidden=hidden, step=t, total_steps=T)   # as R2MClient.score

`POST /embed` returns the reward model's embeddings e and the head version v the replica serves. This class
computes the read-outs `a = attention(e, h)` with v's weights (fetched once per version from
`GET /heads/{v}?copy=serving`, the copy replicas score with) on `device`, then, by default (`rewards_on="policy"`),
the rewards with v's score layer: the server's own functions (`scoring.score_rte`, and `scoring.Scores.of` for an
ensemble, aggregated as `/info` says), so one scored batch is one round trip and every reward is computed by one
head. Where that cannot finish (v no longer kept, or a reward that is not finite), and always with
`rewards_on="server"`, `POST /score` gets the read-outs with v: a replica that serves another version by then
answers 409, and the client fetches that version and recomputes the read-outs from the same e and h; a non-finite
reward gets the server's handling (the previous head). Everything else (`post_preferences`, `current_head`, ...)
goes to the wrapped client as it is: the update path still needs the refreshed hidden states.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from collections.abc import Sequence
from typing import Any, Literal

import torch

from r2m.client import InvalidRequest, R2MClient, ScoreResult, StaleHead
from r2m.service.headcodec import serving_from_bytes
from r2m.service.kernels import precision
from r2m.service.model import HeadConfig, R2MHead, omega
from r2m.service.scoring import Scores, pad_hidden, score_rte

__all__ = ["LocalFeedbackClient", "local_feedback_default"]

log = logging.getLogger("r2m.trainer.local")


def local_feedback_default(policy_device: torch.device | str) -> bool:
    """The default of the trainers' local-feedback setting: on where the policy runs on a GPU (the attention is a
    rounding error next to its forward there, and the network is what is scarce); off on a CPU, where the
    trainer's cores would do the server's work."""
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
        rewards_on: "policy": rewards computed here from e and the read-outs (one round trip); "server": the
            read-outs go to `/score` (two round trips; the server computes every reward).
    """

    def __init__(
        self,
        client: R2MClient,
        device: torch.device | str = "cpu",
        max_stale_retries: int = 5,
        chunk_rows: int = 64,
        rewards_on: Literal["policy", "server"] = "policy",
    ) -> None:
        if rewards_on not in ("policy", "server"):
            raise ValueError(f"rewards_on must be 'policy' or 'server', got {rewards_on!r}")
        self.client = client
        self.device = torch.device(device)
        self.max_stale_retries = max_stale_retries
        self.chunk_rows = chunk_rows
        self.rewards_on = rewards_on
        self.stale_retries = 0  # 409s met so far (each a swap between /embed and /score, or across replicas)
        self.heads_fetched = 0
        self.server_finished = 0  # calls rewards_on="policy" handed to /score (head gone, or a non-finite reward)
        self._scoring: dict[str, Any] | None = None  # omega_floor, aggregation, uwo_lambda from /info, per head
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
        head = serving_from_bytes(blob, _config_of(blob)).to(self.device).eval().requires_grad_(False)
        with self._lock:
            self._heads[version] = head
            for old in sorted(self._heads)[:-2]:
                del self._heads[old]
            self.heads_fetched += 1
            self._scoring = None  # read /info again with the new head (a redeployed server may set them anew)
        return head

    def readouts(
        self, version: int, e: torch.Tensor, hidden: Sequence[torch.Tensor | None], head: R2MHead | None = None
    ) -> list:
        """Read-outs `(rm_dim,)` float32 numpy arrays (None where `hidden` is None) of head `version` (`head`, when
        the caller holds it already)."""
        rows, a = self._attend(head or self.head(version), e, hidden)
        out: list = [None] * len(hidden)
        for i, row in zip(rows, a.cpu().numpy()):
            out[i] = row
        return out

    @torch.inference_mode()
    def _attend(self, head: R2MHead, e: torch.Tensor, hidden: Sequence[Any | None]) -> tuple[list[int], torch.Tensor]:
        """The items with hidden states and their read-outs `(n, rm_dim)`, float32 on `device`, `chunk_rows` items
        per attention call."""
        rows = [i for i, h in enumerate(hidden) if h is not None]
        parts = [torch.empty(0, e.shape[1], device=self.device)]
        for start in range(0, len(rows), self.chunk_rows):
            idx = rows[start : start + self.chunk_rows]
            h, mask = pad_hidden([torch.as_tensor(hidden[i]).to(self.device) for i in idx], None, self.device)
            parts.append(head.attention(e[idx].to(self.device), h, mask).float())
        return rows, torch.cat(parts)

    def score(
        self,
        prompts: str | Sequence[str],
        responses: Sequence[str],
        hidden: Sequence[Any | None] | None = None,
        *,
        step: int = 0,
        total_steps: int = 1,
        return_members: bool = False,
        head_version: int | None = None,
        **_: Any,
    ) -> ScoreResult:
        """As `R2MClient.score`; responses with hidden states get local read-outs. Prefix sharing does not apply
        (no hidden states travel). `head_version`: score with that head only; one the store no longer keeps, or a
        replica that serves another where the server finishes the call, raises `StaleHead`."""
        if hidden is None or all(h is None for h in hidden):
            pin: dict[str, Any] = {} if head_version is None else {"head_version": head_version}
            return self.client.score(prompts, responses, step=step, total_steps=total_steps,
                                     return_members=return_members, **pin)  # fmt: skip
        try:
            omega(step, total_steps, 0.0)  # a bad step is the caller's error, before any request
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        emb = self.client.embed(prompts, responses)
        e = torch.from_numpy(emb.embeddings)
        version = emb.head_version if head_version is None else head_version
        if self.rewards_on == "policy":
            try:
                done = self._finish_here(version, e, list(hidden), step, total_steps, return_members)
            except InvalidRequest as exc:
                if exc.status_code != 404:
                    raise
                if head_version is not None:
                    served = int(self.client.current_head()["served_version"])
                    raise StaleHead(f"head {head_version} is no longer kept", head_version=served) from exc
                # Version v left the store between /embed and the download (heads moving faster than
                # R2M_HEAD_KEEP): the server finishes with the version it serves now (a 409 there is retried below).
                log.info("head %d could not be fetched (%s); the server finishes this call", version, exc)
                version, done = int(self.client.current_head()["served_version"]), None
            if done is not None:
                return done
            with self._lock:
                self.server_finished += 1
        for attempt in range(self.max_stale_retries + 1):
            readouts = self.readouts(version, e, list(hidden))
            try:
                return self.client.score(prompts, responses, readouts=readouts, head_version=version, step=step,
                                         total_steps=total_steps, return_members=return_members)  # fmt: skip
            except StaleHead as exc:
                if attempt == self.max_stale_retries or head_version is not None:
                    raise
                with self._lock:
                    self.stale_retries += 1
                log.info("head moved from %d to %d between /embed and /score; recomputing", version, exc.head_version)
                version = exc.head_version
        raise AssertionError("unreachable")

    def _scoring_settings(self) -> dict[str, Any] | None:
        """/info's omega_floor, aggregation and uwo_lambda; None from a server too old to name them."""
        scoring = self._scoring  # read once: head() may reset it from another thread
        if scoring is None:
            info = self.client.info()
            scoring = self._scoring = {k: info.get(k) for k in ("omega_floor", "aggregation", "uwo_lambda")}
        return None if None in scoring.values() else scoring

    @torch.inference_mode()
    def _finish_here(
        self, version: int, e: torch.Tensor, hidden: list, step: int, total_steps: int, return_members: bool
    ) -> ScoreResult | None:
        """The rewards of head `version` computed here as a replica computes them, or None where the server must: a
        reward that is not finite (the server answers with its previous head), or a server whose /info does not say
        how it aggregates. InvalidRequest (404) when the version is no longer kept."""
        head = self.head(version)
        scoring = self._scoring_settings()
        if scoring is None:
            log.info("the server's /info names no aggregation (an older r2m); the server finishes this call")
            return None
        w = omega(step, total_steps, scoring["omega_floor"])
        n = len(hidden)
        rows, a = self._attend(head, e, hidden)  # kept on `device`: the rewards are computed there too
        readouts: list[torch.Tensor | None] = [None] * n
        for j, i in enumerate(rows):
            readouts[i] = a[j]
        weights = [w if r is not None else 1.0 for r in readouts]
        out = score_rte(head, e.to(self.device), [None] * n, weights, readouts=readouts).float().cpu()
        if not bool(torch.isfinite(out).all()):  # every member's, as the replica checks before aggregating
            log.warning("head %d gave a non-finite reward here; the server finishes this call", version)
            return None
        rewards, uncertainty, members = Scores.of(out, scoring["aggregation"], scoring["uwo_lambda"]).lists()
        return ScoreResult(rewards, version, [version] * n, w, uncertainty, members if return_members else None)
