"""What a benchmark run measures and at which sizes: the full suite (GPU) or the quick one (CPU)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

from ..config import PRESETS, APMConfig, preset

__all__ = ["SECTIONS", "OPTIONAL_SECTIONS", "BenchOptions", "quick_config"]

# In the order they run (the gate runs before all of them): what the targets are read from first
# (the step's implementations, the engine's step, the rates, the scaling), so that a run cut short
# by its time budget still has them; then the rest.
SECTIONS = ("step", "engine", "throughput", "scaling", "forward", "table4", "primitives", "distributed",
            "evaluation", "capabilities")
# run only when asked for (--only, or the option that defines them): one engine setting's values
# in turns (``--ab``)
OPTIONAL_SECTIONS = ("ab",)


def quick_config(name: str, **overrides) -> APMConfig:
    """A preset shrunk for the CPU: 8 x 8 grid of 4-pixel patches, every width / 64 (>= 8),
    D / 16. Same layer structure (depth, pool, RGB head), so every code path still runs."""
    base = PRESETS[name]
    hidden = tuple(max(8, h // 64) for h in base.hidden)
    dim = max(base.heads * 4, base.dim // 16)
    kw = dict(grid=8, patch=4, hidden=hidden, dim=dim)
    kw.update(overrides)
    return preset(name, **kw)


@dataclass
class BenchOptions:
    device: str = "cpu"
    quick: bool = False
    presets: Tuple[str, ...] = tuple(PRESETS)
    sections: Tuple[str, ...] = SECTIONS
    skip: Tuple[str, ...] = ()          # step implementations (keys) or backends to leave out
    out: Optional[str] = "bench-results"
    repeats: int = 20
    warmup: int = 3
    seed: int = 0
    plots: bool = True
    # soft limit on the run's wall time: once spent, what has not started is recorded as skipped
    time_budget_s: Optional[float] = None
    # TTT protocol (spec section 2)
    lr: float = 1e-4
    ttt_steps: int = 20
    # (a) one TTT step
    authors_presets: Optional[Tuple[str, ...]] = None   # None: every TTT preset of the run
    compile_presets: Optional[Tuple[str, ...]] = None
    authors_copies: int = 8
    authors_chunk: int = 16
    # (b) throughput
    throughput_images: int = 20
    students: Optional[int] = None                      # None: the engine decides (end to end)
    students_list: Tuple[int, ...] = (1, 8, 32, 64)     # side by side
    e2e_images: int = 512                               # end to end (0: not run)
    # (c) forward
    forward_batches: Tuple[int, ...] = (1, 64)
    # (d) scaling
    scaling_preset: str = "ttt-b16"
    scaling_grids: Tuple[int, ...] = (7, 14, 28, 56, 112, 224)
    scaling_chunk: int = 4096
    scaling_clip: str = "ViT-B-16"
    # (e) Table 4
    table4_pairs: Tuple[Tuple[str, str], ...] = (("ttt-b16", "ViT-B-16"), ("ttt-l14", "ViT-L-14"),
                                                 ("ttt-h14", "ViT-H-14"))
    tpt_towers: Tuple[str, ...] = ("ViT-B-16",)
    tpt_views: int = 64
    tpt_prompts: int = 1000
    t_max: int = 20
    # (f) primitives: every primitive of every table at these images per student
    primitive_batches: Tuple[int, ...] = (1, 64)
    primitives_preset: str = "ttt-l14"
    # (g) engine: the engine's own gate, memory per student, where the time goes
    engine_preset: str = "ttt-l14"
    # the plain step's latency per table at these TTT presets too (None: every TTT preset of the run)
    engine_presets: Optional[Tuple[str, ...]] = None
    profile_students: Tuple[int, ...] = (1, 64)
    # (h) distributed (under torchrun): images of mode 1, timed steps of mode 2
    dist_images: int = 64
    # (i) the evaluation's methods: images, views of TPT and ZERO
    eval_images: int = 128
    eval_views: int = 64
    # (ab) one engine setting's values in turns: (setting, (values...)) as parse_values gives it
    ab: Optional[Tuple[str, Tuple]] = None
    ab_turns: int = 2
    # free-form preset overrides applied on top of the quick shrink (e.g. {"grid": 6})
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        bad = [s for s in self.sections if s not in SECTIONS + OPTIONAL_SECTIONS]
        if bad:
            raise ValueError(f"sections: unknown {bad}; expected some of {list(SECTIONS + OPTIONAL_SECTIONS)}")
        if ("ab" in self.sections) != (self.ab is not None):
            raise ValueError("ab: the ab section and its setting go together (--ab SETTING=V1,V2 runs it), got "
                             f"sections {list(self.sections)} and ab {self.ab!r}")
        if isinstance(self.ab_turns, bool) or not isinstance(self.ab_turns, int) or self.ab_turns < 1:
            raise ValueError(f"ab_turns: expected a positive integer, got {self.ab_turns!r}")
        bad = [p for p in self.presets if p not in PRESETS]
        if bad:
            raise ValueError(f"presets: unknown {bad}; expected some of {sorted(PRESETS)}")
        for name in ("authors_presets", "compile_presets"):
            bad = [p for p in getattr(self, name) or () if p not in PRESETS]
            if bad:
                raise ValueError(f"{name}: unknown {bad}; expected some of {sorted(PRESETS)}")
        if self.time_budget_s is not None and not (isinstance(self.time_budget_s, (int, float))
                                                   and not isinstance(self.time_budget_s, bool)
                                                   and 0 <= self.time_budget_s < float("inf")):
            raise ValueError(f"time_budget_s: expected a finite number of seconds >= 0 (0: spent) or None, "
                             f"got {self.time_budget_s!r}")
        bad = [p for p in self.engine_presets or () if p not in PRESETS or not PRESETS[p].pool]
        if bad:
            raise ValueError(f"engine_presets: {bad} are not TTT presets; expected some of "
                             f"{sorted(n for n, c in PRESETS.items() if c.pool)}")
        if self.repeats < 20:
            raise ValueError(f"repeats: the harness reports a spread from >= 20 samples, got {self.repeats}")
        for name, least in (("eval_images", 1), ("eval_views", 1), ("warmup", 0), ("e2e_images", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"{name}: expected {'a positive' if least else 'a non-negative'} integer, got {v!r}")
        for name in ("students_list", "scaling_grids", "forward_batches", "primitive_batches", "profile_students"):
            v = getattr(self, name)
            if not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
                raise ValueError(f"{name}: expected positive integers, got {list(v)!r}")
        if self.throughput_images < 20:
            raise ValueError("throughput_images: each image's time is one sample and the harness "
                             f"needs >= 20 samples, got {self.throughput_images}")

    @classmethod
    def quick_defaults(cls, **kw) -> "BenchOptions":
        """Sizes for the CPU: tiny presets, small batches, short scaling sweep, small towers."""
        base = dict(quick=True, forward_batches=(1, 4), scaling_grids=(4, 8, 16),
                    scaling_chunk=64, throughput_images=20, tpt_views=4, tpt_prompts=8,
                    compile_presets=("ttt-l14",), students_list=(1, 3), e2e_images=6,
                    primitive_batches=(1, 2), profile_students=(1,), dist_images=4, eval_images=4,
                    eval_views=4)
        base.update(kw)
        return cls(**base)

    def replace(self, **kw) -> "BenchOptions":
        return dataclasses.replace(self, **kw)

    def config(self, name: str) -> APMConfig:
        if self.quick:
            return quick_config(name, **self.overrides)
        return preset(name, **self.overrides)

    def ttt_presets(self):
        return tuple(p for p in self.presets if PRESETS[p].pool)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
