"""The ``cuda`` table: the primitive contract (``apm_fast.ops.contract``) on the CUDA C++ kernels
of ``csrc/`` (CUTLASS SM90 GEMMs with fused epilogues, a portable GEMM elsewhere, the pool, the
flat Adam), compiled into ``apm_fast._C_cuda``.

This layer only allocates outputs (``contract.empty``, shapes from ``contract.OUTPUTS``) and
brings inputs to the layouts the kernels take (compute dtype, unit-stride rows); the C++ bindings
check every argument.
"""
from __future__ import annotations

import torch

from .._ext import load_extension
from ..ops.contract import OUTPUTS, Primitives, _copy_out, empty
from . import BackendUnavailable

__all__ = ["CudaPrimitives", "cuda_extension"]

_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cuda_extension():
    """The compiled module, or BackendUnavailable saying what is missing and how to build it."""
    mod, why = load_extension()
    if mod is None:
        raise BackendUnavailable(f"backend 'cuda': {why}")
    return mod


def _outputs(prim, *args):
    ref = next(a for a in args if isinstance(a, torch.Tensor))
    outs = [empty(shape, dtype=dtype, device=ref.device) for shape, dtype in OUTPUTS[prim](*args)]
    return outs[0] if len(outs) == 1 else outs


def _cdt(w: torch.Tensor, fn: str) -> torch.dtype:
    if w.dtype not in _COMPUTE_DTYPES:
        raise TypeError(f"{fn}: the cuda backend computes in float32, bfloat16 or float16, got "
                        f"{w.dtype} (use backend='torch' for float64)")
    return w.dtype


def _rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in ``dtype`` with a unit stride in its last dimension (copies only when needed)."""
    t = t.to(dtype)
    return t if t.stride(-1) == 1 or t.size(-1) <= 1 else t.contiguous()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _direct(out, out_db, bias) -> bool:
    """Whether a weight gradient can be written straight into the given outputs: unit-stride rows
    for dw (a column slice of a wider gradient, e.g. the first layer's position columns, is
    written in place), contiguous db."""
    return out is not None and out.stride(-1) == 1 and (not bias or (out_db is not None and out_db.is_contiguous()))


class CudaPrimitives(Primitives):
    """See :class:`apm_fast.ops.contract.Primitives` for the semantics of every primitive."""

    name = "cuda"
    opaque = True
    wgrad_out = True       # the weight-gradient kernels write into given contiguous buffers
    # at one image the first layer's trigger columns' gradient written out and updated with the
    # rest of the layer (one Adam launch instead of the rank-1 one plus the position columns'):
    # on the H200 0.468 against 0.472 ms a step (ea13caa's targets run), 0.470 against 0.476 and
    # 0.481 against 0.490 / 0.494 in the A/B runs before it, 0.479-0.482 against 0.490-0.491 at
    # 4074410 (benchmarks/results/h200/README.md); with several students by the factors as before.
    # The pool's weights likewise: at one image their two updates from the factors, after the
    # backward, took ~10 us more than one launch over the written gradients of every fp32
    # parameter (0.457 / 0.457 against 0.455 / 0.452 ms a step, 66357bd; with 64 students 20.09 /
    # 19.97 against 20.42 / 20.39 ms: benchmarks/results/h200/pool-factors-ab/)
    written_at_one_image = True
    # each layer's Adam beside the rest of the backward at one image only: there 0.446 against
    # 0.452 ms a step (1bf82d0's targets run), 0.445 / 0.450 (e0aad80), 0.4459 / 0.4501 (8b9631e's
    # A/B), 0.449 / 0.455 (3ea46dd), and equal at 7b7ee43 (0.457 both); with 64 students 0.9 %
    # slower (8b9631e's A/B), so there after the backward (benchmarks/results/h200/README.md)
    adam_beside_at_one_image = True
    # the first layer's activation: this table writes ReLU(P + u) out before each GEMM that reads
    # it (forward, the weight gradient's operand, the input gradient's mask), so the TTT step
    # writes it once in the forward and keeps it for the backward: one pass instead of three. On
    # the H200 0.469 against 0.473 ms a step at one image, 142.2 against 137.5 images/s at S = 64
    # (85e1a1d, benchmarks/results/h200/README.md)
    first_layer_act_kept = True
    # the position products from the code's separable form: with several students (dW_P to Adam by
    # its factors) 151.1 against 142.2 images/s at S = 64 (85e1a1d, with the activation kept); at
    # one image, where this table writes the trigger columns' gradient out, since the kept
    # activation comes straight from their Q (81f1e5e): 0.452 against 0.459 ms
    # (ttt.program.position_halves_by_default; benchmarks/results/h200/README.md)
    position_halves = True
    # the batch's reset, as on the Triton table: Adam reads no moments at step 1, so the reset
    # leaves them unwritten, and a kernel broadcasts the snapshot (read once) into every student's
    # weights and their compute copy (csrc/cuda/adam.cu; the profile of the reset it replaces:
    # kernels/adam.py, broadcast_)
    adam_fresh_at_step_one = True

    @property
    def ext(self):
        return cuda_extension()

    def available(self):
        mod, why = load_extension()
        if mod is None:
            return False, why
        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        return True, ""

    def _linear(self, x, w, b, relu, out_dtype):
        cdt = _cdt(w, "linear")
        out = _outputs("linear", x, w, b, relu, out_dtype or cdt)
        self.ext.linear(_rows(x, cdt), _rows(w, cdt), None if b is None else b.to(cdt).contiguous(), relu, out)
        return out

    def _first_layer_act(self, p, u, grid=None, out_dtype=None):
        """ReLU(P + u) materialized by one elementwise kernel before the forward GEMM (see
        csrc/cuda/trigger_split.cu for why it is not fused into the GEMM's operand load); with
        ``grid``, P from Q's rows (the position code's halves, read in fp32)."""
        if grid is not None:
            q = p.to(torch.float32).contiguous()
            out = _outputs("first_layer_act", q, u, grid, out_dtype or p.dtype)
            _cdt(out, "first_layer_act")
            self.ext.first_layer_act(q, _f32(u), out, int(grid[0]), int(grid[1]))
            return out
        p = p.to(_cdt(p, "first_layer_act")).contiguous()
        a = _outputs("first_layer_act", p, u, None, out_dtype or p.dtype)
        if a.dtype != p.dtype:
            raise TypeError(f"first_layer_act: the cuda backend writes P's own dtype {p.dtype} without grid, "
                            f"got out_dtype={out_dtype}")
        self.ext.first_layer_act(p, _f32(u), a)
        return a

    def _first_layer_linear(self, p, u, w, b, relu, out_dtype):
        return self._linear(self._first_layer_act(p, u), w, b, relu, out_dtype)

    def _linear_bwd_input(self, dy, w, mask, out_dtype):
        cdt = _cdt(w, "linear_bwd_input")
        out = _outputs("linear_bwd_input", dy, w, mask, out_dtype or cdt)
        self.ext.linear_bwd_input(_rows(dy, cdt), _rows(w, cdt), None if mask is None else _rows(mask, cdt), out)
        return out

    def _linear_bwd_weight(self, dy, x, bias, out=None, out_db=None):
        # written straight into out / out_db when their rows have a unit stride (the engine's
        # gradient views); any other layout gets a fresh buffer, copied in after
        cdt = _cdt(dy, "linear_bwd_weight")
        direct = _direct(out, out_db, bias)
        dw, db = (out, out_db) if direct else _outputs("linear_bwd_weight", dy, x, bias)
        self.ext.linear_bwd_weight(dy.contiguous(), x.to(cdt).contiguous(), dw, db if bias else None)
        if not direct:
            dw, db = _copy_out(dw, out), _copy_out(db, out_db if bias else None)
        return dw, (db if bias else None)

    def _first_layer_bwd_weight(self, dy, p, u, bias, out=None, out_db=None):
        return self._linear_bwd_weight(dy, self._first_layer_act(p, u), bias, out, out_db)

    def _first_layer_bwd_input(self, dy, w, p, u, out_dtype, act=None):
        # the mask read from the kept activation when given, else from one written here
        cdt = _cdt(w, "first_layer_bwd_input")
        g1, r = _outputs("first_layer_bwd_input", dy, w, p, u, out_dtype or cdt)
        self.ext.first_layer_bwd_input(_rows(dy, cdt), _rows(w, cdt), None if p is None else p.to(cdt).contiguous(),
                                       _f32(u), g1, r, None if act is None else _rows(act, cdt))
        return g1, r

    def _pool_fwd(self, f, pos_out, kt, scale):
        _cdt(f, "pool_fwd")
        f = f.contiguous()
        sbar, lse = _outputs("pool_fwd", f, pos_out, kt, scale)
        self.ext.pool_fwd(f, pos_out.to(f.dtype).contiguous(), _f32(kt), scale, sbar, lse)
        return sbar, lse

    def _pool_bwd(self, f, pos_out, kt, scale, sbar, lse, dsbar, out_dtype):
        _cdt(f, "pool_bwd")
        f = f.contiguous()
        df, dkt = _outputs("pool_bwd", f, pos_out, kt, scale, sbar, lse, dsbar, out_dtype)
        self.ext.pool_bwd(f, pos_out.to(f.dtype).contiguous(), _f32(kt), scale, _f32(sbar), _f32(lse),
                          _f32(dsbar), df, dkt)
        return df, dkt

    def _adam_(self, params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, lowp, outer_a=None,
               outer_b=None):
        # In place. The kernel walks rows of the last dimension, each buffer with its own row
        # stride (flat buffers, padded (S, n) rows, (S, R, C) blocks of a weight's columns); a
        # layout it cannot walk so, the binding refuses, by name.
        grads = None if grads is None else grads.to(torch.float32)
        self.ext.adam_(params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, lowp, outer_a, outer_b)

    def _broadcast_(self, dst, src, lowp):
        # fp32 weights (the engine's); any other master dtype: the plain copy
        if dst.dtype != torch.float32:
            return super()._broadcast_(dst, src, lowp)
        self.ext.broadcast_(dst, src.contiguous(), lowp)
