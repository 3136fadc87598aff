"""The settings' defaults that are derived rather than fixed: the in-flight memory budget from the machine, and the
three caches' shares of R2M_CACHE_MB (their own old variables still win, with a deprecation line)."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["CACHE_SHARES", "cache_share", "default_inflight_bytes", "deprecated"]


# R2M_CACHE_MB's shares, in parts of their sum: the worker's RTE cache saves a backbone forward on every update, the
# canary holds whole hidden states, and the /embed cache only bridges an /embed to the /score that follows it.
CACHE_SHARES = {"rte_cache_mb": 8, "guard_canary_mb": 4, "embed_cache_mb": 1}


def cache_share(data: dict[str, Any], name: str) -> int:
    return data["cache_mb"] * CACHE_SHARES[name] // sum(CACHE_SHARES.values())


@functools.cache
def deprecated(name: str) -> None:
    logging.getLogger("r2m.service.config").warning(
        "R2M_%s is deprecated: set R2M_CACHE_MB, which gives this cache %d/%d of itself (the value set still wins)",
        name.upper(), CACHE_SHARES[name], sum(CACHE_SHARES.values()),
    )  # fmt: skip


def default_inflight_bytes() -> int:
    """A quarter of the memory this process may use (the machine's, or its container's cgroup limit when lower),
    between 256 MiB and 8 GiB (1 GiB where neither can be read)."""
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v2, v1
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" or a huge number: no limit
            sizes.append(int(text))
    if not sizes:
        return 2**30
    return int(min(max(min(sizes) // 4, 256 * 2**20), 8 * 2**30))
