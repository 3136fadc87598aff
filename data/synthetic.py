"""A synthetic, templated preference set for fitting r2m's default encoder reward model offline.

`generate_preferences(n, seed)` returns `n` records `{"prompt", "chosen", "rejected", "kind"}`: a chat-style user
request, a good answer to it, and a worse answer whose single flaw is named by `kind` (one of `KINDS`). The subjects
and their true and false statements are `subjects.txt` beside this file. Deterministic in `n` and `seed`, standard
library only. What the set holds, and its honest limits: docs/data.md.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

__all__ = ["KINDS", "TOPICS", "generate_preferences", "split_preferences"]

KINDS: tuple[str, ...] = (
    "off_topic",
    "ignores_question",
    "rude",
    "evasive",
    "repetitive",
    "too_short",
    "wrong_fact",
    "rambling",
    "wrong_format",
    "needless_refusal",
    "gibberish",
)

# Subjects: package data, its format at the top of the file.
_DATA = Path(__file__).with_name("subjects.txt").read_text(encoding="utf-8")

_CALC_TOPICS: tuple[tuple[str, str], ...] = (
    ("arithmetic", "arithmetic"),
    ("percentages", "percentages"),
    ("conversions", "unit conversions"),
)


@dataclass(frozen=True)
class _Item:
    topic: str
    subject: str  # a few words naming the topic, for filler and hedges
    qtype: str  # howto | concept | why | calc
    phrase: str  # what the templates put in their slot; for calc, a short description
    facts: tuple[str, ...]  # true statements; for calc, facts[0] is the answer and the rest explain it
    wrong: tuple[str, ...]  # false statements (for calc: the same answer sentence with a wrong number)
    prompts: tuple[str, ...] = ()  # calc only: the ways to ask


def _parse(text: str) -> tuple[tuple[str, str, tuple[_Item, ...]], ...]:
    topics: list[tuple[str, str, list[_Item]]] = []
    current: dict | None = None

    def flush() -> None:
        if current is not None:
            topics[-1][2].append(
                _Item(
                    topics[-1][0],
                    topics[-1][1],
                    current["qtype"],
                    current["phrase"],
                    tuple(current["facts"]),
                    tuple(current["wrong"]),
                )
            )

    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            flush()
            current = None
            name, subject = (s.strip() for s in line[1:].split("|"))
            topics.append((name, subject, []))
        elif line.startswith(("howto:", "concept:", "why:")):
            flush()
            qtype, phrase = line.split(":", 1)
            current = {"qtype": qtype, "phrase": phrase.strip(), "facts": [], "wrong": []}
        elif line.startswith("+ ") and current is not None:
            current["facts"].append(line[2:])
        elif line.startswith("- ") and current is not None:
            current["wrong"].append(line[2:])
        else:  # pragma: no cover - a typo in _DATA
            raise ValueError(f"subjects.txt: cannot parse line {raw!r}")
    flush()
    return tuple((name, subject, tuple(items)) for name, subject, items in topics)


_SUBJECTS = _parse(_DATA)
TOPICS: tuple[str, ...] = tuple(t[0] for t in _SUBJECTS) + tuple(t[0] for t in _CALC_TOPICS)
_CALC_SUBJECT = dict(_CALC_TOPICS)
_SUBJECT_ITEMS: tuple[_Item, ...] = tuple(item for _, _, items in _SUBJECTS for item in items)

# ----------------------------------------------------------------------------------------------------------
# Prompt templates
# ----------------------------------------------------------------------------------------------------------
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "howto": (
        "How do I {p}?",
        "How can I {p}?",
        "What's the best way to {p}?",
        "Can you give me some tips on how to {p}?",
        "I'm a complete beginner. How should I {p}?",
        "Explain how to {p}, please.",
        "Any advice on how to {p}?",
        "What steps should I follow to {p}?",
        "Quick question: how do you {p}?",
        "I want to {p}. Where do I start?",
        "how do i {p}",
        "Could you walk me through how to {p}?",
        "Is there an easy way to {p}?",
    ),
    "concept": (
        "Can you explain {p}?",
        "Could you explain {p} in simple terms?",
        "Tell me about {p}.",
        "Help me understand {p}.",
        "What should I know about {p}?",
        "explain {p} like I'm five",
        "Give me a short overview of {p}.",
        "I keep hearing about {p}. Can you explain?",
        "Write a short explanation of {p}.",
        "I'm studying {p} for a class. What are the key points?",
        "Can you break down {p} for me?",
        "I never really understood {p}. Could you help?",
        "Please summarize {p}.",
    ),
    "why": (
        "Can you tell me {p}?",
        "I've always wondered {p}. Can you explain?",
        "Do you know {p}?",
        "Please explain {p}.",
        "My kid asked me {p}, and I didn't know what to say. Can you help?",
        "I'm curious about {p}.",
        "Could you explain {p}?",
        "Help me understand {p}.",
        "I'd like to know {p}.",
        "can someone explain {p}",
        "I was just thinking about {p}. What's the answer?",
    ),
}
_PROMPT_PREFIXES = (
    "Hi!",
    "Hello.",
    "Hey there.",
    "Sorry if this is a basic question.",
    "I've been wondering about this for a while.",
    "I need some help.",
    "Hoping you can help.",
)
_PROMPT_SUFFIXES = ("Thanks!", "Thank you.", "Thanks in advance.", "I'd appreciate any help.")
_FORMAT_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "one_sentence": (
        "Please answer in one sentence.",
        "Answer in a single sentence.",
        "One sentence only, please.",
    ),
    "brief": ("Keep it short.", "Please be brief.", "Just the short version, please."),
    "bullets": (
        "Please use bullet points.",
        "Give me the answer as a bulleted list.",
        "Format it as a list.",
    ),
    "steps": ("List the steps.", "Give me numbered steps.", "Answer with numbered steps, please."),
}

# ----------------------------------------------------------------------------------------------------------
# Answer pieces
# ----------------------------------------------------------------------------------------------------------
_OPENERS = (
    "Sure!",
    "Sure thing.",
    "Good question.",
    "Happy to help.",
    "Great question!",
    "Of course.",
    "Absolutely.",
    "Glad you asked.",
    "Here's a quick rundown.",
    "Here's what you need to know.",
)
_ITEM_OPENERS: dict[str, tuple[str, ...]] = {
    "howto": ("Here's how to {p}.", "To {p}, a few things help."),
    "concept": ("Here's a quick overview of {p}.", "Here's the gist of {p}."),
    "why": ("Here's {p}, in short.", "Let me explain {p}."),
    "calc": (),
}
_CLOSERS = (
    "Hope that helps!",
    "Let me know if you'd like more detail.",
    "Good luck!",
    "Feel free to ask if anything is unclear.",
    "Happy to go into more depth if you need it.",
    "I hope this is useful.",
)
_LIST_INTROS = ("Here are the key points:", "Sure, here you go:", "Here's a quick list:", "Of course:")
_STEP_INTROS = ("Here are the steps:", "Sure, step by step:", "Follow these steps:")

_RUDE_PREFIXES = (
    "Ugh, seriously?",
    "Wow, what a basic question.",
    "Did you even try looking this up?",
    "This is honestly such an obvious question.",
    "I can't believe you need help with this.",
    "Fine, if you really can't figure it out yourself:",
    "Pay attention, because I'm only saying this once.",
    "Oh great, another lazy question.",
    "What a dumb thing to ask.",
    "You clearly haven't done any thinking of your own.",
)
_RUDE_SUFFIXES = (
    "It's not that hard.",
    "Try using your brain next time.",
    "Honestly, this should have been obvious.",
    "Don't bother me with stuff like this again.",
    "Anyone could have figured that out.",
    "You're welcome, I guess.",
    "Seriously, a child could do this.",
    "Now go away.",
    "Don't make me explain it twice, genius.",
)
_RUDE_ALONE = (
    "Figure it out yourself.",
    "Are you serious? Stop wasting my time.",
    "I'm not going to spoon-feed you.",
    "Just google it. I'm not your personal assistant.",
    "Why would I waste my time on this?",
    "That's a stupid question.",
    "Nobody cares. Look it up.",
    "Ask someone who has the patience for you.",
)
_EVASIVE_SHORT = (
    "I'm not sure.",
    "That's hard to say.",
    "You should probably ask someone else.",
    "It depends.",
    "I'd rather not get into that.",
    "Hard to say, honestly.",
    "I don't really know.",
)
_EVASIVE_LONG = (
    "That's a tricky one.",
    "There isn't really a simple answer to that.",
    "It depends on a lot of different factors.",
    "Everyone's situation is different, so I wouldn't want to say anything definite.",
    "You might want to look into {s} more on your own.",
    "Someone who specializes in {s} could probably tell you more.",
    "I don't want to oversimplify, so I'll leave it there.",
    "Sorry I can't be more specific.",
    "There are many opinions on this, and I'd rather not take a side.",
    "It's probably best not to rely on me for questions about {s}.",
)
_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't help with that request.",
    "I can't assist with requests about {s}.",
    "As an AI, I'm not able to give advice on {s}.",
    "I apologize, but this request goes against my guidelines.",
    "I'm not comfortable answering that.",
    "Sorry, I can't provide that information.",
    "I won't be able to help with this one.",
)
_REFUSAL_EXTRAS = (
    "Please consult a qualified professional.",
    "I'd recommend reaching out to an expert in {s}.",
    "Is there anything else I can help you with?",
    "I hope you understand.",
    "Questions like this could be misused, so I have to decline.",
    "For safety reasons, I have to be careful with topics like {s}.",
)
_KEYBOARD_MASH = ("asdf", "qwer", "zxcv", "jkl", "hjkl", "lorem", "ipsum", "xx", "blorp", "fnord", "qq", "uiop")
_TOO_SHORT = (
    "Yes.",
    "No.",
    "Maybe.",
    "Sure.",
    "It depends.",
    "Not sure.",
    "Hmm.",
    "OK.",
    "Good question.",
    "Lots of ways.",
    "Yeah.",
    "Probably.",
    "Kind of.",
    "Depends.",
    "Why?",
    "Idk.",
)
_FILLER = (
    "Well, {s} is one of those things people have a lot of opinions about.",
    "I've always found {s} really interesting.",
    "There's a lot that could be said here, and people have talked about it for years.",
    "In a way, it's like a lot of things in life: it has its ups and downs.",
    "Some people love it, and some people don't really think about it much.",
    "It's really more of a journey than a destination.",
    "Everyone has their own way of looking at it.",
    "At the end of the day, it's all about what works for you.",
    "I remember reading something about this once, but the details escape me.",
    "It's definitely a topic worth thinking about.",
    "Anyway, that's just something to consider.",
    "There are so many angles to {s} that it's hard to know where to begin.",
    "It's kind of fascinating when you stop and think about it.",
    "A lot of people ask about {s}, which says something in itself.",
    "Things have changed a lot over the years, and they'll probably keep changing.",
    "What a fantastic question; you clearly have a wonderful curiosity!",
    "I love that you're interested in {s}!",
    "Honestly, it's so great that you asked, and I'm sure you'll figure it out.",
)
_PARROT = (
    "So you want to know about {q}.",
    "That's a question about {q}.",
    "{Q} is something a lot of people wonder about.",
    "{Q}: that's the question.",
    "There's a lot to say about {q}.",
    "When it comes to {q}, it really depends.",
    "{Q} is an interesting thing to ask about.",
)
_REPEAT_LEADS = ("As I said,", "Again,", "To repeat,", "Like I mentioned,", "Once more,")
_CHANGE_SUBJECT = (
    "Let me tell you about {q} instead.",
    "Rather than that, here's something about {q}.",
    "That reminds me of {q}.",
    "Actually, let's talk about {q}.",
    "Here is something more useful instead: {q}.",
)
_CALC_CHANGE_SUBJECT = (
    "Here's a similar problem instead.",
    "Let's do an easier one.",
    "Try this one instead.",
)
_DRIFT = ("By the way,", "On a different note,", "Speaking of which,", "Unrelated, but")
_PADDING = (
    "Let me explain this in detail.",
    "There's quite a lot to say here, so bear with me.",
    "I'll go through everything step by step.",
    "This is a big topic, so here's the full picture.",
)


def _lower_first(s: str) -> str:
    if len(s) > 1 and s[0].isupper() and not s[1].isupper():
        return s[0].lower() + s[1:]
    return s


# ----------------------------------------------------------------------------------------------------------
# Generated arithmetic, percentage and conversion problems
# ----------------------------------------------------------------------------------------------------------
_UNITS = (  # (from, to, factor, why)
    ("hours", "minutes", 60, "There are 60 minutes in an hour, so multiply by 60."),
    ("days", "hours", 24, "A day has 24 hours, so multiply the number of days by 24."),
    ("meters", "centimeters", 100, "There are 100 centimeters in a meter, so multiply by 100."),
    ("kilograms", "grams", 1000, "A kilogram is 1,000 grams, so multiply by 1,000."),
    ("feet", "inches", 12, "Each foot has 12 inches, so multiply by 12."),
    ("kilometers", "meters", 1000, "A kilometer is 1,000 meters, so multiply by 1,000."),
    ("minutes", "seconds", 60, "There are 60 seconds in a minute, so multiply by 60."),
    ("weeks", "days", 7, "A week has 7 days, so multiply by 7."),
)


def _wrong_number(rng: random.Random, value: int, scale: int) -> int:
    for _ in range(20):
        delta = rng.choice((1, 2, 3, 10, 20, 100, max(2, scale))) * rng.choice((-1, 1))
        if value + delta > 0 and value + delta != value:
            return value + delta
    return value + 1


class _Problem(NamedTuple):
    """A generated problem: its value, the ways to ask it, the answer sentences ("{v}": the value) and the lines
    that explain it."""

    value: int
    scale: int  # a size for the wrong answers' offsets (`_wrong_number`)
    prompts: tuple[str, ...]
    forms: tuple[str, ...]
    explain: tuple[str, ...]


def _arithmetic(rng: random.Random) -> _Problem:
    op = rng.choice(("add", "sub", "mul"))
    if op == "add":
        a, b = rng.randint(12, 999), rng.randint(12, 999)
        c, sym, word = a + b, "+", "plus"
        prompts: tuple[str, ...] = (
            f"What is {a} + {b}?",
            f"What's {a} plus {b}?",
            f"Can you add {a} and {b} for me?",
            f"Calculate {a} + {b}.",
            f"quick math: {a}+{b}?",
            f"I need the sum of {a} and {b}.",
        )
        explain: tuple[str, ...] = (
            "Line the numbers up by place value and add column by column, carrying when a column tops 9.",
            f"You can double-check by subtracting {b} from the result to get back to {a}.",
        )
    elif op == "sub":
        a, b = rng.randint(50, 999), rng.randint(11, 49)
        c, sym, word = a - b, "-", "minus"
        prompts = (
            f"What is {a} - {b}?",
            f"What's {a} minus {b}?",
            f"Subtract {b} from {a}.",
            f"Can you work out {a} minus {b}?",
            f"How much is {a} take away {b}?",
        )
        explain = (
            "Subtract column by column from the right, borrowing when the top digit is smaller.",
            f"To check, add {b} back to the result and you should get {a}.",
        )
    else:
        a, b = rng.randint(3, 99), rng.randint(3, 30)
        c, sym, word = a * b, "×", "times"
        prompts = (
            f"What is {a} × {b}?",
            f"What is {a} * {b}?",
            f"What's {a} times {b}?",
            f"Multiply {a} by {b}.",
            f"Can you calculate {a} times {b}?",
        )
        split = (
            f"It can help to split it up: {a} × {b // 10 * 10} plus {a} × {b % 10}."
            if b > 10 and b % 10
            else f"Multiplication is commutative, so {b} × {a} gives the same result."
        )
        explain = (f"Multiplying by {b} is the same as adding {a} to itself {b} times.", split)
    forms = (f"{a} {sym} {b} = {{v}}.", f"{a} {word} {b} equals {{v}}.", "The answer is {v}.")
    return _Problem(c, a, prompts, forms, explain)


def _percentage(rng: random.Random) -> _Problem:
    p = rng.choice((5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 80))
    n = 20 * rng.randint(1, 50)
    prompts = (
        f"What is {p}% of {n}?",
        f"How much is {p} percent of {n}?",
        f"Can you work out {p}% of {n}?",
        f"What's {p} percent of {n}? I'm trying to figure out a discount.",
        f"Calculate {p}% of {n}, please.",
    )
    forms = (f"{p}% of {n} is {{v}}.", "The answer is {v}.", f"{p} percent of {n} comes to {{v}}.")
    explain = (
        f"Convert the percentage to a decimal, {p / 100:g}, and multiply it by {n}.",
        f"Another way to see it: 1% of {n} is {n / 100:g}, and you need {p} of those.",
    )
    return _Problem(p * n // 100, max(2, n // 10), prompts, forms, explain)


def _conversion(rng: random.Random) -> _Problem:
    src, dst, factor, why = rng.choice(_UNITS)
    amount = rng.randint(2, 60)
    prompts = (
        f"How many {dst} are in {amount} {src}?",
        f"Convert {amount} {src} to {dst}.",
        f"{amount} {src} is how many {dst}?",
        f"What's {amount} {src} in {dst}?",
    )
    forms = (
        f"{amount} {src} is {{v}} {dst}.",
        f"That's {{v}} {dst}.",
        f"There are {{v}} {dst} in {amount} {src}.",
    )
    return _Problem(amount * factor, factor, prompts, forms, (why,))


_PROBLEMS = {"arithmetic": _arithmetic, "percentages": _percentage, "conversions": _conversion}  # _CALC_TOPICS


def _calc_item(rng: random.Random, topic: str) -> _Item:
    subject = _CALC_SUBJECT[topic]
    problem = _PROBLEMS[topic](rng)
    form = rng.choice(problem.forms)
    fmt_value = "{:,}".format
    answer = form.format(v=fmt_value(problem.value))
    wrong = form.format(v=fmt_value(_wrong_number(rng, problem.value, problem.scale)))
    return _Item(topic, subject, "calc", f"{subject} problem", (answer, *problem.explain), (wrong,), problem.prompts)


# ----------------------------------------------------------------------------------------------------------
# Assembly
# ----------------------------------------------------------------------------------------------------------
def _draw_item(rng: random.Random, exclude_topic: str | None = None) -> _Item:
    topics = [t for t in TOPICS if t != exclude_topic]
    topic = rng.choice(topics)
    if topic in _CALC_SUBJECT:
        return _calc_item(rng, topic)
    return rng.choice(next(items for name, _, items in _SUBJECTS if name == topic))


def _sibling(rng: random.Random, item: _Item) -> _Item:
    """Another question on the same topic (for `ignores_question`)."""
    if item.qtype == "calc":
        for _ in range(10):
            other = _calc_item(rng, item.topic)
            if other.facts[0] != item.facts[0]:
                return other
        return other
    siblings = [i for name, _, items in _SUBJECTS if name == item.topic for i in items if i is not item]
    return rng.choice(siblings)


def _formats_for(item: _Item) -> tuple[str, ...]:
    if item.qtype == "calc":
        return ("one_sentence", "brief")
    if item.qtype == "howto":
        return ("one_sentence", "brief", "bullets", "steps")
    return ("one_sentence", "brief", "bullets")


def _make_prompt(rng: random.Random, item: _Item, fmt: str | None) -> str:
    if item.qtype == "calc":
        body = rng.choice(item.prompts)
    else:
        body = rng.choice(_TEMPLATES[item.qtype]).format(p=item.phrase)
    parts = []
    casual = body[0].islower()
    if not casual and rng.random() < 0.25:
        parts.append(rng.choice(_PROMPT_PREFIXES))
    parts.append(body)
    if fmt is not None:
        parts.append(rng.choice(_FORMAT_INSTRUCTIONS[fmt]))
    if not casual and rng.random() < 0.15:
        parts.append(rng.choice(_PROMPT_SUFFIXES))
    return " ".join(parts)


def _n_facts(rng: random.Random, item: _Item, fmt: str | None) -> int:
    n = len(item.facts)
    if fmt == "one_sentence":
        k = 1
    elif fmt == "brief":
        k = rng.choice((1, 2))
    elif fmt in ("bullets", "steps"):
        k = rng.choice((3, 3, 4))
    else:
        k = rng.choices((1, 2, 3, 4), weights=(0.17, 0.3, 0.3, 0.23))[0]
    return max(1, min(k, n))


def _pick(rng: random.Random, item: _Item, k: int) -> list[int]:
    """Indices of `k` facts, in their natural order; the first fact (which names the subject, or is the
    calculation's answer) is favoured for one-sentence answers."""
    n = len(item.facts)
    if item.qtype == "calc":
        return [0, *sorted(rng.sample(range(1, n), min(k - 1, n - 1)))]
    if k == 1:  # a lone sentence should stand on its own, not start with "It ..." or "They ..."
        alone = [i for i in range(n) if i == 0 or not item.facts[i].startswith(_PRONOUNS)]
        return [0] if rng.random() < 0.5 else [rng.choice(alone)]
    return sorted(rng.sample(range(n), k))


_PRONOUNS = ("It ", "It's ", "Its ", "They ", "This ", "That ", "These ", "Both ", "Then ", "Once ", "As ")


def _render(
    rng: random.Random,
    item: _Item,
    sentences: Sequence[str],
    fmt: str | None,
    *,
    opener_p: float = 0.45,
    closer_p: float = 0.3,
) -> str:
    """Lay out answer sentences as prose, a bulleted list or numbered steps, with the usual niceties."""
    sentences = list(sentences)
    if fmt == "bullets":
        lines = [f"- {s}" for s in sentences]
        if rng.random() < 0.5:
            lines.insert(0, rng.choice(_LIST_INTROS))
        return "\n".join(lines)
    if fmt == "steps":
        lines = [f"{i}. {s}" for i, s in enumerate(sentences, 1)]
        if rng.random() < 0.5:
            lines.insert(0, rng.choice(_STEP_INTROS))
        return "\n".join(lines)
    if fmt == "one_sentence":
        return " ".join(sentences)
    out = []
    if rng.random() < opener_p:
        specific = _ITEM_OPENERS[item.qtype]
        if specific and rng.random() < 0.3:
            out.append(rng.choice(specific).format(p=item.phrase))
        else:
            out.append(rng.choice(_OPENERS))
    out.extend(sentences)
    if fmt != "brief" and rng.random() < closer_p:
        out.append(rng.choice(_CLOSERS))
    return " ".join(out)


def _good_answer(rng: random.Random, item: _Item, fmt: str | None) -> str:
    idx = _pick(rng, item, _n_facts(rng, item, fmt))
    return _render(rng, item, [item.facts[i] for i in idx], fmt)


def _topic_words(item: _Item) -> str:
    return f"how to {item.phrase}" if item.qtype == "howto" else item.phrase


def _off_topic(rng: random.Random, item: _Item, fmt: str | None) -> str:
    other = _draw_item(rng, exclude_topic=item.topic)
    r = rng.random()
    if r < 0.3:  # partly relevant: one sentence on the question, then drifts away
        k = max(2, _n_facts(rng, other, fmt))
        drift = [other.facts[i] for i in _pick(rng, other, min(k, len(other.facts)))]
        if fmt not in ("bullets", "steps") and rng.random() < 0.5:
            drift[0] = f"{rng.choice(_DRIFT)} {_lower_first(drift[0])}"
        return _render(rng, item, [item.facts[0], *drift], fmt)
    idx = _pick(rng, other, _n_facts(rng, other, fmt))
    return _render(rng, other, [other.facts[i] for i in idx], fmt)


def _ignores_question(rng: random.Random, item: _Item, fmt: str | None) -> str:
    other = _sibling(rng, item)
    answer = _good_answer(rng, other, fmt)
    if rng.random() < 0.5:  # says outright that it is changing the subject
        if item.qtype == "calc":
            lead = rng.choice(_CALC_CHANGE_SUBJECT)
        else:
            lead = rng.choice(_CHANGE_SUBJECT).format(q=_topic_words(other))
        answer = lead + ("\n" if fmt in ("bullets", "steps") else " ") + answer
    return answer


def _wrong_fact(rng: random.Random, item: _Item, fmt: str | None) -> str:
    idx = _pick(rng, item, _n_facts(rng, item, fmt))
    sentences = [item.facts[i] for i in idx]
    pos = 0 if item.qtype == "calc" else rng.randrange(len(sentences))
    sentences[pos] = rng.choice(item.wrong)
    return _render(rng, item, sentences, fmt)


def _rude(rng: random.Random, item: _Item, fmt: str | None) -> str:
    r = rng.random()
    if r < 0.2:  # nothing but contempt
        return " ".join(rng.sample(_RUDE_ALONE, rng.randint(1, 2)))
    # Some real content wrapped in contempt; mostly a single sentence, so the tone is not drowned out.
    k = 1 if r < 0.7 else _n_facts(rng, item, fmt)
    body = _render(rng, item, [item.facts[i] for i in _pick(rng, item, k)], fmt, opener_p=0.0, closer_p=0.0)
    sep = "\n" if fmt in ("bullets", "steps") else " "
    style = rng.random()
    if style < 0.2:
        return rng.choice(_RUDE_PREFIXES) + sep + body
    if style < 0.4:
        return body + sep + rng.choice(_RUDE_SUFFIXES)
    return rng.choice(_RUDE_PREFIXES) + sep + body + sep + rng.choice(_RUDE_SUFFIXES)


def _evasive(rng: random.Random, item: _Item, fmt: str | None) -> str:
    if rng.random() < 0.4:
        return rng.choice(_EVASIVE_SHORT)
    k = rng.randint(2, 5)
    sentences = [s.format(s=item.subject) for s in rng.sample(_EVASIVE_LONG, k)]
    if rng.random() < 0.3:
        sentences.insert(0, rng.choice(_OPENERS[:7]))
    return " ".join(sentences)


def _rambling(rng: random.Random, item: _Item, fmt: str | None) -> str:
    k = rng.randint(3, 6)
    sentences = [s.format(s=item.subject) for s in rng.sample(_FILLER, k)]
    if rng.random() < 0.45:  # parrots the question back, so echoing the prompt's words earns nothing by itself
        words = _topic_words(item) if item.qtype != "calc" else f"this {item.subject} problem"
        echo = [s.format(q=words, Q=words[0].upper() + words[1:]) for s in rng.sample(_PARROT, rng.randint(1, 3))]
        sentences = echo + sentences[: max(1, k - len(echo))]
    if fmt in ("bullets", "steps"):
        return _render(rng, item, sentences, fmt)
    if rng.random() < 0.35:
        sentences.insert(0, rng.choice(_OPENERS[:7]))
    return " ".join(sentences)


def _degenerate_loop(rng: random.Random, sentence: str) -> str:
    """A sentence that starts fine, then gets stuck on a few words, as a sampler stuck in a loop does."""
    words = sentence.rstrip(".!?").split()
    cut = rng.randint(min(3, len(words)), max(3, len(words) - 1))
    span = rng.randint(1, min(3, cut))
    stuck = " ".join(words[cut - span : cut])
    return " ".join([*words[:cut], *[stuck] * rng.randint(6, 14)])


def _repetitive(rng: random.Random, item: _Item, fmt: str | None) -> str:
    r = rng.random()
    if r < 0.3:  # degenerate word-level loop, possibly after a good sentence or two
        idx = _pick(rng, item, rng.randint(1, 2))
        sentences = [item.facts[i] for i in idx]
        sentences[-1] = _degenerate_loop(rng, sentences[-1])
        return " ".join(sentences)
    if r < 0.6:  # one sentence over and over
        s = item.facts[_pick(rng, item, 1)[0]]
        return _render(rng, item, [s] * rng.randint(4, 6), fmt, closer_p=0.0)
    if r < 0.75:  # two sentences alternating
        a, b = (item.facts[i] for i in _pick(rng, item, 2))
        return _render(rng, item, [a, b] * rng.randint(2, 3), fmt, closer_p=0.0)
    if r < 0.9:  # a decent start that then loops on its last sentence
        idx = _pick(rng, item, rng.randint(1, min(3, len(item.facts))))
        sentences = [item.facts[i] for i in idx]
        sentences += [sentences[-1]] * rng.randint(3, 5)
        return _render(rng, item, sentences, fmt, closer_p=0.0)
    s = item.facts[_pick(rng, item, 1)[0]]  # "as I said" restatements
    leads = rng.sample(_REPEAT_LEADS, rng.randint(3, 4))
    return " ".join([s, *(f"{lead} {_lower_first(s)}" for lead in leads)])


def _too_short(rng: random.Random, item: _Item, fmt: str | None) -> str:
    if rng.random() < 0.35:  # cut off mid-sentence
        words = item.facts[_pick(rng, item, 1)[0]].split()
        cut = max(2, min(len(words) - 2, rng.randint(2, 4)))
        return " ".join(words[:cut]).rstrip(",.:;") + rng.choice(("...", "", " —"))
    return rng.choice(_TOO_SHORT)


def _garble(rng: random.Random, text: str, sentences: Sequence[str]) -> str:
    """A form no chat user asked for. (Only forms an uncased tokenizer can see: capitals and line breaks alone
    are invisible to encoders such as all-MiniLM-L6-v2, so they would be label noise.)"""
    style = rng.randrange(4)
    if style == 0:  # shouting
        return re.sub(r"[.?](?=\s|$)", "!!!", text.upper())
    if style == 1:  # a raw JSON dump
        return json.dumps({"answer": list(sentences), "status": "ok"})
    if style == 2:  # raw HTML
        return "<html><body>" + "".join(f"<p>{s}</p>" for s in sentences) + "</body></html>"
    # one unpunctuated run-on (digits keep their separators: 0.1 and 1,000 stay numbers)
    return re.sub(r"(?<!\d)[.,]|[.,](?!\d)|[!?;:'\"()]", "", text.lower())


def _wrong_format(rng: random.Random, item: _Item, fmt: str | None) -> str:
    if fmt in ("one_sentence", "brief"):  # asked for short, gets everything, padded
        sentences = [rng.choice(_PADDING), *item.facts]
        if rng.random() < 0.5:
            sentences.append(f"In summary, {_lower_first(item.facts[0])}")
        if rng.random() < 0.25 and item.qtype != "calc":
            return _render(rng, item, sentences, "bullets")
        return _render(rng, item, sentences, None, opener_p=0.5, closer_p=0.7)
    if fmt in ("bullets", "steps"):  # asked for a list, gets a paragraph
        idx = _pick(rng, item, rng.choice((3, 4)))
        return _render(rng, item, [item.facts[i] for i in idx], None)
    idx = _pick(rng, item, _n_facts(rng, item, None))
    sentences = [item.facts[i] for i in idx]
    return _garble(rng, _render(rng, item, sentences, None), sentences)


def _needless_refusal(rng: random.Random, item: _Item, fmt: str | None) -> str:
    """Refuses a harmless request (the set has no harmful prompts; see the module's limits)."""
    sentences = [rng.choice(_REFUSALS)]
    if item.qtype == "howto" and rng.random() < 0.3:
        sentences = [f"I'm sorry, but I can't provide instructions on how to {item.phrase}."]
    sentences += rng.sample(_REFUSAL_EXTRAS, rng.randint(0, 2))
    return " ".join(x.format(s=item.subject) for x in sentences)


def _vocabulary() -> tuple[str, ...]:
    words = {w.strip(".,;:!?()\"'").lower() for it in _SUBJECT_ITEMS for f in it.facts for w in f.split()}
    return tuple(sorted(w for w in words if w.isalpha()))


def _gibberish(rng: random.Random, item: _Item, fmt: str | None) -> str:
    """Word salad: incoherent output of a broken sampler."""
    r = rng.random()
    if r < 0.5:  # words from everywhere, no sense
        words = rng.sample(_VOCABULARY, rng.randint(8, 40))
    elif r < 0.75:  # the subject's own words, scrambled
        words = " ".join(item.facts[i] for i in _pick(rng, item, rng.randint(1, 3))).split()
        rng.shuffle(words)
    else:  # keyboard mash with stray words
        words = [rng.choice(_KEYBOARD_MASH) for _ in range(rng.randint(4, 12))]
        words += rng.sample(_VOCABULARY, rng.randint(2, 8))
        rng.shuffle(words)
    text = " ".join(words)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:] + rng.choice((".", "", "...", " ??"))
    return text


_VOCABULARY = _vocabulary()

_REJECTERS = {
    "off_topic": _off_topic,
    "ignores_question": _ignores_question,
    "rude": _rude,
    "evasive": _evasive,
    "repetitive": _repetitive,
    "too_short": _too_short,
    "wrong_fact": _wrong_fact,
    "rambling": _rambling,
    "wrong_format": _wrong_format,
    "needless_refusal": _needless_refusal,
    "gibberish": _gibberish,
}


def _pair(rng: random.Random, kind: str) -> dict:
    item = _draw_item(rng)
    formats = _formats_for(item)
    if kind == "wrong_format":
        fmt = rng.choice(formats) if rng.random() < 0.35 else None
    else:
        fmt = rng.choice(formats) if rng.random() < 0.2 else None
    prompt = _make_prompt(rng, item, fmt)
    for _ in range(20):
        chosen = _good_answer(rng, item, fmt)
        rejected = _REJECTERS[kind](rng, item, fmt)
        if chosen.strip() != rejected.strip():
            break
    else:  # pragma: no cover - every rejecter changes the text almost surely
        raise RuntimeError(f"r2m.data: could not make distinct answers for {prompt!r}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind}


def generate_preferences(n: int, seed: int = 0) -> list[dict]:
    """`n` synthetic preference records `{"prompt", "chosen", "rejected", "kind"}`, deterministic in `seed`.

    The flaw kinds (`KINDS`) are balanced: each occurs `n // len(KINDS)` or one more times, in shuffled order.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"r2m-prefdata:{seed}")  # the old module name: the records (and the bundled head) stay the same
    kinds = [KINDS[i % len(KINDS)] for i in range(n)]
    rng.shuffle(kinds)
    return [_pair(rng, kind) for kind in kinds]


def split_preferences(
    pairs: Sequence[dict], holdout_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Split `pairs` into `(train, heldout)` by prompt: every record of a prompt lands on the same side.

    About `holdout_fraction` of the distinct prompts (rounded, at least one when the fraction is positive and
    there are at least two prompts) go to `heldout`; records keep their original order within each side.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    prompts = list(dict.fromkeys(p["prompt"] for p in pairs))
    rng = random.Random(f"r2m-prefdata-split:{seed}")
    rng.shuffle(prompts)
    n_held = round(holdout_fraction * len(prompts))
    if holdout_fraction > 0 and n_held == 0 and len(prompts) >= 2:
        n_held = 1
    held = set(prompts[:n_held])
    train = [p for p in pairs if p["prompt"] not in held]
    heldout = [p for p in pairs if p["prompt"] in held]
    return train, heldout
