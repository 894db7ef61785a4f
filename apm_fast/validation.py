"""Input checks at the API boundary: which argument, what was expected, what came."""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["check_images", "check_targets", "check_finite", "refuse_repeats"]


def _shape(t) -> str:
    return "x".join(str(s) for s in t.shape) if t.dim() else "scalar"


def check_finite(name: str, t: torch.Tensor):
    """NaN/Inf refused, naming where. A host read of the values: skipped while torch.compile
    traces (the check stays at the eager boundary, outside the compiled graph)."""
    if torch.compiler.is_compiling():
        return
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()
        first = tuple(int(i) for i in bad[0]) if len(bad) else ()
        raise ValueError(f"{name}: expected finite values, found NaN/Inf "
                         f"({len(bad)} element(s), first at index {first})")


def check_images(images, config, name: str = "images", *, values: bool = True) -> torch.Tensor:
    """Images for the model: a float tensor B x C x S x S with S = grid * patch (and, with
    ``values``, finite: a host read of the values; ``values=False`` checks shapes and dtypes only).

    The model refuses other sizes rather than resizing silently (resizing changes what the
    trigger sees); :func:`apm_fast.images.preprocess` resizes and normalizes for you.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape B x {config.in_chans} x "
                        f"{config.image_size} x {config.image_size}, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"{name}: expected shape B x C x H x W (or C x H x W), got {_shape(images)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one image, got an empty batch ({_shape(images)})")
    if images.shape[1] != config.in_chans:
        raise ValueError(f"{name}: expected {config.in_chans} channels (B x C x H x W), got "
                         f"{images.shape[1]} (shape {_shape(images)})")
    s = config.image_size
    if images.shape[2] != s or images.shape[3] != s:
        raise ValueError(
            f"{name}: expected {s} x {s} pixels (grid {config.grid} x patch {config.patch}), got "
            f"{images.shape[2]} x {images.shape[3]}; resize with apm_fast.images.preprocess")
    if not images.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (normalized pixels), got {images.dtype}")
    if values:
        check_finite(name, images)
    return images


def check_targets(targets, batch: int, dim: int, name: str = "targets", *, values: bool = True) -> torch.Tensor:
    """Targets B x D (one per image), floating point, and with ``values`` finite (as
    :func:`check_images`)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {batch} x {dim}, got {type(targets).__name__}")
    if targets.dim() == 1:
        targets = targets.unsqueeze(0)
    if targets.dim() != 2 or targets.shape[1] != dim:
        raise ValueError(f"{name}: expected shape B x D with D = {dim} (the model's dim), got {_shape(targets)}")
    if targets.shape[0] != batch:
        raise ValueError(f"{name}: expected one target per image ({batch}), got {targets.shape[0]}")
    if not targets.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {targets.dtype}")
    if values:
        check_finite(name, targets)
    return targets


# Numbers are checked by kind, not by Python class: numpy scalars (np.int64 steps from a sweep,
# np.float32 learning rates) are accepted like ints and floats; bools, strings and tensors are not.
def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_int(name, value, *, none_ok=False):
    if value is None and none_ok:
        return
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}: expected a positive integer{' or None' if none_ok else ''}, got {value!r}")


def _finite(name, value, lo, hi, what):
    if not _is_real(value) or not math.isfinite(float(value)) or not (lo < float(value) < hi):
        raise ValueError(f"{name}: expected {what}, got {value!r}")


def check_training(*, steps, lr, betas=(0.9, 0.999), eps=1e-8, students=None):
    """The settings of a TTT run, checked once where they enter (trainer, engine, CLI)."""
    _positive_int("steps", steps)
    _finite("lr", lr, 0.0, float("inf"), "a positive finite number")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas: expected two numbers in [0, 1), got {betas!r}")
    for i, b in enumerate(betas):
        if not _is_real(b) or not 0.0 <= float(b) < 1.0:
            raise ValueError(f"betas[{i}]: expected a number in [0, 1), got {b!r}")
    _finite("eps", eps, 0.0, float("inf"), "a positive finite number")
    _positive_int("students", students, none_ok=True)


def step_counts(at, steps: int, *, empty_ok: bool = True) -> list:
    """``at``: step counts in [0, ``steps``] (integers, numpy's too), sorted and without repeats;
    anything else refused, naming ``at`` (the trajectory's and the islands' one check)."""
    try:
        given = list(at) if not isinstance(at, (str, bytes)) else None
    except TypeError:
        given = None
    if given is None:
        raise TypeError(f"at: expected step counts (a list of integers in [0, {steps}]), got {at!r}")
    if any(not _is_int(a) for a in given):
        raise TypeError(f"at: expected integer step counts in [0, {steps}], got {given!r}")
    its = sorted({int(a) for a in given})
    if (not its and not empty_ok) or (its and not 0 <= its[0] <= its[-1] <= steps):
        raise ValueError(f"at: expected step counts in [0, {steps}], got {its}")
    return its


def refuse_repeats(items, message) -> None:
    """ValueError(``message(item, first, second)``) for the first item listed twice (positions)."""
    seen = {}
    for i, x in enumerate(items):
        if x in seen:
            raise ValueError(message(x, seen[x], i))
        seen[x] = i
