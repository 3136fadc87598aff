"""Where and in which dtype a backbone runs: `R2M_DEVICE` and `R2M_DTYPE` resolved against this machine."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

__all__ = ["cpu_has_native_bf16", "resolve_device", "resolve_dtype"]

log = logging.getLogger("r2m.service.backbone")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16), so a bf16 backbone is faster there
    rather than emulated. Asks torch's CPU feature probe, else the kernel's /proc/cpuinfo flags."""
    try:
        caps = torch._C._cpu._get_cpu_capability()  # private in torch 2.13: any failure means "look elsewhere"
        if isinstance(caps, dict) and ("avx512_bf16" in caps or "amx_bf16" in caps):
            return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    except (AttributeError, RuntimeError):
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device, kind: str = "encoder") -> torch.dtype | None:
    """The backbone dtype for the `R2M_DTYPE` setting; None means "the checkpoint's own saved dtype".

    `auto`: a Hugging Face reward model (`kind="sequence-classification"`) loads in its checkpoint's saved dtype,
    as plain transformers 5 does, so it gives the same rewards; an encoder RM (the bundled default, r2m folders)
    runs bfloat16 on CUDA and float32 on CPU. Measured on the default RM on a CPU with native bf16 (AMX), bf16 is
    ~1.5-1.9x faster, but a text's reward then moves by up to ~0.04 with the requests it is batched with (float32:
    ~3e-6), which breaks the "same reward whatever the batch" contract; so bf16 on CPU is opt-in
    (`R2M_DTYPE=bfloat16`), with the tolerance in docs/settings.md.
    """
    if dtype == "auto":
        if kind == "sequence-classification":
            return None
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cpu" and cpu_has_native_bf16():
            log.info("this CPU has native bf16: R2M_DTYPE=bfloat16 runs the encoder RM ~1.5-1.9x faster (opt-in)")
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]
