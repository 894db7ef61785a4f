"""One compiled TTT program: S students of one (config, primitive table, compute dtype, steps).

It owns the parameter store, the static input/output buffers, and two phases:

* ``step``: the driver's forward, which gives dz = d loss_s / dz = 2 / D (z_s - target_s) for
  loss_s = mean_D (z_s - target_s)^2 (written into ``losses[:, t]``, t a device counter) -> the
  driver's backward into the flat gradient views -> Adam on the flat
  buffers (step and lr read on the device) -> the compute copy refreshed in the same pass;
* ``eval``: the final forward, z after the last update, into ``cls`` (and, for a program built
  with ``keep_grid=True``, the grid features f into ``grid``: the eval phase already computes
  them, so keeping them costs one copy there and nothing in ``step``).

Both are captured once as CUDA graphs (see ``graph.py``) and replayed ``steps`` + 1 times per
batch of images; a batch starts with a device-to-device reset. Nothing in a batch's loop reads
a value on the host, so the host only enqueues work. :meth:`StudentProgram.run_trajectory` also
replays ``eval`` after chosen steps, to watch the grid features form (the islands of agreement).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Tuple

import torch

from ..ops.autograd import _no_autocast
from ..ops.contract import TorchPrimitives, acc_dtype_for
from ..ops.driver import (FACTORED, FIRST_WEIGHT, POSITION_COLUMNS, TRIGGER_COLUMNS, Beside, backward, forward,
                          keeps_first_act, unfold_patches, weight_names)
from ..posenc import position_code
from ..validation import step_counts
from .graph import capture_phases
from .store import ParamStore, gemm_weight_names

__all__ = ["StudentProgram", "quiet_autograd", "position_halves_by_default", "trigger_factors_by_default",
           "pool_factors_by_default", "overlap_by_default"]

_FIRST = FIRST_WEIGHT            # the first layer's weight: trigger columns, then position columns
_POOL_FACTORED = [n for n in FACTORED if n != _FIRST]   # the pool's in- and out-projection weights


@contextlib.contextmanager
def quiet_autograd(device):
    """No autograd, no inference-mode tensors (in-place updates of static buffers must stay
    legal later) and no autocast (the driver picks its dtypes itself)."""
    with torch.inference_mode(False), torch.no_grad(), _no_autocast(device):
        yield


def overlap_by_default(prim, students: int) -> bool:
    """Whether a program of ``students`` students on table ``prim`` runs each layer's Adam beside
    the rest of the backward by default (on the update streams, as soon as the backward is done
    with the layer): the table's ``adam_beside_at_one_image`` at one image, its
    ``adam_beside_backward`` with several."""
    return bool(prim.adam_beside_at_one_image if int(students) == 1 else prim.adam_beside_backward)


def trigger_factors_by_default(prim, students: int) -> bool:
    """Whether a program of ``students`` students on table ``prim`` updates the first layer's
    trigger columns from their gradient's factors by default: where the table's
    ``adam_from_factors`` says so, at one image only where its ``written_at_one_image``
    does not (the cuda table writes that gradient out at one image: one Adam launch over the whole
    first layer instead of two, faster there in every run measured)."""
    if not getattr(prim, "adam_from_factors", True):
        return False
    return int(students) > 1 or not getattr(prim, "written_at_one_image", False)


def pool_factors_by_default(prim, students: int) -> bool:
    """Whether a program of ``students`` students on table ``prim`` updates the pool's in- and
    out-projection weights from their gradients' factors by default (rank 1 + H + B H and B:
    ``driver.in_proj_weight_factors``): as the trigger columns (``trigger_factors_by_default``),
    where the table's ``adam_from_factors`` says so, at one image only where its
    ``written_at_one_image`` does not. The gradients are then never written (at 64 students,
    four products writing 151 MB each for ``ttt-l14``, on the small work's stream beside the
    GEMMs) nor read by Adam."""
    return trigger_factors_by_default(prim, students)


def position_halves_by_default(prim, students: int, factored: bool | None = None, kept: bool | None = None) -> bool:
    """Whether a program of ``students`` students on table ``prim`` computes the position products
    from the code's separable form by default: where the table says so, with several students, at
    one image when the first layer's gradient goes to Adam by its factors (``factored``; None:
    ``trigger_factors_by_default``), or when its activation is kept from the forward (``kept``;
    None: the table's ``first_layer_act_kept``), which then comes straight from the halves' Q and
    no P is written. At one image with dW_P written and P made from the halves, the halves' extra
    launches cost more than they save (H200, ``ttt-l14``, Triton table: 0.471 against 0.466 ms a
    step); with dW_P by its factors, they save its GEMM (0.459 against 0.466); with the activation
    from Q, they save P's GEMM (cuda table, dW_P written: 0.452 against 0.459 ms, twice)."""
    factored = trigger_factors_by_default(prim, students) if factored is None else bool(factored)
    kept = keeps_first_act(prim) if kept is None else bool(kept)
    return bool(getattr(prim, "position_halves", False)) and (students > 1 or factored or kept)


def _adam_chunks(prim, total: int) -> int:
    """How many slices to give to adam_ per step.

    A fused table updates in place in one launch (1). The plain-PyTorch table materializes a few
    full-size temporaries per call (3 x 4 B per element): slicing the flat buffers bounds that to
    ~50 MB (4 M elements per slice) at the cost of a few more launches, and never more than 8
    slices (a whole step stays a few hundred launches at any S)."""
    if not isinstance(prim, TorchPrimitives):
        return 1
    per = max(4 << 20, -(-total // 8))
    return max(1, -(-total // per))


class StudentProgram:
    def __init__(self, prim, config, snapshot: Dict[str, torch.Tensor], students: int, steps: int, *,
                 lr: float, betas: Tuple[float, float], eps: float, compute_dtype: torch.dtype,
                 master_dtype: torch.dtype, device, graphs: bool, label: str = "", shards=None,
                 keep_grid: bool = False, moment_dtype: torch.dtype | None = None,
                 overlap: bool | None = None, beside: bool = True, wgrad_beside: bool = True,
                 trigger_factors: bool | None = None, position_halves: bool | None = None,
                 first_layer_act_kept: bool | None = None, pool_factors: bool | None = None):
        self.prim, self.config = prim, config
        self.students, self.steps = int(students), int(steps)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.cdt, self.mdt = compute_dtype, master_dtype
        self.acc = acc_dtype_for(compute_dtype)
        self.device = dev = torch.device(device)
        self.snapshot = snapshot
        # the pool's weights first after the compute copy's prefix: updated from their factors,
        # they leave the rest of the parameters without a copy one adjacent run (one Adam launch),
        # and their blocks start where the prefix ends, aligned for 16-byte accesses (behind the
        # conv's one-element bias they were not: element by element; the cuda table's one-image
        # step with them from their factors, 0.490 then, 0.457 ms aligned, H200); and the blocks
        # whose widths are not multiples of 4 elements (the conv's one-element bias) last, so that
        # every block before them starts aligned too (the first layer's bias, the pool's biases
        # and query: each updated alone, beside the backward, when Adam runs there)
        names = weight_names(config)
        names = [n for n in names if n in _POOL_FACTORED] + [n for n in names if n not in _POOL_FACTORED]
        names.sort(key=lambda n: snapshot[n].numel() % 4 != 0)        # stable: the order otherwise kept
        shapes = [tuple(snapshot[n].shape) for n in names]
        c, s = config, self.students
        with quiet_autograd(dev):
            self.store = ParamStore(names, shapes, s, master_dtype=master_dtype,
                                    compute_dtype=compute_dtype, device=dev,
                                    lowp_names=gemm_weight_names(config), moment_dtype=moment_dtype)
            self.shards = shards
            # this program's rows of the queries: all of them (the shared cached codes), or one
            # rank's slice (shards)
            self.pos_in = position_code(c.pos_dim, c.grid, c.grid, dtype=compute_dtype, device=dev)
            self.pos_out = position_code(c.dim, c.grid, c.grid, dtype=compute_dtype, device=dev)
            # the first layer's trigger columns updated from their gradient's factors (the backward
            # fills this each step), never written out, and with the halves below its position
            # columns too; not sharded: a sharded step sums every gradient, whole, across the ranks
            # (None: the table's default; off: written out)
            factored = (trigger_factors_by_default(prim, s) if trigger_factors is None
                        else bool(trigger_factors))
            # the whole grid: the position products from the code's separable form
            # (driver.position_product; None: the table's default, position_halves_by_default)
            kept = keeps_first_act(prim, first_layer_act_kept)
            halves = (position_halves_by_default(prim, s, factored and shards is None, kept)
                      if position_halves is None else bool(position_halves))
            self.pos_grid = (c.grid, c.grid) if halves else None
            if shards is not None:
                a, b = shards.rows(c.queries)
                self.pos_in, self.pos_out = self.pos_in[a:b], self.pos_out[a:b]
                self.pos_grid = None
            # the first layer's activation written out once in the forward and kept for the
            # backward (None: the table's first_layer_act_kept), or built again where it is read
            self.first_layer_act_kept = kept
            # the images as the trigger conv reads them, unfolded once per batch (not per step)
            self.patches = torch.zeros(s, 1, c.queries, c.in_chans * c.patch ** 2, dtype=self.acc, device=dev)
            self.targets = torch.zeros(s, c.dim, dtype=self.acc, device=dev)
            self.losses = torch.zeros(s, self.steps, dtype=self.acc, device=dev)
            self.cls = torch.zeros(s, c.dim, dtype=self.acc, device=dev)
            # the grid features of the last eval (S x L x D), only when asked for
            self.keep_grid = bool(keep_grid)
            self.grid = (torch.zeros(s, self.pos_in.shape[0], c.dim, dtype=compute_dtype, device=dev)
                         if self.keep_grid else None)
            # Adam's step count and lr live on the device (read there by adam_); t indexes losses
            self.step_t = torch.zeros(1, dtype=torch.float32, device=dev)
            # (fp32 as the adam_ contract says; fp64 for fp64 masters, whose tests compare to
            # torch.optim.Adam's Python-float lr at ~1e-12: an fp32 lr alone is 2e-8 off)
            lr_dtype = torch.float64 if master_dtype == torch.float64 else torch.float32
            self.lr_t = torch.full((1,), float(lr), dtype=lr_dtype, device=dev)
            self.t_idx = torch.zeros(1, dtype=torch.long, device=dev)
            self.n_chunks = _adam_chunks(prim, s * self.store.numel)
            # the weights whose gradients the backward gives by their factors (never written; not
            # sharded) and the dict it puts them in, each step
            pool = (bool(c.pool) and (pool_factors_by_default(prim, s) if pool_factors is None
                                      else bool(pool_factors)))
            self.factored = [] if shards is not None else ([_FIRST] if factored else []) + (
                _POOL_FACTORED if pool else [])
            self.factors: Optional[dict] = {} if self.factored else None
            # each layer's Adam on the update streams as soon as the backward is done with the layer,
            # beside the rest of the backward (Adam in one launch, one device, CUDA; by default
            # where the table says it pays); off: after it
            can = dev.type == "cuda" and self.n_chunks == 1 and shards is None
            want = overlap_by_default(prim, s) if overlap is None else bool(overlap)
            self.overlap = can and want
            # the small independent pieces of forward and backward on a second stream (CUDA)
            self.beside = bool(beside) and dev.type == "cuda"
            self.wgrad_beside = self.beside and bool(wgrad_beside)     # the weight gradients too
            self.reset()
            self.graphs: Optional[dict] = None
            if graphs:
                self.graphs = capture_phases({"step": self._step, "eval": self._eval}, self.reset, dev,
                                             key=label or None)

    @property
    def mode(self) -> str:
        return "graph" if self.graphs is not None else "eager"

    def set_lr(self, lr: float):
        self.lr_t.fill_(float(lr))

    # ------------------------------------------------------------------ phases
    def reset(self):
        """Back to the init snapshot with fresh Adam state (device-to-device only; the moments
        left unwritten where the table's Adam reads none at step 1)."""
        self.store.load_snapshot(self.snapshot, moments=not self.prim.adam_fresh_at_step_one,
                                 prim=self.prim)
        self.step_t.zero_()
        self.t_idx.zero_()
        self.taken = 0                  # steps since the reset (step() refuses more than ``steps``)

    def _step(self):
        c, st, sh = self.config, self.store, self.shards
        # dz = d loss / dz = 2 / D (z - target), straight from the forward (its output product adds
        # to 2 / D (b_O - target), made beside: z itself is never formed)
        dz, f, ctx = forward(self.prim, st.weights, None, c, self.pos_in, self.pos_out, cdt=self.cdt,
                             combine=None if sh is None else sh.combine, patches=self.patches, beside=self.beside,
                             pos_grid=self.pos_grid, keep_first_act=self.first_layer_act_kept,
                             minus=self.targets, alpha=2.0 / c.dim)                # S x 1 x D, acc dtype
        del f                      # ctx holds it until the backward is done with it
        side = Beside(self.device, self.beside)
        with side(dz):                  # the loss record and the counters: beside the backward
            loss = dz[:, 0].square().mean(-1, keepdim=True).mul_((c.dim / 2.0) ** 2)    # S x 1
            self.losses.index_copy_(1, self.t_idx, loss)
            self.step_t.add_(1.0)       # the number of this update, read by Adam on the device
            self.t_idx.add_(1)
        # Adam reads step_t: every update started during the backward waits for this mark (the
        # early ones beside it; without them, those final at its tail, beside the conv's gradients;
        # not sharded: a sharded step sums every gradient across the ranks first); the rest runs
        # after the backward, which joins the side stream before it returns
        mark = side.mark()
        early = _EarlyAdam(self, after=mark) if self.overlap else None
        tail = _TailAdam(self, after=mark) if early is None and sh is None else None
        lanes = early or tail
        backward(self.prim, st.weights, ctx, dz, c, self.pos_in, self.pos_out, grad_out=st.grad_views,
                 release=True, reduce=None if sh is None else sh.sum_, parts=1 if sh is None else sh.world,
                 on_done=None if lanes is None else lanes.start, beside=self.beside,
                 wgrad_beside=self.wgrad_beside, factors=self.factors, factored=self.factored, pos_grid=self.pos_grid,
                 on_tail=None if tail is None else tail.tail)
        del ctx, dz
        if sh is not None:
            sh.sum_(st.grad)            # every rank's share of every gradient, summed: one exchange
        self._adam(None if lanes is None else lanes.join())

    def _adam(self, names=None):
        """Adam over the parameters ``names`` (default: all), on the current stream."""
        for p, g, m, v, lowp, outer in self._updates(names):
            if self.n_chunks == 1:
                self.prim.adam_(p, g, m, v, self.step_t, self.lr_t, self.beta1, self.beta2, self.eps, lowp=lowp,
                                outer=outer)
                continue
            # plain-PyTorch table: slices of dim 1 (a flat group's columns, a block's rows) bound its
            # temporaries (elementwise, so any split works)
            n = p.shape[1]
            per = -(-n // self.n_chunks)
            for a in range(0, n, per):
                sl = slice(a, min(n, a + per))
                self.prim.adam_(p[:, sl], None if g is None else g[:, sl], m[:, sl], v[:, sl], self.step_t,
                                self.lr_t, self.beta1, self.beta2, self.eps,
                                lowp=None if lowp is None else lowp[:, sl],
                                outer=None if outer is None else (outer[0][:, :, sl], outer[1]))

    def _update_names(self):
        """Every name :meth:`_updates` covers in this step's program: the parameters, and the first
        layer's trigger columns where the backward gives their gradient by its factors."""
        return list(self.store.names) + ([TRIGGER_COLUMNS] if _FIRST in self.factored else [])

    def _updates(self, names=None):
        """[(params, grads or None, m, v, lowp or None, outer or None)]: the ``adam_`` calls that
        update ``names`` (default: all). When this step's backward gave the first layer's trigger
        columns by their gradient's factors, :data:`TRIGGER_COLUMNS` names those columns (updated
        from the factors) and "mlp.0.weight" the position columns (from their own factors when the
        backward gave them so: two column blocks). The pool's weights given by their
        factors are updated from them, each in its own launch."""
        st = self.store
        names = list(st.names) + [TRIGGER_COLUMNS] if names is None else list(names)
        updates = []
        factors = self._trigger_factors()
        if factors is not None:
            d = factors[1].shape[-1]
            if TRIGGER_COLUMNS in names:
                p, _, m, v, lowp = st.column_block(_FIRST, 0, d)
                updates.append((p, None, m, v, lowp, factors))
            if _FIRST in names:
                blocks = self.factors.get(POSITION_COLUMNS)
                if blocks is None:
                    updates.append(st.column_block(_FIRST, d) + (None,))
                for c0, c1, a, b in blocks or ():
                    p, _, m, v, lowp = st.column_block(_FIRST, d + c0, d + c1)
                    updates.append((p, None, m, v, lowp, (a, b)))
                names.remove(_FIRST)
        for name in self.factored:
            pair = self.factors.get(name) if name != _FIRST and name in names else None
            if pair is not None:
                p, _, m, v, lowp = st.column_block(name, 0)
                updates.append((p, None, m, v, lowp, pair))
                names.remove(name)
        names = [n for n in names if n != TRIGGER_COLUMNS]
        if names:
            updates += [group + (None,) for group in st.adam_groups(names)]
        return updates

    def _trigger_factors(self):
        """(r, T) of this step's first-layer trigger columns, when the backward gave them so."""
        return self.factors.get(_FIRST) if self.factors else None

    def _factor_tensors(self, names) -> tuple:
        """The backward's tensors the updates of ``names`` read as factors (kept from reuse while
        an update stream reads them)."""
        reads = ()
        if self.factors and TRIGGER_COLUMNS in names:
            reads += tuple(self.factors.get(_FIRST) or ())
        if self.factors and _FIRST in names:
            reads += tuple(t for *_, a, b in self.factors.get(POSITION_COLUMNS) or () for t in (a, b))
        for name in self.factored:
            if name != _FIRST and name in names:
                reads += tuple(self.factors.get(name) or ())
        return reads

    def _numel(self, name: str) -> int:
        """Parameters one student's update of ``name`` covers (see :meth:`_updates`)."""
        st = self.store
        factors = self._trigger_factors()
        trigger = 0 if factors is None else st.shapes[st.names.index(_FIRST)][0] * factors[1].shape[-1]
        if name == TRIGGER_COLUMNS:
            return trigger
        n = st.numels[st.names.index(name)]
        return n - trigger if name == _FIRST else n

    def _eval(self):
        sh = self.shards
        z, f, _ = forward(self.prim, self.store.weights, None, self.config, self.pos_in, self.pos_out,
                          cdt=self.cdt, save=False, combine=None if sh is None else sh.combine, patches=self.patches,
                          beside=self.beside, pos_grid=self.pos_grid)
        self.cls.copy_(z[:, 0])
        if self.grid is not None:
            self.grid.copy_(f[:, 0])

    # ------------------------------------------------------------------ one batch
    def load(self, images: torch.Tensor, targets: torch.Tensor):
        """Put k <= S images and targets into the static inputs and reset to the snapshot."""
        k = images.shape[0]
        if not 1 <= k <= self.students:
            raise ValueError(f"images: expected 1 to {self.students} images for this program, got {k}")
        with quiet_autograd(self.device):
            x = images.to(self.device, self.acc, non_blocking=True)
            self.patches[:k, 0].copy_(unfold_patches(x[:, None], self.config.patch)[:, 0])
            self.targets[:k].copy_(targets, non_blocking=True)
            if k < self.students:                  # padding students: any finite input will do
                self.patches[k:].zero_()
                self.targets[k:].zero_()
            self.reset()

    def step(self):
        """One step of every student (forward, backward, Adam): the captured graph replayed, or
        eagerly. Returns the losses buffer (S x steps; this step's column is the last written).
        At most ``steps`` steps after each :meth:`load` or :meth:`reset` (the losses buffer has a
        column per step)."""
        if self.taken >= self.steps:
            raise ValueError(f"step: this program takes {self.steps} steps a batch and has taken them; "
                             f"load() or reset() starts the next batch")
        self.taken += 1
        with quiet_autograd(self.device):
            if self.graphs is not None:
                self.graphs["step"].replay()
            else:
                self._step()
        return self.losses

    def run(self, images: torch.Tensor, targets: torch.Tensor):
        """Train every student on its own image for ``steps`` steps, from the snapshot.

        images: k x C x H x W, targets: k x D with k <= S (rows k.. are padding and ignored).
        Returns device tensors (cls k x D, losses k x steps), fresh copies of the static
        outputs, without synchronizing: read them when you need them."""
        k = images.shape[0]
        self.load(images, targets)
        with quiet_autograd(self.device):
            if self.graphs is not None:
                step, ev = self.graphs["step"], self.graphs["eval"]
                for _ in range(self.steps):
                    step.replay()
                ev.replay()
            else:
                for _ in range(self.steps):
                    self._step()
                self._eval()
            return self.cls[:k].clone(), self.losses[:k].clone()

    def run_trajectory(self, images: torch.Tensor, targets: torch.Tensor, at, *, weights: bool = False):
        """:meth:`run`, also keeping the grid features after each step count in ``at`` (0: the
        init, ``steps``: the end): the eval phase is replayed after those steps only, so the
        other steps run exactly as in :meth:`run` (the same captured graph). Needs a program
        built with ``keep_grid=True``.

        Returns device tensors (cls k x D, losses k x steps, {step: grid k x L x D in the compute
        dtype}, and with ``weights`` the trained master weights {name: k x shape}), fresh copies,
        without synchronizing."""
        if self.grid is None:
            raise ValueError("run_trajectory: this program keeps no grid; build it with keep_grid=True")
        at = step_counts(at, self.steps)
        k = images.shape[0]
        self.load(images, targets)
        grids = {}
        with quiet_autograd(self.device):
            step, ev = ((self.graphs["step"].replay, self.graphs["eval"].replay) if self.graphs is not None
                        else (self._step, self._eval))
            for t in range(self.steps + 1):
                if t in at:
                    ev()
                    grids[t] = self.grid[:k].clone()
                if t < self.steps:
                    step()
            if self.steps not in grids:
                ev()                   # cls: z after the last update
            out = (self.cls[:k].clone(), self.losses[:k].clone(), grids)
            if weights:
                out += ({n: v[:k].clone() for n, v in self.store.master_views.items()},)
            return out

    def nbytes(self) -> int:
        """Bytes of this program's own buffers (store and statics; not the graph pool)."""
        statics = [self.patches, self.targets, self.losses, self.cls] + ([self.grid] if self.grid is not None else [])
        return self.store.nbytes() + sum(t.numel() * t.element_size() for t in statics)


class _TailAdam:
    """A step's Adam on the main stream after the backward's GEMMs: ``start(names)`` (the
    backward's ``on_done``) notes where those gradients are final (an event on the stream that made
    them); ``tail()`` (the backward's ``on_tail``, on the main stream once every weight gradient is
    joined there) waits for those events and ``after`` (the step counter's update) and updates
    each of the store's two groups (the parameters with a compute copy, the rest) whose parameters
    are all announced by then, with the first layer's trigger columns if they are; ``join()``
    returns the names left, for the update after the backward. The small work's stream is then
    still making the conv's gradients (announced last), beside the largest update instead of
    before it."""

    def __init__(self, program: StudentProgram, after=None):
        self.program = program
        self.after = after
        self.marks = []
        self.left = program._update_names()

    def start(self, names):
        event = None
        if self.program.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.program.device))
        self.marks.append((list(names), event))

    def tail(self):
        final = {n for names, _ in self.marks for n in names}
        st = self.program.store
        names = [n for group in (st.names[:st.n_lowp], st.names[st.n_lowp:]) if group and set(group) <= final
                 for n in group]
        names += [TRIGGER_COLUMNS] if TRIGGER_COLUMNS in final else []
        if not names:
            return
        if self.program.device.type == "cuda":
            stream = torch.cuda.current_stream(self.program.device)
            for event in [e for _, e in self.marks if e is not None] + ([self.after] if self.after else []):
                stream.wait_event(event)
        self.program._adam(names)
        self.left = [n for n in self.left if n not in names]

    def join(self):
        return self.left


class _EarlyAdam:
    """A step's Adam in pieces on the program's update streams (:class:`Beside` blocks on the
    "adam" and "adam.2" streams): ``start(names)`` (the backward's ``on_done``) queues the update of
    those parameters after the work enqueued so far on the current stream (the main one, or the
    driver's "beside" or "wgrad" stream that made them) and after ``after`` (an event: the step
    counter's update), on the stream with the fewer parameters queued so far: updates queue one
    behind the other on a stream, and the two largest (the first layer's and the first
    consumer's, 8.4 M parameters each for ``ttt-l14``) are announced last, close together, in
    either order of being ready; ``join()`` makes the main stream wait for all of it and returns
    the names not yet updated (none when the backward announced every one). Captured into the
    step's graph as forks and joins, so the replayed step overlaps them the same way."""

    def __init__(self, program: StudentProgram, after=None):
        self.program = program
        self.lanes = [Beside(program.device, True, role=role) for role in ("adam", "adam.2")]
        self.queued = [0] * len(self.lanes)
        self.after = after          # an event every update also waits for (the step counter's)
        self.left = program._update_names()

    def start(self, names):
        names = [n for n in names if n in self.left]
        if not names:
            return
        self.left = [n for n in self.left if n not in names]
        prog = self.program
        i = min(range(len(self.lanes)), key=self.queued.__getitem__)
        self.queued[i] += sum(prog._numel(n) for n in names)
        lane = self.lanes[i]
        # the factors of the first layer's gradient are the backward's tensors: kept from reuse
        with lane(*prog._factor_tensors(names)):
            if self.after is not None:
                lane.side.wait_event(self.after)
            self.program._adam(names)

    def join(self):
        for lane in self.lanes:
            lane.join()
        return self.left
