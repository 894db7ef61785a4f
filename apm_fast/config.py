"""Model configuration and the named presets of the APM paper."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Tuple

__all__ = ["APMConfig", "PRESETS", "preset"]

_INITS = ("authors", "pytorch")


@dataclass(frozen=True)
class APMConfig:
    """Everything that fixes the shapes of an APM.

    grid:     G, the number of location queries per side (L = G * G queries per image).
    patch:    p, the trigger convolution's kernel and stride; images are (G*p) x (G*p).
    hidden:   widths of the column MLP (Linear + ReLU each).
    dim:      D, the feature width (the teacher's embedding width).
    heads:    heads of the single-query attention pool.
    pool:     whether the model has the attention pool (gives ``.cls``).
    rgb_head: whether the model has the RGB decoder head (gives ``.rgb``).
    in_chans: channels of the input image.
    init:     "authors" (every parameter ~ N(0, init_std^2), the TTT default) or "pytorch".
    init_std: standard deviation of the authors' init.
    """

    grid: int = 32
    patch: int = 14
    hidden: Tuple[int, ...] = (4096, 2048, 1024)
    dim: int = 768
    heads: int = 8
    pool: bool = True
    rgb_head: bool = False
    in_chans: int = 3
    init: str = "authors"
    init_std: float = 0.01

    def __post_init__(self):
        # Types are checked, never coerced: int("64"), bool("False") (True!) or int(64.7) would
        # build a different model than the one asked for. numpy integers/floats are accepted
        # and stored as Python ints/floats (JSON and hashing need the plain types).
        if isinstance(self.hidden, (str, bytes)) or not isinstance(self.hidden, (tuple, list)):
            raise TypeError(f"hidden: expected a tuple or list of MLP widths, got {self.hidden!r}")
        for i, h in enumerate(self.hidden):
            _positive_int(f"hidden[{i}]", h)
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        for name in ("grid", "patch", "dim", "heads", "in_chans"):
            _positive_int(name, getattr(self, name))
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("pool", "rgb_head"):
            if not isinstance(getattr(self, name), bool):   # numpy bools too: np.bool_ is no bool
                raise TypeError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if len(self.hidden) == 0:
            raise ValueError("hidden: expected at least one MLP width, got an empty tuple")
        if self.pool and self.dim % self.heads != 0:
            raise ValueError(
                f"heads: the pool splits dim={self.dim} over heads; expected a divisor of "
                f"{self.dim}, got heads={self.heads}")
        if not isinstance(self.init, str) or self.init not in _INITS:
            raise ValueError(f"init: expected one of {_INITS}, got {self.init!r}")
        v = self.init_std
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"init_std: expected a positive finite number, got {v!r}")
        if not (math.isfinite(float(v)) and float(v) > 0):
            raise ValueError(f"init_std: expected a positive finite number, got {v!r}")
        object.__setattr__(self, "init_std", float(v))

    # Derived sizes -------------------------------------------------------------------
    @property
    def queries(self) -> int:
        """L, the number of location queries (grid cells) per image."""
        return self.grid * self.grid

    @property
    def pos_dim(self) -> int:
        """Width of the input position code (and of the trigger): G * G."""
        return self.grid * self.grid

    @property
    def column_dim(self) -> int:
        """Width of one column input [trigger ; position]."""
        return 2 * self.pos_dim

    @property
    def image_size(self) -> int:
        return self.grid * self.patch

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def replace(self, **overrides) -> "APMConfig":
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "APMConfig":
        """The config of :meth:`to_dict`'s dict (e.g. a checkpoint's metadata), every field checked."""
        if not isinstance(d, dict):
            raise TypeError(f"config: expected a dict of APMConfig fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**d)


def _positive_int(name, value):
    """A positive int (numpy integers too); a bool or a float, even 4.0, is a wrong type."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


PRESETS = {
    # TTT with CLIP ViT-B/16 (D = 512)
    "ttt-b16": APMConfig(hidden=(4096, 2048, 1024), dim=512, pool=True, rgb_head=False),
    # TTT with CLIP ViT-L/14 (D = 768): the authors' released TTT config
    "ttt-l14": APMConfig(hidden=(4096, 2048, 1024), dim=768, pool=True, rgb_head=False),
    # TTT with OpenCLIP ViT-H/14 (D = 1024)
    "ttt-h14": APMConfig(hidden=(4096, 2048, 1024), dim=1024, pool=True, rgb_head=False),
    # grid distillation from DINOv2 ViT-L/14 (the authors' COCO model)
    "ssl-l14": APMConfig(hidden=(4096, 4096, 4096, 2048, 1024), dim=1024, pool=False,
                         rgb_head=True, init="pytorch"),
}

_OVERRIDES = ("grid", "patch", "hidden", "dim", "heads", "pool", "rgb_head", "in_chans", "init",
              "init_std")


def preset(name: str, **overrides) -> APMConfig:
    """The config of a named preset (``ttt-b16``, ``ttt-l14``, ``ttt-h14``, ``ssl-l14``),
    with any of its fields overridden: ``preset("ttt-l14", grid=16, hidden=(512, 256))``."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"preset: unknown name {name!r}; expected one of {sorted(PRESETS)}")
    bad = sorted(set(overrides) - set(_OVERRIDES))
    if bad:
        raise TypeError(f"preset: unknown override(s) {bad}; expected some of {list(_OVERRIDES)}")
    return PRESETS[name].replace(**overrides)
