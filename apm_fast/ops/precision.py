"""Which dtype the GEMMs of a forward run in: the model's own, or torch's autocast dtype.

A model's forward computes in the model's dtype (fp64 models in fp64, fp32 in true fp32,
bf16/fp16 in their own), unless torch's autocast is on for the device: then an fp32 model's
GEMMs take the autocast dtype (fp32 accumulation, as autocast's own matmuls do). The same rule
holds on every backend, the reference included; the outputs come in the model's dtype. Nothing
is decided behind the user's back. The TTT trainer states its precision itself (``precision=``)
and ignores an ambient autocast.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["compute_dtype", "exact_convolutions", "PRECISIONS", "parse_precision", "precision_name"]

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def compute_dtype(model_dtype: torch.dtype, device) -> torch.dtype:
    """The GEMM operand dtype of a forward: autocast's dtype for an fp32 model under autocast on
    ``device``'s type, else the model's dtype."""
    kind = torch.device(device).type
    if model_dtype == torch.float32 and kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return model_dtype


@contextlib.contextmanager
def exact_convolutions(device):
    """cuDNN's fp32 convolutions in fp32 inside the block, on a CUDA ``device``: PyTorch lets cuDNN
    compute them in TF32 (a 10-bit mantissa) by default, which would put the trigger of an fp32
    model's plain forward (the reference backend, the RGB head) about 1e-4 off instead of 1e-7.
    Other dtypes are not affected; the GEMMs' TF32 switch (``torch.backends.cuda.matmul``) is off
    by default and left as the user set it."""
    c = torch.backends.cudnn
    if torch.device(device).type != "cuda" or not c.allow_tf32:
        yield
        return
    with c.flags(enabled=c.enabled, benchmark=c.benchmark, benchmark_limit=c.benchmark_limit,
                 deterministic=c.deterministic, allow_tf32=False):
        yield


def parse_precision(value, name: str = "precision"):
    """A torch dtype from a dtype or one of ``PRECISIONS``' names (None stays None)."""
    if value is None or isinstance(value, torch.dtype) and value in PRECISIONS.values():
        return value
    if isinstance(value, str) and value in PRECISIONS:
        return PRECISIONS[value]
    raise ValueError(f"{name}: expected one of {sorted(PRECISIONS)} (or a torch dtype among them), got {value!r}")


def precision_name(dtype: torch.dtype) -> str:
    """The name of a dtype as results state it ("bf16", "fp32", ...; others as torch spells them)."""
    return next((k for k, v in PRECISIONS.items() if v == dtype), str(dtype).replace("torch.", ""))
