"""Islands of agreement (the paper's Figure 3): how an APM's grid features organise themselves
while it is test-time trained on one image.

TTT on the image from the fixed init (the :class:`~apm_fast.TestTimeTrainer`'s engine, the
captured step unchanged), the grid features kept after chosen iterations (the captured eval phase
replayed after those steps only: :meth:`~apm_fast.TestTimeTrainer.trajectory`), projected to
colours by one shared projection (PCA fitted on the last iteration's cells; or t-SNE over all of
them) so that a colour means the same thing in every frame: cells that agree on a feature form
islands of one colour.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from PIL import Image

from ..validation import _positive_int, step_counts
from . import pictures

__all__ = ["Islands", "islands", "iterations", "render_islands"]


@dataclass
class Islands:
    """iterations: the step counts captured (0 is the init); grids: one L x D tensor per iteration;
    colours: one L x 3 tensor in [0, 1] per iteration (the shared projection); losses: the loss
    of every step; grid: G; projection: "pca" or "tsne"."""

    iterations: List[int]
    grids: List[torch.Tensor]
    colours: List[torch.Tensor]
    losses: List[float]
    grid: int
    projection: str

    def frames(self, size) -> List[Image.Image]:
        """One picture per iteration at ``size`` (W, H): the G x G colours, each cell a block
        (stretched to the input's aspect when the input was stretched to the square grid)."""
        return [pictures.upscale(pictures.grid_picture(c, self.grid), size) for c in self.colours]


def iterations(steps: int, every: int, at: Optional[Sequence[int]] = None) -> List[int]:
    """The captured step counts: ``at`` when given, else every ``every`` steps up to ``steps``
    (``steps`` itself always included)."""
    _positive_int("steps", steps)
    if at is not None:
        return step_counts(at, steps, empty_ok=False)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every: expected a positive integer, got {every!r}")
    its = list(range(every, steps + 1, every))
    return its if its and its[-1] == steps else its + [steps]


def islands(trainer, image: torch.Tensor, target: torch.Tensor, at: Sequence[int], *,
            projection: str = "pca", seed: int = 0) -> Islands:
    """TTT on one image (``image``: 3 x S x S, the student's normalized input; ``target``: its
    teacher embedding, D) with ``trainer`` (a table backend), the grid features kept after each
    step count in ``at``, projected to colours: PCA fitted on the last captured iteration and
    applied to all, or t-SNE (``projection="tsne"``, scikit-learn) over every iteration's cells."""
    if projection not in pictures.PROJECTIONS:
        raise ValueError(f"projection: expected one of {list(pictures.PROJECTIONS)}, got {projection!r}")
    its = iterations(trainer.steps, 1, at)
    if image.dim() == 3:
        image = image.unsqueeze(0)
    traj = trainer.trajectory(image, target.reshape(1, -1), its)
    grids = [traj.grids[k][0].float().cpu() for k in its]
    colours = pictures.project(grids, [len(grids) - 1], projection, seed=seed)
    return Islands(iterations=its, grids=grids, colours=colours, losses=[float(v) for v in traj.losses[0]],
                   grid=trainer.model.config.grid, projection=projection)


def render_islands(result: Islands, image: Image.Image, out_dir, *, height: int = 160, gif_ms: int = 500,
                   title: str = "") -> dict:
    """Write ``islands.png`` (the input, one panel per captured iteration, the loss curve) and
    ``islands.gif`` (input beside the features, one frame per iteration) into ``out_dir``.
    Panels are ``height`` pixels high, at the input's aspect ratio. Returns {name: path}."""
    out = Path(out_dir)
    w = max(1, round(image.width * height / image.height))
    shown = image.convert("RGB").resize((w, height), Image.BICUBIC)
    frames = result.frames((w, height))
    how = "PCA fitted on the last" if result.projection == "pca" else "t-SNE over all"
    panels = [pictures.label_panel(shown, title or "input")]
    panels += [pictures.label_panel(f, f"iter {k}") for k, f in zip(result.iterations, frames)]
    panels.append(pictures.label_panel(
        pictures.loss_curve(result.losses, (max(160, round(height * 1.4)), height), marks=result.iterations,
                            title="TTT loss"), how))
    png = pictures.save_png(pictures.strip(panels), out / "islands.png")
    gif_frames = [pictures.strip([pictures.label_panel(shown, title or "input"),
                                  pictures.label_panel(f, f"iteration {k} / {result.iterations[-1]}")])
                  for k, f in zip(result.iterations, frames)]
    gif = pictures.save_gif(gif_frames, out / "islands.gif", ms=gif_ms)
    return {"png": png, "gif": gif, "frames": frames}
