"""RGB decoding (the paper's Figure 5 (ii)): what an APM's RGB head reads out of its grid.

The head is asked, at every cell, for the image's colour averaged over that cell's patch (in [0, 1],
in the channel order the model was trained with: :mod:`apm_fast.capabilities.inputs`); its answer
beside the input, and the per-cell squared error, show how much of the image the column features
carry. PSNR = 10 log10(1 / MSE) over cells and channels, the values in [0, 1].

Checkpoints: the package's own safetensors files (:meth:`APM.load`) or the authors' state-dict
layout (:meth:`APM.load_official_state_dict`), whose config is read off the tensors' shapes
(:func:`infer_official_config`): their COCO checkpoint and their TTT one both load without options.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from . import pictures
from .inputs import cell_colours, check_input_kind, default_input_kind, display_rgb, student_input

__all__ = ["Decoding", "decode", "load_model", "infer_official_config", "render_decoding", "with_weights",
           "psnr"]


def psnr(mse: float) -> float:
    """10 log10(1 / mse) for values in [0, 1] (inf for a perfect reconstruction)."""
    return math.inf if mse <= 0 else 10.0 * math.log10(1.0 / mse)


def infer_official_config(state_dict: dict, *, heads: int = 8):
    """The :class:`~apm_fast.APMConfig` of a state dict in the authors' layout, from its shapes:
    patch and channels from ``conv1``, the grid from fc1's input (2 G^2), the MLP widths from
    ``fc1 ... fcN``, D from ``feat_proj_head``, the pool from ``little_query``, the RGB head from
    ``rgb_head_1`` (all-zero ``rgb_head_*``, the place-holders ``export_official`` writes for a
    config without one, are no RGB head). The pool's head count is not in the shapes (``heads``,
    default 8)."""
    from ..checkpoint import zero_rgb_head
    from ..config import APMConfig

    sd = {k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k: v
          for k, v in state_dict.items()}
    need = ["conv1.weight", "fc1.weight", "feat_proj_head.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"checkpoint: not in the authors' layout (no {missing}; expected conv1, fc1 ..., "
                         f"feat_proj_head)")
    conv = sd["conv1.weight"]
    if conv.dim() != 4 or conv.shape[0] != 1 or conv.shape[2] != conv.shape[3]:
        raise ValueError(f"checkpoint: conv1.weight has shape {tuple(conv.shape)}, expected (1, C, p, p)")
    fcs = sorted(int(m.group(1)) for k in sd if isinstance(k, str) and (m := re.fullmatch(r"fc(\d+)\.weight", k)))
    hidden = tuple(int(sd[f"fc{i}.weight"].shape[0]) for i in fcs)
    col = int(sd["fc1.weight"].shape[1])
    g = math.isqrt(col // 2)
    if 2 * g * g != col:
        raise ValueError(f"checkpoint: fc1.weight takes {col} inputs, expected 2 G^2 ([trigger ; position])")
    return APMConfig(grid=g, patch=int(conv.shape[2]), hidden=hidden, dim=int(sd["feat_proj_head.weight"].shape[0]),
                     heads=heads, pool="little_query" in sd,
                     rgb_head="rgb_head_1.weight" in sd and not zero_rgb_head(sd),
                     in_chans=int(conv.shape[1]), init="pytorch")


def load_model(path, *, heads: Optional[int] = None, device=None):
    """(APM, layout) from a checkpoint file, told by its content rather than its suffix:
    ``"apm-fast"`` (a safetensors file written by ``APM.save``, whatever its name) or ``"authors"``
    (their state dict, a torch file or safetensors; config inferred)."""
    from ..checkpoint import _read_state_dict, is_safetensors_file
    from ..model import APM

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file at {str(path)!r}")
    if is_safetensors_file(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                fmt = (f.metadata() or {}).get("format", "")
        except Exception as exc:
            raise ValueError(f"checkpoint {str(path)!r} is not a safetensors file ({type(exc).__name__}: {exc})") from None
        if fmt.startswith("apm-fast/"):
            model = APM.load(path, device=device)
            if heads is not None and model.config.pool and heads != model.config.heads:
                raise ValueError(f"heads: {str(path)!r} holds a model with {model.config.heads} heads, got heads={heads}")
            return model, "apm-fast"
    sd, _ = _read_state_dict(path, "checkpoint")
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
        raise ValueError(f"heads: expected a positive integer (or None: 8), got {heads!r}")
    cfg = infer_official_config(sd, heads=8 if heads is None else heads)
    model = APM(cfg, device=device)
    model.load_official_state_dict(sd)
    return model, "authors"


@torch.no_grad()
def with_weights(model, weights: dict):
    """A copy of ``model`` with some parameters replaced (e.g. the trunk after TTT)."""
    twin = copy.deepcopy(model)
    params = dict(twin.named_parameters())
    for name, value in weights.items():
        params[name].copy_(value.reshape(params[name].shape))
    return twin


@dataclass
class Decoding:
    """input: the S x S RGB picture the model saw; rgb / target: L x 3 (the head's output and the
    cell averages, in [0, 1], in the model's channel order ``kind``); error: L per-cell squared
    error (mean over channels); mse, psnr over all cells; grid: G."""

    input: Image.Image
    rgb: torch.Tensor
    target: torch.Tensor
    error: torch.Tensor
    mse: float
    psnr: float
    kind: str
    grid: int

    def pictures(self, size: int):
        """(input, cell averages, reconstruction, error map) as ``size`` x ``size`` RGB pictures."""
        g = self.grid
        up = lambda img: pictures.upscale(img, (size, size))    # noqa: E731
        return (self.input.resize((size, size), Image.BICUBIC),
                up(pictures.grid_picture(display_rgb(self.target, self.kind), g)),
                up(pictures.grid_picture(display_rgb(self.rgb, self.kind), g)),
                up(pictures.error_map(self.error, g)))


@torch.no_grad()
def decode(model, image, *, kind: Optional[str] = None, crop: Optional[str] = None, backend=None,
           px: Optional[torch.Tensor] = None) -> Decoding:
    """The RGB head's reconstruction of ``image`` (a path, PIL image, array; or ``px``: 3 x S x S
    uint8 pixels already sized) and its per-cell error. ``kind``: the input convention (None: by
    the model, see :func:`~apm_fast.capabilities.inputs.default_input_kind`); ``crop``: None
    stretches the image to S x S (the authors' inference), ``"center"`` crops it."""
    from ..images import pixels

    cfg = model.config
    if not cfg.rgb_head:
        raise ValueError("model: this config has no RGB head (rgb_head=False): nothing to decode")
    kind = check_input_kind(kind or default_input_kind(cfg), "kind")
    if px is None:
        px = pixels(image, cfg, crop=crop)
    elif not (isinstance(px, torch.Tensor) and px.dtype == torch.uint8
              and tuple(px.shape) == (3, cfg.image_size, cfg.image_size)):
        raise TypeError(f"px: expected 3 x {cfg.image_size} x {cfg.image_size} uint8 pixels, got "
                        + (f"{px.dtype} of shape {tuple(px.shape)}" if isinstance(px, torch.Tensor)
                           else type(px).__name__))
    dev = model.device
    x = student_input(px[None].to(dev), kind).to(model.dtype)
    rgb = model(x, backend=backend, want_rgb=True).rgb[0].double()
    target = cell_colours(px[None].to(dev), kind, cfg.patch)[0].double()
    err = (rgb - target).square().mean(-1)
    mse = float(err.mean())
    return Decoding(input=Image.fromarray(px.permute(1, 2, 0).cpu().numpy()), rgb=rgb.cpu(), target=target.cpu(),
                    error=err.cpu(), mse=mse, psnr=psnr(mse), kind=kind, grid=cfg.grid)


def render_decoding(dec: Decoding, out_dir, *, size: int = 192) -> Path:
    """``decode.png`` in ``out_dir``: the input, the cell averages the head is asked for, its
    reconstruction, the per-cell error map (black to white up to the largest error, stated)."""
    inp, cells, rec, err = dec.pictures(size)
    panels = [pictures.label_panel(inp, "input"), pictures.label_panel(cells, "cell averages (target)"),
              pictures.label_panel(rec, f"RGB head: {dec.psnr:.1f} dB"),
              pictures.label_panel(err, f"sq. error, max {float(dec.error.max()):.3g}")]
    return pictures.save_png(pictures.strip(panels), Path(out_dir) / "decode.png")
