"""How much memory one student costs, and how many students fit.

Budget of one ``ttt-l14`` student (N = 22.03 M trained parameters, 19.66 M of them GEMM
operands; B = 1 image, L = 1024, bf16 compute, fp32 state), in MB (1e6 B):

=============================================  ==========
fp32 master weights, gradients, Adam m and v    352.5   (16 N)
bf16 copy of the GEMM operands                   39.3   (2 x 19.66 M)
the image (fp32, static input of the graph)       2.4
**state subtotal**                              394.3
kept for the backward at its peak: P = pos W_P^T (L x 4096 bf16) 8.4, patches 2.4
the backward's peak: dW of the first consumer (2048 x 4096 fp32) 33.6 beside dy (L x 2048 bf16) 4.2
**peak of a step**                              443.0
=============================================  ==========

That is with a fused primitive table (its kernels allocate nothing but their outputs, Adam in
place), and it relies on the driver dropping every activation and gradient as soon as it is used
(``driver.backward(..., grad_out=..., release=True)``); ``tests/test_engine_memory.py`` traces it
on the meta device. The plain-PyTorch table upcasts GEMM operands to fp32 and makes temporaries
in Adam (sliced, see ``program._adam_chunks``): about 0.48 GB. A table that keeps the first
layer's activation from the forward for the backward (``first_layer_act_kept``: the Triton and
cuda tables) holds L x 4096 bf16 more through the backward (8.4 MB; ``student_bytes`` measures
it). The init snapshot (4 N, 88 MB) and
the position codes are shared by all students and not counted per student.

``student_bytes`` measures instead of trusting the table: it runs one eager step at S = 1 and
S = 2 and takes the difference of the peaks (the marginal cost of one student, with the backend's
real transients); on the CPU it returns the formula.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

from ..ops.contract import acc_dtype_for

__all__ = ["estimate_student_bytes", "student_bytes", "choose_students", "count_params"]

_MEASURED: Dict[tuple, Tuple[int, int]] = {}


def count_params(config) -> int:
    """N: trained parameters of one student."""
    c = config
    widths = (c.column_dim,) + c.hidden
    n = c.in_chans * c.patch * c.patch + 1
    n += sum(widths[i] * widths[i + 1] + widths[i + 1] for i in range(len(c.hidden)))
    n += c.hidden[-1] * c.dim + c.dim
    if c.pool:
        n += 4 * c.dim * c.dim + 5 * c.dim          # in_proj (3D x D + 3D), out_proj, query
    return n


def _numel(c, name: str) -> int:
    """Elements of one GEMM operand (``mlp.i.weight/bias``, ``head.weight/bias``)."""
    widths = (c.column_dim,) + c.hidden + (c.dim,)
    i = len(c.hidden) if name.startswith("head.") else int(name.split(".")[1])
    return widths[i] * widths[i + 1] if name.endswith(".weight") else widths[i + 1]


def estimate_student_bytes(config, compute_dtype: torch.dtype, master_dtype: torch.dtype = torch.float32,
                           moment_dtype: torch.dtype | None = None) -> int:
    """Formula (see the module docstring): state + kept activations + the largest transient."""
    c = config
    n = count_params(c)
    msz = torch.empty((), dtype=master_dtype).element_size()
    vsz = torch.empty((), dtype=moment_dtype or master_dtype).element_size()
    csz = torch.empty((), dtype=compute_dtype).element_size()
    asz = torch.empty((), dtype=acc_dtype_for(compute_dtype)).element_size()
    from .store import gemm_weight_names
    n_gemm = sum(_numel(c, name) for name in gemm_weight_names(c))
    state = 2 * msz * n + 2 * vsz * n + (csz * n_gemm if compute_dtype != master_dtype else 0)
    L = c.queries
    kept = L * (sum(c.hidden) + c.dim) * csz + L * c.in_chans * c.patch ** 2 * asz
    transient = max(c.hidden[0] * c.pos_dim, max(a * b for a, b in zip(c.hidden, c.hidden[1:] + (c.dim,)))) * asz
    return state + kept + transient


def student_bytes(prim, config, compute_dtype, master_dtype, device, snapshot,
                  moment_dtype=None) -> Tuple[int, int]:
    """(bytes per student, bytes shared by all students) for this table/config/dtype.

    On CUDA: measured once per process and key (two eager steps at S = 1 and S = 2, peaks
    compared); elsewhere the formula, with no shared part."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return estimate_student_bytes(config, compute_dtype, master_dtype, moment_dtype), 0
    key = (config, type(prim).__qualname__, getattr(prim, "name", ""), compute_dtype, master_dtype, moment_dtype,
           str(dev))
    if key not in _MEASURED:
        from .program import StudentProgram
        peaks = []
        for s in (1, 2):
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            prog = StudentProgram(prim, config, snapshot, s, 1, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                  compute_dtype=compute_dtype, master_dtype=master_dtype, device=dev,
                                  graphs=False, moment_dtype=moment_dtype)
            img = torch.zeros(s, config.in_chans, config.image_size, config.image_size, device=dev)
            prog.run(img, torch.zeros(s, config.dim, device=dev))
            torch.cuda.synchronize(dev)
            peaks.append(torch.cuda.max_memory_allocated(dev) - base)
            del prog, img
        per = max(peaks[1] - peaks[0], estimate_student_bytes(config, compute_dtype, master_dtype, moment_dtype) // 2)
        _MEASURED[key] = (per, max(0, peaks[0] - per))
    return _MEASURED[key]


def choose_students(n_images: int, per_student: int, shared: int, device, *, max_students: int = 64,
                    reserve_bytes: int | None = None, safety: float = 1.15) -> int:
    """S for ``n_images`` images: as many as fit in free device memory (minus ``reserve_bytes``,
    default max(1 GiB, 5 % of the device), with a ``safety`` factor on the per-student cost),
    at most ``max_students`` and ``n_images``. On the CPU: 1. Batching buys little there, and
    with one student at a time a result is bitwise independent of how images are grouped (batched
    reductions may round differently with S; within the dtype's tolerance, but not bit for bit)."""
    n_images = max(1, int(n_images))
    dev = torch.device(device)
    if dev.type != "cuda":
        return 1
    free, total = torch.cuda.mem_get_info(dev)
    free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)   # cached, reusable
    reserve = max(1 << 30, total // 20) if reserve_bytes is None else int(reserve_bytes)
    fit = int((free - reserve - shared) // max(1, math.ceil(per_student * safety)))
    return max(1, min(fit, max_students, n_images))
