"""Which dtype the feedback attention reads half-precision hidden states in, by what the CPU's matmuls do natively.

A CPU without native bfloat16 (or float16) matmul instructions runs torch's half-precision GEMMs through a slow
emulation, several times slower than the float32 one, so widening `h` to float32 first is faster than reading it as
it came (`widen`: a block of rows at a time, each block still in cache when the matmul reads it; bench/README.md,
section 2, has the figures). Where the instructions exist (AVX512-BF16 / AMX on x86,
the BF16 / FP16 extensions on Arm) and on CUDA, half precision is read as it is. R2M_CPU_HALF_HIDDEN overrides the
choice (`native`, `upcast`); `auto` decides once per process from the CPU flags in /proc/cpuinfo, or where those are
unreadable, or where oneDNN's instruction set is capped below them (ONEDNN_MAX_CPU_ISA), from a one-time
micro-measurement.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import torch

__all__ = ["HALF_MODES", "compute_dtype", "configure", "describe", "native_half"]

logger = logging.getLogger("r2m.precision")

HALF_MODES = ("auto", "native", "upcast")
_HALF = (torch.bfloat16, torch.float16)
# CPU flags (x86 /proc/cpuinfo "flags", Arm "Features") that mean native matmuls in that dtype.
_NATIVE_FLAGS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16", "asimdhp"),
}
_mode = "auto"


def configure(mode: str) -> None:
    """Set the process-wide choice (R2M_CPU_HALF_HIDDEN) and log what it means on this CPU."""
    global _mode
    if mode not in HALF_MODES:
        raise ValueError(f"unknown R2M_CPU_HALF_HIDDEN {mode!r}; choose one of {', '.join(HALF_MODES)}")
    _mode = mode
    logger.info("hidden states on the CPU: %s", describe())


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def _measured_native(dtype: torch.dtype) -> bool:
    """A half-precision matmul at most 1.5x the float32 one's time (best of 5, a 256 x 1024 x 1024 product)."""
    a, b = torch.randn(256, 1024), torch.randn(1024, 1024)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t)
        return min(times)

    return best(a.to(dtype), b.to(dtype)) <= 1.5 * best(a, b)


def _isa_cap() -> str | None:
    """oneDNN's instruction-set cap (ONEDNN_MAX_CPU_ISA, formerly DNNL_MAX_CPU_ISA) when one is set: torch's CPU
    matmuls then may not use what the flags show (with `AVX2` a bf16 matmul runs ~100x slower than float32 on a CPU
    with AVX512-BF16)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap if cap and cap.upper() not in ("ALL", "DEFAULT") else None


@functools.cache
def native_half(dtype: torch.dtype) -> tuple[bool, str]:
    """(whether this CPU multiplies `dtype` natively, how that was decided), once per process."""
    flags = _cpu_flags()
    if flags is not None:
        found = [f for f in _NATIVE_FLAGS[dtype] if f in flags]
        why = f"cpu flags: {', '.join(found) or 'none of ' + '/'.join(_NATIVE_FLAGS[dtype])}"
        cap = _isa_cap()
        if not found or cap is None:
            return bool(found), why
        return _measured_native(dtype), f"measured once: {why}, but ONEDNN_MAX_CPU_ISA={cap}"
    return _measured_native(dtype), "measured once"


def compute_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype hidden states of `dtype` are read in on `device`: their own, or float32 for half precision on a
    CPU without native matmuls in it (R2M_CPU_HALF_HIDDEN)."""
    if dtype not in _HALF or torch.device(device).type != "cpu" or _mode == "native":
        return dtype
    if _mode == "upcast":
        return torch.float32
    return dtype if native_half(dtype)[0] else torch.float32


def describe() -> str:
    """One line per half-precision dtype: the path taken on the CPU and why."""
    parts = []
    for dtype in _HALF:
        name = str(dtype).removeprefix("torch.")
        if _mode != "auto":
            parts.append(f"{name} {'as sent' if _mode == 'native' else 'upcast to float32'} (R2M_CPU_HALF_HIDDEN)")
            continue
        native, why = native_half(dtype)
        parts.append(f"{name} {'as sent' if native else 'widened to float32 in blocks'} ({why})")
    return "; ".join(parts)
