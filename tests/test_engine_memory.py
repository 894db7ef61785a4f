"""Peak memory of one full-size TTT step, traced on the meta device (no arithmetic, no GPU).

A dispatch mode counts the bytes of every live tensor storage; the step of a ``ttt-l14`` student
runs on meta tensors through (a) a table that allocates exactly the contract's outputs and nothing
else, which is how the fused Triton/CUDA tables behave (their kernels write only their outputs;
Adam in place), and (b) the plain-PyTorch table. (a) checks the engine's own part of the memory
budget: the flat state, and the driver releasing activations and gradients as soon as they are
used. The budget is 0.45 GB per student (docs/engine.md); the GPU benchmark measures the real
tables.
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from apm_fast import APM, preset
from apm_fast.ops.contract import OUTPUTS, Primitives, TorchPrimitives
from apm_fast.ttt.memory import count_params, estimate_student_bytes
from apm_fast.ttt.program import StudentProgram


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages of tensors created under the mode that are still referenced."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.owners = {}                   # storage -> [tensors alive, bytes]

    def _drop(self, key):
        entry = self.owners[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.owners[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = set()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.owners:
                    self.owners[key] = [0, st.nbytes()]
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                self.owners[key][0] += 1
                weakref.finalize(t, self._drop, key)
        return out


class OutputsOnly(Primitives):
    """The contract's outputs (``contract.OUTPUTS``: shapes, dtypes) and nothing else; computes
    nothing; weight gradients written into given buffers, Adam in place (like the fused tables)."""

    name = "outputs-only"
    wgrad_out = True

    def _adam_(self, *args):
        pass


def _outputs_only(prim):
    def impl(self, *args):
        if prim in ("linear_bwd_weight", "first_layer_bwd_weight"):
            *args, out, out_db = args
            dw, db = (t.new_empty(s, dtype=d) for (s, d), t in zip(OUTPUTS[prim](*args), (args[0], args[0])))
            return (out if out is not None else dw), (out_db if out_db is not None else db)
        outs = [args[0].new_empty(s, dtype=d) for s, d in OUTPUTS[prim](*args)]
        return outs[0] if len(outs) == 1 else tuple(outs)
    return impl


for _prim in OUTPUTS:
    setattr(OutputsOnly, "_" + _prim, _outputs_only(_prim))


def _trace(prim, students, config=None):
    """(bytes after the program is built, peak during one step, peak during the final forward)."""
    cfg = config or preset("ttt-l14")
    model = APM(cfg, device="meta")
    snapshot = {n: p.detach() for n, p in model.named_parameters()}
    model.pos_in(dtype=torch.bfloat16)              # shared position codes exist before (not per student)
    model.pos_out(dtype=torch.bfloat16)
    mode = LiveBytes()
    with mode:
        prog = StudentProgram(prim, cfg, snapshot, students, 2, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                              compute_dtype=torch.bfloat16, master_dtype=torch.float32, device="meta",
                              graphs=False)
        built = mode.live
        mode.peak = mode.live
        prog._step()
        step_peak = mode.peak
        mode.peak = mode.live
        prog._eval()
        eval_peak = mode.peak
        del prog
    return built, step_peak, eval_peak


def test_one_fused_student_peaks_within_budget():
    built, step, ev = _trace(OutputsOnly(), 1)
    n = count_params(preset("ttt-l14"))
    # state: fp32 master/grad/m/v (16 N) + bf16 copy of the GEMM operands (< 2 N) + the image
    assert 16 * n < built < 18 * n
    assert step <= 0.45e9, f"one student's step peaks at {step / 1e9:.3f} GB"
    # above the state only what the backward holds at its peak (P, patches, one dW, one dy)
    assert step - built < 50e6, f"activations/transients {(step - built) / 1e6:.1f} MB"
    assert ev < step
    # the formula used for S selection is not optimistic
    assert estimate_student_bytes(preset("ttt-l14"), torch.bfloat16) >= step - 5e6


def test_a_kept_first_layer_activation_costs_its_own_bytes_only():
    """With ``first_layer_act_kept`` (the cuda table) the step holds ReLU(P + u) (L x H1 in bf16)
    from the forward to the backward: the peak grows by at most that, and the final forward
    (no backward after it) keeps nothing more."""
    class Kept(OutputsOnly):
        first_layer_act_kept = True

    cfg = preset("ttt-l14")
    act = cfg.queries * cfg.hidden[0] * 2
    built, step, ev = _trace(OutputsOnly(), 1)
    k_built, k_step, k_ev = _trace(Kept(), 1)
    assert k_built == built and k_ev == ev
    assert step < k_step <= step + act, f"{(k_step - step) / 1e6:.1f} MB more, the activation is {act / 1e6:.1f}"


def test_students_cost_the_same_each():
    one = _trace(OutputsOnly(), 1)
    three = _trace(OutputsOnly(), 3)
    per = (three[1] - one[1]) / 2
    assert abs(per - one[1]) < 0.01 * one[1]          # nothing shared hides in the per-student peak


def test_plain_torch_table_peak_is_bounded():
    """The readable table upcasts GEMM operands to fp32: more, but bounded (Adam sliced)."""
    built, step, _ = _trace(TorchPrimitives(), 1)
    assert step - built < 110e6 and step < 0.5e9
