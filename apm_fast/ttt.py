"""Test-time training (spec section 2): per image, reset -> `steps` x Adam on MSE(z, target).

Each image starts from the same init snapshot with fresh Adam state, so its result depends on
nothing but the image and its target: not on the images before it, nor on how images are grouped.
The teacher is never called here: targets come in precomputed (``classify`` computes them once).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F

from .backends import get_backend
from .validation import check_images, check_targets

__all__ = ["TestTimeTrainer", "TTTResult"]


@dataclass
class TTTResult:
    """cls: B x D pooled features after the last Adam step; losses: B x steps (the loss of each
    step's forward, before its update); seconds: per-image wall time of the training loop."""

    cls: torch.Tensor
    losses: torch.Tensor
    seconds: List[float] = field(default_factory=list)


class TestTimeTrainer:
    """Overfit ``model`` on each test image's teacher embedding, independently per image.

    The model's parameters at construction are the init snapshot every image starts from;
    the model is left at that snapshot after every call.

    When the backend has a primitive table (``.primitives``: "torch", "triton", "cuda"), ``fit``
    runs on :class:`apm_fast.engine.TTTEngine` (captured step, ``students`` images side by side;
    None: as many as fit in memory). ``engine=False`` forces the plain autograd loop (the
    reference), ``engine=True`` requires the engine.
    """

    __test__ = False  # not a pytest class despite the name

    def __init__(self, model, steps: int = 20, lr: float = 1e-4, backend: str | None = None, *,
                 betas=(0.9, 0.999), eps: float = 1e-8, normalize_target: bool = False,
                 engine: bool | None = None, students: int | None = None):
        if not model.config.pool:
            raise ValueError("model: TTT regresses the pooled feature, but this config has pool=False")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive integer, got {steps!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr: expected a positive number, got {lr!r}")
        self.model = model
        self.steps = steps
        self.lr = float(lr)
        self.betas = tuple(betas)
        self.eps = float(eps)
        self.backend = backend
        self.normalize_target = normalize_target
        self.snapshot = {k: p.detach().clone() for k, p in model.named_parameters()}
        if engine not in (None, True, False):
            raise ValueError(f"engine: expected None, True or False, got {engine!r}")
        self.engine = engine
        self.students = students
        self._engine = None

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def reset(self):
        """Put the model's parameters back to the init snapshot."""
        for k, p in self.model.named_parameters():
            p.copy_(self.snapshot[k])
            p.grad = None

    def _optimizer(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        kw = dict(lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=0.0)
        if params and params[0].is_cuda:
            kw["fused"] = True
        return torch.optim.Adam(params, **kw)

    def _wants_engine(self, impl) -> bool:
        if self.engine is False:
            return False
        has = hasattr(impl, "primitives")
        if self.engine and not has:
            raise ValueError(f"engine=True: backend {impl.name!r} has no primitive table; use "
                             "'torch', 'triton' or 'cuda', or engine=None/False")
        return has

    def _get_engine(self, backend):
        from .engine import TTTEngine

        e = self._engine
        if e is None or e.backend != backend:
            e = TTTEngine(self.model, steps=self.steps, lr=self.lr, betas=self.betas, eps=self.eps,
                          backend=backend, students=self.students,
                          normalize_target=self.normalize_target, snapshot=self.snapshot)
            self._engine = e
        e.steps, e.lr, e.betas, e.eps = self.steps, self.lr, self.betas, self.eps
        e.students, e.normalize_target = self.students, self.normalize_target
        return e

    def prepare_targets(self, targets: torch.Tensor) -> torch.Tensor:
        if self.normalize_target:
            targets = F.normalize(targets, dim=-1)
        return targets

    # ------------------------------------------------------------------ training
    def fit(self, images: torch.Tensor, targets: torch.Tensor, *, progress=None) -> TTTResult:
        """Train on each image alone; ``images`` B x C x S x S (normalized), ``targets`` B x D."""
        model = self.model
        images = check_images(images, model.config)
        targets = check_targets(targets, images.shape[0], model.config.dim)
        dev, dt = model.device, model.dtype
        impl = get_backend(self.backend, device=dev)
        if self._wants_engine(impl):
            return self._get_engine(impl.name).fit(images, targets, progress=progress, check=False)
        images = images.to(device=dev, dtype=dt)
        targets = self.prepare_targets(targets.to(device=dev, dtype=dt))
        backend = impl.name
        cls_out, loss_out, secs = [], [], []
        try:
            for i in range(images.shape[0]):
                t0 = time.perf_counter()
                z, losses = self._fit_one(images[i:i + 1], targets[i:i + 1], backend)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                secs.append(time.perf_counter() - t0)
                cls_out.append(z)
                loss_out.append(losses)
                if progress is not None:
                    progress(1)
        finally:
            self.reset()
        return TTTResult(cls=torch.cat(cls_out), losses=torch.stack(loss_out), seconds=secs)

    def classify(self, images, teacher, classes, *, templates="single", topk: int = 5):
        """TTT on each image, then zero-shot classification of its pooled feature against the
        teacher's class embeddings; see :func:`apm_fast.classify.classify`."""
        from .classify import classify
        return classify(self, images, teacher, classes, templates=templates, topk=topk)

    def _fit_one(self, image, target, backend):
        model = self.model
        self.reset()
        opt = self._optimizer()
        losses = torch.empty(self.steps, dtype=torch.float32, device=image.device)
        for s in range(self.steps):
            z = model(image, backend=backend, want_grid=False).cls
            loss = F.mse_loss(z, target)            # mean over D (one image)
            opt.zero_grad(set_to_none=True)         # every step: no accumulation across steps
            loss.backward()
            opt.step()
            losses[s] = loss.detach()               # stays on the device: no sync in the loop
        with torch.no_grad():
            z = model(image, backend=backend, want_grid=False).cls
        return z.detach(), losses
