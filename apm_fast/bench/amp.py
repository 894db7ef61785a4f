"""The compute precision of a benchmark run, in one place.

On a GPU the model keeps fp32 master weights and runs under bf16 autocast (the precision of the
spec's H100 numbers); on the CPU everything runs in fp32. The authors-style step always uses fp16
autocast with a GradScaler, as their script does.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["default_amp_dtype", "autocast", "dtype_name"]


def default_amp_dtype(device):
    return torch.bfloat16 if torch.device(device).type == "cuda" else None


def autocast(device, dtype, *, cache_enabled: bool = True):
    """``torch.autocast`` for ``dtype`` (None: a no-op context). Graph capture needs
    ``cache_enabled=False``: the autocast weight cache must not outlive the captured region."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=cache_enabled)


def dtype_name(dtype) -> str:
    if dtype is None:
        return "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float64: "fp64"}.get(dtype, str(dtype).replace("torch.", ""))
