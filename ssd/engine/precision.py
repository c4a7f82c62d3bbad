"""The compute precision of a training step (``train.precision``) and its autocast dtype."""
from __future__ import annotations

import torch

from ssd.util.settings import PRECISIONS

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``requested`` (one of PRECISIONS) on ``device``.

    ``auto``: on a GPU, bf16 autocast where the GPU has it, else fp16 with loss scaling; on a CPU,
    bf16 autocast only where the CPU computes bf16 natively (AVX512-BF16 or AMX), else fp32, since
    emulated bf16 is slower than fp32.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"train.precision={requested!r}: expected one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        # Emulation counted, a V100 or T4 would say yes and run bf16 slower than fp16.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX) and oneDNN is there to use it."""
    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, name, lambda: False)() for name in
                 ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return bool(native and torch.backends.mkldnn.is_available())
