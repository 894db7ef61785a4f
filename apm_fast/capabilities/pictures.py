"""Pictures of grids: features projected to colours (PCA, t-SNE), panels, strips, GIFs.

Projections map L x D grid features to L x 3 colours in [0, 1]. For several grids to be compared
(iterations of a training, frames of an interpolation) they share ONE projection: PCA is fitted
on a reference set of cells (the last iteration; the two end frames) and applied to every grid,
with the colour scale of the reference, so a colour means the same feature direction in every
frame. t-SNE has no transform for new points: it is fitted on all grids' cells together.

Files are written atomically (a temporary file, then ``os.replace``): a killed run never leaves
half a PNG or GIF behind.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .files import atomic_write

__all__ = ["PROJECTIONS", "PCAProjection", "fit_pca", "project", "grid_picture", "upscale", "label_panel",
           "strip", "loss_curve", "error_map", "save_png", "save_gif", "as_uint8"]

PROJECTIONS = ("pca", "tsne")


@dataclass
class PCAProjection:
    """mean (D), components (3 x D), and the colour scale lo/hi (3) of the reference cells."""

    mean: torch.Tensor
    components: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        """... x D features -> ... x 3 colours in [0, 1] (clipped outside the reference's range)."""
        y = (feats.double() - self.mean) @ self.components.T
        return ((y - self.lo) / (self.hi - self.lo).clamp_min(1e-12)).clamp(0.0, 1.0).float()


def fit_pca(ref: torch.Tensor, *, quantile: float = 0.01) -> PCAProjection:
    """The top-3 principal directions of ``ref`` (N x D cells), in float64; the colour scale
    spans the reference's projections from the ``quantile`` to the 1 - ``quantile`` quantile (a
    few outlying cells must not wash out the rest). Component signs are fixed (the largest
    loading positive) so that the colours do not flip between runs."""
    if ref.dim() != 2 or ref.shape[0] < 2:
        raise ValueError(f"ref: expected N x D features with N >= 2, got shape {tuple(ref.shape)}")
    x = ref.detach().double().cpu()
    mean = x.mean(0)
    xc = x - mean
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    comps = torch.zeros(3, x.shape[1], dtype=torch.float64)
    k = min(3, vh.shape[0])
    comps[:k] = vh[:k]
    idx = comps.abs().argmax(1)
    sign = torch.sign(comps[torch.arange(3), idx])
    comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]
    y = xc @ comps.T
    lo = torch.quantile(y, quantile, dim=0)
    hi = torch.quantile(y, 1.0 - quantile, dim=0)
    return PCAProjection(mean, comps, lo, hi)


def project(grids: Sequence[torch.Tensor], reference: Sequence[int], method: str = "pca", *,
            seed: int = 0) -> List[torch.Tensor]:
    """Colours (L x 3 in [0, 1]) of every grid (L x D) under one shared projection.

    ``method="pca"``: fitted on the grids listed in ``reference`` (indices) and applied to all;
    ``"tsne"``: scikit-learn's t-SNE (3 components, seeded) over the cells of all grids at once,
    each component scaled to [0, 1] over them."""
    if method not in PROJECTIONS:
        raise ValueError(f"projection: expected one of {list(PROJECTIONS)}, got {method!r}")
    grids = [g.detach().double().cpu() for g in grids]
    if method == "pca":
        pca = fit_pca(torch.cat([grids[i] for i in reference]))
        return [pca(g) for g in grids]
    try:
        from sklearn.manifold import TSNE
    except ImportError as exc:
        raise ValueError(f"projection: 'tsne' needs scikit-learn (pip install scikit-learn): {exc}") from None
    allx = torch.cat(grids).numpy()
    n = allx.shape[0]
    emb = TSNE(n_components=3, perplexity=float(min(30, max(2, (n - 1) // 3))), init="pca",
               random_state=seed).fit_transform(allx)
    emb = torch.from_numpy(np.asarray(emb, dtype=np.float64))
    lo, hi = emb.min(0).values, emb.max(0).values
    emb = ((emb - lo) / (hi - lo).clamp_min(1e-12)).float()
    return list(emb.split([g.shape[0] for g in grids]))


# ---------------------------------------------------------------------------- panels
def as_uint8(rgb) -> np.ndarray:
    """H x W x 3 floats in [0, 1] (tensor or array) -> uint8 array."""
    a = rgb.detach().cpu().numpy() if isinstance(rgb, torch.Tensor) else np.asarray(rgb)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def grid_picture(colours: torch.Tensor, grid: int) -> Image.Image:
    """L x 3 colours of a G x G grid (cell l = y * G + x) -> a G x G RGB image."""
    return Image.fromarray(as_uint8(colours.reshape(grid, grid, 3)))


def upscale(img: Image.Image, size) -> Image.Image:
    """A grid picture at ``size`` (W, H) pixels, each cell a block (nearest: cells stay cells)."""
    return img.resize(tuple(int(s) for s in size), Image.NEAREST)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:            # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def label_panel(img: Image.Image, text: str, *, height: int = 18) -> Image.Image:
    """``img`` with a white caption band above it."""
    out = Image.new("RGB", (img.width, img.height + height), "white")
    out.paste(img, (0, height))
    draw = ImageDraw.Draw(out)
    draw.text((3, 2), text, fill="black", font=_font(max(9, height - 6)))
    return out


def strip(panels: Sequence[Image.Image], *, gap: int = 4, rows: Optional[Sequence[Sequence[Image.Image]]] = None) -> Image.Image:
    """Panels side by side (one row), or ``rows`` of panels stacked, on white, top-aligned."""
    rows = [list(panels)] if rows is None else [list(r) for r in rows]
    widths = [sum(p.width for p in r) + gap * (len(r) - 1) for r in rows]
    heights = [max(p.height for p in r) for r in rows]
    out = Image.new("RGB", (max(widths), sum(heights) + gap * (len(rows) - 1)), "white")
    y = 0
    for r, h in zip(rows, heights):
        x = 0
        for p in r:
            out.paste(p, (x, y))
            x += p.width + gap
        y += h + gap
    return out


def loss_curve(losses: Sequence[float], size=(240, 180), *, marks: Sequence[int] = (), title: str = "loss") -> Image.Image:
    """A small line plot of ``losses`` (log scale when they span over a decade), drawn with PIL
    (no plotting library needed); ``marks``: step counts to tick on the x axis (e.g. the captured
    iterations)."""
    w, h = size
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    y = np.asarray([float(v) for v in losses], dtype=np.float64)
    # margins for the labels, smaller on small pictures (the plot keeps at least half the size)
    left, right = min(40, w // 4), w - min(14, w // 12)
    top, bottom = min(20, h // 6), h - min(22, h // 4)
    d.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    f = _font(11)
    ok = np.isfinite(y)
    if not ok.any():
        d.text((left + 4, top + 4), "no finite loss", fill="red", font=f)
        return img
    pos = y[ok & (y > 0)]
    log = pos.size == ok.sum() and pos.size > 1 and pos.max() / pos.min() > 10.0
    v = np.log10(np.where(ok, np.maximum(y, 1e-300), np.nan)) if log else y
    lo, hi = np.nanmin(v), np.nanmax(v)
    hi = hi if hi > lo else lo + 1.0
    n = len(y)
    xs = left + (right - left) * (np.arange(n) + 1) / max(n, 1)
    ys = bottom - (bottom - top) * (v - lo) / (hi - lo)
    pts = [(float(a), float(b)) for a, b, k in zip(xs, ys, ok) if k]
    if len(pts) > 1:
        d.line(pts, fill=(200, 40, 40), width=2)
    elif pts:
        d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=(200, 40, 40))
    for m in marks:
        if 0 < m <= n:
            x = left + (right - left) * m / n
            d.line([(x, bottom), (x, bottom + 4)], fill="black")
            d.text((x - 8, bottom + 6), str(m), fill="black", font=f)
    fmt = (lambda t: f"{10 ** t:.3g}") if log else (lambda t: f"{t:.3g}")
    d.text((2, top - 2), fmt(hi), fill="black", font=f)
    d.text((2, bottom - 10), fmt(lo), fill="black", font=f)
    d.text((left + 4, 3), title + (" (log)" if log else ""), fill="black", font=f)
    return img


def error_map(err: torch.Tensor, grid: int, vmax: Optional[float] = None) -> Image.Image:
    """L per-cell errors -> a G x G heat picture (black, red, yellow, white as the error grows
    from 0 to ``vmax``; default the largest error)."""
    e = err.detach().double().cpu().reshape(grid, grid)
    top = float(e.max()) if vmax is None else float(vmax)
    t = (e / top if top > 0 else torch.zeros_like(e)).clamp(0, 1).numpy()
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    return Image.fromarray(as_uint8(rgb))


# ---------------------------------------------------------------------------- files
def save_png(img: Image.Image, path) -> Path:
    """Write a PNG atomically (optimized: the README's pictures stay small)."""
    return atomic_write(path, lambda f: img.save(f, format="PNG", optimize=True))


def save_gif(frames: Sequence[Image.Image], path, *, ms: int = 400, loop: int = 0) -> Path:
    """Write an animated GIF atomically (``ms`` per frame, looping forever by default)."""
    frames = [fr.convert("RGB") for fr in frames]
    if not frames:
        raise ValueError("frames: expected at least one frame for the GIF, got none")
    return atomic_write(path, lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=ms, loop=loop, optimize=False))
