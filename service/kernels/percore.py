"""Work split across the CPU cores so that a thread reads what it wrote itself: worker threads of one torch thread each.

The feedback attention widens half-precision hidden states a block at a time where the CPU lacks native half matmuls
(`widen.attend_blocks`). Left to torch's intra-op threads, the widening copy of a block is split across the cores,
while the two matmuls that read it right after are matrix-vector products that MKL runs on the calling thread alone,
so half of every block is read from the core that did not write it, and each of a dozen small ops per block wakes
the other thread. Here the blocks are shared out among worker threads, each widening its own blocks and running both
matmuls on them with one torch thread, so a block is read by the thread that wrote it (bench/README.md, section 2,
has the figures of both paths). Threads are not pinned to cores.

Each worker sets its thread count with OpenMP's own setter, which changes that thread only: torch's `set_num_threads`
would also store the count process-wide, for every thread that has not run a parallel op yet to adopt
(`one_thread_here`). Where that cannot be had the work runs in the caller, as before.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import queue
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = ["one_thread_here", "per_core"]

U = TypeVar("U")
R = TypeVar("R")

logger = logging.getLogger("r2m.percore")


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch's intra-op threads run on, as this process loaded it (GNU libgomp in the PyPI wheels,
    LLVM's libomp or libiomp5 in other builds); None where none is found."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for path in dict.fromkeys(re.findall(r"(/\S*/lib(?:gomp|omp|iomp5)[^/\s]*\.so[^/\s]*)$", maps, re.MULTILINE)):
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same library, not a second copy
        except OSError:
            continue
        if hasattr(lib, "omp_set_num_threads"):
            return lib
    return None


def one_thread_here() -> bool:
    """Put this thread on one OpenMP thread, leaving torch's process-wide count alone; whether it took.

    `torch.set_num_threads(1)` would also store 1 as the process-wide count, which every thread adopts at its first
    parallel op (`at::init_num_threads`, once per thread): a request thread starting then would run on one core for
    good. OpenMP's own setter changes this thread only, and MKL follows it (a worker's GEMM runs at one core's CPU
    time per wall second)."""
    torch.get_num_threads()  # this thread's one-time init from the process-wide count, first: it cannot undo the one
    omp = _openmp()
    if omp is None:
        return False
    omp.omp_set_num_threads(1)
    return torch.get_num_threads() == 1


class _Worker(threading.Thread):
    """One thread on one torch thread, running what it is given in order; share i of every call goes to worker i,
    so a worker keeps reading its own buffers."""

    def __init__(self, index: int, started: threading.Barrier) -> None:
        super().__init__(name=f"r2m-percore-{index}", daemon=True)  # idle between calls: nothing to finish at exit
        self._ready = started
        self._tasks: queue.SimpleQueue[tuple[Callable[[Any], Any], Any, Future[Any]] | None] = queue.SimpleQueue()
        self.one_thread = False

    def run(self) -> None:
        try:
            self.one_thread = one_thread_here()
        finally:
            try:
                self._ready.wait()
            except threading.BrokenBarrierError:
                return  # the start failed: this worker is not used
        while (task := self._tasks.get()) is not None:
            fn, arg, future = task
            try:
                result = fn(arg)
            except BaseException as exc:  # the caller raises it
                future.set_exception(exc)
            else:
                future.set_result(result)

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._tasks.put((fn, arg, future))
        return future

    def stop(self) -> None:
        self._tasks.put(None)


_lock = threading.Lock()
_workers: list[_Worker] = []
_unavailable = False  # the workers could not be started, or not on one thread each: not tried again


def _start(n: int) -> list[_Worker] | None:
    """The process's workers, `n` at least, each on one torch thread; None where that cannot be had (threads that
    cannot start, no OpenMP runtime found): the work then runs in the caller, as it would without them."""
    global _unavailable
    with _lock:
        if _unavailable:
            return None
        if len(_workers) < n:
            started = threading.Barrier(n - len(_workers) + 1, timeout=60)
            new = [_Worker(i, started) for i in range(len(_workers), n)]
            why = None
            try:
                for w in new:
                    w.start()
                started.wait()
            except (RuntimeError, threading.BrokenBarrierError) as exc:
                started.abort()  # the ones that started return
                why = str(exc) or type(exc).__name__
            else:
                if not all(w.one_thread for w in new):
                    why = "torch's OpenMP runtime not found, or its thread count not settable per thread"
                    for w in new:
                        w.stop()
            if why is not None:
                _unavailable = True
                logger.warning("no per-core workers (%s): the widened attention runs on torch's own threads", why)
                return None
            _workers.extend(new)
        return _workers[:n]


def _forget_after_fork() -> None:
    global _lock, _unavailable
    _lock, _unavailable = threading.Lock(), False
    _workers.clear()  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_after_fork)


def per_core(fn: Callable[[Sequence[U]], R], units: Sequence[U]) -> list[R]:
    """`fn` over contiguous shares of `units`, one share per core (as many as torch's intra-op threads here, at most
    one per unit), each in its own worker thread with one torch thread, under the caller's grad and inference modes.
    With one thread (or one unit) it runs here, as it is, on all the units.

    Returns what `fn` returned for each share, in the order of the shares, once every share is done; the error of the
    first share that raised one is raised here.
    """
    n = min(len(units), torch.get_num_threads())
    workers = _start(n) if n > 1 else None
    if workers is None:
        return [fn(units)]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def share(part: Sequence[U]) -> R:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(part)

    bounds = [len(units) * i // n for i in range(n + 1)]
    futures = [w.submit(share, units[a:b]) for w, a, b in zip(workers, bounds, bounds[1:])]
    wait(futures)
    return [f.result() for f in futures]
