"""The trained state of S students in a few flat buffers, and its reset to the init snapshot.

Layout: every buffer (master weights, gradients, Adam's m and v) is one flat tensor of S * N
elements (N = parameters of one student), parameter-major: parameter k occupies
``[S * o_k, S * (o_k + n_k))`` as an (S, n_k) block. So each parameter's view ``(S, *shape)`` is
contiguous (what batched GEMM kernels want: batch stride = one student's matrix) while the
optimizer sees (S, n) tensors and updates everything elementwise (the layout is irrelevant to an
elementwise update as long as all buffers share it). The GEMM operands come first; the
compute-dtype copy covers just that prefix, so Adam runs as two passes: the prefix (writing the
copy too) and the small rest.

Reset (every image batch) is a device-to-device copy of the init snapshot into every student and
into their compute copy (the table's ``broadcast_``, one call per parameter) and zeroed Adam moments (or the
moments left as they are, for a table whose Adam reads none at step 1: the table's
``adam_fresh_at_step_one``): no host transfer, no reallocation, so captured graphs keep pointing
at the same memory.

The snapshot itself is kept once, per parameter, in the caller's tensors (e.g. the trainer's
snapshot dict): it is not duplicated per student, nor flattened into another copy.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch

from ..ops.contract import TorchPrimitives

__all__ = ["ParamStore", "gemm_weight_names", "check_snapshot"]

_PLAIN = TorchPrimitives()


def gemm_weight_names(config) -> List[str]:
    """Names the fused driver feeds to GEMMs in the compute dtype: every MLP/head weight and the
    biases of layers after the first (GEMM epilogues). The forward reads these from the compute
    copy; everything else (conv, first bias, pool projections, query: a few hundred KFLOP per
    step in the accumulation dtype) from the fp32 master."""
    names = [f"mlp.{i}.weight" for i in range(len(config.hidden))] + ["head.weight", "head.bias"]
    names += [f"mlp.{i}.bias" for i in range(1, len(config.hidden))]
    return names


class ParamStore:
    """Flat master/grad/m/v (and compute-copy) buffers of ``students`` students.

    names, shapes: the trained parameters of one student. master_dtype: fp32 (fp64 for fp64
    models); compute_dtype: the GEMM operand dtype. When it differs from master_dtype, the
    parameters named in ``lowp_names`` (the GEMM operands) get a compute copy, refreshed by every
    Adam update; they are laid out first so that their copy is one prefix of the flat buffers
    (the small rest needs no copy: 4.7 MB less per ``ttt-l14`` student). moment_dtype: Adam's
    m and v (None: the master dtype; bf16 halves them, fp32 masters only).
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Tuple[int, ...]], students: int, *,
                 master_dtype: torch.dtype, compute_dtype: torch.dtype, device,
                 lowp_names: Sequence[str] = (), moment_dtype: torch.dtype | None = None):
        if students < 1:
            raise ValueError(f"students: expected a positive integer, got {students!r}")
        shape_of = {n: tuple(int(x) for x in sh) for n, sh in zip(names, shapes)}
        want_lowp = compute_dtype != master_dtype
        low = [n for n in names if want_lowp and n in set(lowp_names)]
        self.names = low + [n for n in names if n not in set(low)]
        self.shapes = [shape_of[n] for n in self.names]
        self.students = s = int(students)
        self.numels = [math.prod(sh) for sh in self.shapes]
        self.offsets = [0]
        for n in self.numels[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.numel = sum(self.numels)                    # N, one student
        self.n_lowp = len(low)                           # parameters with a compute copy: the first
        self.numel_lowp = sum(self.numels[:len(low)])    # the prefix with a compute copy
        self.master_dtype, self.compute_dtype = master_dtype, compute_dtype
        self.device = torch.device(device)
        kw = dict(dtype=master_dtype, device=self.device)
        self.master = torch.zeros(s * self.numel, **kw)
        self.grad = torch.zeros(s * self.numel, **kw)
        self.moment_dtype = moment_dtype or master_dtype      # checked by the engine (parse_moments)
        self.exp_avg = torch.zeros(s * self.numel, dtype=self.moment_dtype, device=self.device)
        self.exp_avg_sq = torch.zeros(s * self.numel, dtype=self.moment_dtype, device=self.device)
        self.lowp = (torch.zeros(s * self.numel_lowp, dtype=compute_dtype, device=self.device)
                     if low else None)
        self.master_views = self._views(self.master)
        self.grad_views = self._views(self.grad)
        lowp_views = self._views(self.lowp, len(low)) if low else {}
        # what the forward/backward read: GEMM operands from the compute copy, the rest in fp32
        self.weights: Dict[str, torch.Tensor] = {n: lowp_views.get(n, self.master_views[n]) for n in self.names}

    # ------------------------------------------------------------------ layout
    def _views(self, flat: torch.Tensor, count: int | None = None) -> Dict[str, torch.Tensor]:
        return {n: self._view(flat, i) for i, n in enumerate(self.names[:count])}

    def _view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Parameter ``i``'s (S, *shape) block of a flat buffer."""
        s, o, k = self.students, self.offsets[i], self.numels[i]
        return flat[s * o: s * (o + k)].view(s, *self.shapes[i])

    def flat2d(self, flat: torch.Tensor) -> torch.Tensor:
        """A flat buffer as the (S, N) tensor of the optimizer contract."""
        return flat.view(self.students, self.numel)

    def adam_groups(self, names=None):
        """[(params, grads, m, v, lowp or None)] as (S, n) views covering every element of the
        parameters ``names`` (default: all) once: parameters adjacent in the layout form one group
        (one launch), split where the compute copy ends (all of them: the prefix with a copy,
        then the rest)."""
        if names is None:
            idx = list(range(len(self.names)))
        else:
            unknown = sorted(set(names) - set(self.names))
            if unknown:
                raise ValueError(f"names: unknown parameter(s) {unknown}; expected some of {self.names}")
            idx = sorted({self.names.index(n) for n in names})
        runs = []
        for i in idx:
            if runs and runs[-1][1] == i and i != self.n_lowp:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        s = self.students
        groups = []
        for a, b in runs:
            lo, hi = s * self.offsets[a], s * (self.offsets[b - 1] + self.numels[b - 1])
            bufs = (self.master, self.grad, self.exp_avg, self.exp_avg_sq)
            lowp = self.lowp[lo:hi].view(s, -1) if a < self.n_lowp else None
            groups.append(tuple(t[lo:hi].view(s, -1) for t in bufs) + (lowp,))
        return groups

    def column_block(self, name: str, start: int, stop=None):
        """(params, grads, m, v, lowp or None) of the columns [start, stop) of the 2-D parameter
        ``name``, as (S, rows, columns) views (rows one row stride apart): one of ``adam_``'s
        column blocks, e.g. the first layer's trigger columns."""
        i = self.names.index(name)
        if len(self.shapes[i]) != 2:
            raise ValueError(f"name: expected a 2-D parameter, got {name!r} of shape {self.shapes[i]}")
        cols = slice(start, stop)
        views = [self._view(t, i)[:, :, cols] for t in (self.master, self.grad, self.exp_avg, self.exp_avg_sq)]
        return (*views, self._view(self.lowp, i)[:, :, cols] if i < self.n_lowp else None)

    def nbytes(self) -> int:
        bufs = [self.master, self.grad, self.exp_avg, self.exp_avg_sq] + ([self.lowp] if self.lowp is not None else [])
        return sum(b.numel() * b.element_size() for b in bufs)

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def load_snapshot(self, snapshot: Dict[str, torch.Tensor], *, moments: bool = True, prim=None):
        """Every student's weights := snapshot (name -> tensor of the parameter's shape, on this
        device), and their compute copy, by the table ``prim``'s ``broadcast_`` (None: the plain
        table's); Adam moments cleared (``moments=False``: left as they are, for an Adam that reads
        none at its first update). Device-to-device only."""
        prim = prim or _PLAIN
        for i, (n, sh) in enumerate(zip(self.names, self.shapes)):
            lowp = self._view(self.lowp, i) if i < self.n_lowp else None
            prim.broadcast_(self.master_views[n], snapshot[n].reshape(sh).to(self.master_dtype), lowp=lowp)
        if moments:
            self.exp_avg.zero_()
            self.exp_avg_sq.zero_()

    def student(self, i: int) -> Dict[str, torch.Tensor]:
        """Student ``i``'s master weights (views), e.g. to inspect one result."""
        return {n: v[i] for n, v in self.master_views.items()}


def check_snapshot(snapshot: Dict[str, torch.Tensor], names, shapes, device) -> Dict[str, torch.Tensor]:
    """Snapshot tensors for ``names`` on ``device`` (moved once if they live elsewhere)."""
    out = {}
    for n, sh in zip(names, shapes):
        if n not in snapshot:
            raise ValueError(f"snapshot: missing parameter {n!r}; expected every name of weight_names(config)")
        t = snapshot[n].detach()
        if tuple(t.shape) != tuple(sh):
            raise ValueError(f"snapshot[{n!r}]: expected shape {tuple(sh)}, got {tuple(t.shape)}")
        out[n] = t.to(device)  # no-op when already there
    return out
