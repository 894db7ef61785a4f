"""The ``cuda`` backend: the primitive contract (apm_fast/ops/primitives.py) on the CUDA C++
kernels of csrc/ (CUTLASS SM90 GEMMs with fused epilogues, a portable GEMM elsewhere, the pool,
the flat Adam), compiled into ``apm_fast._C_cuda``.

This layer only allocates outputs and brings inputs to the layouts the kernels take (compute
dtype, unit-stride rows); the C++ bindings check every argument. Outputs are allocated with
``_empty`` (``torch.empty``) and written completely by the kernels.
"""
from __future__ import annotations

import torch

from .._ext import load_extension
from . import BackendUnavailable, register_backend
from .fused import FusedBackend

__all__ = ["CudaPrimitives", "cuda_extension"]

_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cuda_extension():
    """The compiled module, or BackendUnavailable saying what is missing and how to build it."""
    mod, why = load_extension("_C_cuda")
    if mod is None:
        raise BackendUnavailable(f"backend 'cuda': {why}")
    return mod


def _availability():
    mod, why = load_extension("_C_cuda")
    if mod is None:
        return False, why
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return True, ""


def _empty(*shape, dtype, device):
    """Every output of this backend is allocated here (tests swap in a NaN-filled allocation to
    catch an element a kernel does not write)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _cdt(w: torch.Tensor, fn: str) -> torch.dtype:
    if w.dtype not in _COMPUTE_DTYPES:
        raise TypeError(f"{fn}: the cuda backend computes in float32, bfloat16 or float16, got "
                        f"{w.dtype} (use backend='torch' for float64)")
    return w.dtype


def _rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in ``dtype`` with a unit stride in its last dimension (copies only when needed)."""
    t = t.to(dtype)
    return t if t.stride(-1) == 1 or t.size(-1) <= 1 else t.contiguous()


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


class CudaPrimitives:
    """The primitive table of the cuda backend (same methods and semantics as TorchPrimitives)."""

    name = "cuda"

    @property
    def ext(self):
        return cuda_extension()

    # ---------------------------------------------------------------- forward GEMMs
    def linear(self, x, w, b=None, *, relu=False, out_dtype=None):
        cdt = _cdt(w, "linear")
        w = _rows(w, cdt)
        s, n = w.shape[0], w.shape[1]
        out = _empty(s, x.shape[-2], n, dtype=out_dtype or cdt, device=w.device)
        self.ext.linear(_rows(x, cdt), w, None if b is None else b.to(cdt).contiguous(), bool(relu), out)
        return out

    def first_layer_linear(self, p, u, w, b, *, relu=True, out_dtype=None):
        # ReLU(P + u) is built by one elementwise kernel, then fed to the forward GEMM (see
        # csrc/cuda/trigger_split.cu for why it is not fused into the GEMM's operand load)
        return self.linear(self.first_layer_act(p, u), w, b, relu=relu, out_dtype=out_dtype)

    def first_layer_act(self, p, u):
        cdt = _cdt(p, "first_layer_act")
        p = p.contiguous()
        s, l, h1 = p.shape
        a = _empty(s, u.shape[1] * l, h1, dtype=cdt, device=p.device)
        self.ext.first_layer_act(p, _acc(u), a)
        return a

    # ---------------------------------------------------------------- backward GEMMs
    def linear_bwd_input(self, dy, w, *, mask=None, out_dtype=None):
        cdt = _cdt(w, "linear_bwd_input")
        w = _rows(w, cdt)
        out = _empty(dy.shape[0], dy.shape[1], w.shape[2], dtype=out_dtype or cdt, device=w.device)
        self.ext.linear_bwd_input(_rows(dy, cdt), w, None if mask is None else _rows(mask, cdt), out)
        return out

    def linear_bwd_weight(self, dy, x, *, bias=True):
        cdt = _cdt(dy, "linear_bwd_weight")
        dy = dy.contiguous()
        x = x.to(cdt).contiguous()
        s, _, n = dy.shape
        dw = _empty(s, n, x.shape[-1], dtype=torch.float32, device=dy.device)
        db = _empty(s, n, dtype=torch.float32, device=dy.device) if bias else None
        self.ext.linear_bwd_weight(dy, x, dw, db)
        return dw, db

    def first_layer_bwd_weight(self, dy, p, u, *, bias=True):
        return self.linear_bwd_weight(dy, self.first_layer_act(p, u), bias=bias)

    def first_layer_bwd_input(self, dy, w, p, u, *, out_dtype=None):
        cdt = _cdt(w, "first_layer_bwd_input")
        w = _rows(w, cdt)
        p = p.to(cdt).contiguous()
        s, l, h1 = p.shape
        b = u.shape[1]
        g1 = _empty(s, b * l, h1, dtype=out_dtype or cdt, device=w.device)
        r = _empty(s, b, h1, dtype=torch.float32, device=w.device)
        self.ext.first_layer_bwd_input(_rows(dy, cdt), w, p, _acc(u), g1, r)
        return g1, r

    # ---------------------------------------------------------------- single-query pool
    def pool_fwd(self, f, pos_out, kt, scale):
        _cdt(f, "pool_fwd")
        f = f.contiguous()
        s, b, _, d = f.shape
        h = kt.shape[1]
        sbar = _empty(s, b, h, d, dtype=torch.float32, device=f.device)
        lse = _empty(s, b, h, dtype=torch.float32, device=f.device)
        self.ext.pool_fwd(f, pos_out.to(f.dtype).contiguous(), _acc(kt), float(scale), sbar, lse)
        return sbar, lse

    def pool_bwd(self, f, pos_out, kt, scale, sbar, lse, dsbar, *, out_dtype=None):
        _cdt(f, "pool_bwd")
        f = f.contiguous()
        s, _, _, d = f.shape
        df = _empty(f.shape, dtype=out_dtype or f.dtype, device=f.device)
        dkt = _empty(s, kt.shape[1], d, dtype=torch.float32, device=f.device)
        self.ext.pool_bwd(f, pos_out.to(f.dtype).contiguous(), _acc(kt), float(scale), _acc(sbar),
                          _acc(lse), _acc(dsbar), df, dkt)
        return df, dkt

    # ---------------------------------------------------------------- optimizer
    def adam_(self, params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, *, lowp=None):
        # In place over flat buffers. (S, n) views whose rows are padded (unit last stride, larger
        # row stride) are updated one row at a time; anything else the binding refuses, by name.
        grads = grads.to(torch.float32)
        state = [params, exp_avg, exp_avg_sq] + ([lowp] if lowp is not None else [])
        args = (float(beta1), float(beta2), float(eps))
        if all(t.is_contiguous() for t in state) or params.dim() != 2 or \
                any(t.dim() != 2 or t.stride(-1) != 1 for t in state):
            self.ext.adam_(params, grads.contiguous(), exp_avg, exp_avg_sq, step, lr, *args, lowp)
            return
        for i in range(params.shape[0]):
            self.ext.adam_(params[i], grads[i].contiguous(), exp_avg[i], exp_avg_sq[i], step, lr, *args,
                           None if lowp is None else lowp[i])


register_backend(FusedBackend("cuda", CudaPrimitives(), _availability))
