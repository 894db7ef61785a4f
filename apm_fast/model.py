"""The APM module: parameters, init, checkpoint I/O; the arithmetic lives in the backends."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import reference
from .backends import get_backend, resolve_backend
from .config import APMConfig
from .ops.autograd import _no_autocast, fused_forward
from .ops.driver import columns, rgb_head, weight_names
from .ops.precision import compute_dtype, exact_convolutions
from .posenc import position_code
from .validation import _positive_int, check_images

__all__ = ["APM", "APMOutput"]


@dataclass
class APMOutput:
    """cls: B x D pooled feature (None without pool); grid: B x L x D features f of every
    location query (before the output position code is added); rgb: B x L x 3 or None."""

    cls: Optional[torch.Tensor]
    grid: Optional[torch.Tensor]
    rgb: Optional[torch.Tensor] = None


class APM(nn.Module):
    """Asynchronous Perception Machine.

    ``model(images, backend=None)`` takes normalized images B x C x S x S (S = grid * patch) and
    returns an :class:`APMOutput`. ``backend`` picks the implementation (``"reference"``: the
    plain form; a table run through the driver's exact rewrites of spec section 3: ``"torch"``,
    ``"triton"``, ``"cuda"`` where built); ``None`` picks the fastest one available.
    """

    def __init__(self, config: APMConfig, *, dtype=None, device=None):
        super().__init__()
        if not isinstance(config, APMConfig):
            raise TypeError(f"config: expected an APMConfig (see apm_fast.preset), got {type(config).__name__}")
        self.config = c = config
        fk = {"dtype": dtype, "device": device}
        self.conv = nn.Conv2d(c.in_chans, 1, kernel_size=c.patch, stride=c.patch, **fk)
        widths = (c.column_dim,) + c.hidden
        self.mlp = nn.ModuleList(nn.Linear(widths[i], widths[i + 1], **fk) for i in range(len(c.hidden)))
        self.head = nn.Linear(c.hidden[-1], c.dim, **fk)
        if c.pool:
            self.attn = nn.MultiheadAttention(c.dim, c.heads, batch_first=True, **fk)
            self.query = nn.Parameter(torch.empty(c.dim, **fk))
        else:
            self.attn = None
            self.register_parameter("query", None)
        if c.rgb_head:
            self.rgb = nn.Sequential(
                nn.Linear(c.dim + c.column_dim, 256, **fk), nn.ReLU(),
                nn.Linear(256, 256, **fk), nn.ReLU(),
                nn.Linear(256, 3, **fk), nn.ReLU())
        else:
            self.rgb = None
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self):
        c = self.config
        if c.init == "authors":
            # every parameter, biases and the query included, ~ N(0, 0.01^2) (the authors' TTT init)
            for p in self.parameters():
                p.normal_(0.0, c.init_std)
        else:
            for m in self.modules():
                if m is not self and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            if self.query is not None:
                nn.init.normal_(self.query, 0.0, 1.0)

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def pos_in(self, dtype=None, device=None) -> torch.Tensor:
        """L x G^2 input position code (cached, read-only)."""
        c = self.config
        return position_code(c.pos_dim, c.grid, c.grid, dtype=dtype or self.dtype, device=device or self.device)

    def pos_out(self, dtype=None, device=None) -> torch.Tensor:
        """L x D output position code added before the pool (cached, read-only)."""
        c = self.config
        return position_code(c.dim, c.grid, c.grid, dtype=dtype or self.dtype, device=device or self.device)

    def extra_repr(self) -> str:
        c = self.config
        return (f"grid={c.grid}, patch={c.patch}, hidden={c.hidden}, dim={c.dim}, heads={c.heads}, "
                f"pool={c.pool}, rgb_head={c.rgb_head}")

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, backend: str | None = None, *, want_grid: bool = True,
                want_rgb: bool | None = None, chunk: int | None = None,
                query_grid: int | None = None) -> APMOutput:
        """The features of ``images`` (B, C, H, W) at every location: ``grid`` (B, L, D), ``cls``
        (B, D) with a pool, ``rgb`` with an RGB head; in the model's dtype.

        ``backend``: ``"reference"`` (the plain form) or a table (``"torch"``, ``"triton"``,
        ``"cuda"``); None: the table whose forward was measured fastest on the images' device for
        this config
        (``apm-fast info`` says which and why). GEMMs run in the model's dtype, or, for an fp32
        model inside an autocast region, in torch's autocast dtype (bf16/fp16/fp64 models keep
        their own; every backend, ``apm_fast.ops.precision``); the outputs come in the model's dtype.
        ``chunk``: evaluate the location queries ``chunk`` at a time (inference, no gradients)
        with memory bounded by the chunk, not by L; ``query_grid``: ask about a G_q x G_q grid of
        locations instead of the model's own (implies chunked evaluation, default chunk 4096).
        Chunked evaluation runs on the tables and returns no RGB.
        On a CUDA device, inference (under ``torch.no_grad()`` / ``torch.inference_mode()``)
        replays a captured CUDA graph from the second call with the same input shape on, and
        chunked evaluation replays one captured chunk: the eager launches are bound by the host.
        One of each is kept for the next call; ``apm_fast.ops.release_graphs()`` frees them."""
        images = check_images(images, self.config)
        name = resolve_backend(backend, images.device, self.config, workload="forward")
        chunked = chunk is not None or query_grid is not None
        if name == "reference":
            if chunked:
                raise ValueError("chunk/query_grid: chunked evaluation runs on the tables ('torch', "
                                 "'triton', 'cuda'), not on backend='reference'")
            with self._autocast_rule(images.device):
                cls, grid, rgb = reference.forward(self, images.to(self.dtype), want_grid=want_grid, want_rgb=want_rgb)
            return APMOutput(*(None if v is None else v.to(self.dtype) for v in (cls, grid, rgb)))
        prim = get_backend(name, device=images.device)
        cdt = compute_dtype(self.dtype, images.device)
        images = images.to(self.dtype)
        c = self.config
        if chunked:
            if want_rgb:
                raise ValueError("want_rgb: chunked evaluation (chunk/query_grid) returns no RGB; "
                                 "call without chunk for the RGB head")
            for arg, v in (("chunk", chunk), ("query_grid", query_grid)):
                _positive_int(arg, v, none_ok=True)          # numpy integers too
            chunk, query_grid = (None if v is None else int(v) for v in (chunk, query_grid))
            w = {n: p.detach().unsqueeze(0) for n, p in self.named_parameters() if n in weight_names(c)}
            cls, grid = columns(prim, w, images, c, cdt=cdt, chunk=chunk or 4096, query_grid=query_grid,
                                want_grid=want_grid)
            return APMOutput(cls=None if cls is None else cls.to(self.dtype),
                             grid=None if grid is None else grid.to(self.dtype))
        cls, f = fused_forward(prim, self, images, cdt)
        f = f.to(self.dtype)
        rgb = None
        if c.rgb_head and (want_rgb is None or want_rgb):
            with self._autocast_rule(images.device):
                t = F.conv2d(images, self.conv.weight, self.conv.bias, stride=c.patch).flatten(1)
                rgb = rgb_head(dict(self.named_parameters()), c, f, t, self.pos_in(device=images.device))
            rgb = rgb.to(self.dtype)
        return APMOutput(cls=None if cls is None else cls.to(self.dtype), grid=f if want_grid else None,
                         rgb=rgb)

    @contextlib.contextmanager
    def _autocast_rule(self, device):
        """Where the plain torch ops of a forward run (the reference, the RGB head): under an
        ambient autocast only where :func:`~apm_fast.ops.precision.compute_dtype` gives its dtype
        (an fp32 model), else autocast off (the model's own dtype), as the tables compute; fp32
        convolutions in fp32, not cuDNN's default TF32 (:func:`~apm_fast.ops.precision.exact_convolutions`)."""
        rule = contextlib.nullcontext() if compute_dtype(self.dtype, device) != self.dtype else _no_autocast(device)
        with rule, exact_convolutions(device):
            yield

    # ------------------------------------------------------------------ checkpoints
    def load_official_state_dict(self, state_dict, *, strict_unexpected: bool = True):
        """Load the authors' checkpoint layout (a state_dict or a path to one); see
        :func:`apm_fast.checkpoint.load_official_state_dict`."""
        from .checkpoint import load_official_state_dict
        return load_official_state_dict(self, state_dict, strict_unexpected=strict_unexpected)

    def save(self, path: str | os.PathLike):
        """Save weights and config to a ``.safetensors`` file (no pickled objects)."""
        from .checkpoint import save_apm
        save_apm(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device=None) -> "APM":
        """Load a model written by :meth:`save`."""
        from .checkpoint import load_apm
        return load_apm(path, device=device)
