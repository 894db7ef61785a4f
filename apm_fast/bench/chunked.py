"""APM inference over any number of location queries, streamed in chunks with bounded memory: the
benchmark's entry to :func:`apm_fast.ops.chunked.columns_forward` (the scaling section uses it).

``position_rows`` lives in :mod:`apm_fast.posenc` and is re-exported here for old imports.
"""
from __future__ import annotations

import torch

from ..backends import get_backend
from ..ops.chunked import columns_forward
from ..posenc import position_rows

__all__ = ["position_rows", "chunked_forward"]


def chunked_forward(model, images: torch.Tensor, *, query_grid: int | None = None,
                    chunk: int = 4096, want_grid: bool = False, backend: str = "torch"):
    """(cls, grid) of ``model`` on ``images`` over a ``query_grid`` x ``query_grid`` set of
    locations (default: the model's grid), ``chunk`` queries at a time, through ``backend``'s
    primitive table (``torch``, ``triton`` or ``cuda``). ``cls`` is None without a pool; ``grid``
    (B x L x D) only with ``want_grid``."""
    prim = get_backend(backend, device=images.device).primitives
    return columns_forward(prim, model, images, chunk=chunk, query_grid=query_grid, want_grid=want_grid)
