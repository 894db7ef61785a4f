"""The ``triton`` table: the primitive contract (``apm_fast.ops.contract``) on the Triton kernels
of ``apm_fast.kernels`` (one file per fused operation, kernel and launcher together).

Nothing here imports Triton until a primitive runs, so this module imports (and ``available()``
answers) on machines without Triton or a GPU.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ..ops.contract import Primitives

__all__ = ["TritonPrimitives"]


def _kernels():
    """The launcher modules, imported on first use (this pulls in Triton). Plain import statements:
    torch.compile's tracer follows them (it refuses importlib calls)."""
    from apm_fast.kernels import _common, adam, gemm, heads, pool, wgrad

    return _common, gemm, wgrad, pool, adam, heads


class TritonPrimitives(Primitives):
    """See :class:`apm_fast.ops.contract.Primitives` for the semantics of every primitive."""

    name = "triton"
    opaque = True
    wgrad_out = True       # the weight-gradient kernels write straight into given buffers
    # each layer's Adam beside the rest of the backward: on the H200 137.3 against 136.0 images/s
    # at S = 64, and 0.473 against 0.475 ms a step at one image, within the run-to-run spread (the
    # cuda table: 0.509 against 0.482, slower), benchmarks/results/h200/e84f14e-step-engine-throughput/
    adam_beside_backward = True
    adam_beside_at_one_image = True
    # the position products from the code's separable form (with dW_P to Adam by its factors): on
    # the H200 at S = 64 144.5 against 138.5 images/s with one GEMM each, at one image 0.459
    # against 0.466 ms a step (02d9635); with dW_P written, at one image slower (0.474 against
    # 0.469 ms: six more launches), so there the engine keeps the one GEMM (b7e1beb; both in
    # benchmarks/results/h200/; ttt.program.position_halves_by_default)
    position_halves = True
    # the first layer's activation written once in the forward (then a plain GEMM) and kept for the
    # weight gradient, which reads it from memory anyway (its cuBLAS route writes it out): on the
    # H200 0.464 against 0.468 and 0.466 against 0.472 ms a step at one image, 152.6 against 147.2
    # images/s at S = 64 (85e1a1d, benchmarks/results/h200/README.md)
    first_layer_act_kept = True
    # its Adam masks the moments' loads at step 1 (kernels/adam.py): the batch's reset leaves them
    adam_fresh_at_step_one = True

    def __init__(self, use_custom_ops: bool | None = None):
        self.use_custom_ops = use_custom_ops

    def available(self):
        if importlib.util.find_spec("triton") is None:
            return False, "the 'triton' package is not installed (pip install triton)"
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return True, ""      # Triton's interpreter runs the kernels on CPU tensors (tests)
        if not torch.cuda.is_available():
            return False, ("no CUDA GPU is visible (torch.cuda.is_available() is False); the Triton kernels "
                           "need one, or TRITON_INTERPRET=1 to run them on CPU tensors in Triton's interpreter")
        return True, ""

    def _route(self, prim, *args):
        if not torch.compiler.is_compiling():   # checked again when the compiled graph runs the op
            _kernels()[0].launch_device_ok(args[0].device)
        return super()._route(prim, *args)

    def _wgrad(self, prim, args, bias, out, out_db):
        if not torch.compiler.is_compiling():
            _kernels()[0].launch_device_ok(args[0].device)
        return super()._wgrad(prim, args, bias, out, out_db)

    def _linear(self, x, w, b, relu, out_dtype):
        return _kernels()[1].linear(x, w, b, relu=relu, out_dtype=out_dtype)

    def _first_layer_linear(self, p, u, w, b, relu, out_dtype):
        return _kernels()[1].first_layer_linear(p, u, w, b, relu=relu, out_dtype=out_dtype)

    def _linear_bwd_input(self, dy, w, mask, out_dtype):
        return _kernels()[1].linear_bwd_input(dy, w, mask=mask, out_dtype=out_dtype)

    def _first_layer_act(self, p, u, grid=None, out_dtype=None):
        return _kernels()[1].first_layer_act(p, u, grid=grid, out_dtype=out_dtype)

    def _first_layer_bwd_input(self, dy, w, p, u, out_dtype, act=None):
        # the mask in the GEMM's epilogue: from p + u, or from the kept activation when given
        return _kernels()[1].first_layer_bwd_input(dy, w, p, u, out_dtype=out_dtype, act=act)

    def _linear_bwd_weight(self, dy, x, bias, out=None, out_db=None):
        return _kernels()[2].linear_bwd_weight(dy, x, bias=bias, out=out, out_db=out_db)

    def _first_layer_bwd_weight(self, dy, p, u, bias, out=None, out_db=None):
        return _kernels()[2].first_layer_bwd_weight(dy, p, u, bias=bias, out=out, out_db=out_db)

    def _pool_fwd(self, f, pos_out, kt, scale):
        return _kernels()[3].pool_fwd(f, pos_out, kt, scale)

    def _pool_bwd(self, f, pos_out, kt, scale, sbar, lse, dsbar, out_dtype):
        return _kernels()[3].pool_bwd(f, pos_out, kt, scale, sbar, lse, dsbar, out_dtype=out_dtype)

    def _heads_product(self, x, w, transpose):
        # several students with one image or a few each, fp32 (the step's) or fp64: the
        # matrix-vector kernels, where the plain form's products over the block diagonal are slow
        # (kernels/heads.py); one student keeps the plain form's product per head (cuBLAS gemv,
        # 4-5 us a call at ttt-l14 on the H200: not slow, and the kernels are not timed there
        # yet); more images make a real product (cuBLAS's)
        heads = _kernels()[5]
        if x.shape[0] > 1 and x.dtype in (torch.float32, torch.float64) and x.shape[1] <= heads.MAX_IMAGES:
            return heads.heads_product(x, w, transpose)
        return super()._heads_product(x, w, transpose)

    def _broadcast_(self, dst, src, lowp):
        if not torch.compiler.is_compiling():
            _kernels()[0].launch_device_ok(dst.device)
        _kernels()[4].broadcast_(dst, src, lowp)

    def _adam_(self, params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, lowp, outer_a=None,
               outer_b=None):
        _kernels()[4].adam_(params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, lowp=lowp,
                            outer=None if outer_a is None else (outer_a, outer_b))
