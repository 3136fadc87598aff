"""A replica follows the head store: on each announcement (or on the catch-up timer) it loads the latest version,
checks its hash and config, and swaps it in. The batcher takes one head snapshot per batch, so the swap lands
between batches: no request is scored by two heads, and none waits for the swap.

Nothing of a swap runs on a request's path: the fetch, the hash, the decode and the finiteness check run on this
thread, on one torch thread (a busy second core is left to the batches), and what it loads is the serving copy, the
matrices a batch multiplies, so nothing is fused or built when the head is installed (a reference assignment)."""

from __future__ import annotations

import logging
import threading
import time

from .backoff import Backoff
from .engine import HeadVersion, ScoringEngine
from .headcodec import serving_from_bytes, sha256
from .headstore import HeadStore, StoreUnavailable
from .kernels.percore import one_thread_here
from .metrics import ServiceMetrics

__all__ = ["HeadSync"]

log = logging.getLogger("r2m.headsync")


class HeadSync:
    def __init__(
        self, engine: ScoringEngine, store: HeadStore, metrics: ServiceMetrics, model_name: str, poll_s: float
    ):
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.model_name = model_name
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="r2m-headsync", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop following the store; waits at most `timeout` seconds (default: a poll and then some)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 5 if timeout is None else timeout)

    def _run(self) -> None:
        # Each torch op of a load (widening, the finiteness check) on two OpenMP threads waits for the second core
        # whenever a batch holds it: 15 ms instead of 1 for a 3 MB head on a busy 2-core machine.
        one_thread_here()
        backoff = Backoff()
        seen: int | None = None  # the store's latest version as last observed here
        while not self._stop.is_set():
            try:
                latest = self.store.wait_for_change(seen, timeout=self.poll_s)
                backoff.reset()
            except StoreUnavailable as exc:
                log.warning("%s; serving head %d meanwhile", exc, self.engine.current.version)
                backoff.wait(self._stop)
                continue
            if latest == seen:
                continue  # the timer ran out with nothing new
            seen = latest
            if latest is None or latest == self.engine.current.version or latest in self.engine.bad_versions:
                continue
            try:
                if not self.load(latest):
                    seen = None  # look again: it may have been pruned for a newer one
            except StoreUnavailable as exc:
                log.warning("%s; serving head %d meanwhile", exc, self.engine.current.version)
                seen = None
            except Exception:  # noqa: BLE001 - the replica keeps serving its current head
                log.exception("loading head %s failed; serving head %d meanwhile", latest, self.engine.current.version)
                seen = None
                backoff.wait(self._stop)

    def load(self, version: int) -> bool:
        """Fetch, verify and swap in `version`; False (and the current head kept) when it does not fit.

        The phases are timed (`r2m_head_swap_phase_seconds{phase}`, and the served version's `served_swap_ms` in
        `GET /heads/current`): notice (publication to the start of this load: the pub/sub trip or the catch-up
        timer), fetch (meta and serving copy from the store), hash, load (decode, config and finiteness checks) and
        install (the swap itself)."""
        started, now = time.perf_counter(), time.time()
        phases: dict[str, float] = {}
        meta = self.store.meta(version)
        if meta is None:
            return False  # pruned meanwhile; a newer one is announced
        if meta.get("created"):
            phases["notice"] = max(0.0, now - float(meta["created"]))
        # The serving copy when the publisher made one; the float32 master otherwise (fused here, once).
        serving = "serving_sha256" in meta
        blob = self.store.serving(version) if serving else self.store.weights(version)
        if blob is None:
            return False
        mark = time.perf_counter()
        phases["fetch"] = mark - started
        expected = self.engine.head_config.to_dict()
        problem = None
        digest = sha256(blob)
        phases["hash"] = time.perf_counter() - mark
        mark = time.perf_counter()
        if digest != meta.get("serving_sha256" if serving else "sha256"):
            problem = "content hash mismatch"
        elif meta.get("config") != expected:
            problem = f"head config {meta.get('config')} differs from this replica's {expected}"
        elif meta.get("model") not in (None, self.model_name):
            problem = f"trained for model {meta.get('model')!r}, this replica serves {self.model_name!r}"
        if problem is None:
            try:
                head = serving_from_bytes(blob, self.engine.head_config)
            except ValueError as exc:
                problem = str(exc)
            else:
                if not head.is_finite():
                    problem = "its weights hold NaN or Inf"
        if problem is not None:
            log.error("not swapping to head version %d: %s", version, problem)
            self.metrics.head_load_failures.inc()
            self.engine.bad_versions.add(version)
            return False
        phases["load"] = time.perf_counter() - mark
        mark = time.perf_counter()
        # The phases so far go in before the install, so that whoever sees the new version sees them too.
        so_far = {k: round(1000 * v, 3) for k, v in phases.items()}
        new = HeadVersion(version=version, head=head, meta=meta, swap_ms=so_far)
        self.engine.swap(new)
        phases["install"] = time.perf_counter() - mark
        new.swap_ms["install"] = round(1000 * phases["install"], 3)
        for phase, seconds in phases.items():
            self.metrics.head_swap_phase_seconds.labels(phase).observe(seconds)
        self.metrics.head_version.set(version)
        self.metrics.head_swaps.inc()
        self.metrics.head_swap_seconds.observe(time.perf_counter() - started)
        if meta.get("created"):
            self.metrics.head_swap_latency.observe(max(0.0, time.time() - float(meta["created"])))
        log.info("serving head version %d (%.1f ms to load: %s)", version, 1000 * (time.perf_counter() - started),
                 ", ".join(f"{k} {v:.1f} ms" for k, v in new.swap_ms.items()))  # fmt: skip
        return True
