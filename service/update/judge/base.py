"""What every judge kind shares (`PairJudge`: the bounded concurrency and the outcome counts) and the simplest kind,
a Python callable (`CallableJudge`)."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ...metrics import WorkerMetrics
from .verdicts import ABSTAINED, FAILED, Triple, Verdict, as_preference

log = logging.getLogger("r2m.judge")

T = TypeVar("T")
FOREVER = float("inf")  # a deadline that never comes (the trainer's own judging)


# --- the judges -------------------------------------------------------------------------------------------------


class PairJudge:
    """What the worker asks: `judge(pairs, deadline)` -> one `Verdict` per (prompt, response_a, response_b), by the
    `time.monotonic()` deadline. `metrics` (set by the `PairLabeller`) counts every request."""

    kind = "judge"
    model = ""
    both_orders = False

    def __init__(self, concurrency: int = 8) -> None:
        self.concurrency = concurrency
        self.metrics: WorkerMetrics | None = None

    def judge(self, pairs: Sequence[Triple], deadline: float) -> list[Verdict]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def count(self, outcome: str, seconds: float | None = None) -> None:
        if self.metrics is not None:
            self.metrics.judge_requests.labels(outcome).inc()
            if seconds is not None:
                self.metrics.judge_latency.observe(seconds)


def run_bounded(tasks: Sequence[Callable[[], T]], concurrency: int, deadline: float) -> list[T | None]:
    """Each task's result, at most `concurrency` running at once, None for those not done by `deadline`. The threads
    are daemons: a task still running at the deadline (a hung Python judge) is abandoned, and holds no exit up."""
    results: list[T | None] = [None] * len(tasks)
    done = [False] * len(tasks)
    todo: deque[int] = deque(range(len(tasks)))
    cond = threading.Condition()

    def work() -> None:
        while True:
            with cond:
                if not todo or time.monotonic() >= deadline:
                    return
                i = todo.popleft()
            try:
                result: T | None = tasks[i]()
            except Exception:  # noqa: BLE001 - a task that breaks is a failed one, and must not hang the wait
                log.exception("a judge task failed")
                result = None
            with cond:
                results[i], done[i] = result, True
                cond.notify_all()

    for n in range(min(concurrency, len(tasks))):
        threading.Thread(target=work, name=f"r2m-judge-{n}", daemon=True).start()
    with cond:
        cond.wait_for(
            lambda: all(done), timeout=None if deadline == FOREVER else max(0.0, deadline - time.monotonic())
        )
        return list(results)


class CallableJudge(PairJudge):
    """A Python judge (module docstring): called once per pair from up to `concurrency` threads, or, when it has a
    `batch` method, once per batch. An exception is a failure, an answer that is no probability an abstention."""

    kind = "callable"

    def __init__(self, fn: Any, concurrency: int = 8) -> None:
        super().__init__(concurrency)
        self.fn = fn
        self.model = callable_name(fn)

    def _call(self, call: Callable[[], Any]) -> tuple[Any, float | None]:
        """The judge's answer and its seconds; seconds None when it raised."""
        started = time.monotonic()
        try:
            out = call()
        except Exception as exc:  # noqa: BLE001 - a judge's failure is counted, never a label
            log.warning("judge %s failed: %s: %s", self.model, type(exc).__name__, exc)
            self.count("error", time.monotonic() - started)
            return None, None
        return out, time.monotonic() - started

    def _one(self, triple: Triple) -> Verdict:
        out, seconds = self._call(lambda: self.fn(*triple))
        if seconds is None:
            return FAILED
        p = as_preference(out)
        self.count("ok" if p is not None and p != 0.5 else "abstain" if p == 0.5 else "garbage", seconds)
        return Verdict(p)

    def judge(self, pairs: Sequence[Triple], deadline: float) -> list[Verdict]:
        if hasattr(self.fn, "batch"):
            answer = run_bounded([lambda: self._call(lambda: self.fn.batch(list(pairs)))], 1, deadline)[0]
            out, seconds = answer if answer is not None else (None, None)
            if seconds is None:
                return [FAILED] * len(pairs)
            if not isinstance(out, (list, tuple)) or len(out) != len(pairs):
                self.count("garbage", seconds)
                return [ABSTAINED] * len(pairs)
            self.count("ok", seconds)
            return [Verdict(as_preference(p)) for p in out]
        tasks: list[Callable[[], Verdict]] = [functools.partial(self._one, t) for t in pairs]
        verdicts = run_bounded(tasks, self.concurrency, deadline)
        return [v if v is not None else FAILED for v in verdicts]


def callable_name(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}:{name}"
