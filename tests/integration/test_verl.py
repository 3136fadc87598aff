"""The verl adapter (`r2m.client.verl`) against the real server: the same rewards as /score, one call per sample
from many threads (as verl's naive reward manager runs a sync reward function) or one batched call."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import pytest

from r2m.client import R2MClient

from .conftest import Process


@pytest.fixture(scope="module")
def r2m_verl() -> Iterator[ModuleType]:
    """The adapter, imported here rather than at collection: importing a submodule sets it as an attribute of
    `r2m.client`, and the pinned public surface (test_exported_members) must not see it."""
    import r2m.client

    module = importlib.import_module("r2m.client.verl")
    yield module
    vars(r2m.client).pop("verl", None)


PROMPT = "How do I boil an egg?"
RESPONSES = [
    "Put the egg in cold water, bring it to a boil, simmer for nine minutes, then cool it in ice water.",
    "No idea. Look it up yourself.",
    "Eggs are laid by hens.",
]


def test_module_level_compute_score_matches_score(
    r2m_verl: ModuleType, server: Process, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(r2m_verl, "_clients", {})
    monkeypatch.setenv("R2M_URL", server.url)
    with R2MClient(server.url) as client:
        expected = client.score(PROMPT, RESPONSES).rewards
    samples = [(r, {"question": PROMPT, "index": i}) for i, r in enumerate(RESPONSES * 8)]
    with ThreadPoolExecutor(8) as pool:
        got = list(
            pool.map(
                lambda s: r2m_verl.compute_score(
                    data_source="gsm8k", solution_str=s[0], ground_truth="x", extra_info=s[1]
                ),
                samples,
            )
        )
    assert got == pytest.approx(expected * 8, abs=1e-5)
    batched = r2m_verl.compute_score_batched(
        data_sources=["gsm8k"] * 3,
        solution_strs=RESPONSES,
        ground_truths=[None] * 3,
        extra_infos=[{"prompt": PROMPT}] * 3,
    )
    assert batched == pytest.approx(expected, abs=1e-5)
