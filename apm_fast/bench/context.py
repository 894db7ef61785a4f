"""State shared by the sections of one benchmark run: options, device, machine line, the gate's
report, which backends exist, and the deterministic models and inputs of every preset."""
from __future__ import annotations

import gc
import time
import traceback
from typing import Callable, Dict

import torch

from ..backends import available_backends
from ..model import APM
from ..validation import check_images
from .amp import default_amp_dtype, dtype_name
from .gate import GateReport
from .machine import machine_info
from .options import EXPECTED_BACKENDS, BenchOptions

__all__ = ["Context", "backend_status", "error_text", "free_memory"]


def backend_status() -> Dict[str, str]:
    """Every backend the package knows or is meant to have: "available" or why not (from
    :func:`apm_fast.available_backends`)."""
    found = available_backends()
    out = {}
    for name in EXPECTED_BACKENDS:
        out[name] = found.get(name, "not registered in apm_fast.backends (not part of this "
                                    "version of the package)")
    for name in sorted(found):
        out.setdefault(name, found[name])
    return out


def error_text(exc: BaseException) -> str:
    """One line for the JSON: the exception and where it was raised."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{where}"


def free_memory(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


class Context:
    def __init__(self, options: BenchOptions, log: Callable[[str], None] = print):
        self.options = options
        self.device = torch.device(options.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device: 'cuda' was asked for but torch sees no CUDA device")
        self.amp_dtype = default_amp_dtype(self.device)
        self.precision = dtype_name(self.amp_dtype)
        dtype = ("bf16 autocast, fp32 weights" if self.amp_dtype is not None else "fp32")
        self.machine = machine_info(self.device, dtype)
        self.gate = GateReport()
        self.points = {}
        self.backends = backend_status()
        self.log = log
        self.started = time.perf_counter()

    # -- which paths run ------------------------------------------------------------------
    def skipped(self, key: str) -> bool:
        return key in self.options.skip

    def out_of_time(self) -> str:
        """"" while the time budget lasts, else the reason to record for what is left out."""
        budget = self.options.time_budget_s
        if budget is None or time.perf_counter() - self.started < budget:
            return ""
        return f"time budget of {budget:.0f} s spent before this started (--time-budget to change)"

    def fast_backends(self):
        """Backends other than the reference, in a fixed order, with their status."""
        return [(n, s) for n, s in self.backends.items() if n != "reference"]

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
        from ..backends import get_backend

        with torch.no_grad():
            z = get_backend("reference").forward(model, images, want_grid=False).cls
        gen = torch.Generator().manual_seed(12345 + offset)
        noise = torch.randn(z.shape, generator=gen).to(z.device)
        return (noise * z.std()).float()
