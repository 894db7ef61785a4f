"""Test-time training (spec section 2): per image, reset -> `steps` x Adam on MSE(z, target).

Each image starts from the same init snapshot with fresh Adam state, so its result depends on
nothing but the image and its target: not on the images before it, nor on how images are grouped.
The teacher is never called here: targets come in precomputed (the classification pipeline
computes them once per image).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F

from .. import reference
from ..backends import resolve_backend
from ..config import APMConfig
from ..ops.autograd import _no_autocast
from ..ops.precision import exact_convolutions, parse_precision, precision_name
from ..validation import check_images, check_targets, check_training

__all__ = ["TestTimeTrainer", "TTTResult", "Pending", "Trajectory", "check_options"]

_TABLES = "a table ('torch', 'triton', 'cuda')"


def check_options(backend, device, config=None, dtype: torch.dtype = torch.float32, *, precision=None,
                  moments=None, shards=None) -> str:
    """The backend a :class:`TestTimeTrainer` of a ``dtype`` model on ``device`` trains with
    (``backend``: a name, or None: the default for ``device`` and the model's ``config``), once
    ``precision=``, ``moments=`` and ``shards=`` are checked against it: the trainer's first check,
    which the command line runs on its options before any long work. Errors name the argument.

    ``backend="reference"`` trains the plain model in its own dtype with ``torch.optim.Adam``
    (moments in that dtype too): ``moments`` may only be None or that dtype's name, and
    ``precision``/``shards`` need a table."""
    name = resolve_backend(backend, device, config)
    cdt = parse_precision(precision)
    if name == "reference":
        own = precision_name(dtype)
        if cdt is not None:
            raise ValueError(f"precision: the reference backend trains the plain model in its own dtype ({own}); "
                             f"expected no precision, got {precision!r} (a precision needs {_TABLES})")
        if moments is not None and moments != own:
            raise ValueError(f"moments: the reference backend keeps Adam's moments in the model's dtype, as "
                             f"torch.optim.Adam does: expected {own!r} (or none given), got {moments!r} (other moments "
                             f"need {_TABLES})")
        if shards is not None:
            raise ValueError(f"shards: the reference backend trains on one device; expected None, got {shards!r} "
                             f"(shards need {_TABLES})")
        return name
    from .engine import default_precision, parse_moments

    cdt = cdt or default_precision(dtype, device)
    # the engine's master weights: fp64 where the model or the GEMMs are, else fp32
    parse_moments(moments, torch.float64 if torch.float64 in (dtype, cdt) else torch.float32)
    return name


@dataclass
class TTTResult:
    """cls: B x D pooled features after the last Adam step; losses: B x steps (the loss of each
    step's forward, before its update); seconds: per-image time of the training loop."""

    cls: torch.Tensor
    losses: torch.Tensor
    seconds: List[float] = field(default_factory=list)


@dataclass
class Trajectory:
    """What :meth:`TestTimeTrainer.trajectory` watched: ``grids`` {step count: B x L x D grid
    features f after that many Adam steps (0: the init)}, ``cls`` (B x D) and ``losses``
    (B x steps) as in :class:`TTTResult`; ``weights`` {parameter name: B x shape} after the last
    step, when asked for (the trained trunk, e.g. to decode RGB with it)."""

    grids: dict
    cls: torch.Tensor
    losses: torch.Tensor
    weights: Optional[dict] = None


@dataclass
class Pending:
    """A launched batch: device outputs, ready once ``done`` (an event, or None when finished)."""

    cls: torch.Tensor          # k x D
    losses: torch.Tensor       # k x steps
    start: Optional[object] = None
    done: Optional[object] = None
    seconds: float = 0.0       # host time of the run when it finished at launch

    def wait(self) -> float:
        """Block until the batch is finished; returns its seconds."""
        if self.done is None:
            return self.seconds
        self.done.synchronize()
        return self.start.elapsed_time(self.done) / 1e3


class TestTimeTrainer:
    """Overfit ``model`` on each test image's teacher embedding, independently per image.

    The model's parameters at construction are the init snapshot every image starts from (on every
    backend; later changes to the model are not seen); the model is never left changed. Every
    parameter of the trunk and the pool is trained, whatever its ``requires_grad``. ``backend="reference"`` trains the plain model with autograd and
    ``torch.optim.Adam`` (the oracle); any table (``"torch"``, ``"triton"``, ``"cuda"``; None: the
    fastest here) trains on the engine (``apm_fast.ttt.engine``): flat parameter buffers, the
    step captured as a CUDA graph on a GPU, ``students`` images side by side (None: as many as fit
    in memory). ``precision``: the GEMM dtype of the engine ("bf16", "fp16", "fp32", "fp64";
    None: bf16 for an fp32 model on a GPU, the model's dtype otherwise); the master weights are
    fp32 (fp64 where the model or ``precision`` is fp64), and Adam's moments take their dtype
    unless ``moments="bf16"`` (half their memory and traffic; fp32 masters; every table; its
    effect: docs/engine.md). ``backend="reference"`` trains in the model's dtype (GEMMs, weights
    and Adam's moments): ``moments`` there is None or that dtype's name, ``precision`` None.
    Training ignores an ambient ``torch.autocast`` on every backend: it runs in the precision
    it states (:attr:`precision`, :attr:`moments`).
    """

    __test__ = False  # not a pytest class despite the name

    def __init__(self, model, steps: int = 20, lr: float = 1e-4, backend: str | None = None, *,
                 betas=(0.9, 0.999), eps: float = 1e-8, normalize_target: bool = False,
                 students: int | None = None, precision=None, shards=None, moments=None):
        if not isinstance(getattr(model, "config", None), APMConfig):
            raise TypeError(f"model: expected an apm_fast.APM, got {type(model).__name__}")
        if not model.config.pool:
            raise ValueError("model: TTT regresses the pooled feature, but this config has pool=False")
        check_training(steps=steps, lr=lr, betas=betas, eps=eps, students=students)
        self.model = model
        self.steps, self.lr = steps, float(lr)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self.normalize_target = bool(normalize_target)
        self.backend = check_options(backend, model.device, model.config, model.dtype, precision=precision,
                                     moments=moments, shards=shards)
        self.snapshot = {k: p.detach().clone() for k, p in model.named_parameters()}
        self.engine = None
        if self.backend != "reference":
            from .engine import TTTEngine

            self.engine = TTTEngine(model, steps=steps, lr=self.lr, betas=self.betas, eps=self.eps,
                                    backend=self.backend, students=students, precision=precision,
                                    snapshot=self.snapshot, shards=shards, moments=moments)

    @property
    def precision(self) -> str:
        """The GEMM dtype training runs in, by name (stated in every result)."""
        return precision_name(self.engine.compute_dtype if self.engine is not None else self.model.dtype)

    @property
    def moments(self) -> str:
        """The dtype of Adam's moments, by name (stated in every result beside the precision)."""
        return precision_name(self.engine.moment_dtype if self.engine is not None else self.model.dtype)

    def students_for(self, n_images: int) -> int:
        """Images trained side by side for a call with ``n_images`` images."""
        return 1 if self.engine is None else self.engine.students_for(n_images)

    def prepare_targets(self, targets: torch.Tensor) -> torch.Tensor:
        return F.normalize(targets, dim=-1) if self.normalize_target else targets

    # ------------------------------------------------------------------ training
    def launch(self, images: torch.Tensor, targets: torch.Tensor, students: int | None = None) -> Pending:
        """Train k images (k x C x H x W, normalized; k <= students on the engine) on their targets
        (k x D) without waiting where the device allows: read the result after ``wait()``.
        Shapes and dtypes are checked as :meth:`fit` checks them; the values are not scanned for
        NaN/Inf (a host read would stall the device's queue; :meth:`fit` does scan them)."""
        images = check_images(images, self.model.config, values=False)
        targets = check_targets(targets, images.shape[0], self.model.config.dim, values=False)
        targets = self.prepare_targets(targets)
        if self.engine is not None:
            return self.engine.launch(images, targets, students)
        t0 = time.perf_counter()
        dev, dt = self.model.device, self.model.dtype
        with _no_autocast(dev), exact_convolutions(dev):   # the model's dtype, as stated, whatever autocast is on
            cls, losses, _ = reference.fit(self.model, images.to(dev, dt), targets.to(dev, dt), steps=self.steps,
                                           lr=self.lr, betas=self.betas, eps=self.eps, start=self.snapshot)
        return Pending(cls, losses, seconds=time.perf_counter() - t0)

    def fit(self, images: torch.Tensor, targets: torch.Tensor, *, progress=None) -> TTTResult:
        """Train on each image alone; ``images`` B x C x S x S (normalized), ``targets`` B x D.
        ``progress(k)`` is called as images finish."""
        model = self.model
        images = check_images(images, model.config)
        targets = check_targets(targets, images.shape[0], model.config.dim)
        if self.engine is not None:
            return self.engine.fit(images, self.prepare_targets(targets), progress=progress)
        dev, dt = model.device, model.dtype
        with _no_autocast(dev), exact_convolutions(dev):   # the model's dtype, as stated, whatever autocast is on
            cls, losses, seconds = reference.fit(model, images.to(dev, dt), self.prepare_targets(targets.to(dev, dt)),
                                                 steps=self.steps, lr=self.lr, betas=self.betas, eps=self.eps,
                                                 progress=progress, start=self.snapshot)
        return TTTResult(cls=cls, losses=losses, seconds=seconds)

    def trajectory(self, images: torch.Tensor, targets: torch.Tensor, at=(), *, weights: bool = False) -> Trajectory:
        """Train each image alone (as :meth:`fit`, every image side by side) and keep the grid
        features after the step counts in ``at`` (0 to ``steps``): how the features form over
        the iterations (the paper's islands of agreement, Figure 3). On a GPU the captured step
        runs unchanged; the captured eval phase is replayed after those steps only.
        ``weights=True`` also returns the trained weights of the trunk (not the RGB head, which
        TTT does not train). Needs a table backend."""
        if self.engine is None:
            raise ValueError("backend: trajectory runs on the engine; use a table backend ('torch', "
                             "'triton', 'cuda'), not 'reference'")
        images = check_images(images, self.model.config)
        targets = check_targets(targets, images.shape[0], self.model.config.dim)
        cls, losses, grids, *w = self.engine.trajectory(images, self.prepare_targets(targets), at, weights=weights)
        dt = self.model.dtype
        return Trajectory(grids={k: g.to(dt) for k, g in grids.items()}, cls=cls.to(dt),
                          losses=losses.to(torch.float32), weights=w[0] if w else None)

    def program(self, students: int = 1):
        """The engine's compiled program for ``students`` side by side (one step at a time: its
        ``load``, ``step``, ``reset``; benchmarks time a single step with it)."""
        if self.engine is None:
            raise ValueError("backend='reference' has no compiled program; use a table backend")
        return self.engine.program(students)
