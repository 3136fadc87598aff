"""Judges over HTTP: the retrying request loop (429 and 5xx with backoff honouring Retry-After), r2m's pairwise HTTP
protocol (`HTTPJudge`) and the client-side rate limit (`RateLimit`: requests and tokens per minute)."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from .base import FOREVER, PairJudge
from .verdicts import ABSTAINED, FAILED, Triple, Verdict, as_preference

log = logging.getLogger("r2m.judge")


class Requests:
    """POSTs with retries on connection errors, timeouts, 429 and 5xx: exponential backoff with jitter, a 429's or
    503's `Retry-After` honoured, never past the deadline. A 4xx other than 429 is not retried (the caller reads it)."""

    backoff_s = 0.5  # the first retry's base delay; doubles per retry
    max_backoff_s = 20.0

    def __init__(self, judge: PairJudge, timeout: float, retries: int, headers: dict[str, str] | None = None) -> None:
        self.judge = judge
        self.timeout = timeout
        self.retries = retries
        self.client = httpx.Client(timeout=timeout, headers=headers or {})
        self._jitter = random.Random()

    def post(self, url: str, body: dict[str, Any], deadline: float) -> tuple[httpx.Response | None, float]:
        """The answer (2xx, or a 4xx to read) and its seconds; (None, 0) when every try failed or time ran out."""
        for attempt in range(self.retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            started = time.monotonic()
            wait: float | None = None
            try:
                r = self.client.post(url, json=body, timeout=min(self.timeout, left))
            except httpx.HTTPError as exc:
                self.judge.count("error", time.monotonic() - started)
                log.warning("judge request to %s failed: %s: %s", url, type(exc).__name__, exc)
            else:
                seconds = time.monotonic() - started
                if r.status_code < 400 or (r.status_code < 500 and r.status_code != 429):
                    return r, seconds
                self.judge.count("rate_limited" if r.status_code == 429 else "error", seconds)
                log.warning("judge %s answered %d", url, r.status_code)
                wait = retry_after(r.headers.get("retry-after"))
            if attempt == self.retries:
                break
            delay = wait if wait is not None else self._backoff(attempt)
            if time.monotonic() + delay >= deadline:
                break
            time.sleep(delay)
        return None, 0.0

    def _backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * self._jitter.uniform(0.5, 1.0)

    def close(self) -> None:
        self.client.close()


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class HTTPJudge(PairJudge):
    """A judge behind r2m's pairwise HTTP protocol (module docstring): one POST per batch of pairs."""

    kind = "http"

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 3, concurrency: int = 8) -> None:
        super().__init__(concurrency)
        self.url = url
        self._http = Requests(self, timeout, retries)

    def judge(self, pairs: Sequence[Triple], deadline: float) -> list[Verdict]:
        if not pairs:
            return []
        body = {"pairs": [{"prompt": p, "response_a": a, "response_b": b} for p, a, b in pairs]}
        r, seconds = self._http.post(self.url, body, deadline)
        if r is None:
            return [FAILED] * len(pairs)
        if r.status_code >= 400:
            self.count("error", seconds)
            log.warning("judge %s answered %d: %s", self.url, r.status_code, r.text[:200])
            return [FAILED] * len(pairs)
        try:
            prefs = r.json().get("preferences")
        except (ValueError, AttributeError):
            prefs = None
        if not isinstance(prefs, list) or len(prefs) != len(pairs):
            self.count("garbage", seconds)
            log.warning("judge %s answered %r: expected %d preferences", self.url, r.text[:200], len(pairs))
            return [ABSTAINED] * len(pairs)
        self.count("ok", seconds)
        return [Verdict(as_preference(p)) for p in prefs]

    def batch(self, pairs: Sequence[Triple]) -> list[float]:
        """P(response_a is better) per pair (0.5 where the judge gave none); ValueError when the judge failed."""
        verdicts = self.judge(pairs, FOREVER)
        if any(v.failed for v in verdicts):
            raise ValueError(f"judge {self.url} did not answer")
        return [0.5 if v.preference is None else v.preference for v in verdicts]

    def __call__(self, prompt: str, a: str, b: str) -> float:
        return self.batch([(prompt, a, b)])[0]

    def close(self) -> None:
        self._http.close()


class RateLimit:
    """Requests and tokens per minute over a sliding 60 s window (0: no limit), shared by a judge's threads. A
    request's tokens are estimated before it is sent and settled from the answer's `usage`."""

    window_s = 60.0

    def __init__(self, rpm: int = 0, tpm: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.clock = clock
        self._log: deque[list[float]] = deque()  # [sent at, tokens]
        self._lock = threading.Lock()

    def acquire(self, tokens: int, deadline: float) -> list[float] | None:
        """A lease (pass it to `settle`), once the window has room; None when it would have none by `deadline`."""
        while True:
            with self._lock:
                now = self.clock()
                while self._log and self._log[0][0] <= now - self.window_s:
                    self._log.popleft()
                used = sum(e[1] for e in self._log)
                fits = (not self.rpm or len(self._log) < self.rpm) and (
                    not self.tpm or used + tokens <= self.tpm or not self._log
                )
                if fits:
                    lease = [now, float(tokens)]
                    self._log.append(lease)
                    return lease
                wait = self._log[0][0] + self.window_s - now
            if now + wait >= deadline:
                return None
            time.sleep(wait)

    def settle(self, lease: list[float], tokens: int) -> None:
        with self._lock:
            lease[1] = float(tokens)
