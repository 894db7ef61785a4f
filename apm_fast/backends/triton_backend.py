"""The ``triton`` backend: the primitive contract of ``apm_fast.ops.primitives`` on Triton kernels.

Each primitive checks its inputs once (shapes, devices, dtypes; the message names the argument,
what was expected and what came) and launches the kernels of ``apm_fast.kernels``. Under
``torch.compile`` the calls go through the ``torch.library`` custom ops of
``apm_fast.kernels.library`` (opaque to the tracer, with fake implementations), in eager mode
straight to the launchers. Nothing here imports Triton until a primitive runs, so this module
imports (and ``available()`` answers) on machines without Triton or a GPU.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from . import register_backend
from .fused import FusedBackend

__all__ = ["TritonPrimitives", "availability"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def availability():
    """(True, "") when the kernels can run here, else (False, what is missing and how to fix it)."""
    if importlib.util.find_spec("triton") is None:
        return False, "the 'triton' package is not installed (pip install triton, or apm-fast[triton])"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, ""      # Triton's interpreter runs the kernels on CPU tensors (tests)
    if not torch.cuda.is_available():
        return False, ("no CUDA GPU is visible (torch.cuda.is_available() is False); the Triton kernels "
                       "need one, or TRITON_INTERPRET=1 to run them on CPU tensors in Triton's interpreter")
    return True, ""


def _kernels():
    """The launcher modules, imported on first use (this pulls in Triton). Plain import statements:
    torch.compile's tracer follows them (it refuses importlib calls)."""
    from apm_fast.kernels import adam, gemm, pool, wgrad

    return {"gemm": gemm, "wgrad": wgrad, "pool": pool, "adam": adam}


# ------------------------------------------------------------------------------------ checks
def _t(name, t, dims, dtypes=_FLOATS, unit_last=False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        raise ValueError(f"{name}: expected {' or '.join(str(d) for d in dims)} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if unit_last and t.shape[-1] > 1 and t.stride(-1) != 1:
        # the GEMM and pool kernels take any strides; the optimizer walks flat buffers
        raise ValueError(f"{name}: expected unit stride along the last dimension, got strides {t.stride()}")


def _shape(name, t, expected):
    got = tuple(t.shape)
    if len(got) != len(expected) or any(e is not None and g != e for g, e in zip(got, expected)):
        exp = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name}: expected shape {exp}, got {got}")


def _same_device(**ts):
    devs = {n: t.device for n, t in ts.items() if t is not None}
    first = next(iter(devs.values()))
    for n, d in devs.items():
        if d != first:
            raise ValueError(f"{n}: expected a tensor on {first} like {next(iter(devs))}, got {d}")
    if not torch.compiler.is_compiling():   # checked again when the compiled graph runs the op
        from apm_fast.kernels._common import launch_device_ok

        launch_device_ok(first)


def _out_dtype(name, dt):
    if dt is not None and dt not in _FLOATS:
        raise TypeError(f"{name}: expected None or one of {[str(d) for d in _FLOATS]}, got {dt}")


class TritonPrimitives:
    """The primitive table on Triton kernels; see :class:`apm_fast.ops.TorchPrimitives` for the
    semantics of every method. ``use_custom_ops``: None (default) routes through the
    ``torch.library`` ops only while ``torch.compile`` traces; True/False force it."""

    name = "triton"

    def __init__(self, use_custom_ops: bool | None = None):
        self.use_custom_ops = use_custom_ops

    def _ops(self):
        via = self.use_custom_ops
        if via is None:
            via = torch.compiler.is_compiling()
        if via:
            from apm_fast.kernels import library  # noqa: F401  (registers the ops)

            return torch.ops.apm_fast_triton
        return None

    # ---------------------------------------------------------------- forward GEMMs
    def linear(self, x, w, b=None, *, relu=False, out_dtype=None):
        _t("w", w, (3,))
        _t("x", x, (2, 3))
        s, n, k = w.shape
        _shape("x", x, (None, k) if x.dim() == 2 else (s, None, k))
        if b is not None:
            _t("b", b, (2,))
            _shape("b", b, (s, n))
        _out_dtype("out_dtype", out_dtype)
        _same_device(x=x, w=w, b=b)
        ops = self._ops()
        if ops is not None:
            return ops.linear(x, w, b, relu, out_dtype)
        return _kernels()["gemm"].linear(x, w, b, relu=relu, out_dtype=out_dtype)

    def first_layer_linear(self, p, u, w, b, *, relu=True, out_dtype=None):
        self._check_first(p, u)
        s, l, h1 = p.shape
        _t("w", w, (3,))
        _shape("w", w, (s, None, h1))
        if b is not None:
            _t("b", b, (2,))
            _shape("b", b, (s, w.shape[1]))
        _out_dtype("out_dtype", out_dtype)
        _same_device(p=p, u=u, w=w, b=b)
        ops = self._ops()
        if ops is not None:
            return ops.first_layer_linear(p, u, w, b, relu, out_dtype)
        return _kernels()["gemm"].first_layer_linear(p, u, w, b, relu=relu, out_dtype=out_dtype)

    def first_layer_act(self, p, u):
        """ReLU(p + u) materialized, in PyTorch: the fused path never needs it (it is built inside
        the kernels that consume it); kept for callers that do."""
        self._check_first(p, u)
        s, l, h1 = p.shape
        a = torch.relu(p.float()[:, None, :, :] + u.float()[:, :, None, :])
        return a.reshape(s, -1, h1).to(p.dtype)

    @staticmethod
    def _check_first(p, u):
        _t("p", p, (3,))
        _t("u", u, (3,))
        s, _, h1 = p.shape
        _shape("u", u, (s, None, h1))

    # ---------------------------------------------------------------- backward GEMMs
    def linear_bwd_input(self, dy, w, *, mask=None, out_dtype=None):
        _t("dy", dy, (3,))
        _t("w", w, (3,))
        s, n, k = w.shape
        _shape("dy", dy, (s, None, n))
        if mask is not None:
            _t("mask", mask, (3,))
            _shape("mask", mask, (s, dy.shape[1], k))
        _out_dtype("out_dtype", out_dtype)
        _same_device(dy=dy, w=w, mask=mask)
        ops = self._ops()
        if ops is not None:
            return ops.linear_bwd_input(dy, w, mask, out_dtype)
        return _kernels()["gemm"].linear_bwd_input(dy, w, mask=mask, out_dtype=out_dtype)

    def linear_bwd_weight(self, dy, x, *, bias=True):
        _t("dy", dy, (3,))
        _t("x", x, (2, 3))
        s, m, _ = dy.shape
        _shape("x", x, (m, None) if x.dim() == 2 else (s, m, None))
        _same_device(dy=dy, x=x)
        ops = self._ops()
        if ops is not None:
            dw, db = ops.linear_bwd_weight(dy, x, bias)
            return dw, (db if bias else None)
        return _kernels()["wgrad"].linear_bwd_weight(dy, x, bias=bias)

    def first_layer_bwd_weight(self, dy, p, u, *, bias=True):
        self._check_first(p, u)
        _t("dy", dy, (3,))
        s, l, _ = p.shape
        _shape("dy", dy, (s, u.shape[1] * l, None))
        _same_device(dy=dy, p=p, u=u)
        ops = self._ops()
        if ops is not None:
            dw, db = ops.first_layer_bwd_weight(dy, p, u, bias)
            return dw, (db if bias else None)
        return _kernels()["wgrad"].first_layer_bwd_weight(dy, p, u, bias=bias)

    def first_layer_bwd_input(self, dy, w, p, u, *, out_dtype=None):
        self._check_first(p, u)
        s, l, h1 = p.shape
        _t("w", w, (3,))
        _shape("w", w, (s, None, h1))
        _t("dy", dy, (3,))
        _shape("dy", dy, (s, u.shape[1] * l, w.shape[1]))
        _out_dtype("out_dtype", out_dtype)
        _same_device(dy=dy, w=w, p=p, u=u)
        ops = self._ops()
        if ops is not None:
            return ops.first_layer_bwd_input(dy, w, p, u, out_dtype)
        return _kernels()["gemm"].first_layer_bwd_input(dy, w, p, u, out_dtype=out_dtype)

    # ---------------------------------------------------------------- single-query pool
    def _check_pool(self, f, pos_out, kt):
        _t("f", f, (4,))
        _t("pos_out", pos_out, (2,))
        _t("kt", kt, (3,))
        s, _, l, d = f.shape
        _shape("pos_out", pos_out, (l, d))
        _shape("kt", kt, (s, None, d))

    def pool_fwd(self, f, pos_out, kt, scale):
        self._check_pool(f, pos_out, kt)
        _same_device(f=f, pos_out=pos_out, kt=kt)
        ops = self._ops()
        if ops is not None:
            return ops.pool_fwd(f, pos_out, kt, float(scale))
        return _kernels()["pool"].pool_fwd(f, pos_out, kt, float(scale))

    def pool_bwd(self, f, pos_out, kt, scale, sbar, lse, dsbar, *, out_dtype=None):
        self._check_pool(f, pos_out, kt)
        s, b, _, d = f.shape
        h = kt.shape[1]
        for name, t, shp in (("sbar", sbar, (s, b, h, d)), ("lse", lse, (s, b, h)), ("dsbar", dsbar, (s, b, h, d))):
            _t(name, t, (len(shp),), _FLOATS + (torch.float64,))
            _shape(name, t, shp)
        _out_dtype("out_dtype", out_dtype)
        _same_device(f=f, pos_out=pos_out, kt=kt, sbar=sbar, lse=lse, dsbar=dsbar)
        ops = self._ops()
        if ops is not None:
            return ops.pool_bwd(f, pos_out, kt, float(scale), sbar, lse, dsbar, out_dtype)
        return _kernels()["pool"].pool_bwd(f, pos_out, kt, float(scale), sbar, lse, dsbar, out_dtype=out_dtype)

    # ---------------------------------------------------------------- optimizer
    def adam_(self, params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, *, lowp=None):
        _t("params", params, (2,), (torch.float32,), unit_last=True)
        for name, t in (("grads", grads), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            _t(name, t, (2,), (torch.float32,) if name != "grads" else _FLOATS, unit_last=True)
            _shape(name, t, tuple(params.shape))
        if lowp is not None:
            _t("lowp", lowp, (2,), unit_last=True)
            _shape("lowp", lowp, tuple(params.shape))
        for name, t in (("step", step), ("lr", lr)):
            if not isinstance(t, torch.Tensor) or t.numel() != 1:
                raise ValueError(f"{name}: expected a one-element tensor on the device (read there, never "
                                 f"on the host), got {t if not isinstance(t, torch.Tensor) else tuple(t.shape)}")
        _same_device(params=params, grads=grads, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, step=step, lr=lr,
                     lowp=lowp)
        ops = self._ops()
        if ops is not None:
            ops.adam_(params, grads, exp_avg, exp_avg_sq, step, lr, float(beta1), float(beta2), float(eps), lowp)
            return
        _kernels()["adam"].adam_(params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, lowp=lowp)


register_backend(FusedBackend("triton", TritonPrimitives(), availability))
