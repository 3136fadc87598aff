"""The one JSONL reader and writer of r2m, and the two record kinds read from files: prompts and labelled pairs."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["BUNDLED_PROMPTS", "PAIR_FIELDS", "load_pairs", "load_prompts", "read_jsonl", "write_jsonl"]

PAIR_FIELDS = ("prompt", "chosen", "rejected")
BUNDLED_PROMPTS = {"default": "prompts.jsonl"}  # name -> file of this package (64 short chat prompts)


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write one JSON object per line (UTF-8), creating the parent folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(
    path: str | Path, fields: Sequence[str] = PAIR_FIELDS, optional: Sequence[str] = ("kind",)
) -> list[dict]:
    """JSON objects, one per line, each with string `fields` (and, when present, string `optional` fields).

    Blank lines are skipped. Raises `ValueError` naming the file and the 1-based line number when a line is not
    JSON, not an object, or breaks the field rules.
    """
    path = Path(path)
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: line {lineno}: expected a JSON object, got {type(rec).__name__}")
            for key in fields:
                if not isinstance(rec.get(key), str):
                    got = "missing" if key not in rec else type(rec[key]).__name__
                    raise ValueError(f"{path}: line {lineno}: {key!r} must be a string ({got})")
            for key in optional:
                if key in rec and not isinstance(rec[key], str):
                    raise ValueError(f"{path}: line {lineno}: {key!r} must be a string")
            out.append(rec)
    return out


def load_prompts(source: str) -> list[str]:
    """Prompts from a bundled set name (`BUNDLED_PROMPTS`), a .jsonl file ({"prompt": ...} per line) or a text
    file (one per line)."""
    path = Path(__file__).with_name(BUNDLED_PROMPTS[source]) if source in BUNDLED_PROMPTS else Path(source)
    if path.suffix == ".jsonl":
        prompts = [row["prompt"] for row in read_jsonl(path, fields=("prompt",), optional=())]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts={source!r}: no prompts in {path}")
    return prompts


def load_pairs(path: str | Path) -> list[dict[str, str]]:
    """Labelled pairs from a .jsonl file of {"prompt", "chosen", "rejected"} lines (other keys are dropped)."""
    pairs = [{k: row[k] for k in PAIR_FIELDS} for row in read_jsonl(path)]
    if not pairs:
        raise ValueError(f"pairs={str(path)!r}: no pairs in the file")
    return pairs
