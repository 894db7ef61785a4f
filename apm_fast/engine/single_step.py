"""One TTT step as a callable, for timing a single step in isolation (benchmarks).

``make_step(model, image, target)`` builds a one-student program whose captured step graph is
replayed by each call; ``.reset()`` puts weights and Adam state back to the init. The program's
loss buffer is sized for many calls, so a timing loop never runs past it between resets.
"""
from __future__ import annotations

import torch

from ..validation import check_images, check_targets
from .program import StudentProgram, quiet_autograd
from .engine import TTTEngine

__all__ = ["make_step", "EngineStep"]

_MAX_CALLS = 1 << 14


class EngineStep:
    def __init__(self, program: StudentProgram):
        self.program = program

    @property
    def mode(self) -> str:
        return self.program.mode

    def __call__(self) -> torch.Tensor:
        """Run one step (forward, backward, Adam); returns this step's loss (a device scalar)."""
        p = self.program
        with quiet_autograd(p.device):
            if p.graphs is not None:
                p.graphs["step"].replay()
            else:
                p._step()
        return p.losses[0, p.t_idx[0] - 1]

    def reset(self):
        with quiet_autograd(self.program.device):
            self.program.reset()


def make_step(model, image, target, *, backend=None, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
              graphs=None, compute_dtype=None) -> EngineStep:
    """A single-image step over ``model``'s current parameters (1 x C x S x S image, 1 x D target)."""
    image = check_images(image, model.config)
    target = check_targets(target, image.shape[0], model.config.dim)
    if image.shape[0] != 1:
        raise ValueError(f"image: expected one image, got {image.shape[0]}")
    eng = TTTEngine(model, steps=_MAX_CALLS, lr=lr, betas=betas, eps=eps, backend=backend, students=1,
                    graphs=graphs, compute_dtype=compute_dtype)
    prog = eng.program(1)
    with quiet_autograd(prog.device):
        prog.images[0, 0].copy_(image[0])
        prog.targets[0].copy_(target[0])
        prog.reset()
    return EngineStep(prog)
