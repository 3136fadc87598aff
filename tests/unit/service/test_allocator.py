"""The malloc settings `r2m serve` and `r2m worker` make for themselves (r2m.service.allocator); the effect on
resident memory is measured against a real server in tests/integration/test_safety.py and bench section 11."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CALL = "from r2m.service.allocator import tune_allocator; print(tune_allocator())"


def _run(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    cmd = [sys.executable, "-c", CALL]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**clean, **env}, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_gets_a_fixed_mmap_threshold_and_two_arenas() -> None:
    assert _run({}) == "malloc: mmap threshold 128 KiB, 2 arenas"


def test_the_users_own_malloc_settings_win() -> None:
    said = _run({"MALLOC_ARENA_MAX": "4"})
    assert "MALLOC_ARENA_MAX" in said and "left" in said
