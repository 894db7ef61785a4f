"""What every kernel file shares: interpreter detection, dtype mapping, SM count, config picking.

Autotuning policy (one place, so every op behaves the same):
* Under ``TRITON_INTERPRET=1`` (CPU tests) every op uses one fixed, small config and nothing is
  benchmarked: the interpreter's cost grows with programs x loop iterations, not with block size.
* On a GPU each op ranks its candidate configs for the shape with a cheap heuristic. The GEMMs
  first look the shape up in ``tuned_configs.TUNED`` (winners measured on this GPU, else on one of
  its compute capability: used as they are, nothing benchmarked). Otherwise, with autotuning on
  (default; ``APM_FAST_AUTOTUNE=0`` turns it off) the top few (``APM_FAST_AUTOTUNE_TOP``, default
  3) are benchmarked once per shape key (``pick`` for the GEMMs, ``triton.autotune`` for the
  pool), otherwise the top one runs directly (no benchmarking, so nothing to warm up before a
  CUDA graph capture).

TMA (Hopper's tensor memory accelerator) is used through host-side tensor descriptors
(``triton.tools.tensor_descriptor.TensorDescriptor``, in Triton 3.6 and 3.7, interpreter
included); ``as_rows`` / ``tma_ok`` say whether an operand can be described (unit last stride,
16-byte aligned base and row stride). ``APM_FAST_GEMM_VARIANT=ptr`` forces the pointer kernels.
"""
from __future__ import annotations

import functools
import math
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
    if INTERPRET and dtype == torch.bfloat16:
        # Triton's interpreter computes bf16 dots wrongly (errors of 1e9 relative, an upstream
        # limitation): refused rather than returned
        raise TypeError("triton kernels: bf16 is not supported in Triton's interpreter (TRITON_INTERPRET=1: "
                        "its bf16 products are wrong); use fp32 or fp16 there, or the torch table")
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


from apm_fast.ops.contract import empty  # noqa: E402,F401  (the one allocator of outputs)


def launch_device_ok(device: torch.device):
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter: say which is missing."""
    if device.type == "cuda" or (device.type == "cpu" and INTERPRET):
        return
    if device.type == "cpu":
        raise RuntimeError("triton kernels: CPU tensors need TRITON_INTERPRET=1 set before apm_fast.kernels "
                           "is imported (Triton's interpreter); on a GPU pass CUDA tensors")
    raise RuntimeError(f"triton kernels: expected CUDA tensors, got tensors on {device}")


# ------------------------------------------------------------------------------------ TMA
try:   # host-side descriptors (Triton >= 3.3); without them every GEMM uses the pointer kernels
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None

HAS_TMA = TensorDescriptor is not None


def tma_allowed() -> bool:
    """TMA variants may be chosen (``APM_FAST_GEMM_VARIANT=ptr`` forbids them, a debugging escape)."""
    return HAS_TMA and os.environ.get("APM_FAST_GEMM_VARIANT", "") != "ptr"


def as_rows(t: torch.Tensor):
    """``t`` as a 2-D (rows, columns) view without copying: a 2-D tensor as it is, an (S, M, X)
    tensor as (S * M, X) when its students follow each other (stride(0) == M * stride(1), e.g. a
    contiguous tensor, or a column slice of one); None otherwise."""
    if t.dim() == 2:
        return t
    if t.dim() == 3 and (t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1)):
        return t.as_strided((t.shape[0] * t.shape[1], t.shape[2]), (t.stride(1), t.stride(2)))
    return None


def tma_ok(t2d) -> bool:
    """Can a TMA descriptor cover this 2-D view? Unit last stride, 16-byte aligned base and rows."""
    if t2d is None or t2d.dim() != 2 or min(t2d.shape) < 1:
        return False
    elt = t2d.element_size()
    return (t2d.stride(1) == 1 and t2d.data_ptr() % 16 == 0 and (t2d.stride(0) * elt) % 16 == 0
            and t2d.dtype in _TL)


def descriptor(t2d: torch.Tensor, block):
    """Host-side descriptor of a 2-D view (its block shape is the tile one load brings in)."""
    return TensorDescriptor(t2d, list(t2d.shape), list(t2d.stride()), list(block))


# ------------------------------------------------------------------------------------ picking
_PICKED: dict = {}


def bench(fn) -> float:
    """Milliseconds per call of ``fn`` on the GPU (tests replace this)."""
    return triton.testing.do_bench(fn, warmup=5, rep=25)


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def pick(key, ranked, run, device):
    """The config to run for shape ``key`` among ``ranked`` (best guess first): with autotuning on,
    the fastest of the first ``autotune_top()`` measured once per key (``run(cfg)`` performs the
    whole operation with ``cfg``; a candidate that fails to build is skipped), else the first. Never
    measures during a CUDA graph capture (the first candidate runs; nothing is remembered)."""
    if key in _PICKED:
        return _PICKED[key]
    if not autotune_enabled() or len(ranked) == 1 or _capturing(device):
        return ranked[0]
    best, best_t = ranked[0], math.inf
    for cfg in ranked[:autotune_top()]:
        try:
            t = bench(lambda: run(cfg))
        except Exception:        # e.g. out of shared memory for this tile on this GPU
            continue
        if t < best_t:
            best, best_t = cfg, t
    _PICKED[key] = best
    return best


# ------------------------------------------------- device code shared by the pointer and TMA variants
@triton.jit
def gemm_epilogue(acc, offs_l, offs_n, in_l, in_n, bias_s, m_sb, u_row, r_sb, sm_l, sm_n, su_x,
                  HAS_BIAS: tl.constexpr, RELU: tl.constexpr, EPI_MASK: tl.constexpr, ZERO_ROWS: tl.constexpr):
    """A GEMM tile's epilogue (gemm.py, gemm_tma.py): + bias, ReLU, and the input gradient's
    mask: EPI_MASK 1: C *= (m > 0); 2: C *= (m + u > 0) and r += the tile's column sums (one image
    per row segment); 3: C *= (m > 0) and r += the column sums (m a kept activation ReLU(P + u)).
    ``bias_s``, ``m_sb``, ``r_sb``: the bases of this student (and segment).
    ZERO_ROWS: the mask zeroes the rows past L as well (a TMA tile may hold the next image's rows
    there; the pointer kernel's load them as 0 already, and the extra predicate costs it code).
    Returns (C, the tile's in-bounds mask)."""
    if HAS_BIAS:
        bias = tl.load(bias_s + offs_n, mask=in_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tile_mask = in_l[:, None] & in_n[None, :]
    if EPI_MASK != 0:
        m = tl.load(m_sb + offs_l[:, None] * sm_l + offs_n[None, :] * sm_n, mask=tile_mask, other=0.0).to(tl.float32)
        if EPI_MASK == 2:
            u = tl.load(u_row + offs_n * su_x, mask=in_n, other=0.0)
            m = m + u.to(tl.float32)[None, :]
        if ZERO_ROWS:
            acc = tl.where(tile_mask & (m > 0), acc, 0.0)
        else:
            acc = tl.where(m > 0, acc, 0.0)
        if EPI_MASK >= 2:
            tl.atomic_add(r_sb + offs_n, tl.sum(acc, axis=0), mask=in_n)
    return acc, tile_mask


@triton.jit
def wgrad_share(pid, L, NSEG, N, K, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """A weight-gradient program's share of the work (wgrad.py, wgrad_tma.py): its output tile
    (pid_n, pid_k), the row tiles per segment, and the chunks of BLOCK_M rows [c_lo, c_hi) it
    sums (its split of them). The split index varies slowest: programs running together read the
    same rows (L2 reuse)."""
    num_n = tl.cdiv(N, BLOCK_N)
    num_k = tl.cdiv(K, BLOCK_K)
    num_tiles = num_n * num_k
    split = pid // num_tiles
    tile = pid % num_tiles
    tiles_l = tl.cdiv(L, BLOCK_M)
    chunks = NSEG * tiles_l
    per = tl.cdiv(chunks, SPLIT)
    c_lo = split * per
    c_hi = tl.minimum(c_lo + per, chunks)
    return tile // num_k, tile % num_k, tiles_l, c_lo, c_hi


@triton.jit
def wgrad_store(dw_s, db_s, offs_n, offs_k, in_n, in_k, sw_n, sw_k, acc, db, pid_k,
                HAS_DB: tl.constexpr, SPLIT: tl.constexpr):
    """A weight-gradient tile written (split-K: added) at this student's ``dw_s``; db by the
    programs of the first column tile."""
    w_ptrs = dw_s + offs_n[:, None] * sw_n + offs_k[None, :] * sw_k
    out_mask = in_n[:, None] & in_k[None, :]
    if SPLIT == 1:
        tl.store(w_ptrs, acc, mask=out_mask)
    else:
        tl.atomic_add(w_ptrs, acc, mask=out_mask)
    if HAS_DB:
        if pid_k == 0:
            if SPLIT == 1:
                tl.store(db_s + offs_n, db, mask=in_n)
            else:
                tl.atomic_add(db_s + offs_n, db, mask=in_n)
