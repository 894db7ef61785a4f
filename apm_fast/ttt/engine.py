"""TTTEngine: test-time training of many images side by side, one captured step per replay.

The worker behind :class:`apm_fast.TestTimeTrainer` for every table backend, with its semantics
(the autograd loop of ``apm_fast.reference`` is the oracle): every image is trained alone from
the same init snapshot with fresh Adam state, for ``steps`` steps of Adam on MSE(z, target)
averaged over D; ``cls`` is z after the last update. Here S images (S *students*) are trained at
once through the primitives' student dimension; each student has its own weights, Adam state,
image and target, so a result depends only on its image and target, neither on S nor on the
order (tests check both).

S defaults to what fits in free device memory (``memory.py``); the step is captured as a CUDA
graph once per (config, backend, S, dtype) and replayed for every step of every batch
(``program.py``). Outputs stay on the device until a batch is read.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch

from ..backends import get_backend
from ..ops.driver import weight_names
from ..ops.precision import parse_precision
from ..validation import check_training
from .memory import choose_students, student_bytes
from .program import StudentProgram
from .store import check_snapshot
from .trainer import Pending, TTTResult

__all__ = ["TTTEngine", "default_precision"]


def parse_moments(moments, master_dtype: torch.dtype) -> torch.dtype:
    """Adam's moment dtype from ``moments=`` (None or "fp32": the master dtype; "bf16")."""
    if moments is None or moments == "fp32":
        return master_dtype
    if moments == "bf16":
        if master_dtype != torch.float32:
            raise ValueError(f"moments: 'bf16' moments need fp32 master weights, these are {master_dtype} "
                             f"(an fp64 model, or precision='fp64' / --precision fp64)")
        return torch.bfloat16
    raise ValueError(f"moments: expected 'fp32', 'bf16' or None, got {moments!r}")


def default_precision(model_dtype: torch.dtype, device) -> torch.dtype:
    """bf16 GEMMs for an fp32 model on a GPU (the tensor cores pay); the model's dtype otherwise."""
    if model_dtype == torch.float32 and torch.device(device).type == "cuda":
        return torch.bfloat16
    return model_dtype


class TTTEngine:
    """Test-time training through a table of primitives (built by ``TestTimeTrainer``).

    model: an APM with a pool; ``snapshot`` (name -> tensor) the init every image starts from;
    the engine never writes the model. backend: a table's name. students: S, images trained side
    by side (None: as many as fit in memory, at most ``max_students``). precision: GEMM operand
    dtype (None: :func:`default_precision`). moments: Adam's m and v, "fp32" (None, the
    default: the master dtype, as torch.optim.Adam) or "bf16" (half their memory and traffic;
    fp32 masters only; every table). graphs: capture the step as a CUDA graph (None: on
    CUDA devices without shards; falls back to eager, with a warning, when capture fails).
    shards: one image's queries split over ranks (``apm_fast.distributed.QueryShards``).
    overlap: run each layer's Adam on a second stream as soon as the backward is done with the
    layer, beside the rest of the backward (None: where the table measured it faster, the Triton
    table, and the cuda table at one image, on CUDA without shards; False: the whole Adam after
    the backward). The result is the
    same either way. The attribute ``beside`` (True; False for comparisons) runs the step's small
    independent pieces (trigger, the pool's projections and parameter gradients, the conv's
    gradients, the loss record) on a second CUDA stream beside the GEMMs
    (``driver.Beside``); with it, ``wgrad_beside`` (True; False for comparisons) also runs each
    layer's weight gradient beside its input gradient, on a third stream. The attribute
    ``trigger_factors`` (None: ``program.trigger_factors_by_default``, on for the kernel tables but
    the cuda table at one image; a bool for comparisons): the first layer's trigger columns are
    updated from their gradient's factors (rank one per image: never written to memory, and their
    update starts before the rest of the first layer's backward is done), and with the halves below
    its position columns too; without shards. The attribute ``position_halves`` (None: the table's ``position_halves`` with several
    students, or at one image with ``trigger_factors`` or the activation kept
    (``program.position_halves_by_default``), on for the Triton and cuda tables; a bool for
    comparisons): the position products P = pos W_P^T and dW_P over the whole grid from the code's
    separable form (``driver.position_product``: about 1.6 instead of 8.6 GFLOP each for
    ``ttt-l14``, in four launches instead of one; with the activation kept, made from their Q
    without P; dW_P by its factors where the trigger columns' gradient goes so); without shards. The attribute ``first_layer_act_kept`` (None: the table's
    ``first_layer_act_kept``, on for the Triton and cuda tables; a bool for comparisons): the first
    layer's activation ReLU(P + u) written out once in the forward and kept for the backward,
    instead of built again by each primitive that reads it. The attribute ``pool_factors`` (None:
    ``program.pool_factors_by_default``, on for the kernel tables; a bool for comparisons): the
    pool's in- and out-projection weights updated from their gradients' factors
    (``driver.in_proj_weight_factors``; never written); without shards.
    """

    def __init__(self, model, *, steps: int, lr: float, betas, eps: float, backend: str,
                 snapshot: Dict[str, torch.Tensor], students: int | None = None, max_students: int = 64,
                 precision=None, graphs: bool | None = None, reserve_bytes: int | None = None, shards=None,
                 moments=None, overlap: bool | None = None):
        check_training(steps=steps, lr=lr, betas=betas, eps=eps, students=students)
        cfg = model.config
        self.config = cfg
        self.device = model.device
        self.model_dtype = model.dtype
        self.steps, self.lr, self.betas, self.eps = steps, lr, betas, eps
        self.students, self.max_students = students, max_students
        self.reserve_bytes = reserve_bytes
        self.compute_dtype = parse_precision(precision) or default_precision(model.dtype, self.device)
        self.master_dtype = torch.float64 if torch.float64 in (model.dtype, self.compute_dtype) else torch.float32
        self.moment_dtype = parse_moments(moments, self.master_dtype)
        self.shards = shards
        self.overlap = overlap
        self.beside = True
        self.wgrad_beside = True
        self.trigger_factors = None
        self.position_halves = None
        self.first_layer_act_kept = None
        self.pool_factors = None
        self.graphs = (self.device.type == "cuda" and shards is None) if graphs is None else bool(graphs)
        self.backend = backend
        self.prim = get_backend(backend, device=self.device)
        if self.moment_dtype == torch.bfloat16 and not getattr(self.prim, "bf16_moments", True):
            raise ValueError(f"moments: the {backend} table's Adam keeps fp32 moments; moments='bf16' runs on "
                             f"backend='triton', 'cuda' or 'torch'")
        names = weight_names(cfg)
        params = dict(model.named_parameters())
        self.snapshot = check_snapshot(snapshot, names, [tuple(params[n].shape) for n in names], self.device)
        self._program: Optional[StudentProgram] = None
        self._auto_max = None                      # S that fits, decided once

    # ------------------------------------------------------------------ configuration
    def student_memory(self) -> Dict[str, int]:
        """{"per_student": bytes, "shared": bytes} for this config/backend/dtype (measured on CUDA)."""
        per, shared = student_bytes(self.prim, self.config, self.compute_dtype, self.master_dtype,
                                    self.device, self.snapshot, self.moment_dtype)
        return {"per_student": per, "shared": shared}

    def students_for(self, n_images: int) -> int:
        """S used for ``n_images`` images: the user's choice or what fits (never more than n)."""
        if self.students is not None:
            return max(1, min(self.students, n_images))
        if n_images <= 1:
            return 1                               # nothing to decide: no memory probe
        if self._auto_max is None:
            # decided once, while no program holds memory (later, our own program would look
            # like memory taken by someone else and S would shrink from call to call)
            self._program = None
            mem = self.student_memory()
            self._auto_max = choose_students(1 << 30, mem["per_student"], mem["shared"], self.device,
                                             max_students=self.max_students, reserve_bytes=self.reserve_bytes)
        return min(self._auto_max, n_images)

    def program(self, students: int, *, keep_grid: bool = False) -> StudentProgram:
        """The program for S = ``students`` (built and captured once; one is kept at a time).
        ``keep_grid``: its eval phase also keeps the grid features (:meth:`trajectory`)."""
        check_training(steps=self.steps, lr=self.lr, students=students)
        if students is None:
            raise ValueError("students: expected a positive integer, got None")
        cdt = self.compute_dtype
        if keep_grid and self.shards is not None:
            raise ValueError("keep_grid: the grid features of a sharded program are split over ranks; "
                             "watch them on one device (shards=None)")
        key = (students, cdt, self.moment_dtype, self.steps, self.betas, self.eps, self.graphs, bool(keep_grid),
               self.overlap, self.beside, self.wgrad_beside, self.trigger_factors, self.position_halves,
               self.first_layer_act_kept, self.pool_factors)
        prog = self._program
        if prog is None or prog.key != key:
            self._program = prog = None           # free the old one before building the new
            label = (f"{self.backend}/S={students}/{str(cdt).replace('torch.', '')}/"
                     f"hidden={self.config.hidden},dim={self.config.dim},grid={self.config.grid}")
            prog = StudentProgram(self.prim, self.config, self.snapshot, students, self.steps, lr=self.lr,
                                  betas=self.betas, eps=self.eps, compute_dtype=cdt,
                                  master_dtype=self.master_dtype, device=self.device, graphs=self.graphs,
                                  label=label, shards=self.shards, keep_grid=keep_grid,
                                  moment_dtype=self.moment_dtype, overlap=self.overlap, beside=self.beside,
                                  wgrad_beside=self.wgrad_beside, trigger_factors=self.trigger_factors,
                                  position_halves=self.position_halves,
                                  first_layer_act_kept=self.first_layer_act_kept,
                                  pool_factors=self.pool_factors)
            prog.key = key
            self._program = prog
        prog.set_lr(self.lr)
        return prog

    @property
    def mode(self) -> Optional[str]:
        """"graph" or "eager" for the current program (None before the first batch)."""
        return None if self._program is None else self._program.mode

    # ------------------------------------------------------------------ running
    def launch(self, images: torch.Tensor, targets: torch.Tensor, students: int | None = None) -> Pending:
        """Train k <= S images (k x C x H x W, normalized) on their targets (k x D) without waiting:
        the returned batch's tensors are ready after ``wait()``. Inputs may live on the host
        (pinned for an asynchronous copy). Runs on the current CUDA stream."""
        k = images.shape[0]
        prog = self.program(students or self.students_for(k))
        if self.device.type == "cuda":
            start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            cls, losses = prog.run(images, targets)
            done.record()
            return Pending(cls, losses, start, done)
        t0 = time.perf_counter()
        cls, losses = prog.run(images, targets)
        return Pending(cls, losses, seconds=time.perf_counter() - t0)

    def trajectory(self, images: torch.Tensor, targets: torch.Tensor, at, *, weights: bool = False):
        """Train k images side by side (as :meth:`launch`) and keep their grid features after the
        step counts in ``at``; returns the program's :meth:`StudentProgram.run_trajectory`
        tuple, synchronized."""
        prog = self.program(images.shape[0], keep_grid=True)     # every image side by side
        out = prog.run_trajectory(images, targets, at, weights=weights)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out

    def fit(self, images: torch.Tensor, targets: torch.Tensor, *, progress=None) -> TTTResult:
        """Train on each image alone (side by side), checked inputs (B x C x H x W, B x D): returns
        a TTTResult with cls (B x D, model dtype), losses (B x steps, fp32) and per-image seconds
        (a batch's time shared among its images). ``progress(k)`` is called as batches finish."""
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


def _finish(k: int, job: Pending, progress):
    secs = job.wait()
    if progress is not None:
        progress(k)
    return job.cls, job.losses, [secs / k] * k
