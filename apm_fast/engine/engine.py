"""TTTEngine: test-time training of many images side by side, one captured step per replay.

Semantics are those of :class:`apm_fast.ttt.TestTimeTrainer` (its autograd path is the reference):
every image is trained alone from the same init snapshot with fresh Adam state, for ``steps``
steps of Adam on MSE(z, target) averaged over D; ``cls`` is z after the last update. Here S images
(S *students*) are trained at once through the primitives' student dimension; each student has its
own weights, Adam state, image and target, so a result depends only on its image and target,
neither on S nor on the order (tests check both).

S defaults to what fits in free device memory (``memory.py``); the step is captured as a CUDA
graph once per (config, backend, S, dtype) and replayed for every step of every batch
(``program.py``). Outputs stay on the device until a batch is read.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..backends import get_backend
from ..ops.apm_fused import weight_names
from ..ops.precision import compute_dtype as default_compute_dtype
from ..validation import check_images, check_targets
from .memory import choose_students, student_bytes
from .program import StudentProgram
from .store import check_snapshot

__all__ = ["TTTEngine", "PendingBatch"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


@dataclass
class PendingBatch:
    """A launched batch: device outputs, ready once ``done`` (an event, or None on the CPU)."""

    cls: torch.Tensor          # k x D, acc dtype
    losses: torch.Tensor       # k x steps, acc dtype
    start: Optional[object]
    done: Optional[object]
    seconds: float = 0.0       # host time of the launch (the whole run on the CPU)

    def wait(self) -> float:
        """Block until the batch is finished; returns its device seconds."""
        if self.done is None:
            return self.seconds
        self.done.synchronize()
        return self.start.elapsed_time(self.done) / 1e3


class TTTEngine:
    """Test-time training through a fused primitive table.

    model: an APM with a pool; its parameters (or ``snapshot``, name -> tensor) are the init every
    image starts from; the engine never writes them. backend: a backend name whose object has
    ``.primitives`` (``"torch"``, ``"triton"``, ``"cuda"``; None: the default for the device).
    students: S, images trained side by side (None: as many as fit in memory, at most
    ``max_students``). compute_dtype: GEMM operand dtype (``torch.bfloat16``/"bf16", "fp32", ...;
    None: :func:`apm_fast.ops.compute_dtype`). graphs: capture the step as a CUDA graph (None:
    on CUDA devices; falls back to eager, with a warning, when capture fails).
    """

    def __init__(self, model, *, steps: int = 20, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 backend: str | None = None, students: int | None = None, max_students: int = 64,
                 compute_dtype=None, graphs: bool | None = None, normalize_target: bool = False,
                 snapshot: Dict[str, torch.Tensor] | None = None, reserve_bytes: int | None = None):
        cfg = model.config
        if not cfg.pool:
            raise ValueError("model: TTT regresses the pooled feature, but this config has pool=False")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive integer, got {steps!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr: expected a positive number, got {lr!r}")
        for name, v in (("students", students), ("max_students", max_students)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: expected a positive integer or None, got {v!r}")
        self.model_config = self.config = cfg
        self.device = model.device
        self.model_dtype = model.dtype
        self.steps, self.lr = steps, float(lr)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self.students, self.max_students = students, max_students
        self.normalize_target = normalize_target
        self.reserve_bytes = reserve_bytes
        self._cdt_arg = _parse_dtype(compute_dtype)
        self.graphs = (self.device.type == "cuda") if graphs is None else bool(graphs)
        impl = get_backend(backend, device=self.device)
        if not hasattr(impl, "primitives"):
            raise ValueError(f"backend: {impl.name!r} has no primitive table (.primitives); the engine "
                             "needs one of the fused backends ('torch', 'triton', 'cuda')")
        self.backend = impl.name
        self.prim = impl.primitives
        names = weight_names(cfg)
        params = dict(model.named_parameters())
        if snapshot is None:
            snapshot = {n: params[n].detach().clone() for n in names}
        self.snapshot = check_snapshot(snapshot, names, [tuple(params[n].shape) for n in names], self.device)
        self._program: Optional[StudentProgram] = None
        self._auto_max = None                      # (dtypes, S that fits), decided once

    # ------------------------------------------------------------------ configuration
    @property
    def compute_dtype(self) -> torch.dtype:
        return self._cdt_arg or default_compute_dtype(self.model_dtype, self.device)

    @property
    def master_dtype(self) -> torch.dtype:
        return torch.float64 if torch.float64 in (self.model_dtype, self.compute_dtype) else torch.float32

    def student_memory(self) -> Dict[str, int]:
        """{"per_student": bytes, "shared": bytes} for this config/backend/dtype (measured on CUDA)."""
        per, shared = student_bytes(self.prim, self.config, self.compute_dtype, self.master_dtype,
                                    self.device, self.snapshot)
        return {"per_student": per, "shared": shared}

    def students_for(self, n_images: int) -> int:
        """S used for ``n_images`` images: the user's choice or what fits (never more than n)."""
        if self.students is not None:
            return max(1, min(self.students, n_images))
        if n_images <= 1:
            return 1                               # nothing to decide: no memory probe
        key = (self.compute_dtype, self.master_dtype)
        if self._auto_max is None or self._auto_max[0] != key:
            # decided once, while no program holds memory (later, our own program would look
            # like memory taken by someone else and S would shrink from call to call)
            self._program = None
            mem = self.student_memory()
            self._auto_max = (key, choose_students(1 << 30, mem["per_student"], mem["shared"], self.device,
                                                   max_students=self.max_students,
                                                   reserve_bytes=self.reserve_bytes))
        return min(self._auto_max[1], n_images)

    def program(self, students: int) -> StudentProgram:
        """The program for S = ``students`` (built and captured once; one is kept at a time)."""
        cdt = self.compute_dtype
        key = (students, cdt, self.master_dtype, self.steps, self.betas, self.eps, self.graphs)
        prog = self._program
        if prog is None or prog.key != key:
            self._program = prog = None           # free the old one before building the new
            label = (f"{self.backend}/S={students}/{str(cdt).replace('torch.', '')}/"
                     f"hidden={self.config.hidden},dim={self.config.dim},grid={self.config.grid}")
            prog = StudentProgram(self.prim, self.config, self.snapshot, students, self.steps, lr=self.lr,
                                  betas=self.betas, eps=self.eps, compute_dtype=cdt,
                                  master_dtype=self.master_dtype, device=self.device, graphs=self.graphs,
                                  label=label)
            prog.key = key
            self._program = prog
        prog.set_lr(self.lr)
        return prog

    @property
    def mode(self) -> Optional[str]:
        """"graph" or "eager" for the current program (None before the first batch)."""
        return None if self._program is None else self._program.mode

    # ------------------------------------------------------------------ running
    def prepare_targets(self, targets: torch.Tensor) -> torch.Tensor:
        return F.normalize(targets, dim=-1) if self.normalize_target else targets

    def launch(self, images: torch.Tensor, targets: torch.Tensor, students: int | None = None) -> PendingBatch:
        """Train k <= S images (k x C x H x W, normalized) on their targets (k x D) without waiting:
        the returned batch's tensors are ready after ``wait()``. Inputs may live on the host
        (pinned for an asynchronous copy). Runs on the current CUDA stream."""
        k = images.shape[0]
        prog = self.program(students or self.students_for(k))
        targets = self.prepare_targets(targets)
        if self.device.type == "cuda":
            start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            cls, losses = prog.run(images, targets)
            done.record()
            return PendingBatch(cls, losses, start, done)
        t0 = time.perf_counter()
        cls, losses = prog.run(images, targets)
        return PendingBatch(cls, losses, None, None, time.perf_counter() - t0)

    def fit(self, images: torch.Tensor, targets: torch.Tensor, *, progress=None, check: bool = True):
        """Train on each image alone (side by side), like ``TestTimeTrainer.fit``: returns a
        TTTResult with cls (B x D, model dtype), losses (B x steps, fp32) and per-image seconds
        (a batch's time shared among its images). ``progress(k)`` is called as batches finish.
        ``check=False`` skips the input checks (the caller has made them)."""
        from ..ttt import TTTResult

        cfg = self.config
        if check:
            images = check_images(images, cfg)
            targets = check_targets(targets, images.shape[0], cfg.dim)
        else:
            images = images if images.dim() == 4 else images.unsqueeze(0)
            targets = targets if targets.dim() == 2 else targets.unsqueeze(0)
        n = images.shape[0]
        s = self.students_for(n)
        # batches are copied into the program's static buffers one at a time (dtype and device
        # converted by that copy): the whole set never has to fit on the device at once
        outs: List[tuple] = []
        pending: Optional[tuple] = None
        for a in range(0, n, s):
            b = min(n, a + s)
            job = (b - a, self.launch(images[a:b], targets[a:b], students=s))
            if pending is not None:            # one batch queued ahead keeps the device busy
                outs.append(_finish(*pending, progress))
            pending = job
        outs.append(_finish(*pending, progress))
        cls = torch.cat([o[0] for o in outs]).to(self.model_dtype)
        losses = torch.cat([o[1] for o in outs]).to(torch.float32)
        seconds = [sec for o in outs for sec in o[2]]
        return TTTResult(cls=cls, losses=losses, seconds=seconds)


def _finish(k: int, job: PendingBatch, progress):
    secs = job.wait()
    if progress is not None:
        progress(k)
    return job.cls, job.losses, [secs / k] * k


def _parse_dtype(value):
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise ValueError(f"compute_dtype: expected a torch dtype or one of {sorted(_DTYPES)}, got {value!r}")
