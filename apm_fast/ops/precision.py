"""Which dtype the fused GEMMs run in.

fp64 models run in fp64 (tests), bf16/fp16 models in their own dtype. An fp32 model runs its
GEMMs in bf16 on a GPU (fp32 accumulation; the default, where the tensor cores pay) unless fp32 is
asked for with ``APM_FAST_PRECISION=fp32`` or ``with apm_fast.ops.precision("fp32"):``;
on the CPU it stays fp32.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

__all__ = ["precision", "compute_dtype"]

_NAMES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
_local = threading.local()


@contextlib.contextmanager
def precision(name: str):
    """Run fused GEMMs of fp32 models in ``name`` ("bf16", "fp16" or "fp32") inside the block."""
    if name not in _NAMES:
        raise ValueError(f"precision: expected one of {sorted(_NAMES)}, got {name!r}")
    old = getattr(_local, "name", None)
    _local.name = name
    try:
        yield
    finally:
        _local.name = old


def compute_dtype(model_dtype: torch.dtype, device) -> torch.dtype:
    if model_dtype in (torch.float64, torch.bfloat16, torch.float16):
        return model_dtype
    name = getattr(_local, "name", None) or os.environ.get("APM_FAST_PRECISION")
    if name is not None:
        if name not in _NAMES:
            raise ValueError(f"APM_FAST_PRECISION: expected one of {sorted(_NAMES)}, got {name!r}")
        return _NAMES[name]
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
