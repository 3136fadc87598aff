"""The synthetic preference set: deterministic, balanced, prompt-disjoint splits, strict JSONL reading."""

from __future__ import annotations

import ast
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

import r2m.data
from r2m.data import KINDS, TOPICS, generate_preferences, read_jsonl, split_preferences, write_jsonl


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    return generate_preferences(2000, seed=0)


def test_same_seed_gives_identical_records() -> None:
    assert generate_preferences(300, seed=7) == generate_preferences(300, seed=7)


def test_different_seeds_give_different_samples() -> None:
    a, b = generate_preferences(300, seed=0), generate_preferences(300, seed=1)
    assert a != b
    shared = {p["prompt"] for p in a} & {p["prompt"] for p in b}
    assert len(shared) < 100


def test_empty_and_negative_sizes() -> None:
    assert generate_preferences(0) == []
    with pytest.raises(ValueError, match="n must be"):
        generate_preferences(-1)


def test_records_are_well_formed(pairs: list[dict]) -> None:
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected", "kind"}
        assert all(isinstance(p[k], str) and p[k].strip() for k in p)
        assert p["kind"] in KINDS
        assert p["chosen"].strip() != p["rejected"].strip()
        for text in (p["prompt"], p["chosen"], p["rejected"]):
            assert not re.search(r"\{[a-z]?\}", text), f"unfilled template slot in {text!r}"
    json.dumps(pairs)  # plain JSON types only


def test_every_kind_is_present_and_balanced(pairs: list[dict]) -> None:
    counts = Counter(p["kind"] for p in pairs)
    assert set(counts) == set(KINDS)
    lo, hi = len(pairs) // len(KINDS), -(-len(pairs) // len(KINDS))
    assert all(lo <= c <= hi for c in counts.values()), counts


@pytest.mark.parametrize("n", [1, 10, 97])
def test_balance_holds_for_any_n(n: int) -> None:
    counts = Counter(p["kind"] for p in generate_preferences(n, seed=2))
    assert max(counts.values()) - min(counts.get(k, 0) for k in KINDS) <= 1


def test_prompts_are_varied(pairs: list[dict]) -> None:
    assert len(TOPICS) >= 40
    prompts = {p["prompt"] for p in pairs}
    assert len(prompts) >= 1000
    assert len({p["chosen"] for p in pairs}) >= 1000


def test_length_alone_does_not_separate_chosen_from_rejected(pairs: list[dict]) -> None:
    longer = sum(len(p["chosen"]) > len(p["rejected"]) for p in pairs) / len(pairs)
    assert 0.25 <= longer <= 0.75, longer
    # long-but-bad and short-but-good answers are both common
    assert sum(len(p["rejected"]) > 300 for p in pairs) >= 0.1 * len(pairs)
    assert sum(len(p["chosen"]) < 120 for p in pairs) >= 0.1 * len(pairs)


def test_format_requests_are_honoured_by_chosen(pairs: list[dict]) -> None:
    bullets = [p for p in pairs if "bullet" in p["prompt"] or "as a list" in p["prompt"]]
    steps = [p for p in pairs if "numbered steps" in p["prompt"] or "List the steps" in p["prompt"]]
    one = [p for p in pairs if "one sentence" in p["prompt"].lower() or "single sentence" in p["prompt"]]
    assert bullets and steps and one
    for p in bullets:
        lines = p["chosen"].splitlines()
        assert sum(line.startswith("- ") for line in lines) >= len(lines) - 1 >= 1
    for p in steps:
        assert re.search(r"^1\. .*\n2\. ", p["chosen"], re.M)
    for p in one:
        assert "\n" not in p["chosen"] and len(p["chosen"]) < 200


def test_split_is_prompt_disjoint_and_deterministic(pairs: list[dict]) -> None:
    doubled = pairs + [dict(p, chosen=p["chosen"] + " Hope that helps!") for p in pairs[:300]]
    train, held = split_preferences(doubled, holdout_fraction=0.2, seed=0)
    assert len(train) + len(held) == len(doubled)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in held}
    n_prompts = len({p["prompt"] for p in doubled})
    assert abs(len({p["prompt"] for p in held}) - 0.2 * n_prompts) <= 1
    assert split_preferences(doubled, 0.2, seed=0) == (train, held)
    assert split_preferences(doubled, 0.2, seed=1)[1] != held
    # records keep their order within each side
    pos = {id(p): i for i, p in enumerate(doubled)}
    assert [pos[id(p)] for p in held] == sorted(pos[id(p)] for p in held)


def test_split_edge_cases() -> None:
    two = generate_preferences(2, seed=0)
    train, held = split_preferences(two, holdout_fraction=0.2)
    assert len(held) == 1 and len(train) == 1
    assert split_preferences(two, holdout_fraction=0.0) == (two, [])
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="holdout_fraction"):
            split_preferences(two, holdout_fraction=bad)


def test_jsonl_round_trip(tmp_path: Path, pairs: list[dict]) -> None:
    path = tmp_path / "sub" / "prefs.jsonl"
    write_jsonl(pairs[:50], path)
    assert read_jsonl(path) == pairs[:50]
    assert read_jsonl(str(path)) == pairs[:50]
    assert len(path.read_text(encoding="utf-8").splitlines()) == 50


def test_read_jsonl_skips_blank_lines_and_accepts_records_without_kind(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('\n{"prompt": "p", "chosen": "c", "rejected": "r"}\n\n', encoding="utf-8")
    assert read_jsonl(path) == [{"prompt": "p", "chosen": "c", "rejected": "r"}]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "p", "chosen": "c"}', "'rejected' must be a string"),
        ('{"prompt": "p", "chosen": 3, "rejected": "r"}', "'chosen' must be a string"),
        ('{"prompt": "p", "chosen": "c", "rejected": "r", "kind": 1}', "'kind' must be a string"),
        ('{"prompt": "p", "chosen": "c", "rejected": ', "not valid JSON"),
        ('["p", "c", "r"]', "expected a JSON object"),
    ],
)
def test_read_jsonl_names_the_bad_line(tmp_path: Path, bad_line: str, message: str) -> None:
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r", "kind": "rude"})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{good}\n{bad_line}\n{good}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"line 4: .*{re.escape(message)}"):
        read_jsonl(path)


def test_the_data_package_uses_only_the_standard_library() -> None:
    modules = set()
    for source in Path(r2m.data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    assert modules <= set(sys.stdlib_module_names) | {"__future__"}, modules
