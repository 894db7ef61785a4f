"""Perceptual interpolation: the columns asked with a trigger between two images' triggers.

An APM sees an image only through its trigger T (the conv's output, one value per cell); every
column is the shared MLP on [T ; pos_l]. Mixing two images' triggers, T_i = T_A + (T_B - T_A) i / n
for i = 0 ... n, and asking every column with T_i gives a grid and an RGB read-out per step: frame
0 is exactly the decoding of A and frame n that of B (the tests check it), the frames between
are what the model makes of a trigger no image produced. Computed with the driver's pieces
(``trigger_split`` for the triggers, ``columns(trigger=...)`` for the grid, ``rgb_head``), in
chunks of columns: memory is bounded by the chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
from PIL import Image

from . import pictures
from .inputs import check_input_kind, default_input_kind, display_rgb, student_input

__all__ = ["Interpolation", "interpolate", "render_interpolation"]


@dataclass
class Interpolation:
    """weights: the n + 1 mixing weights i / n; triggers: (n + 1) x G^2; grids: (n + 1) x L x D;
    rgb: (n + 1) x L x 3 in the model's channel order ``kind`` (None without an RGB head);
    colours: (n + 1) x L x 3, the grids under one PCA fitted on the two end frames; inputs: the
    two S x S pictures the model saw."""

    weights: List[float]
    triggers: torch.Tensor
    grids: torch.Tensor
    rgb: Optional[torch.Tensor]
    colours: List[torch.Tensor]
    inputs: tuple
    kind: str
    grid: int


@torch.no_grad()
def interpolate(model, a, b, frames: int = 8, *, kind: Optional[str] = None, crop: Optional[str] = None,
                backend=None, chunk: int = 4096) -> Interpolation:
    """``frames`` (>= 2) read-outs of ``model`` for triggers from image ``a``'s to image ``b``'s
    (paths, PIL images, arrays). ``kind``: the input convention (None: by the model); ``crop``:
    None stretches (the authors' inference), ``"center"`` crops."""
    from ..backends import get_backend, resolve_backend
    from ..images import pixels
    from ..ops.contract import acc_dtype_for
    from ..ops.driver import columns, rgb_head, trigger_split, weight_names
    from ..ops.precision import compute_dtype

    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise ValueError(f"frames: expected an integer >= 2 (the two ends included), got {frames!r}")
    cfg = model.config
    kind = check_input_kind(kind or default_input_kind(cfg), "kind")
    dev = model.device
    name = resolve_backend(backend, dev, cfg, workload="forward")
    if name == "reference":
        name = "torch"          # the columns with a given trigger run on a table; "torch" is the plain one
    prim = get_backend(name, device=dev)
    px = torch.stack([pixels(im, cfg, crop=crop) for im in (a, b)])
    x = student_input(px.to(dev), kind).to(model.dtype)
    params = dict(model.named_parameters())
    w = {n: params[n].detach().unsqueeze(0) for n in weight_names(cfg)}
    cdt = compute_dtype(model.dtype, dev)
    _, t, _ = trigger_split(w, x.unsqueeze(0), cfg, acc_dtype_for(cdt))              # 1 x 2 x d
    n = frames - 1
    mix = torch.arange(frames, dtype=torch.float64) / n
    ta, tb = t[0, 0].double(), t[0, 1].double()
    triggers = (ta[None] + (tb - ta)[None] * mix[:, None].to(dev)).to(t.dtype)      # frames x d
    triggers[0], triggers[-1] = t[0, 0], t[0, 1]        # the ends exactly A's and B's own
    _, grid = columns(prim, w, None, cfg, cdt=cdt, chunk=chunk, trigger=triggers)
    grid = grid.to(model.dtype)
    rgb = None
    if cfg.rgb_head:
        rgb = rgb_head(params, cfg, grid, triggers.to(model.dtype), model.pos_in(device=dev)).double().cpu()
    grids = grid.float().cpu()
    colours = pictures.project(list(grids), [0, frames - 1], "pca")
    inputs = tuple(Image.fromarray(p.permute(1, 2, 0).numpy()) for p in px)
    return Interpolation(weights=mix.tolist(), triggers=triggers.cpu(), grids=grids, rgb=rgb, colours=colours,
                         inputs=inputs, kind=kind, grid=cfg.grid)


def render_interpolation(res: Interpolation, out_dir, *, size: int = 112, gif_ms: int = 250) -> dict:
    """``interpolation.png`` (A, the RGB read-outs, B on the first row; the PCA pictures of the
    grids below them) and ``interpolation.gif`` (RGB beside PCA, there and back) in ``out_dir``."""
    g = res.grid
    up = lambda img: pictures.upscale(img, (size, size))        # noqa: E731
    pca = [up(pictures.grid_picture(c, g)) for c in res.colours]
    rgb = ([up(pictures.grid_picture(display_rgb(r, res.kind), g)) for r in res.rgb] if res.rgb is not None
           else [Image.new("RGB", (size, size), "white")] * len(pca))
    a, b = (im.resize((size, size), Image.BICUBIC) for im in res.inputs)
    blank = Image.new("RGB", (size, size), "white")
    row1 = [pictures.label_panel(a, "A")] + [pictures.label_panel(r, f"{wt:.2f}") for r, wt in zip(rgb, res.weights)]
    row1.append(pictures.label_panel(b, "B"))
    row2 = [pictures.label_panel(blank, "")] + [pictures.label_panel(p, "PCA") for p in pca]
    row2.append(pictures.label_panel(blank, ""))
    png = pictures.save_png(pictures.strip([], rows=[row1, row2]), Path(out_dir) / "interpolation.png")
    frames = [pictures.strip([pictures.label_panel(r, f"A -> B {wt:.2f}"), pictures.label_panel(p, "grid (PCA)")])
              for r, p, wt in zip(rgb, pca, res.weights)]
    gif = pictures.save_gif(frames + frames[-2:0:-1], Path(out_dir) / "interpolation.gif", ms=gif_ms)
    return {"png": png, "gif": gif}
