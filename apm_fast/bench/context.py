"""State shared by the sections of one benchmark run: options, device, machine line, the gate's
report, which backends exist, and the deterministic models and inputs of every preset."""
from __future__ import annotations

import fnmatch
import gc
import time
import traceback
from typing import Callable

import torch

from ..backends import available_backends
from ..ttt.program import (overlap_by_default, pool_factors_by_default, position_halves_by_default,
                           trigger_factors_by_default)
from ..model import APM
from ..validation import check_images
from .gate import GateReport
from .machine import machine_info
from .options import BenchOptions

__all__ = ["Context", "error_text", "free_memory"]


def error_text(exc: BaseException) -> str:
    """One line for the JSON: the exception and where it was raised."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{where}"


def free_memory(device):
    from ..ops import release_graphs

    release_graphs()                 # the captured inference graphs kept for a next call
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


class Context:
    def __init__(self, options: BenchOptions, log: Callable[[str], None] = print):
        self.options = options
        self.device = torch.device(options.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device: 'cuda' was asked for but torch sees no CUDA device")
        # every path computes under bf16 autocast on a GPU (the precision of the spec's numbers),
        # in fp32 on the CPU; the authors-style step uses fp16 with a GradScaler, as they do
        self.amp_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.precision = "bf16" if self.amp_dtype is not None else "fp32"
        dtype = ("bf16 autocast, fp32 weights" if self.amp_dtype is not None else "fp32")
        self.machine = machine_info(self.device, dtype)
        self.gate = GateReport()
        self.points = {}
        self.backends = available_backends()
        self.log = log
        self.started = time.perf_counter()

    # -- which paths run ------------------------------------------------------------------
    def skipped(self, key: str) -> bool:
        """Whether --skip names ``key`` (a backend, an implementation or a row's key): exactly, or
        by a shell-style pattern (``latency/*/eager``: ``*`` also spans slashes)."""
        return any(key == pat or fnmatch.fnmatchcase(key, pat) for pat in self.options.skip)

    def out_of_time(self) -> str:
        """"" while the time budget lasts, else the reason to record for what is left out."""
        budget = self.options.time_budget_s
        if budget is None or time.perf_counter() - self.started < budget:
            return ""
        return f"time budget of {budget:.0f} s spent before this started (--time-budget to change)"

    def fast_backends(self):
        """Backends other than the reference, in a fixed order, with their status."""
        return [(n, s) for n, s in self.backends.items() if n != "reference"]

    def _table(self, name: str):
        from ..backends import get_backend

        return get_backend(name, device=self.device, check=False)

    def other_adam(self, name: str, students: int):
        """The Adam schedule the engine does not use by default on table ``name`` at S =
        ``students``, to measure beside its default in the same run: (overlap value, key suffix,
        words for labels)."""
        beside = not overlap_by_default(self._table(name), students)
        return (beside, "adam-beside-backward" if beside else "adam-after-backward",
                "Adam beside the backward" if beside else "Adam after the backward")

    def other_position(self, name: str, students: int):
        """The position products the engine does not use by default on table ``name`` at S =
        ``students`` (from the code's separable form, or one GEMM over the L rows), to measure beside
        its default in the same run: (position_halves value, key suffix, words for labels)."""
        halves = not position_halves_by_default(self._table(name), students)
        return (halves, "position-halves" if halves else "position-gemm",
                "position products from the code's halves" if halves else "position products as one GEMM")

    def other_first_act(self, name: str):
        """The first layer's activation the way table ``name`` does not by default (kept from the
        forward for the backward, or built again where it is read), to measure beside its default
        in the same run: (first_layer_act_kept value, key suffix, words for labels)."""
        kept = not getattr(self._table(name), "first_layer_act_kept", False)
        return (kept, "first-act-kept" if kept else "first-act-rebuilt",
                "the first layer's activation kept" if kept else "the first layer's activation rebuilt")

    def other_pool(self, name: str, students: int):
        """The pool's weights the way the engine does not update them by default on table ``name``
        at S = ``students`` (from their gradients' factors, or from the gradients written out), to
        measure beside its default in the same run: (pool_factors value, key suffix, words)."""
        factors = not pool_factors_by_default(self._table(name), students)
        return (factors, "pool-factors" if factors else "pool-written",
                "the pool's weights from their factors" if factors else "the pool's weights' gradients written")

    def factored_by_default(self, name: str, students: int) -> bool:
        """Whether the engine updates the first layer's trigger columns from their gradient's
        factors by default on table ``name`` at S = ``students``."""
        return trigger_factors_by_default(self._table(name), students)

    def said(self, reason: str) -> str:
        """``reason`` the first time it is logged in this run, a short reference afterwards (a
        missing backend's reason would otherwise fill the log once per row)."""
        seen = self.__dict__.setdefault("_said", set())
        if reason in seen:
            return "(the reason above)"
        seen.add(reason)
        return reason

    def row(self, base: dict, status: str, name: str, measure: Callable[[], dict]) -> dict:
        """One result row: ``base`` plus what ``measure()`` returns, or why it did not run
        (``status`` of the backend it needs; ``name`` or the row's key excluded by --skip, a gate's
        row (``gate/...``) only with its backend; the
        time budget spent; the exception it raised). Logged either way."""
        row = dict(base, status="ok", reason="")
        if status != "available":
            row.update(status="absent", reason=status)
        elif self.skipped(name) or (self.skipped(base.get("key", "")) and not base.get("key", "").startswith("gate/")):
            row.update(status="skipped", reason="excluded by --skip")
        elif self.out_of_time():
            row.update(status="skipped", reason=self.out_of_time())
        else:
            try:
                row.update(measure())
            except Exception as exc:  # one failing measurement must not stop the others
                row.update(status="error", reason=error_text(exc))
            free_memory(self.device)
        what = row.get("key", name)
        if "preset" in base:                  # rows of one key at several presets
            what = f"{base['preset']} {what}"
        if row["status"] != "ok":
            self.log(f"  {what:34s} {row['status']}: {self.said(row['reason'])}")
        elif "images_per_s" in row:
            self.log(f"  {what:34s} {row['images_per_s']:10.1f} images/s")
        elif "timing" in row:
            self.log(f"  {what:34s} {row['timing']['median_ms']:10.4f} ms")
        return row

    def tiny_teacher(self):
        """A CLIP of two tiny towers with random weights (the quick sizes' teacher)."""
        import json
        import tempfile

        from ..teachers import OpenCLIPTeacher
        from .clip_models import TINY_TEXT, TINY_VISION

        folder = tempfile.mkdtemp(prefix="apm-bench-")
        path = f"{folder}/apm-bench-tiny-clip.json"
        with open(path, "w") as f:
            # the real tokenizer: its ids need the real vocabulary
            json.dump({"embed_dim": 32, "vision_cfg": TINY_VISION, "text_cfg": dict(TINY_TEXT, vocab_size=49408)}, f)
        return OpenCLIPTeacher(path, None, device=self.device)

    # -- deterministic models and inputs ---------------------------------------------------
    def seed_for(self, preset: str) -> int:
        return self.options.seed * 1000 + sum(ord(ch) for ch in preset)

    def config(self, preset: str, *, gate: bool = True):
        cfg = self.options.config(preset)
        # PyTorch's default init keeps activations of order one through the MLP, so that every
        # layer visibly shapes the output and the gate is sensitive to all of them; the cost of
        # a step does not depend on the values.
        return cfg.replace(init="pytorch") if gate else cfg

    def model(self, preset: str) -> APM:
        torch.manual_seed(self.seed_for(preset))
        return APM(self.config(preset), device=self.device)

    def images(self, preset: str, n: int, *, offset: int = 0) -> torch.Tensor:
        cfg = self.options.config(preset)
        gen = torch.Generator().manual_seed(self.seed_for(preset) + 7 + offset)
        x = torch.randn(n, cfg.in_chans, cfg.image_size, cfg.image_size, generator=gen)
        return check_images(x.to(self.device), cfg)

    def targets(self, model: APM, images: torch.Tensor, *, offset: int = 0) -> torch.Tensor:
        """Targets of the scale of the model's own output, so that the loss and its gradient
        depend on the output (a target far larger than z would hide errors in z)."""
        from .. import reference

        with torch.no_grad():
            z = reference.forward(model, images, want_grid=False)[0]
        gen = torch.Generator().manual_seed(12345 + offset)
        noise = torch.randn(z.shape, generator=gen).to(z.device)
        return (noise * z.std()).float()
