"""A backend made of a primitive table: the fused driver of ``apm_fast.ops`` behind the model API.

Triton and CUDA backends are ``FusedBackend(name, primitives, availability)``; they differ only in
their primitive table. The RGB head (not part of the fused path) is computed in PyTorch on the
fused path's features, and its gradient flows back into the fused backward.
"""
from __future__ import annotations

from ..ops import fused_forward

__all__ = ["FusedBackend"]


class FusedBackend:
    def __init__(self, name, primitives, availability=None):
        self.name = name
        self.primitives = primitives
        self._availability = availability

    def available(self):
        return self._availability() if self._availability is not None else (True, "")

    def forward(self, model, images, *, want_grid=True, want_rgb=None):
        from ..model import APMOutput
        from .reference import trigger
        from .torch_rewrite import rgb_split

        cls, f = fused_forward(self.primitives, model, images)
        rgb = None
        if model.config.rgb_head and (want_rgb is None or want_rgb):
            t = trigger(model, images.to(model.dtype))
            rgb = rgb_split(model, f, t, model.pos_in(dtype=f.dtype, device=f.device))
        return APMOutput(cls=cls, grid=f if want_grid else None, rgb=rgb)
