"""Work split across the CPU cores so that each core reads what it wrote itself: threads of one torch thread each.

The feedback attention widens half-precision hidden states a block at a time where the CPU lacks native half matmuls
(`model._attend_blocks`). Left to torch's intra-op threads, the widening copy of a block is split across the cores
one way and the two matmuls that read it right after are split another way, so much of a block is read by a core
that did not write it. On a 2-core AMD EPYC VM with AVX2 only (2026-12-05) the widened scores and pooling took
2.4-2.7 ms per item of 700 x 4096 bf16 rows against 0.6-0.85 ms for the same rows in float32, and 1.35-1.4 ms in
other hours of the same machine (the slow hours fit two vCPUs that share no cache; not verified). Here each worker
thread widens its own blocks and runs both matmuls on them with one torch thread (OpenMP's and MKL's thread counts are
per thread), so a block stays with the core that made it: 0.87-1.33 ms per item in the same runs, side by side with
the old path, and section 2's bf16 figure 1.1-1.4x float32 instead of 1.3-1.8x.

Torch's `set_num_threads` also stores a process-wide count that every thread adopts at its first parallel op
(`at::init_num_threads`): the workers take that first, then set one thread, and the caller restores the
process-wide count before any work runs, so that no other thread of the process inherits one thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from typing import Any, TypeVar

import torch

__all__ = ["per_core"]

U = TypeVar("U")

logger = logging.getLogger("r2m.percore")


class _Worker(threading.Thread):
    """One thread on one torch thread, running what it is given in order; share i of every call goes to worker i,
    so a worker keeps reading its own buffers."""

    def __init__(self, index: int, started: threading.Barrier) -> None:
        super().__init__(name=f"r2m-percore-{index}", daemon=True)  # idle between calls: nothing to finish at exit
        self._ready = started
        self._tasks: queue.SimpleQueue[tuple[Callable[[Any], None], Any, Future[None]]] = queue.SimpleQueue()

    def run(self) -> None:
        try:
            # A thread's first parallel op (or count query) sets its count from the process-wide one, once: done
            # first here, so that it cannot undo the one thread once the caller has restored the process-wide count.
            torch.get_num_threads()
            torch.set_num_threads(1)
        finally:
            self._ready.wait()
        while True:
            fn, arg, future = self._tasks.get()
            try:
                fn(arg)
            except BaseException as exc:  # the caller raises it
                future.set_exception(exc)
            else:
                future.set_result(None)

    def submit(self, fn: Callable[[Any], None], arg: Any) -> Future[None]:
        future: Future[None] = Future()
        self._tasks.put((fn, arg, future))
        return future


_lock = threading.Lock()
_workers: list[_Worker] = []
_unavailable = False  # threads could not be started once: not tried again


def _start(n: int) -> list[_Worker] | None:
    """The process's workers, `n` at least, each already on one torch thread; None where threads cannot be started
    (the work then runs in the caller, as it would without them)."""
    global _unavailable
    with _lock:
        if _unavailable:
            return None
        if len(_workers) < n:
            caller_threads = torch.get_num_threads()
            started = threading.Barrier(n - len(_workers) + 1, timeout=60)
            new = [_Worker(i, started) for i in range(len(_workers), n)]
            try:
                for w in new:
                    w.start()
                started.wait()  # all new ones set their one thread ...
            except (RuntimeError, threading.BrokenBarrierError) as exc:
                started.abort()  # a started one leaves its barrier and idles
                _unavailable = True
                logger.warning("no per-core workers (%s): the widened attention runs on torch's own threads", exc)
                return None
            finally:
                torch.set_num_threads(caller_threads)  # ... and the process-wide count is the caller's again
            _workers.extend(new)
        return _workers[:n]


def _forget_after_fork() -> None:
    global _lock, _unavailable
    _lock, _unavailable = threading.Lock(), False
    _workers.clear()  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_after_fork)


def per_core(fn: Callable[[Sequence[U]], None], units: Sequence[U]) -> None:
    """`fn` over contiguous shares of `units`, one share per core (as many as torch's intra-op threads here, at most
    one per unit), each in its own worker thread with one torch thread, under the caller's grad and inference modes.
    `fn` writes its results into tensors the caller made. With one thread (or one unit) it runs here, as it is.

    Returns when every share is done; the first error any share raised is raised here.
    """
    n = min(len(units), torch.get_num_threads())
    workers = _start(n) if n > 1 else None
    if workers is None:
        fn(units)
        return
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def share(part: Sequence[U]) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            fn(part)

    bounds = [len(units) * i // n for i in range(n + 1)]
    futures = [w.submit(share, units[a:b]) for w, a, b in zip(workers, bounds, bounds[1:])]
    wait(futures)
    for f in futures:
        f.result()
