"""r2m.data: the data r2m ships and reads, standard library only.

- `generate_preferences` / `split_preferences`: the synthetic preference set the bundled reward model was fitted on
  (`r2m.data.synthetic`; its subjects are the package-data file `subjects.txt`);
- `load_prompts("default")`: the bundled chat prompts (`prompts.jsonl`), or prompts from a file;
- `read_jsonl` / `write_jsonl` / `load_pairs`: the one JSONL reader and writer.
"""

from .jsonl import BUNDLED_PROMPTS, PAIR_FIELDS, load_pairs, load_prompts, read_jsonl, write_jsonl
from .synthetic import KINDS, TOPICS, generate_preferences, split_preferences

__all__ = [
    "BUNDLED_PROMPTS",
    "KINDS",
    "PAIR_FIELDS",
    "TOPICS",
    "generate_preferences",
    "load_pairs",
    "load_prompts",
    "read_jsonl",
    "split_preferences",
    "write_jsonl",
]
