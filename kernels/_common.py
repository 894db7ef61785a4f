"""What every kernel file shares: interpreter detection, dtype mapping, SM count, config picking.

Autotuning policy (one place, so every op behaves the same):
* Under ``TRITON_INTERPRET=1`` (CPU tests) every op uses one fixed, small config and nothing is
  benchmarked: the interpreter's cost grows with programs x loop iterations, not with block size.
* On a GPU each op ranks its candidate configs for the shape with a cheap heuristic; with
  autotuning on (default; ``APM_FAST_AUTOTUNE=0`` turns it off) ``triton.autotune`` benchmarks
  the top few (``APM_FAST_AUTOTUNE_TOP``, default 3) once per shape key, otherwise the top one
  runs directly (no benchmarking, so nothing to warm up before a CUDA graph capture).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Read once: @triton.jit functions are built for the interpreter only if it was on when they were
# defined, so a later change of the variable would not switch these kernels anyway.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SUPPORTED = tuple(_TL)


def tl_dtype(dtype: torch.dtype):
    try:
        return _TL[dtype]
    except KeyError:
        raise TypeError(f"triton kernels: expected a dtype in {[str(d) for d in SUPPORTED]}, got {dtype}") from None


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands multiply in true fp32 ("ieee"): the fp32 mode exists for accuracy, not speed.
    16-bit operands ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def autotune_enabled() -> bool:
    return not INTERPRET and os.environ.get("APM_FAST_AUTOTUNE", "1") != "0"


def autotune_top() -> int:
    return max(1, int(os.environ.get("APM_FAST_AUTOTUNE_TOP", "3")))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small stand-in (4) on the CPU so that the
    interpreter exercises the split paths with tiny problems."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def config_kwargs(cfg: triton.Config) -> dict:
    """Launch keyword arguments of a config (meta-parameters, warps, stages) for a raw kernel."""
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def tuned(fn, configs, key, rank, **autotune_kw):
    """An autotuned wrapper of the raw kernel ``fn`` whose candidates, for the shape at hand, are the
    top ``autotune_top()`` of ``configs`` ordered by ``rank(configs, named_args)``."""

    def prune(cfgs, named_args, **kwargs):
        return rank(cfgs, {**named_args, **kwargs})[:autotune_top()]

    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                           **autotune_kw)(fn)


# Tests set this to fill every output buffer with NaN before the kernels write it: an element a
# kernel forgets to write then fails the comparison instead of passing on stale memory.
POISON_OUTPUTS = os.environ.get("APM_FAST_POISON_OUTPUTS", "0") == "1"


def empty(shape, *, device, dtype) -> torch.Tensor:
    """An output buffer the kernels overwrite entirely (NaN-filled when POISON_OUTPUTS)."""
    t = torch.empty(shape, device=device, dtype=dtype)
    if POISON_OUTPUTS:
        t.fill_(float("nan"))
    return t


def check_device(name: str, t: torch.Tensor, device: torch.device):
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (like the other operands), got {t.device}")


def launch_device_ok(device: torch.device):
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter: say which is missing."""
    if device.type == "cuda" or (device.type == "cpu" and INTERPRET):
        return
    if device.type == "cpu":
        raise RuntimeError("triton kernels: CPU tensors need TRITON_INTERPRET=1 set before apm_fast.kernels "
                           "is imported (Triton's interpreter); on a GPU pass CUDA tensors")
    raise RuntimeError(f"triton kernels: expected CUDA tensors, got tensors on {device}")
