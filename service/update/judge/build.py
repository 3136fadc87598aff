"""A judge from its spec (`load_judge`: `openai:<base_url>`, `http(s)://...`, `module:function`) or from an object
(`as_judge`), the service's own (`build_judge`) and what /info shows of it (`judge_info`)."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from pydantic import ValidationError

from ...config import ServiceSettings
from .base import CallableJudge, PairJudge
from .chat import OpenAIJudge, load_template
from .remote import HTTPJudge

log = logging.getLogger("r2m.judge")


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
