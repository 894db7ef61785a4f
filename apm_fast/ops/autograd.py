"""The model's forward over a table as one ``autograd.Function`` (S = 1): the driver's forward,
and its hand-written backward as the Function's backward."""
from __future__ import annotations

import torch

from .driver import backward, forward, weight_names
from .kept import LOCK, KeptGraph, cache, kept

__all__ = ["fused_forward"]


def _no_autocast(device):
    """Autocast off on ``device`` (a no-op where autocast does not exist, e.g. "meta")."""
    import contextlib

    kind = torch.device(device).type
    return torch.autocast(kind, enabled=False) if kind in ("cuda", "cpu") else contextlib.nullcontext()


class _APMFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prim, model, cdt, save, images, *params):
        cfg = model.config
        names = weight_names(cfg)
        w = {n: p.detach().unsqueeze(0) for n, p in zip(names, params)}
        pos_in = model.pos_in(dtype=cdt, device=images.device)
        pos_out = model.pos_out(dtype=cdt, device=images.device)
        # ``save``: what the backward reads is kept only when one follows (gradients recorded): an
        # inference call keeps nothing (the first layer's activation included)
        z, f, fctx = forward(prim, w, images.unsqueeze(0), cfg, pos_in, pos_out, cdt=cdt, save=save)
        ctx.prim, ctx.cfg, ctx.names, ctx.w, ctx.fctx = prim, cfg, names, w, fctx
        ctx.pos = (pos_in, pos_out)
        ctx.image_dtype = images.dtype
        zo = z[0] if z is not None else images.new_zeros(0)
        return zo, f[0]

    @staticmethod
    def backward(ctx, dz, df):
        cfg = ctx.cfg
        has_dz = cfg.pool and dz is not None and dz.numel() > 0
        want_images = ctx.needs_input_grad[4]
        with _no_autocast(df.device):
            g = backward(ctx.prim, ctx.w, ctx.fctx, dz.unsqueeze(0) if has_dz else None, cfg, *ctx.pos,
                         df_extra=df.unsqueeze(0) if df is not None else None, image_grad=want_images)
        dx = g["images"][0].to(ctx.image_dtype) if want_images else None
        return (None, None, None, None, dx) + tuple(g[n][0].to(ctx.w[n].dtype) for n in ctx.names)


def fused_forward(prim, model, images, cdt: torch.dtype, *, graphs: bool | None = None):
    """(cls or None, grid f) of ``model`` on ``images`` (B, C, S, S) through the table ``prim``
    with GEMM operands in ``cdt``, differentiable with respect to the model's parameters and the
    images. ``cls`` comes in the accumulation dtype, ``f`` in ``cdt``.

    Inference (no gradient recorded: ``torch.no_grad()``, ``torch.inference_mode()``, or no
    parameter requiring one) on a CUDA device replays a captured CUDA graph of the forward from
    the second call with the same model, table, dtype and input shape on (:class:`_ForwardGraph`:
    the eager forward is bound by the host, ~1.3 ms of launches at one image); ``graphs=False``
    never does, ``True`` captures at the first call (on the CPU: the same function, eagerly). The
    outputs are fresh tensors either way."""
    cfg = model.config
    params = dict(model.named_parameters())
    ps = [params[n] for n in weight_names(cfg)]
    inference = not (torch.is_grad_enabled() and any(p.requires_grad for p in ps))
    if inference and (images.is_cuda or graphs) and graphs is not False:
        got = _replayed(prim, model, ps, images, cdt, now=bool(graphs))
        if got is not None:
            return got
    with _no_autocast(images.device):            # the driver picks its dtypes itself
        backward_follows = torch.is_grad_enabled() and (images.requires_grad or not inference)
        z, f = _APMFused.apply(prim, model, cdt, backward_follows, images, *ps)
    return (z if cfg.pool else None), f


class _ForwardGraph(KeptGraph):
    """One model's inference forward on one input shape captured as a CUDA graph: it reads the
    model's parameters where they live (so in-place updates are seen), the input from a static
    copy; its outputs are cloned out after each replay."""

    def __init__(self, prim, model, params, images, cdt):
        super().__init__(images.device)
        cfg = self.config = model.config
        self.prim, self.cdt = prim, cdt
        self.w = {n: p.detach().unsqueeze(0) for n, p in zip(weight_names(cfg), params)}
        dev = images.device
        self.pos = (model.pos_in(dtype=cdt, device=dev), model.pos_out(dtype=cdt, device=dev))
        self.images = images.detach().clone()
        self.z = self.f = None
        self.capture(self._run, lambda: None, f"forward/{getattr(prim, 'name', '?')}/{tuple(images.shape)}")

    def _run(self):
        with torch.no_grad(), _no_autocast(self.images.device):
            z, f, _ = forward(self.prim, self.w, self.images.unsqueeze(0), self.config, *self.pos, cdt=self.cdt,
                              save=False)
        self.z, self.f = z, f

    def __call__(self, images):
        with self.exclusive():
            self.images.copy_(images)
            self.replay()
            return (self.z[0].clone() if self.config.pool else None), self.f[0].clone()


_FORWARD = cache()           # the one captured forward kept, by key
_SEEN = cache()              # the last inference call's key: a repeat is worth a capture


def _replayed(prim, model, params, images, cdt, *, now: bool):
    """The replayed forward's outputs, or None where this call runs eagerly (a first call)."""
    key = (getattr(prim, "name", "?"), id(prim), id(model), cdt, model.config, tuple(images.shape), images.dtype,
           str(images.device), tuple((p.data_ptr(), p.dtype) for p in params), torch.is_inference_mode_enabled())
    with LOCK:
        if not (now or key in _FORWARD or key in _SEEN):
            _SEEN.clear()
            _SEEN[key] = True
            return None
    return kept(_FORWARD, key, lambda: _ForwardGraph(prim, model, params, images, cdt))(images)
