"""One TTT step (forward, backward, Adam) at B = 1, implemented every way the benchmark compares.

Every implementation owns a private copy of the model, starts from the same weights, image and
target, and offers the same four calls:

* ``prepare()``: everything that is not a step (compilation, graph capture, warm-up);
* ``reset()``: weights and optimizer state back to the values at construction;
* ``step()``: one step, returning the loss (a tensor; no host synchronisation);
* ``grads()``: the parameter gradients of the last step by name, or None where the
  implementation keeps them out of sight.

All of them call the forward without the model's input validation (a host synchronisation, which
a timed loop and a captured graph must not contain): the input is validated once when the
benchmark builds it. Every implementation computes under the run's autocast (bf16 on a GPU).
"""
from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .. import reference
from ..backends import get_backend
from ..ops.autograd import fused_forward
from ..ops.precision import compute_dtype, precision_name
from ..ttt import TestTimeTrainer
from ..ttt.graph import capture_phases
from .timing import autocast

__all__ = ["StepImpl", "EagerStep", "CompiledStep", "GraphStep", "AuthorsStyleStep", "EngineStep",
           "forward_fn", "dtype_name"]


def dtype_name(dtype) -> str:
    return "fp32" if dtype is None else precision_name(dtype)


def forward_fn(backend: str, device):
    """``fn(model, images, want_grid, graphs=None) -> (cls, grid)``: the model's forward through
    ``backend`` without the input checks (the caller has made them), in the dtype autocast says;
    a table's inference forward replays a captured graph from its second call on a GPU unless
    ``graphs=False`` (``ops.autograd.fused_forward``)."""
    if backend == "reference":
        return lambda model, images, want_grid=True, graphs=None: reference.forward(
            model, images, want_grid=want_grid, want_rgb=False)[:2]
    prim = get_backend(backend, device=device)

    def fn(model, images, want_grid=True, graphs=None):
        cls, f = fused_forward(prim, model, images, compute_dtype(model.dtype, images.device), graphs=graphs)
        return cls, f
    return fn


class StepImpl:
    key = "?"
    label = "?"
    backend = None

    def __init__(self, model, image, target, *, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                 amp_dtype=None):
        self.model = copy.deepcopy(model)
        self.model.train()
        self.device = self.model.device
        self.image = image.to(self.device)
        self.target = target.to(self.device, torch.float32)
        self.lr, self.betas, self.eps = float(lr), tuple(betas), float(eps)
        self.amp_dtype = amp_dtype
        self._precision = dtype_name(amp_dtype)
        self.snapshot = {k: p.detach().clone() for k, p in self.model.named_parameters()}
        self.opt = None

    # -- the common protocol --------------------------------------------------------------
    @property
    def precision(self) -> str:
        """The compute precision's label (a key of the gate's tolerance table)."""
        return self._precision

    def prepare(self):
        pass

    @torch.no_grad()
    def reset(self):
        for k, p in self.model.named_parameters():
            p.copy_(self.snapshot[k])
        if self.opt is not None:
            self.opt.state.clear()

    def step(self):
        raise NotImplementedError

    def grads(self) -> Optional[Dict[str, torch.Tensor]]:
        return {k: p.grad for k, p in self.model.named_parameters() if p.grad is not None}

    def params(self) -> Dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())

    def step_from_init(self):
        """The first step from the initial weights with fresh optimizer state (used by the gate)."""
        self.reset()
        return self.step()

    def describe(self) -> dict:
        return {"key": self.key, "label": self.label, "backend": self.backend,
                "precision": self.precision}

    # -- helpers ------------------------------------------------------------------------------
    def _adam(self, **kw):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr, betas=self.betas, eps=self.eps,
                                weight_decay=0.0, **kw)


class EagerStep(StepImpl):
    """A backend's forward, autograd's backward and PyTorch's Adam (fused on the GPU), eagerly."""

    def __init__(self, model, image, target, *, backend="reference", **kw):
        super().__init__(model, image, target, **kw)
        self.backend = backend
        self._forward = forward_fn(backend, self.device)
        self.key = "eager" if backend == "reference" else backend
        cuda = self.device.type == "cuda"
        if backend == "reference":
            self.label = "plain eager PyTorch (reference backend" + (", fused Adam)" if cuda else ")")
        else:
            self.label = f"{backend} backend, eager"
        self.opt = self._adam(**({"fused": True} if cuda else {}))

    def _loss(self):
        with autocast(self.device, self.amp_dtype):
            z = self._forward(self.model, self.image, want_grid=False)[0]
        return F.mse_loss(z.float(), self.target)

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss()
        loss.backward()
        self.opt.step()
        return loss.detach()


class CompiledStep(EagerStep):
    """``torch.compile`` of the forward and loss (AOTAutograd compiles the backward too); the
    fused Adam stays eager, as a user would write it."""

    def __init__(self, model, image, target, *, backend="reference", **kw):
        super().__init__(model, image, target, backend=backend, **kw)
        self.key = "compile" if backend == "reference" else f"{backend}+compile"
        self.label = ("torch.compile(plain eager)" if backend == "reference"
                      else f"torch.compile({backend} backend)")
        forward = self._forward
        # the position codes cached before tracing (the graph then reads them as constants)
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            self.model.pos_in(dtype=dt), self.model.pos_out(dtype=dt)

        def loss_fn(model, image, target):
            z = forward(model, image, want_grid=False)[0]
            return F.mse_loss(z.float(), target)

        self._compiled = torch.compile(loss_fn)

    def _loss(self):
        with autocast(self.device, self.amp_dtype):
            return self._compiled(self.model, self.image, self.target)

    def prepare(self):
        self.step()  # compiles forward and backward
        self.reset()


class GraphStep(EagerStep):
    """The whole step captured once in a CUDA graph and replayed: forward, backward and a
    capturable fused Adam (its step count lives on the device), the recipe of PyTorch's
    "whole network capture", through the engine's capture (``apm_fast.ttt.graph``)."""

    def __init__(self, model, image, target, *, backend="torch", **kw):
        if torch.device(model.device).type != "cuda":
            raise RuntimeError(f"graph capture: needs a CUDA device, the model is on {model.device}")
        super().__init__(model, image, target, backend=backend, **kw)
        self.key = f"{backend}+graph" if backend != "reference" else "eager+graph"
        self.label = f"{backend} backend, CUDA graph" if backend != "reference" else \
            "plain eager PyTorch, CUDA graph"
        self.opt = self._adam(fused=True, capturable=True)
        self._graph = None
        self._static_loss = None

    def _captured_step(self):
        # gradients are zeroed inside the graph, then accumulated into by the backward: every
        # replay starts from zero (the warm-up left .grad tensors in place)
        self.opt.zero_grad(set_to_none=False)
        # the autocast weight cache must not live across the captured region
        with autocast(self.device, self.amp_dtype, cache_enabled=False):
            z = self._forward(self.model, self.image, want_grid=False)[0]
        loss = F.mse_loss(z.float(), self.target)
        loss.backward()
        self.opt.step()
        self._static_loss = loss.detach()

    def prepare(self):
        graphs = capture_phases({"step": self._captured_step}, self.reset, self.device, key=self.key)
        if graphs is None:
            raise RuntimeError("CUDA graph capture of the step failed (see the warning)")
        self._graph = graphs["step"]
        self.reset()

    @torch.no_grad()
    def reset(self):
        for k, p in self.model.named_parameters():
            p.copy_(self.snapshot[k])
            if p.grad is not None:
                p.grad.zero_()            # gradients accumulate into the captured buffers
        # in place: the captured graph holds these very tensors
        for state in self.opt.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    v.zero_()

    def step(self):
        if self._graph is None:
            self.prepare()
        self._graph.replay()
        return self._static_loss


class AuthorsStyleStep(StepImpl):
    """The authors' TTT step, re-implemented from the description in the spec (not their code).

    8 identical copies of the image; the plain form (every column [T ; pos] materialized); the
    B*L columns run through the MLP and head in chunks of 16 columns in a Python loop and are
    concatenated back with ``torch.cat``; fp16 autocast with a GradScaler; plain (for-loop) Adam.
    Their script's defects (teacher re-run every iteration, gradients never zeroed) are *not*
    reproduced: this is their cost structure, not their bugs.
    """

    key = "authors"
    label = "authors-style (re-implemented)"

    def __init__(self, model, image, target, *, copies=8, chunk=16, **kw):
        kw["amp_dtype"] = torch.float16
        super().__init__(model, image, target, **kw)
        if copies < 1 or chunk < 1:
            raise ValueError(f"authors-style: copies and chunk must be positive, got {copies}, {chunk}")
        self.copies, self.chunk = int(copies), int(chunk)
        self.backend = "reference"
        self.opt = self._adam(foreach=False, fused=False)
        self.scaler = torch.amp.GradScaler(self.device.type)
        self._images = torch.cat([self.image] * self.copies)
        self._targets = torch.cat([self.target] * self.copies)

    def describe(self):
        d = super().describe()
        d.update(copies=self.copies, chunk=self.chunk)
        return d

    def _forward(self):
        m, c = self.model, self.model.config
        x = reference.columns(m, self._images)               # copies x L x 2G^2
        b, l = x.shape[0], x.shape[1]
        flat = x.reshape(b * l, x.shape[2])
        outs = []
        for s in range(0, b * l, self.chunk):
            h = flat[s:s + self.chunk]
            for lin in m.mlp:
                h = F.relu(lin(h))
            outs.append(m.head(h))
        f = torch.cat(outs).reshape(b, l, -1)
        kv = f + m.pos_out(dtype=f.dtype, device=f.device)[None]
        q = m.query.reshape(1, 1, -1).expand(b, 1, c.dim)
        z, _ = m.attn(q, kv, kv, need_weights=False)
        return z[:, 0]

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.device, torch.float16):
            z = self._forward()
            loss = F.mse_loss(z.float(), self._targets)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)   # unscales the gradients in place, skips on inf/NaN
        self.scaler.update()
        return loss.detach()

    def reset(self):
        super().reset()
        self.scaler = torch.amp.GradScaler(self.device.type)

    def step_from_init(self):
        # The scaler skips a step whose fp16 gradients overflowed and halves its scale: that is
        # the authors' behaviour, not an error; retry from the init with the smaller scale.
        self.reset()
        for _ in range(8):
            scale = self.scaler.get_scale()
            loss = self.step()
            if self.scaler.get_scale() >= scale:
                return loss
            StepImpl.reset(self)
        return loss


class EngineStep(StepImpl):
    """The engine's graph-captured step (``TestTimeTrainer(...).program(1)``) through a table."""

    def __init__(self, model, image, target, *, backend, **kw):
        super().__init__(model, image, target, **kw)
        self.backend = backend
        self.key = f"engine/{backend}"
        self.label = f"engine, {backend} table, graph-captured step"
        # the losses buffer holds one column per step: sized for every call of a timing run
        trainer = TestTimeTrainer(self.model, steps=1 << 14, lr=self.lr, betas=self.betas, eps=self.eps,
                                  backend=backend, students=1, precision=self.amp_dtype or self.model.dtype)
        self._prog = trainer.program(1)
        self._prog.load(self.image, self.target)

    def prepare(self):
        self.step()
        self.reset()

    def reset(self):
        self._prog.reset()

    def step(self):
        return self._prog.step()[0, self._prog.t_idx[0] - 1]

    def grads(self):
        return None  # the engine keeps gradients in its own flat buffers

    def params(self):
        return None  # ... and its weights: the gate then checks the loss only
