"""The Triton primitives as ``torch.library`` custom ops (namespace ``apm_fast_triton``).

``torch.compile`` cannot look inside an autotuned Triton launcher with host-side heuristics, so
under compilation the primitives go through these opaque ops instead; each has a fake (meta)
implementation giving the output shapes and dtypes, which is all the tracer needs. Eager code
calls the launchers directly (no dispatcher overhead per launch). Importing this module
registers the ops once per process.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import adam, gemm, pool, wgrad
from ._common import launch_device_ok

__all__ = ["NAMESPACE"]

NAMESPACE = "apm_fast_triton"
_acc = torch.float32


def _empty(t: Tensor, shape, dtype):
    return t.new_empty(shape, dtype=dtype)


def _db(db: Optional[Tensor], dw: Tensor) -> Tensor:
    """Custom ops cannot return None: a missing bias gradient is an (S, 0) tensor."""
    return db if db is not None else dw.new_empty((dw.shape[0], 0))


# ---------------------------------------------------------------------------------- forward GEMMs
@torch.library.custom_op(f"{NAMESPACE}::linear", mutates_args=())
def linear(x: Tensor, w: Tensor, b: Optional[Tensor], relu: bool, out_dtype: Optional[torch.dtype]) -> Tensor:
    launch_device_ok(w.device)
    return gemm.linear(x, w, b, relu=relu, out_dtype=out_dtype)


@linear.register_fake
def _(x, w, b, relu, out_dtype):
    return _empty(w, (w.shape[0], x.shape[-2], w.shape[1]), out_dtype or w.dtype)


@torch.library.custom_op(f"{NAMESPACE}::first_layer_linear", mutates_args=())
def first_layer_linear(p: Tensor, u: Tensor, w: Tensor, b: Optional[Tensor], relu: bool,
                       out_dtype: Optional[torch.dtype]) -> Tensor:
    launch_device_ok(w.device)
    return gemm.first_layer_linear(p, u, w, b, relu=relu, out_dtype=out_dtype)


@first_layer_linear.register_fake
def _(p, u, w, b, relu, out_dtype):
    return _empty(w, (w.shape[0], u.shape[1] * p.shape[1], w.shape[1]), out_dtype or w.dtype)


# ---------------------------------------------------------------------------------- backward GEMMs
@torch.library.custom_op(f"{NAMESPACE}::linear_bwd_input", mutates_args=())
def linear_bwd_input(dy: Tensor, w: Tensor, mask: Optional[Tensor], out_dtype: Optional[torch.dtype]) -> Tensor:
    launch_device_ok(w.device)
    return gemm.linear_bwd_input(dy, w, mask=mask, out_dtype=out_dtype)


@linear_bwd_input.register_fake
def _(dy, w, mask, out_dtype):
    return _empty(w, (w.shape[0], dy.shape[1], w.shape[2]), out_dtype or w.dtype)


@torch.library.custom_op(f"{NAMESPACE}::first_layer_bwd_input", mutates_args=())
def first_layer_bwd_input(dy: Tensor, w: Tensor, p: Tensor, u: Tensor,
                          out_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor]:
    launch_device_ok(w.device)
    return gemm.first_layer_bwd_input(dy, w, p, u, out_dtype=out_dtype)


@first_layer_bwd_input.register_fake
def _(dy, w, p, u, out_dtype):
    s, l, h1 = p.shape
    return _empty(w, (s, u.shape[1] * l, h1), out_dtype or w.dtype), _empty(w, (s, u.shape[1], h1), _acc)


@torch.library.custom_op(f"{NAMESPACE}::linear_bwd_weight", mutates_args=())
def linear_bwd_weight(dy: Tensor, x: Tensor, bias: bool) -> Tuple[Tensor, Tensor]:
    launch_device_ok(dy.device)
    dw, db = wgrad.linear_bwd_weight(dy, x, bias=bias)
    return dw, _db(db, dw)


@linear_bwd_weight.register_fake
def _(dy, x, bias):
    s, _, n = dy.shape
    return _empty(dy, (s, n, x.shape[-1]), _acc), _empty(dy, (s, n if bias else 0), _acc)


@torch.library.custom_op(f"{NAMESPACE}::first_layer_bwd_weight", mutates_args=())
def first_layer_bwd_weight(dy: Tensor, p: Tensor, u: Tensor, bias: bool) -> Tuple[Tensor, Tensor]:
    launch_device_ok(dy.device)
    dw, db = wgrad.first_layer_bwd_weight(dy, p, u, bias=bias)
    return dw, _db(db, dw)


@first_layer_bwd_weight.register_fake
def _(dy, p, u, bias):
    s, _, n = dy.shape
    return _empty(dy, (s, n, p.shape[2]), _acc), _empty(dy, (s, n if bias else 0), _acc)


# ---------------------------------------------------------------------------------- pool
@torch.library.custom_op(f"{NAMESPACE}::pool_fwd", mutates_args=())
def pool_fwd(f: Tensor, pos_out: Tensor, kt: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    launch_device_ok(f.device)
    return pool.pool_fwd(f, pos_out, kt, scale)


@pool_fwd.register_fake
def _(f, pos_out, kt, scale):
    s, b, _, d = f.shape
    h = kt.shape[1]
    return _empty(f, (s, b, h, d), _acc), _empty(f, (s, b, h), _acc)


@torch.library.custom_op(f"{NAMESPACE}::pool_bwd", mutates_args=())
def pool_bwd(f: Tensor, pos_out: Tensor, kt: Tensor, scale: float, sbar: Tensor, lse: Tensor, dsbar: Tensor,
             out_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor]:
    launch_device_ok(f.device)
    return pool.pool_bwd(f, pos_out, kt, scale, sbar, lse, dsbar, out_dtype=out_dtype)


@pool_bwd.register_fake
def _(f, pos_out, kt, scale, sbar, lse, dsbar, out_dtype):
    return _empty(f, f.shape, out_dtype or f.dtype), _empty(f, kt.shape, _acc)


# ---------------------------------------------------------------------------------- optimizer
@torch.library.custom_op(f"{NAMESPACE}::adam_", mutates_args=("params", "exp_avg", "exp_avg_sq", "lowp"))
def adam_(params: Tensor, grads: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, lr: Tensor,
          beta1: float, beta2: float, eps: float, lowp: Optional[Tensor]) -> None:
    launch_device_ok(params.device)
    adam.adam_(params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, lowp=lowp)


@adam_.register_fake
def _(params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, lowp):
    return None
