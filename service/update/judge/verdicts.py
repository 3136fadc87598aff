"""A judge's answer to one pair: `Verdict` (P(response_a is better), or none), read from a Python or HTTP judge's
value, from a chat model's text, or from its log-probabilities."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("r2m.judge")

Judge = Callable[[str, str, str], "bool | float"]  # a Python judge
Triple = tuple[str, str, str]  # (prompt, response_a, response_b)


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


def as_preference(value: Any) -> float | None:
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
