"""The outside judge of the R2M update: which pairs of a batch's groups it is asked about, and the three kinds of
judge that answer (docs/judge.md).

The paper's in-group pseudo-labels are the reward model's own: they sharpen what it already prefers, blind spots
included. A judge brings a label from outside. For every preference batch the worker recomputes each group's rewards
with the current head, picks `R2M_JUDGE_PAIRS` pairs (`choose_pairs`: each picked group's best- against its
worst-scored response, the pair the pseudo-label loss would train on, then other pairs of the same groups), asks the
judge, and trains the labelled pairs (Bradley-Terry) with the refreshed hidden states the groups carried.

    R2M_JUDGE=openai:http://vllm-host:8000/v1 R2M_JUDGE_MODEL=Qwen/Qwen2.5-7B-Instruct r2m serve
    R2M_JUDGE=http://judge-host:9000/judge r2m worker
    R2M_JUDGE=my_pkg.judges:compare r2m worker

Kinds (`load_judge`):
- `openai:<base_url>` (`OpenAIJudge`): an OpenAI-compatible chat-completions endpoint. A pairwise prompt from a
  template, each pair asked in both orders (orders that disagree abstain), the verdict from the letters'
  log-probabilities when the server returns them, else parsed from the text (`verdict_from_text`).
- `http(s)://...` (`HTTPJudge`): one POST per batch, `{"pairs": [{"prompt", "response_a", "response_b"}, ...]}`,
  answered `{"preferences": [p, ...]}`, one P(response_a is better) per pair (or 0/1, true/false).
- `module:function`, or any object passed in (`CallableJudge`): `f(prompt, response_a, response_b) -> bool | float`,
  True or a probability > 0.5 when `response_a` is better; exactly 0.5 abstains. An object with
  `batch(triples) -> list[float]` is asked a whole batch at once.

A verdict is P(response_a is better). A judge that fails (refused connection, timeout, 5xx or 429 after the
retries, the update's deadline) gives no verdict: never a label. An answer that holds no verdict is an abstention.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import math
import random
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar

import httpx
import torch
from pydantic import ValidationError

from ..config import ServiceSettings
from ..metrics import WorkerMetrics

__all__ = [
    "DEFAULT_TEMPLATE",
    "CallableJudge",
    "HTTPJudge",
    "Judge",
    "JudgeReport",
    "OpenAIJudge",
    "PairJudge",
    "PairLabeller",
    "RateLimit",
    "Verdict",
    "as_judge",
    "build_judge",
    "choose_pairs",
    "judge_info",
    "label_pairs",
    "load_judge",
    "load_template",
    "verdict_from_logprobs",
    "verdict_from_text",
]

log = logging.getLogger("r2m.judge")

Judge = Callable[[str, str, str], "bool | float"]  # a Python judge
Triple = tuple[str, str, str]  # (prompt, response_a, response_b)
T = TypeVar("T")

PLACEHOLDERS = ("{prompt}", "{response_a}", "{response_b}")
DEFAULT_TEMPLATE = files("r2m.service.assets").joinpath("judge_pairwise.txt").read_text(encoding="utf-8")
_FOREVER = float("inf")


# --- pair choice ------------------------------------------------------------------------------------------------


def choose_pairs(
    rewards: Sequence[float], groups: int | Sequence[range], budget: int, generator: torch.Generator
) -> list[tuple[int, int]]:
    """Up to `budget` distinct pairs of indices `(i, j)` into `rewards`, both of one group: first each picked group's
    best- against its worst-scored response (groups picked at random without replacement), then other pairs of the
    same groups at random. `groups`: the index ranges of the groups, or one group size K (groups of K consecutive
    rewards)."""
    if isinstance(groups, int):
        groups = [range(g * groups, (g + 1) * groups) for g in range(len(rewards) // groups)]
    order = torch.randperm(len(groups), generator=generator).tolist()
    chosen: list[tuple[int, int]] = []
    for g in order[:budget]:
        rows = groups[g]
        best = max(rows, key=lambda r: rewards[r])
        worst = min(rows, key=lambda r: rewards[r])
        if best != worst:
            chosen.append((best, worst))
    if len(chosen) < budget:
        taken = {tuple(sorted(p)) for p in chosen}
        rest = [(a, b) for rows in groups for a in rows for b in rows if a < b and (a, b) not in taken]
        for k in torch.randperm(len(rest), generator=generator).tolist()[: budget - len(chosen)]:
            chosen.append(rest[k])
    return chosen


# --- verdicts ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One pair's answer: `preference` = P(response_a is better), None when there is no label; `failed` when the
    judge gave no answer at all (asking again may get one), as opposed to an abstention."""

    preference: float | None
    failed: bool = False
    disagreed: bool = False  # both orders asked, opposite verdicts

    @property
    def label(self) -> bool | None:
        """True: response_a is better; False: response_b; None: no label."""
        if self.preference is None or self.preference == 0.5:
            return None
        return self.preference > 0.5


FAILED = Verdict(None, failed=True)
ABSTAINED = Verdict(None)


def _as_preference(value: Any) -> float | None:
    """A Python or HTTP judge's answer as P(a is better); None when it is not one (garbage)."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0:
        return float(value)
    return None


_BRACKETED = re.compile(r"\[\[\s*([AB])\s*\]\]")
_LEADING = re.compile(
    r"^(?i:(?:the\s+)?(?:better\s+)?(?:answer|verdict|choice|winner|response|output)?\s*(?:is)?\s*[:\-]?\s*)"
    r"(?i:(?:response|output|assistant)\s*)?[\[(<\"'{]*\s*([AB])(?![A-Za-z0-9])"
)


def verdict_from_text(text: str) -> float | None:
    """1.0 when the judge's text names A, 0.0 for B, None when it names neither (garbage). Accepted: "A", "B.",
    "Response A", "[[A]]" (anywhere), "(B)", "**A**", "Answer: A", "The better response is B", a lone "a"."""
    cleaned = re.sub(r"[*#`_]", "", text).strip()
    m = _BRACKETED.search(cleaned) or _LEADING.match(cleaned)
    if m is None and cleaned.rstrip(".") in ("a", "b"):
        return 1.0 if cleaned.startswith("a") else 0.0
    if m is None:
        return None
    return 1.0 if m.group(1) == "A" else 0.0


def verdict_from_logprobs(content: Any) -> float | None:
    """P(A) / (P(A) + P(B)) at the first completion token whose top candidates include the letter A or B (as
    OpenAI's `choices[0].logprobs.content` gives them); None when no token has either."""
    if not isinstance(content, list):
        return None
    for token in content:
        if not isinstance(token, dict):
            return None
        candidates = list(token.get("top_logprobs") or []) + [token]
        mass = {"A": 0.0, "B": 0.0}
        seen: set[str] = set()
        for c in candidates:
            text, lp = c.get("token"), c.get("logprob")
            if not isinstance(text, str) or not isinstance(lp, (int, float)) or text in seen:
                continue
            seen.add(text)
            letter = text.strip().strip("[]()*\"'")
            if letter in mass:
                mass[letter] += math.exp(lp)
        total = mass["A"] + mass["B"]
        if total > 0:
            return mass["A"] / total
    return None


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

    def _count(self, outcome: str, seconds: float | None = None) -> None:
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
            lambda: all(done), timeout=None if deadline == _FOREVER else max(0.0, deadline - time.monotonic())
        )
        return list(results)


class CallableJudge(PairJudge):
    """A Python judge (module docstring): called once per pair from up to `concurrency` threads, or, when it has a
    `batch` method, once per batch. An exception is a failure, an answer that is no probability an abstention."""

    kind = "callable"

    def __init__(self, fn: Any, concurrency: int = 8) -> None:
        super().__init__(concurrency)
        self.fn = fn
        self.model = _callable_name(fn)

    def _call(self, call: Callable[[], Any]) -> tuple[Any, float | None]:
        """The judge's answer and its seconds; seconds None when it raised."""
        started = time.monotonic()
        try:
            out = call()
        except Exception as exc:  # noqa: BLE001 - a judge's failure is counted, never a label
            log.warning("judge %s failed: %s: %s", self.model, type(exc).__name__, exc)
            self._count("error", time.monotonic() - started)
            return None, None
        return out, time.monotonic() - started

    def _one(self, triple: Triple) -> Verdict:
        out, seconds = self._call(lambda: self.fn(*triple))
        if seconds is None:
            return FAILED
        p = _as_preference(out)
        self._count("ok" if p is not None and p != 0.5 else "abstain" if p == 0.5 else "garbage", seconds)
        return Verdict(p)

    def judge(self, pairs: Sequence[Triple], deadline: float) -> list[Verdict]:
        if hasattr(self.fn, "batch"):
            answer = run_bounded([lambda: self._call(lambda: self.fn.batch(list(pairs)))], 1, deadline)[0]
            out, seconds = answer if answer is not None else (None, None)
            if seconds is None:
                return [FAILED] * len(pairs)
            if not isinstance(out, (list, tuple)) or len(out) != len(pairs):
                self._count("garbage", seconds)
                return [ABSTAINED] * len(pairs)
            self._count("ok", seconds)
            return [Verdict(_as_preference(p)) for p in out]
        tasks: list[Callable[[], Verdict]] = [functools.partial(self._one, t) for t in pairs]
        verdicts = run_bounded(tasks, self.concurrency, deadline)
        return [v if v is not None else FAILED for v in verdicts]


def _callable_name(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}:{name}"


class _Requests:
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
                self.judge._count("error", time.monotonic() - started)
                log.warning("judge request to %s failed: %s: %s", url, type(exc).__name__, exc)
            else:
                seconds = time.monotonic() - started
                if r.status_code < 400 or (r.status_code < 500 and r.status_code != 429):
                    return r, seconds
                self.judge._count("rate_limited" if r.status_code == 429 else "error", seconds)
                log.warning("judge %s answered %d", url, r.status_code)
                wait = _retry_after(r.headers.get("retry-after"))
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


def _retry_after(value: str | None) -> float | None:
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
        self._http = _Requests(self, timeout, retries)

    def judge(self, pairs: Sequence[Triple], deadline: float) -> list[Verdict]:
        if not pairs:
            return []
        body = {"pairs": [{"prompt": p, "response_a": a, "response_b": b} for p, a, b in pairs]}
        r, seconds = self._http.post(self.url, body, deadline)
        if r is None:
            return [FAILED] * len(pairs)
        if r.status_code >= 400:
            self._count("error", seconds)
            log.warning("judge %s answered %d: %s", self.url, r.status_code, r.text[:200])
            return [FAILED] * len(pairs)
        try:
            prefs = r.json().get("preferences")
        except (ValueError, AttributeError):
            prefs = None
        if not isinstance(prefs, list) or len(prefs) != len(pairs):
            self._count("garbage", seconds)
            log.warning("judge %s answered %r: expected %d preferences", self.url, r.text[:200], len(pairs))
            return [ABSTAINED] * len(pairs)
        self._count("ok", seconds)
        return [Verdict(_as_preference(p)) for p in prefs]

    def batch(self, pairs: Sequence[Triple]) -> list[float]:
        """P(response_a is better) per pair (0.5 where the judge gave none); ValueError when the judge failed."""
        verdicts = self.judge(pairs, _FOREVER)
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


def load_template(path: str | None) -> str:
    """The pairwise prompt: the file at `path` (R2M_JUDGE_TEMPLATE), else the one shipped with r2m."""
    if path is None:
        return DEFAULT_TEMPLATE
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"R2M_JUDGE_TEMPLATE={path!r}: cannot read it ({exc.strerror or exc})") from None
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise ValueError(f"R2M_JUDGE_TEMPLATE={path!r}: the template lacks {', '.join(missing)}")
    return text


def render(template: str, prompt: str, a: str, b: str) -> str:
    """The template with its placeholders filled in one pass (a response that contains "{prompt}" stays as it is)."""
    values = {"{prompt}": prompt, "{response_a}": a, "{response_b}": b}
    return re.sub(r"\{prompt\}|\{response_a\}|\{response_b\}", lambda m: values[m.group(0)], template)


class OpenAIJudge(PairJudge):
    """An LLM judge over the OpenAI chat-completions API (module docstring). One request per pair and order,
    `concurrency` in flight, within `rpm`/`tpm`; temperature 0, `max_tokens` completion tokens, log-probabilities
    asked for (a server that refuses them is asked without from then on)."""

    kind = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        template: str = DEFAULT_TEMPLATE,
        both_orders: bool = True,
        max_tokens: int = 4,
        timeout: float = 30.0,
        retries: int = 3,
        rpm: int = 0,
        tpm: int = 0,
        concurrency: int = 8,
    ) -> None:
        super().__init__(concurrency)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.template = template
        self.both_orders = both_orders
        self.max_tokens = max_tokens
        self.limit = RateLimit(rpm, tpm)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._http = _Requests(self, timeout, retries, headers)
        self._logprobs = True
        self._max_key = "max_tokens"

    def judge(self, pairs: Sequence[Triple], deadline: float) -> list[Verdict]:
        asks = [(p, a, b) for p, a, b in pairs]
        if self.both_orders:
            asks += [(p, b, a) for p, a, b in pairs]
        tasks: list[Callable[[], Verdict]] = [functools.partial(self.ask, *t, deadline) for t in asks]
        answers = run_bounded(tasks, self.concurrency, deadline)
        out = []
        for i in range(len(pairs)):
            first = answers[i]
            if not self.both_orders:
                out.append(FAILED if first is None else first)
                continue
            second = answers[len(pairs) + i]
            if first is None or second is None or first.failed or second.failed:
                out.append(FAILED)  # one order alone cannot tell a verdict from position bias
            elif first.label is None or second.label is None:
                out.append(ABSTAINED)
            elif first.label == second.label:  # "the first one" both times: the swapped order's first is b
                out.append(Verdict(None, disagreed=True))
            else:
                assert first.preference is not None and second.preference is not None
                out.append(Verdict((first.preference + 1.0 - second.preference) / 2))
        return out

    def ask(self, prompt: str, a: str, b: str, deadline: float) -> Verdict:
        """One chat completion: P(the response shown first is better)."""
        content = render(self.template, prompt, a, b)
        lease = self.limit.acquire(len(content) // 4 + self.max_tokens, deadline)
        if lease is None:
            self._count("rate_limited")
            return FAILED
        for _ in range(3):  # the tries beyond the first drop what the server refused (logprobs, max_tokens)
            body: dict[str, Any] = {
                "model": self.model,
                "messages": [{"role": "user", "content": content}],
                "temperature": 0,
                self._max_key: self.max_tokens,
            }
            if self._logprobs:
                body |= {"logprobs": True, "top_logprobs": 5}
            r, seconds = self._http.post(self.url, body, deadline)
            if r is None:
                return FAILED
            if r.status_code < 400:
                return self._verdict(r, seconds, lease)
            if r.status_code == 400 and self._adapt(r.text):
                continue
            self._count("error", seconds)
            log.warning("judge %s answered %d: %s", self.url, r.status_code, r.text[:300])
            return FAILED
        return FAILED

    def _adapt(self, error: str) -> bool:
        """Adjust to a server that refuses a parameter (log-probs, or max_tokens on newer hosted models)."""
        if self._logprobs and "logprobs" in error:
            log.info("judge %s refuses logprobs; reading verdicts from the text", self.url)
            self._logprobs = False
            return True
        if self._max_key == "max_tokens" and "max_tokens" in error and "max_completion_tokens" in error:
            self._max_key = "max_completion_tokens"
            return True
        return False

    def _verdict(self, r: httpx.Response, seconds: float, lease: list[float]) -> Verdict:
        try:
            answer = r.json()
            choice = answer["choices"][0]
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            self._count("garbage", seconds)
            log.warning("judge %s answered no chat completion: %r", self.url, r.text[:200])
            return ABSTAINED
        usage = answer.get("usage") or {}
        prompt_tokens, completion_tokens = (
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
        )
        if prompt_tokens or completion_tokens:
            self.limit.settle(lease, prompt_tokens + completion_tokens)
            if self.metrics is not None:
                self.metrics.judge_tokens.labels("prompt").inc(prompt_tokens)
                self.metrics.judge_tokens.labels("completion").inc(completion_tokens)
        p = verdict_from_logprobs((choice.get("logprobs") or {}).get("content"))
        if p is None:
            p = verdict_from_text(text)
        if p is None:
            self._count("garbage", seconds)
            log.info("judge %s gave no verdict: %r", self.url, text[:100])
            return ABSTAINED
        self._count("abstain" if p == 0.5 else "ok", seconds)
        return Verdict(p)

    def close(self) -> None:
        self._http.close()


# --- building one -----------------------------------------------------------------------------------------------


def load_judge(spec: str, settings: ServiceSettings | None = None) -> Any:
    """The judge a spec names: an `OpenAIJudge` (`openai:<base_url>`, configured by the R2M_JUDGE_* settings, read
    from the environment when `settings` is None), an `HTTPJudge` (an http(s) URL), or the Python callable of
    `module:function` itself. ValueError, naming the spec, when it names none."""
    if spec.startswith("openai:"):
        try:
            s = settings or ServiceSettings(judge=spec)
        except ValidationError as exc:  # one line, naming the setting (R2M_JUDGE_MODEL unset, most likely)
            raise ValueError(f"judge={spec!r}: {exc.errors()[0]['msg']}") from None
        import os

        return OpenAIJudge(
            spec.removeprefix("openai:"),
            s.judge_model or "",
            os.environ.get(s.judge_api_key_env) or None,
            template=load_template(s.judge_template),
            both_orders=s.judge_both_orders,
            max_tokens=s.judge_max_tokens,
            timeout=s.judge_timeout_s,
            retries=s.judge_retries,
            rpm=s.judge_rpm,
            tpm=s.judge_tpm,
            concurrency=s.judge_concurrency,
        )
    if spec.startswith(("http://", "https://")):
        if settings is None:
            return HTTPJudge(spec)
        return HTTPJudge(spec, settings.judge_timeout_s, settings.judge_retries, settings.judge_concurrency)
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"judge={spec!r}: give module:function (a Python callable), an http(s):// URL or openai:<url>")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"judge={spec!r}: cannot import {module} ({exc})") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ValueError(f"judge={spec!r}: {module} has no callable {name!r}")
    return fn


def as_judge(obj: Any, concurrency: int = 8) -> PairJudge:
    """Any judge as a `PairJudge`: one already, or a Python callable (or an object with `batch`) wrapped."""
    if isinstance(obj, PairJudge):
        return obj
    if not callable(obj) and not hasattr(obj, "batch"):
        raise ValueError(f"judge {obj!r}: give a callable f(prompt, response_a, response_b) or a PairJudge")
    return CallableJudge(obj, concurrency)


def build_judge(settings: ServiceSettings, judge: Any = None) -> PairJudge | None:
    """The worker's judge: `judge` when given (a program's own, e.g. the benchmark's), else the one R2M_JUDGE names,
    else None. ValueError, naming the setting, when it cannot be built."""
    if judge is None and settings.judge is None:
        return None
    if judge is None:
        assert settings.judge is not None
        try:
            judge = load_judge(settings.judge, settings)
        except ValueError as exc:
            raise ValueError(f"R2M_JUDGE: {exc}") from None
        if settings.judge.startswith("openai:") and not _key_present(settings.judge_api_key_env):
            log.info("%s is not set: the judge is called without an API key", settings.judge_api_key_env)
    return as_judge(judge, settings.judge_concurrency)


def _key_present(name: str) -> bool:
    import os

    return bool(os.environ.get(name))


def judge_info(settings: ServiceSettings, judge: PairJudge | None = None) -> dict[str, Any] | None:
    """What /info shows of the judge: its kind, model and budget (never a key or a URL, which may carry one)."""
    if judge is None and settings.judge is None:
        return None
    if judge is not None:
        kind, model, both = judge.kind, judge.model, judge.both_orders
    else:
        spec = settings.judge or ""
        kind = "callable"
        if spec.startswith(("openai:", "http://", "https://")):
            kind = "openai" if spec.startswith("openai:") else "http"
        model = {"openai": settings.judge_model or "", "callable": spec}.get(kind, "")
        both = kind == "openai" and settings.judge_both_orders
    return {
        "kind": kind,
        "model": model,
        "pairs_per_batch": settings.judge_pairs,
        "both_orders": both,
        "with_pseudo_labels": settings.judge_with_pseudo_labels,
        "rpm": settings.judge_rpm,
        "tpm": settings.judge_tpm,
    }


# --- labelling a batch ------------------------------------------------------------------------------------------


@dataclass
class JudgeReport:
    """What the judge made of one preference batch (or, summed, of one update)."""

    asked: int = 0
    labels: int = 0
    abstained: int = 0
    failed: int = 0
    surprises: int = 0  # labels against the head's order: the judge prefers the response the head scored lower
    cached: int = 0
    seconds: float = 0.0

    def add(self, other: JudgeReport) -> None:
        for name in ("asked", "labels", "abstained", "failed", "surprises", "cached"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds = max(self.seconds, other.seconds)

    @property
    def unavailable(self) -> bool:
        """No label, and not because the judge abstained: asking again may get some."""
        return self.asked > 0 and self.labels == 0 and self.failed > 0

    def figures(self) -> dict[str, float]:
        return {
            "asked": self.asked,
            "labels": self.labels,
            "abstained": self.abstained,
            "failed": self.failed,
            "surprise_rate": self.surprises / self.labels if self.labels else 0.0,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class BatchGroups:
    """One preference batch's groups as the update holds them: their id (the pair choice's seed) and row ranges."""

    batch_id: str
    groups: list[range] = field(default_factory=list)


class PairLabeller:
    """Picks each batch's pairs, asks the judge by the update's deadline, and counts what came back. Verdicts are
    kept (`cache_size` pairs), so a batch trained again (a retry, a publish conflict, a split merge) pays once."""

    def __init__(
        self, judge: PairJudge, settings: ServiceSettings, metrics: WorkerMetrics | None = None, cache_size: int = 4096
    ) -> None:
        self.judge = judge
        self.budget = settings.judge_pairs
        self.seed = settings.seed
        self.deadline_s = settings.judge_deadline_s
        self.metrics = metrics
        judge.metrics = metrics
        self._cache: OrderedDict[str, Verdict] = OrderedDict()
        self.cache_size = cache_size

    def generator(self, batch_id: str) -> torch.Generator:
        """Seeded by the batch and R2M_SEED: a retry, another worker or a replay picks the same pairs."""
        digest = hashlib.sha256(f"judge|{batch_id}|{self.seed}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)

    def label(
        self,
        batches: Sequence[BatchGroups],
        prompts: Sequence[str],
        responses: Sequence[str],
        ranking: Sequence[float],
        served: Sequence[float],
    ) -> tuple[list[tuple[int, int]], list[JudgeReport]]:
        """`(chosen row, rejected row)` for every labelled pair of the batches, and one report per batch. Pairs are
        picked by `ranking` (the recomputed rewards, or those the groups carried); `served` are the served head's
        recomputed rewards, against which a label is a surprise."""
        started = time.monotonic()
        picks = [choose_pairs(ranking, b.groups, self.budget, self.generator(b.batch_id)) for b in batches]
        flat = [(i, j) for p in picks for i, j in p]
        triples = [(prompts[i], responses[i], responses[j]) for i, j in flat]
        keys = [_key(*t) for t in triples]
        verdicts: list[Verdict | None] = [self._cache.get(k) for k in keys]
        todo = [n for n, v in enumerate(verdicts) if v is None]
        asked = set(todo)
        if todo:
            fresh = self.judge.judge([triples[n] for n in todo], started + self.deadline_s)
            for n, answer in zip(todo, fresh):
                verdicts[n] = answer
                if not answer.failed:
                    self._remember(keys[n], answer)
        labelled: list[tuple[int, int]] = []
        reports: list[JudgeReport] = []
        n = 0
        for batch_picks in picks:
            report = JudgeReport(asked=len(batch_picks), seconds=time.monotonic() - started)
            for i, j in batch_picks:
                v = verdicts[n]
                assert v is not None
                report.cached += n not in asked
                n += 1
                if v.failed:
                    report.failed += 1
                elif v.label is None:
                    report.abstained += 1
                    if v.disagreed and self.metrics is not None:
                        self.metrics.judge_order_disagreements.inc()
                else:
                    chosen, rejected = (i, j) if v.label else (j, i)
                    labelled.append((chosen, rejected))
                    report.labels += 1
                    report.surprises += served[chosen] < served[rejected]
            reports.append(report)
        self._observe(reports)
        return labelled, reports

    def _remember(self, key: str, verdict: Verdict) -> None:
        self._cache[key] = verdict
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _observe(self, reports: Sequence[JudgeReport]) -> None:
        m = self.metrics
        if m is None:
            return
        total = JudgeReport()
        for r in reports:
            total.add(r)
            m.judge_batch_labels.observe(r.labels)
            m.judge_batch_abstentions.observe(r.abstained)
        m.judge_pairs.labels("labelled").inc(total.labels)
        m.judge_pairs.labels("abstained").inc(total.abstained)
        m.judge_pairs.labels("failed").inc(total.failed)
        m.judge_cached.inc(total.cached)
        m.judge_surprises.inc(total.surprises)
        if total.labels:
            m.judge_surprise_rate.set(total.surprises / total.labels)

    def close(self) -> None:
        self.judge.close()


def _key(prompt: str, a: str, b: str) -> str:
    return hashlib.sha256(json.dumps([prompt, a, b]).encode()).hexdigest()


def label_pairs(
    judge: Any, prompts: Sequence[str], responses: Sequence[str], pairs: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """`[(chosen index, rejected index), ...]` for the pairs the judge labels, in order (the trainer's own judging:
    no deadline; abstentions and failures are left out)."""
    verdicts = as_judge(judge).judge([(prompts[i], responses[i], responses[j]) for i, j in pairs], _FOREVER)
    failed = sum(v.failed for v in verdicts)
    if failed:
        log.warning("the judge failed on %d of %d pairs; they get no label", failed, len(pairs))
    return [(i, j) if v.label else (j, i) for (i, j), v in zip(pairs, verdicts) if v.label is not None]
