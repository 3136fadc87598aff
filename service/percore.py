"""Work split across the CPU cores so that each core reads what it wrote itself: threads of one torch thread each.

The feedback attention widens half-precision hidden states a block at a time where the CPU lacks native half matmuls
(`model._attend_blocks`). Left to torch's intra-op threads, the widening copy of a block is split across the cores
one way and the two matmuls that read it right after are split another way, so much of a block is read by a core
that did not write it. On a 2-core AMD EPYC VM with AVX2 only (2026-12-05) the widened scores and pooling took
2.5-2.7 ms per item of 700 x 4096 bf16 rows against 0.6-0.85 ms for the same rows in float32, and 1.35-1.4 ms in
other hours of the same machine (the slow hours fit two vCPUs that share no cache; not verified). Here each worker
thread widens its own blocks and runs both matmuls on them with one torch thread (OpenMP's and MKL's thread counts are
per thread), so a block stays with the core that made it: 0.87-0.95 ms per item in the same runs, and section 2's
bf16 figure 1.1-1.3x float32 instead of 1.3-1.8x.

Torch's `set_num_threads` also stores a process-wide count that every thread adopts at its first parallel op
(`at::init_num_threads`): the pool's workers take that first, then set one thread, and the caller restores the
process-wide count before any work runs, so that no other thread of the process inherits one thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

__all__ = ["per_core"]

U = TypeVar("U")

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_size = 0


def _one_torch_thread(started: threading.Barrier) -> None:
    # A thread's first parallel op (or count query) sets its count from the process-wide one, once: done first here,
    # so that it cannot undo the one thread later, once the caller has restored the process-wide count.
    torch.get_num_threads()
    torch.set_num_threads(1)
    started.wait()


def _workers(n: int) -> ThreadPoolExecutor:
    """The process's pool, with `n` workers at least, each already on one torch thread."""
    global _pool, _size
    with _lock:
        if _pool is None or _size < n:
            caller_threads = torch.get_num_threads()
            started = threading.Barrier(n + 1)
            pool = ThreadPoolExecutor(
                n, thread_name_prefix="r2m-percore", initializer=_one_torch_thread, initargs=(started,)
            )
            for _ in range(n):  # every thread starts now (an idle one would be reused, none is idle yet)
                pool.submit(int)
            started.wait()  # all n set their one thread ...
            torch.set_num_threads(caller_threads)  # ... and the process-wide count is the caller's again
            if _pool is not None:
                _pool.shutdown(wait=False)  # its queued work still runs
            _pool, _size = pool, n
        return _pool


def _forget_after_fork() -> None:
    global _pool, _size
    _pool, _size = None, 0  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_after_fork)


def per_core(fn: Callable[[Sequence[U]], None], units: Sequence[U]) -> None:
    """`fn` over contiguous shares of `units`, one share per core (as many as torch's intra-op threads here, at most
    one per unit), each in its own worker thread with one torch thread, under the caller's grad and inference modes.
    `fn` writes its results into tensors the caller made. With one thread (or one unit) it runs here, as it is.

    Returns when every share is done; the first error any share raised is raised here.
    """
    n = min(len(units), torch.get_num_threads())
    if n <= 1:
        fn(units)
        return
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def share(part: Sequence[U]) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            fn(part)

    pool = _workers(n)
    bounds = [len(units) * i // n for i in range(n + 1)]
    futures = [pool.submit(share, units[a:b]) for a, b in zip(bounds, bounds[1:])]
    wait(futures)
    for f in futures:
        f.result()
