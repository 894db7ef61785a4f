"""The compute precision of a benchmark run, in one place.

On a GPU the model keeps fp32 master weights and runs under bf16 autocast (the precision of the
spec's H100 numbers); on the CPU everything runs in fp32. The authors-style step always uses fp16
autocast with a GradScaler, as their script does.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["default_amp_dtype", "autocast", "dtype_name", "PLAIN_BACKENDS", "backend_precision"]

# Backends written in plain PyTorch ops: they get the run's autocast. The fused backends choose
# their own compute dtype (``apm_fast.ops.precision``: bf16 GEMMs with fp32 accumulation on a GPU
# for fp32 weights) and are called without autocast, which would retype their PyTorch pieces.
PLAIN_BACKENDS = ("reference", "torch")


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


def backend_precision(name, device, amp_dtype):
    """(autocast dtype to call backend ``name`` under, label of the precision it computes in)."""
    if name in PLAIN_BACKENDS:
        return amp_dtype, dtype_name(amp_dtype)
    try:
        from ..ops.precision import compute_dtype

        return None, dtype_name(compute_dtype(torch.float32, device))
    except ImportError:  # a package without the fused driver: assume the GPU default
        return None, "bf16" if torch.device(device).type == "cuda" else "fp32"
