"""The LLM judge over the OpenAI chat-completions API (`OpenAIJudge`): the pairwise prompt from a template, both orders,
the verdict from the letters' log-probabilities or the text."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx

from .base import PairJudge, run_bounded
from .remote import RateLimit, Requests
from .verdicts import ABSTAINED, FAILED, Triple, Verdict, verdict_from_logprobs, verdict_from_text

log = logging.getLogger("r2m.judge")

PLACEHOLDERS = ("{prompt}", "{response_a}", "{response_b}")
DEFAULT_TEMPLATE = files("r2m.service.assets").joinpath("judge_pairwise.txt").read_text(encoding="utf-8")


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
        self._http = Requests(self, timeout, retries, headers)
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
            self.count("rate_limited")
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
            self.count("error", seconds)
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
            self.count("garbage", seconds)
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
            self.count("garbage", seconds)
            log.info("judge %s gave no verdict: %r", self.url, text[:100])
            return ABSTAINED
        self.count("abstain" if p == 0.5 else "ok", seconds)
        return Verdict(p)

    def close(self) -> None:
        self._http.close()
