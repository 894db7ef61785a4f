"""The correctness gate that runs before anything is timed.

Every fast path is run on the same weights and inputs as the ``reference`` backend evaluated in
float64, and compared by the norm-wise relative error ``||fast - ref|| / ||ref||``:

* each backend other than ``reference``: the forward (``cls``, ``grid``, ``rgb``) on two images,
  and every parameter gradient of the TTT loss on one image;
* each TTT step implementation: its first step from the initial weights: the loss, the
  gradients it leaves in ``.grad`` and the Adam update it applied.

A failed check marks the whole run: the report keeps every timing but prints and stores no speedup.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .. import reference
from .timing import autocast

__all__ = ["TOLERANCES", "UPDATE_TOLERANCE", "UPDATE_TOLERANCE_OWN", "GateCheck", "GateReport", "ReferencePoint",
           "relative_error", "gate_backend", "gate_step"]

# (forward, gradient) bounds on the norm-wise relative error against float64, per compute dtype.
# bf16 keeps 8 significant bits (unit round-off 2^-9 ~ 2e-3); every layer rounds its inputs and
# the GEMMs accumulate in fp32, so after 4-6 layers, the pool's softmax and a backward pass
# 1e-2 is typical; the bound leaves a margin of ~5x. fp16 has 11 bits (4x tighter). fp32 paths
# may use TF32 GEMMs (10 bits) on a GPU. A real bug (a wrong weight, a missing bias, a softmax
# over the wrong axis) gives errors of order 1 and fails all of them.
TOLERANCES = {
    "fp64": (1e-9, 1e-9),
    "fp32": (2e-3, 5e-3),
    "bf16": (5e-2, 1e-1),
    "fp16": (2e-2, 5e-2),
}
# Adam's first update is lr * g / (|g| + eps), i.e. +-lr per weight. Where an implementation
# shows its gradients, its update is checked against Adam applied to those very gradients (only
# fp32 round-off of the weights separates them: ~1e-4 of the update). Where it does not, the
# update is compared with the reference's: gradients that round to the other sign in low
# precision flip their +-lr (bf16 at the sizes tested: 0.15-0.3), so that bound is loose; it
# still catches a missing, scaled or reversed step.
UPDATE_TOLERANCE_OWN = 1e-3
UPDATE_TOLERANCE = 0.5


def relative_error(fast, ref) -> float:
    """||fast - ref|| / ||ref|| in float64 (inf if the shapes differ or fast is not finite)."""
    if fast is None or ref is None:
        return math.inf if (fast is None) != (ref is None) else 0.0
    fast = fast.detach().to("cpu", torch.float64).reshape(-1)
    ref = ref.detach().to("cpu", torch.float64).reshape(-1)
    if fast.shape != ref.shape or not bool(torch.isfinite(fast).all()):
        return math.inf
    den = float(ref.norm())
    num = float((fast - ref).norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


@dataclass
class GateCheck:
    preset: str
    path: str
    check: str
    precision: str
    rel_err: float
    tol: float
    passed: bool
    note: str = ""


@dataclass
class GateReport:
    checks: List[GateCheck] = field(default_factory=list)
    errors: List[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks) and not self.errors

    def add(self, preset, path, check, precision, rel_err, tol, note=""):
        ok = bool(math.isfinite(rel_err) and rel_err <= tol)
        self.checks.append(GateCheck(preset, path, check, precision, float(rel_err), float(tol),
                                     ok, note))
        return ok

    def error(self, preset, path, exc):
        self.errors.append({"preset": preset, "path": path,
                            "error": f"{type(exc).__name__}: {exc}"})

    def failed_paths(self) -> List[str]:
        bad = {f"{c.preset}/{c.path}" for c in self.checks if not c.passed}
        bad |= {f"{e['preset']}/{e['path']}" for e in self.errors}
        return sorted(bad)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "failed": self.failed_paths(),
                "tolerances": {k: {"forward": v[0], "grad": v[1]} for k, v in TOLERANCES.items()},
                "update_tolerance": {"own_gradients": UPDATE_TOLERANCE_OWN, "reference": UPDATE_TOLERANCE},
                "checks": [_finite(asdict(c)) for c in self.checks], "errors": self.errors}


def _finite(d):
    # JSON has no inf: an infinite error is stored as a string
    if not math.isfinite(d["rel_err"]):
        d["rel_err"] = "inf"
    return d


@dataclass
class ReferencePoint:
    """The float64 reference at one set of weights and inputs."""

    cls: Optional[torch.Tensor]
    grid: torch.Tensor
    rgb: Optional[torch.Tensor]
    loss: Optional[torch.Tensor] = None
    grads: Optional[Dict[str, torch.Tensor]] = None
    update: Optional[Dict[str, torch.Tensor]] = None

    def cpu(self) -> "ReferencePoint":
        """The same point with every tensor on the host (it then costs no device memory)."""
        mv = lambda t: None if t is None else t.detach().cpu()
        mvd = lambda d: None if d is None else {k: mv(v) for k, v in d.items()}
        return ReferencePoint(cls=mv(self.cls), grid=mv(self.grid), rgb=mv(self.rgb),
                              loss=mv(self.loss), grads=mvd(self.grads), update=mvd(self.update))

    @classmethod
    def compute(klass, model, images, target=None, *, lr=1e-4, eps=1e-8):
        m64 = copy.deepcopy(model).double()
        with torch.no_grad():
            cls, grid, rgb = reference.forward(m64, images.double(), want_grid=True)
        point = klass(cls=cls, grid=grid, rgb=rgb)
        if target is not None and model.config.pool:
            z = reference.forward(m64, images[:1].double(), want_grid=False)[0]
            loss = F.mse_loss(z, target.double())
            names = [k for k, p in m64.named_parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, [p for k, p in m64.named_parameters() if p.requires_grad])
            point.loss = loss.detach()
            point.grads = dict(zip(names, grads))
            # Adam's first step: m_hat = g, v_hat = g^2, so the update is -lr * g / (|g| + eps)
            point.update = {k: -lr * g / (g.abs() + eps) for k, g in point.grads.items()}
        return point


def _cat(tensors: Dict[str, torch.Tensor], names) -> Optional[torch.Tensor]:
    if tensors is None or any(tensors.get(k) is None for k in names):
        return None
    return torch.cat([tensors[k].detach().to("cpu", torch.float64).reshape(-1) for k in names])


def gate_backend(report: GateReport, preset: str, name: str, model, images, target,
                 point: ReferencePoint, amp_dtype):
    """Forward and gradients of backend ``name`` against the float64 reference (under the run's
    autocast: every backend computes in the same precision)."""
    from .steps import dtype_name

    precision = dtype_name(amp_dtype)
    tol_f, tol_g = TOLERANCES[precision]
    m = copy.deepcopy(model)
    with torch.no_grad(), autocast(m.device, amp_dtype):
        out = m(images, backend=name)
    if m.config.pool:
        report.add(preset, name, "forward.cls", precision, relative_error(out.cls, point.cls), tol_f)
    report.add(preset, name, "forward.grid", precision, relative_error(out.grid, point.grid), tol_f)
    if m.config.rgb_head:
        report.add(preset, name, "forward.rgb", precision, relative_error(out.rgb, point.rgb), tol_f)
    if point.grads is not None:
        m.zero_grad(set_to_none=True)
        with autocast(m.device, amp_dtype):
            z = m(images[:1], backend=name, want_grid=False).cls
        F.mse_loss(z.float(), target.float()).backward()
        names = list(point.grads)
        grads = {k: p.grad for k, p in m.named_parameters()}
        report.add(preset, name, "grad", precision,
                   relative_error(_cat(grads, names), _cat(point.grads, names)), tol_g)


def gate_step(report: GateReport, preset: str, impl, point: ReferencePoint):
    """The first step of a TTT step implementation from the initial weights."""
    precision = impl.precision
    tol_f, tol_g = TOLERANCES[precision]
    loss = impl.step_from_init()
    report.add(preset, impl.key, "step.loss", precision, relative_error(loss, point.loss), tol_f)
    names = list(point.grads)
    grads = impl.grads()
    if grads is not None:
        report.add(preset, impl.key, "step.grad", precision,
                   relative_error(_cat(grads, names), _cat(point.grads, names)), tol_g)
    params = impl.params()
    if params is None:
        return
    update = {k: params[k].detach() - impl.snapshot[k] for k in names}
    if grads is not None and all(grads.get(k) is not None for k in names):
        lr, eps = impl.lr, impl.eps
        own = {k: -lr * g.double() / (g.double().abs() + eps) for k, g in grads.items()}
        report.add(preset, impl.key, "step.update", precision,
                   relative_error(_cat(update, names), _cat(own, names)), UPDATE_TOLERANCE_OWN,
                   note="against Adam applied to its own gradients")
    else:
        report.add(preset, impl.key, "step.update", precision,
                   relative_error(_cat(update, names), _cat(point.update, names)), UPDATE_TOLERANCE,
                   note="against the reference's update")
