"""The primitive contract every table implements, checked once at the table's boundary.

A *table* is an object with the primitives below: same arguments, same shapes, same semantics.
The driver (``driver.py``) composes them into the whole APM forward and backward (spec section 3),
so every backend runs exactly the same algebra and differs only in how each primitive is computed.
:class:`Primitives` is the boundary: its public methods check their arguments (the message names
the argument, what was expected and what came) and route the call to the table's ``_<primitive>``
implementation, or, while ``torch.compile`` traces an opaque table, through the ``torch.library``
custom ops that ``library.py`` generates for it. :class:`TorchPrimitives` is the plain-PyTorch table:
the readable definition of every primitive and the oracle the kernel tests compare against.

Conventions
-----------
* Every per-student tensor carries a leading student dimension ``S`` (S independent students,
  each with its own weights and images; S = 1 is the common case). A tensor shared by all
  students (the position codes) has no S dimension.
* ``B`` images per student, ``L`` location queries per image, rows ``M = B * L`` ordered
  (b, l) with l fastest.
* GEMM operands are in the *compute dtype* (bf16 on GPU by default; fp32; fp64 in CPU tests);
  accumulation is at least fp32. Outputs are in ``out_dtype`` (default: the operands' dtype).
* Weight and bias gradients come in the accumulation dtype (fp32, or fp64 for fp64 operands).
  The weight-gradient primitives take ``out`` / ``out_db``: preallocated tensors (any strides,
  e.g. views of one flat gradient buffer) that receive the results and are returned. A table with
  ``wgrad_out = True`` writes them in place; for the others the boundary copies.
* Every output a kernel writes comes from :func:`empty` (NaN-filled under
  ``APM_FAST_POISON_OUTPUTS=1``, so that an element a kernel forgets fails the tests).
* No primitive keeps state between calls (graph capture replays them).
"""
from __future__ import annotations

import os
from typing import Dict, Tuple

import torch

__all__ = ["PRIMITIVES", "Primitives", "TorchPrimitives", "acc_dtype_for", "bmm_acc", "empty", "OUTPUTS",
           "first_layer_act", "head_blocks", "heads_product"]

# name -> the torch.library schema of the primitive (library.py registers one op per table and name)
PRIMITIVES: Dict[str, str] = {
    "linear": "(Tensor x, Tensor w, Tensor? b, bool relu, ScalarType? out_dtype) -> Tensor",
    "first_layer_linear": "(Tensor p, Tensor u, Tensor w, Tensor? b, bool relu, ScalarType? out_dtype) -> Tensor",
    "linear_bwd_input": "(Tensor dy, Tensor w, Tensor? mask, ScalarType? out_dtype) -> Tensor",
    "linear_bwd_weight": "(Tensor dy, Tensor x, bool bias) -> (Tensor, Tensor)",
    "first_layer_bwd_weight": "(Tensor dy, Tensor p, Tensor u, bool bias) -> (Tensor, Tensor)",
    "first_layer_bwd_input": ("(Tensor dy, Tensor w, Tensor? p, Tensor u, ScalarType? out_dtype, Tensor? act) -> "
                              "(Tensor, Tensor)"),
    "first_layer_act": "(Tensor p, Tensor u, int[]? grid=None, ScalarType? out_dtype=None) -> Tensor",
    "pool_fwd": "(Tensor f, Tensor pos_out, Tensor kt, float scale) -> (Tensor, Tensor)",
    "pool_bwd": ("(Tensor f, Tensor pos_out, Tensor kt, float scale, Tensor sbar, Tensor lse, Tensor dsbar, "
                 "ScalarType? out_dtype) -> (Tensor, Tensor)"),
    "heads_product": "(Tensor x, Tensor w, bool transpose) -> Tensor",
    "adam_": ("(Tensor(a!) params, Tensor? grads, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor step, "
              "Tensor lr, float beta1, float beta2, float eps, Tensor(d!)? lowp, Tensor? outer_a, "
              "Tensor? outer_b) -> ()"),
}

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def acc_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for 16-bit operands, otherwise the operands' own."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty(shape, *, dtype, device) -> torch.Tensor:
    """The one allocator of primitive outputs (NaN-filled under ``APM_FAST_POISON_OUTPUTS=1``)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("APM_FAST_POISON_OUTPUTS", "0") == "1":
        t.fill_(float("nan"))
    return t


def _acc(t):
    return acc_dtype_for(t.dtype)


# name -> (shape, dtype) of each output, from the arguments (the fakes under torch.compile and
# the tables that allocate before launching use these)
OUTPUTS = {
    "linear": lambda x, w, b, relu, od: [((w.shape[0], x.shape[-2], w.shape[1]), od or w.dtype)],
    "first_layer_linear": lambda p, u, w, b, relu, od: [((w.shape[0], u.shape[1] * p.shape[1], w.shape[1]),
                                                         od or w.dtype)],
    "linear_bwd_input": lambda dy, w, mask, od: [((w.shape[0], dy.shape[1], w.shape[2]), od or w.dtype)],
    "linear_bwd_weight": lambda dy, x, bias: [((dy.shape[0], dy.shape[2], x.shape[-1]), _acc(dy)),
                                              ((dy.shape[0], dy.shape[2] if bias else 0), _acc(dy))],
    "first_layer_bwd_weight": lambda dy, p, u, bias: [((dy.shape[0], dy.shape[2], p.shape[2]), _acc(dy)),
                                                      ((dy.shape[0], dy.shape[2] if bias else 0), _acc(dy))],
    "first_layer_bwd_input": lambda dy, w, p, u, od, act=None: [
        ((w.shape[0], dy.shape[1], w.shape[2]), od or w.dtype), ((w.shape[0], u.shape[1], w.shape[2]), _acc(w))],
    "first_layer_act": lambda p, u, grid=None, od=None: [
        ((p.shape[0], u.shape[1] * (p.shape[1] if grid is None else grid[0] * grid[1]), p.shape[2]), od or p.dtype)],
    "pool_fwd": lambda f, pos, kt, scale: [((f.shape[0], f.shape[1], kt.shape[1], f.shape[3]), _acc(f)),
                                           ((f.shape[0], f.shape[1], kt.shape[1]), _acc(f))],
    "pool_bwd": lambda f, pos, kt, scale, sbar, lse, ds, od: [(tuple(f.shape), od or f.dtype),
                                                              (tuple(kt.shape), _acc(f))],
    "heads_product": lambda x, w, tr: [((*x.shape[:3], w.shape[1] // x.shape[2] if tr else w.shape[2]), x.dtype)],
}


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
    first_name, first = next(iter(devs.items()))
    for n, d in devs.items():
        if d != first:
            raise ValueError(f"{n}: expected a tensor on {first} like {first_name}, got {d}")


def _out_dtype(dt):
    if dt is not None and dt not in _FLOATS:
        raise TypeError(f"out_dtype: expected None or one of {[str(d) for d in _FLOATS]}, got {dt}")


def _check_first(p, u):
    _t("p", p, (3,))
    _t("u", u, (3,))
    _shape("u", u, (p.shape[0], None, p.shape[2]))


def _check_wgrad_out(out, out_db, shape, bias, acc):
    for name, t, shp in (("out", out, shape), ("out_db", out_db if bias else None, shape[:2])):
        if t is not None:
            _t(name, t, (len(shp),), (acc,))
            _shape(name, t, shp)


def _check_pool(f, pos_out, kt):
    _t("f", f, (4,))
    _t("pos_out", pos_out, (2,))
    _t("kt", kt, (3,))
    s, _, l, d = f.shape
    _shape("pos_out", pos_out, (l, d))
    _shape("kt", kt, (s, None, d))


def _copy_out(value, out):
    if out is None or value is None:
        return value
    return out.copy_(value.reshape(out.shape))


class Primitives:
    """The boundary of a table: checks, then ``self._<primitive>(...)`` with the schema's
    positional arguments. ``opaque`` tables (compiled kernels) go through their generated
    ``torch.library`` ops while ``torch.compile`` traces (``use_custom_ops`` None) or always
    (True); ``wgrad_out`` tables write weight gradients into ``out=`` themselves;
    ``adam_beside_backward``: the engine's default for this table with several students, each
    layer's Adam on the update streams beside the rest of the backward (on where measured faster:
    the Triton table); ``adam_beside_at_one_image``: the same at one image (on for the Triton and
    cuda tables; ``ttt.program.overlap_by_default``).
    ``adam_from_factors``: the engine's default for this table, the first layer's trigger columns
    and the pool's in- and out-projection weights updated from their gradients' factors
    (``adam_``'s ``outer``; on for the kernel tables);
    ``written_at_one_image``: except at one image, where the gradients that could go to Adam
    by their factors (the trigger columns', the pool's weights') are written out (on where
    measured faster: the cuda table, measured when its Adam ran after the backward there;
    ``ttt.program.trigger_factors_by_default``, ``ttt.program.pool_factors_by_default``).
    ``position_halves``: the engine's default for this table with several students, and at one
    image when the first layer's gradient goes to Adam by its factors, the position products from
    the code's separable form (``driver.position_product``; on where measured faster: the Triton
    and cuda tables).
    ``first_layer_act_kept``: the driver's default for this table where a backward follows (the
    TTT step), the first layer's activation ReLU(P + u) made once by :meth:`first_layer_act` in the
    forward and kept for the backward (the first consumer's forward GEMM, its weight gradient's
    operand, and the input gradient's mask through ``act=``) instead of the fused primitives
    building it each time; on where measured faster: the cuda table, which writes it out before
    each GEMM that reads it (one pass a step instead of three), and the Triton table, whose weight
    gradient writes it out (S * B * L * H1 elements held from the forward to the backward).
    ``broadcast_`` (the reset of S students' weights to a snapshot) is not a model op: a table
    without a kernel for it inherits the plain broadcast copy.
    ``adam_fresh_at_step_one``: this table's ``adam_`` reads no moments at step 1 (it takes them
    as zeros, what they are at a first update), so the engine's reset to the snapshot leaves them
    unwritten: each batch saves one write and one read of both moments (16 B a parameter, 8 with
    bf16 moments); on the Triton and cuda tables (``ttt.store.ParamStore.load_snapshot``)."""

    name = "?"
    opaque = False
    wgrad_out = False
    use_custom_ops = None
    adam_beside_backward = False
    adam_beside_at_one_image = False
    adam_from_factors = True
    written_at_one_image = False
    position_halves = False
    first_layer_act_kept = False
    adam_fresh_at_step_one = False

    def available(self) -> Tuple[bool, str]:
        return True, ""

    def _route(self, prim, *args):
        via = self.use_custom_ops
        if via is None:
            via = self.opaque and torch.compiler.is_compiling()
        if via:
            from .library import ops_for

            return getattr(ops_for(self), prim)(*args)
        return getattr(self, "_" + prim)(*args)

    # ---------------------------------------------------------------- forward GEMMs
    def linear(self, x, w, b=None, *, relu=False, out_dtype=None):
        """y = x w^T (+ b) (ReLU).  x: (S, M, K) or shared (M, K); w: (S, N, K); b: (S, N) or None.
        Returns (S, M, N)."""
        _t("w", w, (3,))
        _t("x", x, (2, 3))
        s, n, k = w.shape
        _shape("x", x, (None, k) if x.dim() == 2 else (s, None, k))
        if b is not None:
            _t("b", b, (2,))
            _shape("b", b, (s, n))
        _out_dtype(out_dtype)
        _same_device(x=x, w=w, b=b)
        return self._route("linear", x, w, b, bool(relu), out_dtype)

    def first_layer_linear(self, p, u, w, b, *, relu=True, out_dtype=None):
        """The first layer's activation built on the fly and fed to the next layer:
        A[s, b*L + l] = ReLU(p[s, l] + u[s, b]);  y = A w^T + b (ReLU).
        p: (S, L, H1) compute dtype; u: (S, B, H1) acc dtype; w: (S, N, H1); b: (S, N).
        Returns (S, B*L, N). The B*L x H1 activation is never required in memory."""
        _check_first(p, u)
        _t("w", w, (3,))
        _shape("w", w, (p.shape[0], None, p.shape[2]))
        if b is not None:
            _t("b", b, (2,))
            _shape("b", b, (p.shape[0], w.shape[1]))
        _out_dtype(out_dtype)
        _same_device(p=p, u=u, w=w, b=b)
        return self._route("first_layer_linear", p, u, w, b, bool(relu), out_dtype)

    def first_layer_act(self, p, u, *, grid=None, out_dtype=None):
        """The first layer's activation written out: A[s, b*L + l] = ReLU(p[s, l] + u[s, b]) as
        (S, B*L, H1) in ``out_dtype`` (default p's dtype; what first_layer_linear builds on the
        fly). p: (S, L, H1); u: (S, B, H1) acc dtype.

        ``grid`` (height, width): P given by the position code's separable form instead
        (``driver.position_product``): p is Q (S, width + height, H1), any float dtype, and
        P[s, y * width + x] = Q[s, x] + Q[s, width + y], summed in the acc dtype with u before the
        one rounding to ``out_dtype`` (L = height * width; P itself is never written)."""
        _check_first(p, u)
        if grid is not None:
            grid = [int(v) for v in grid]
            if len(grid) != 2 or min(grid) < 1:
                raise ValueError(f"first_layer_act: grid must be (height, width) of positive ints, got {grid}")
            if p.shape[1] != grid[0] + grid[1]:
                raise ValueError(f"first_layer_act: with grid={tuple(grid)}, p must hold the width + height = "
                                 f"{grid[0] + grid[1]} rows of Q, got {p.shape[1]}")
        _out_dtype(out_dtype)
        _same_device(p=p, u=u)
        return self._route("first_layer_act", p, u, grid, out_dtype)

    # ---------------------------------------------------------------- backward GEMMs
    def linear_bwd_input(self, dy, w, *, mask=None, out_dtype=None):
        """dx = dy w, times (mask > 0) when ``mask`` (the layer's input activation, (S, M, K)) is
        given: the ReLU that produced the input. dy: (S, M, N); w: (S, N, K). Returns (S, M, K)."""
        _t("dy", dy, (3,))
        _t("w", w, (3,))
        s, n, k = w.shape
        _shape("dy", dy, (s, None, n))
        if mask is not None:
            _t("mask", mask, (3,))
            _shape("mask", mask, (s, dy.shape[1], k))
        _out_dtype(out_dtype)
        _same_device(dy=dy, w=w, mask=mask)
        return self._route("linear_bwd_input", dy, w, mask, out_dtype)

    def linear_bwd_weight(self, dy, x, *, bias=True, out=None, out_db=None):
        """dw = sum_m dy[m]^T x[m] and db = sum_m dy[m].  dy: (S, M, N); x: (S, M, K) or shared
        (M, K). Returns (dw (S, N, K), db (S, N) or None) in the acc dtype (or ``out``/``out_db``
        holding them)."""
        _t("dy", dy, (3,))
        _t("x", x, (2, 3))
        s, m, n = dy.shape
        _shape("x", x, (m, None) if x.dim() == 2 else (s, m, None))
        _check_wgrad_out(out, out_db, (s, n, x.shape[-1]), bias, acc_dtype_for(dy.dtype))
        _same_device(dy=dy, x=x, out=out, out_db=out_db)
        return self._wgrad("linear_bwd_weight", (dy, x), bias, out, out_db)

    def first_layer_bwd_weight(self, dy, p, u, *, bias=True, out=None, out_db=None):
        """linear_bwd_weight with x = ReLU(p + u) rebuilt on the fly (see first_layer_linear)."""
        _check_first(p, u)
        _t("dy", dy, (3,))
        s, l, h1 = p.shape
        _shape("dy", dy, (s, u.shape[1] * l, None))
        _check_wgrad_out(out, out_db, (s, dy.shape[2], h1), bias, acc_dtype_for(dy.dtype))
        _same_device(dy=dy, p=p, u=u, out=out, out_db=out_db)
        return self._wgrad("first_layer_bwd_weight", (dy, p, u), bias, out, out_db)

    def _wgrad(self, prim, args, bias, out, out_db):
        db_out = out_db if bias else None
        if self.wgrad_out and not (self.opaque and (self.use_custom_ops or torch.compiler.is_compiling())):
            dw, db = getattr(self, "_" + prim)(*args, bias, out, db_out)
        else:
            dw, db = self._route(prim, *args, bias)
            dw, db = _copy_out(dw, out), _copy_out(db, db_out)
        return dw, (db if bias else None)

    def first_layer_bwd_input(self, dy, w, p, u, *, out_dtype=None, act=None):
        """g1 = (dy w) * (p[l] + u[b] > 0): the gradient at the first layer's pre-activation,
        and r = sum_l g1 per image. dy: (S, B*L, N); w: (S, N, H1); p: (S, L, H1). Returns (g1
        (S, B*L, H1) in out_dtype, r (S, B, H1) in the acc dtype). ``act``: the activation as
        :meth:`first_layer_act` wrote it, when the caller kept it (``first_layer_act_kept``): the
        mask is then read from it (act > 0), and p may be None (a forward that made the
        activation from the position code's halves has no P)."""
        _t("w", w, (3,))
        _t("u", u, (3,))
        s, n, h1 = w.shape
        _shape("u", u, (s, None, h1))
        if p is None:
            if act is None:
                raise ValueError("first_layer_bwd_input: p may be None only when act is given")
        else:
            _t("p", p, (3,))
            _shape("p", p, (s, None, h1))
        _t("dy", dy, (3,))
        l = p.shape[1] if p is not None else dy.shape[1] // max(1, u.shape[1])
        _shape("dy", dy, (s, u.shape[1] * l, n))
        if act is not None:
            _t("act", act, (3,), (w.dtype,) if p is None else (p.dtype,))
            _shape("act", act, (s, u.shape[1] * l, h1))
        _out_dtype(out_dtype)
        _same_device(dy=dy, w=w, p=p, u=u, act=act)
        return self._route("first_layer_bwd_input", dy, w, p, u, out_dtype, act)

    # ---------------------------------------------------------------- single-query pool
    def pool_fwd(self, f, pos_out, kt, scale):
        """Softmax-weighted sum over the L cells, one query per head.

        kv = f + pos_out; score[s,b,h,l] = scale * kt[s,h] . kv[s,b,l]; a = softmax_l(score);
        sbar[s,b,h] = sum_l a[s,b,h,l] kv[s,b,l].
        f: (S, B, L, D) compute dtype; pos_out: (L, D); kt: (S, H, D) acc dtype.
        Returns sbar (S, B, H, D) and lse (S, B, H) = logsumexp_l(score), both in the acc dtype.
        (lse lets slices of L be combined exactly, ``driver.combine_pool``, and the backward
        rebuild a.)"""
        _check_pool(f, pos_out, kt)
        _same_device(f=f, pos_out=pos_out, kt=kt)
        return self._route("pool_fwd", f, pos_out, kt, float(scale))

    def pool_bwd(self, f, pos_out, kt, scale, sbar, lse, dsbar, *, out_dtype=None):
        """Gradients of pool_fwd: given dsbar (S, B, H, D) returns (df (S, B, L, D) in out_dtype,
        dkt (S, H, D) in the acc dtype, summed over B).

        With c[h,l] = a[h,l] (kv_l . dsbar_h - sbar_h . dsbar_h):
        df_l = sum_h a[h,l] dsbar_h + scale c[h,l] kt_h;   dkt_h = scale sum_{b,l} c[h,l] kv_l."""
        _check_pool(f, pos_out, kt)
        s, b, _, d = f.shape
        h = kt.shape[1]
        for name, t, shp in (("sbar", sbar, (s, b, h, d)), ("lse", lse, (s, b, h)), ("dsbar", dsbar, (s, b, h, d))):
            _t(name, t, (len(shp),))
            _shape(name, t, shp)
        _out_dtype(out_dtype)
        _same_device(f=f, pos_out=pos_out, kt=kt, sbar=sbar, lse=lse, dsbar=dsbar)
        return self._route("pool_bwd", f, pos_out, kt, float(scale), sbar, lse, dsbar, out_dtype)

    # ---------------------------------------------------------------- the pool's per-head products
    def heads_product(self, x, w, *, transpose=False):
        """Each head's vector times its own block of rows of a per-student matrix: with
        w_h = w[s, h dh : (h + 1) dh, :] (dh x K; w (S, H dh, K), any strides: a third of the pool's
        in-projection as it lies),

        transpose=False: out[s, n, h] = x[s, n, h] w_h    (x (S, N, H, dh) -> (S, N, H, K));
        transpose=True:  out[s, n, h] = w_h x[s, n, h]    (x (S, N, H, K) -> (S, N, H, dh)).

        The pool's query key k~ and the gradient at its weighted sums dsbar are the first (q's or
        do's heads against W_K, W_V); its value projection and the query's gradient the second
        (sbar's or dk~'s heads against W_V, W_K). x and w in one float dtype, the result in it
        (the driver passes the acc dtype). At S students each reads its own weights once: per
        student a matrix-vector product per head, memory-bound."""
        _t("x", x, (4,))
        _t("w", w, (3,), (x.dtype,))
        s, _, h, k = x.shape
        if w.shape[0] != s or w.shape[1] % h:
            raise ValueError(f"w: expected shape ({s}, H dh, K) with H = {h} (x's heads) dividing its rows, "
                             f"got {tuple(w.shape)}")
        _shape("x", x, (s, None, h, w.shape[2] if transpose else w.shape[1] // h))
        _same_device(x=x, w=w)
        return self._route("heads_product", x, w, bool(transpose))

    def _heads_product(self, x, w, transpose):
        """The plain implementation (cuBLAS products; a table with a kernel for it overrides)."""
        return heads_product(x, w, transpose)

    # ---------------------------------------------------------------- optimizer
    def adam_(self, params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, *, lowp=None, outer=None):
        """One Adam update (no weight decay), in place; capturable.

        params, grads, exp_avg, exp_avg_sq: (S, N) fp32 (or fp64) flat buffers, or (S, R, C) views
        of them with unit last stride (a block of columns of a weight: any row stride); the two
        moments may instead both be bf16 (fp32 params only: read into fp32, updated there,
        rounded once when stored; ``moments="bf16"`` of the trainer). ``step`` and ``lr`` are
        one-element device tensors read on the device, never on the host: ``step`` holds the
        number of this update (1 for the first), the caller increments it. When ``lowp`` (params'
        shape, e.g. bf16) is given it receives the updated parameters in its dtype in the same pass.
        ``outer=(a, b)`` with ``grads=None`` (3-D params only): the gradient is given by its
        factors, grad[s] = sum_k a[s, k]^T b[s, k] with a (S, K, R), b (S, K, C) in params' dtype, unit
        stride along their last dimension, any other strides (b may be one tensor every student
        shares, a stride-0 view): a rank-K weight gradient never written to memory (the first
        layer's trigger columns, rank B; with the position code's halves its position columns,
        rank width or height). A table whose ``adam_fresh_at_step_one`` is set reads no moments
        when ``step`` is 1 and takes them as zeros (the same update as zeroed moments, bit for
        bit); the others read them.
        Matches torch.optim.Adam:
        m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
        p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)."""
        master = (torch.float32, torch.float64)
        _t("params", params, (2, 3), master, unit_last=True)
        moments = (params.dtype, torch.bfloat16) if params.dtype == torch.float32 else (params.dtype,)
        if (grads is None) == (outer is None):
            raise ValueError("grads, outer: expected exactly one of them (the gradient, or its factors (a, b)), "
                             f"got {'both' if grads is not None else 'neither'}")
        outer_a = outer_b = None
        if outer is not None:
            if params.dim() != 3 or not isinstance(outer, (tuple, list)) or len(outer) != 2:
                raise ValueError("outer: expected a pair (a, b) of factors with 3-D params (S, R, C), got "
                                 f"{type(outer).__name__} with params of shape {tuple(params.shape)}")
            outer_a, outer_b = outer
            s, r, c = params.shape
            _t("outer[0]", outer_a, (3,), (params.dtype,), unit_last=True)
            _shape("outer[0]", outer_a, (s, None, r))
            _t("outer[1]", outer_b, (3,), (params.dtype,), unit_last=True)
            _shape("outer[1]", outer_b, (s, outer_a.shape[1], c))
        state = (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)) + ((("grads", grads),) if grads is not None else ())
        for name, t in state:
            _t(name, t, (params.dim(),), moments if name != "grads" else _FLOATS, unit_last=True)
            _shape(name, t, tuple(params.shape))
        if exp_avg.dtype != exp_avg_sq.dtype:
            raise ValueError(f"exp_avg, exp_avg_sq: expected one dtype for both moments, got {exp_avg.dtype} "
                             f"and {exp_avg_sq.dtype}")
        if lowp is not None:
            _t("lowp", lowp, (params.dim(),), unit_last=True)
            _shape("lowp", lowp, tuple(params.shape))
        for name, t in (("step", step), ("lr", lr)):
            if not isinstance(t, torch.Tensor) or t.numel() != 1:
                raise ValueError(f"{name}: expected a one-element tensor on the device (read there, never "
                                 f"on the host), got {t if not isinstance(t, torch.Tensor) else tuple(t.shape)}")
        _same_device(params=params, grads=grads, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, step=step, lr=lr,
                     lowp=lowp, outer_a=outer_a, outer_b=outer_b)
        self._route("adam_", params, grads, exp_avg, exp_avg_sq, step, lr, float(beta1), float(beta2),
                    float(eps), lowp, outer_a, outer_b)

    def broadcast_(self, dst, src, *, lowp=None):
        """dst[s] = src for every s, in place, and lowp[s] = src rounded to lowp's dtype (to nearest
        even) when given: the reset of S students' weights (and their compute copy) to one snapshot.
        dst, lowp: contiguous (S, *src.shape); src: dst's dtype. Not an op of a model's graph (the
        engine calls it between batches): no torch.library route. The plain implementation is a
        broadcast copy (the torch table's; the Triton and cuda tables have a kernel)."""
        if not isinstance(dst, torch.Tensor) or dst.dim() < 1:
            got = f"shape {tuple(dst.shape)}" if isinstance(dst, torch.Tensor) else type(dst).__name__
            raise ValueError(f"dst: expected a tensor (S, *shape), got {got}")
        _t("src", src, (dst.dim() - 1,), (dst.dtype,))
        _shape("src", src, tuple(dst.shape[1:]))
        for name, t in (("dst", dst), ("lowp", lowp)):
            if t is not None and not t.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
        if lowp is not None:
            _t("lowp", lowp, (dst.dim(),))
            _shape("lowp", lowp, tuple(dst.shape))
        _same_device(dst=dst, src=src, lowp=lowp)
        self._broadcast_(dst, src, lowp)

    def _broadcast_(self, dst, src, lowp):
        dst.copy_(src.unsqueeze(0).expand_as(dst))
        if lowp is not None:
            lowp.copy_(src.to(lowp.dtype).unsqueeze(0).expand_as(lowp))

def _bcast(x: torch.Tensor, s: int) -> torch.Tensor:
    """(M, K) shared operand -> (S, M, K) view; (S, M, K) unchanged."""
    return x.unsqueeze(0).expand(s, *x.shape) if x.dim() == 2 else x


def bmm_acc(a, b, acc):
    """bmm accumulated in ``acc``: 16-bit operands multiply on the tensor cores with an fp32
    result (as the kernels do) where torch has ``bmm.dtype``; otherwise in ``acc`` itself."""
    if a.dtype in (torch.bfloat16, torch.float16) and a.dtype == b.dtype and a.is_cuda \
            and hasattr(torch.ops.aten.bmm, "dtype"):
        return torch.ops.aten.bmm.dtype(a, b, acc)
    return torch.bmm(a.to(acc), b.to(acc))


def head_blocks(x: torch.Tensor, out=None) -> torch.Tensor:
    """x (S, N, H, dh) spread on the block diagonal: (S, N H, H dh), row (n, h) holding x[:, n, h]
    in head h's columns and zeros elsewhere (written into ``out``, any strides, when given)."""
    s, n, h, dh = x.shape
    eye = torch.eye(h, dtype=x.dtype, device=x.device)
    if out is not None:
        torch.mul(x[:, :, :, None, :], eye[:, :, None], out=out.view(s, n, h, h, dh))
        return out
    return (x[:, :, :, None, :] * eye[:, :, None]).reshape(s, n * h, h * dh)


def heads_product(x: torch.Tensor, w: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Primitives.heads_product by cuBLAS products: one student, one product per head (its rows
    are one stride apart); several, one product per student against x spread on the block
    diagonal (transpose=False) or against every head's x (transpose=True, the heads' own blocks
    kept), so that w is read as it lies instead of being copied into a (student, head) batch."""
    s, n, h, k = x.shape
    dh = w.shape[1] // h
    if not transpose:
        if s == 1:
            return torch.einsum("shdk,snhd->snhk", w.reshape(s, h, dh, -1), x)
        return torch.bmm(head_blocks(x), w).view(s, n, h, -1)
    if s == 1:
        return torch.einsum("shdk,snhk->snhd", w.reshape(s, h, dh, k), x)
    r = torch.bmm(x.reshape(s, n * h, k), w.transpose(1, 2)).view(s, n, h, h, dh)
    return r.diagonal(dim1=2, dim2=3).transpose(-1, -2)


def first_layer_act(p, u, grid=None, out_dtype=None):
    """The first layer's activation ReLU(p[s, l] + u[s, b]) as (S, B*L, H1) in ``out_dtype``
    (default p's dtype): what the fused kernels build on the fly (tests and the sweep compare
    against it). With ``grid`` (height, width), p is Q and P[y * width + x] = Q[x] + Q[width + y]
    (see Primitives.first_layer_act)."""
    s, _, h1 = p.shape
    acc = acc_dtype_for(p.dtype)
    pa = p.to(acc)
    if grid is not None:
        height, width = grid
        pa = (pa[:, width:width + height, None, :] + pa[:, None, :width, :]).reshape(s, height * width, h1)
    a = torch.relu(pa[:, None, :, :] + u.to(acc)[:, :, None, :])
    return a.reshape(s, -1, h1).to(out_dtype or p.dtype)


class TorchPrimitives(Primitives):
    """The plain-PyTorch table (any device, any dtype): the definition of every primitive."""

    name = "torch"
    wgrad_out = True
    # it materializes the gradient anyway, and its elementwise update over the column blocks
    # (strided views) is slower than over the flat buffers: the step took 1.85 ms against 1.41
    # (H200; b377a5b against 10b1643, benchmarks/results/h200/README.md)
    adam_from_factors = False

    def _linear(self, x, w, b, relu, out_dtype):
        acc = acc_dtype_for(w.dtype)
        y = bmm_acc(_bcast(x, w.shape[0]).to(w.dtype), w.transpose(1, 2), acc)
        if b is not None:
            y = y + b.to(acc)[:, None, :]
        if relu:
            y = torch.relu(y)
        return y.to(out_dtype or w.dtype)

    def _first_layer_linear(self, p, u, w, b, relu, out_dtype):
        return self._linear(first_layer_act(p, u), w, b, relu, out_dtype)

    def _linear_bwd_input(self, dy, w, mask, out_dtype):
        dx = bmm_acc(dy.to(w.dtype), w, acc_dtype_for(w.dtype))
        if mask is not None:
            dx = dx * (mask > 0)
        return dx.to(out_dtype or w.dtype)

    def _linear_bwd_weight(self, dy, x, bias, out=None, out_db=None):
        acc = acc_dtype_for(dy.dtype)
        dw = bmm_acc(dy.transpose(1, 2), _bcast(x, dy.shape[0]).to(dy.dtype), acc)
        db = dy.to(acc).sum(1) if bias else None
        return _copy_out(dw, out), _copy_out(db, out_db)

    def _first_layer_bwd_weight(self, dy, p, u, bias, out=None, out_db=None):
        return self._linear_bwd_weight(dy, first_layer_act(p, u), bias, out, out_db)

    def _first_layer_act(self, p, u, grid=None, out_dtype=None):
        return first_layer_act(p, u, grid, out_dtype)

    def _first_layer_bwd_input(self, dy, w, p, u, out_dtype, act=None):
        s, h1, b = w.shape[0], w.shape[2], u.shape[1]
        l = dy.shape[1] // b                          # 0 for an empty slice of the queries
        acc = acc_dtype_for(w.dtype)
        g = bmm_acc(dy.to(w.dtype), w, acc)
        if act is None:
            mask = p.to(acc)[:, None, :, :] + u.to(acc)[:, :, None, :] > 0
        else:
            mask = act.view(s, b, l, h1) > 0
        g = g.view(s, b, l, h1) * mask
        r = g.sum(2)
        return g.reshape(s, -1, h1).to(out_dtype or w.dtype), r

    def _pool_fwd(self, f, pos_out, kt, scale):
        acc = acc_dtype_for(f.dtype)
        kv = f.to(acc) + pos_out.to(acc)
        score = torch.einsum("sbld,shd->sbhl", kv, kt.to(acc)) * scale
        lse = torch.logsumexp(score, dim=-1)
        a = torch.exp(score - lse[..., None])
        sbar = torch.einsum("sbhl,sbld->sbhd", a, kv)
        return sbar, lse

    def _pool_bwd(self, f, pos_out, kt, scale, sbar, lse, dsbar, out_dtype):
        acc = acc_dtype_for(f.dtype)
        kv = f.to(acc) + pos_out.to(acc)
        kt, sbar, lse, dsbar = kt.to(acc), sbar.to(acc), lse.to(acc), dsbar.to(acc)
        score = torch.einsum("sbld,shd->sbhl", kv, kt) * scale
        a = torch.exp(score - lse[..., None])
        dot = torch.einsum("sbld,sbhd->sbhl", kv, dsbar) - (sbar * dsbar).sum(-1)[..., None]
        c = a * dot
        df = torch.einsum("sbhl,sbhd->sbld", a, dsbar) + scale * torch.einsum("sbhl,shd->sbld", c, kt)
        dkt = scale * torch.einsum("sbhl,sbld->shd", c, kv)
        return df.to(out_dtype or f.dtype), dkt

    def _adam_(self, params, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, lowp, outer_a=None,
               outer_b=None):
        # 1 - beta^t in fp64, then rounded (as the kernels do): in fp32, 1 - 0.999^1 is 1.3e-5 off,
        # an error of that size in every step of an fp32 training
        t = step.to(torch.float64)
        grads = torch.bmm(outer_a.transpose(1, 2), outer_b) if grads is None else grads.to(params.dtype)
        # bf16 moments: updated in the params' dtype, rounded once when stored back (as the kernels)
        m, v = exp_avg.to(params.dtype), exp_avg_sq.to(params.dtype)
        m.mul_(beta1).add_(grads, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
        # scalar ** tensor: no host-to-device copy of the betas, which CUDA graph capture forbids
        bc1 = (1 - torch.pow(beta1, t)).to(params.dtype)
        bc2 = (1 - torch.pow(beta2, t)).to(params.dtype)
        denom = v.sqrt() / bc2.sqrt() + eps
        params.sub_(lr.to(params.dtype) / bc1 * m / denom)
        if m is not exp_avg:
            exp_avg.copy_(m)
            exp_avg_sq.copy_(v)
        if lowp is not None:
            lowp.copy_(params)
