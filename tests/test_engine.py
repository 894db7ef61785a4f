"""The TTT engine on the CPU through the plain-PyTorch primitive table.

The reference is TestTimeTrainer's autograd loop (``backend="reference"``): a different computation
(autograd through the plain model, torch.optim.Adam) from the engine's (hand-written fused
backward, flat-buffer Adam). Tolerances: float64 agrees to ~1e-16 per step; Adam's first steps are
nearly sign(g) * lr, so a gradient entry near zero that the two computations round differently
moves its weight by up to lr: in fp32 (and with lr = 1e-2 so that students really move), cls
agrees to ~1e-5 relative, hence rtol 1e-4.
"""
import warnings

import pytest
import torch

from apm_fast import APM, TestTimeTrainer, preset
from apm_fast.ops import TorchPrimitives, backward, forward, weight_names
from apm_fast.ops.driver import POSITION_COLUMNS, TRIGGER_COLUMNS
from apm_fast.ttt import program as program_mod
from apm_fast.ttt.memory import choose_students, count_params, estimate_student_bytes
from apm_fast.ttt.store import ParamStore
from helpers import BLOCK_SHAPES, check_block_adam, check_broadcast, check_fresh_adam

STEPS = 4
LR = 1e-2
# odd sizes: 5 x 5 grid (position code of width 25), widths that are not powers of two
CONFIGS = {
    "three-layer": dict(grid=5, patch=3, hidden=(24, 20, 12), dim=16, heads=4),
    "two-layer": dict(grid=4, patch=2, hidden=(18, 10), dim=12, heads=3),
}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=2e-5)}


def _setup(name="three-layer", dtype=torch.float64, n=5, seed=0):
    torch.manual_seed(seed)
    cfg = preset("ttt-l14", **CONFIGS[name])
    model = APM(cfg, dtype=dtype)
    px = cfg.image_size
    images = torch.randn(n, cfg.in_chans, px, px, dtype=dtype)
    targets = torch.randn(n, cfg.dim, dtype=dtype)
    return model, images, targets


def _engine(model, graphs=None, **kw):
    """A trainer on the engine (the torch table)."""
    kw = {"steps": STEPS, "lr": LR, "backend": "torch", **kw}
    t = TestTimeTrainer(model, **kw)
    if graphs is not None:
        t.engine.graphs = graphs
    return t


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_engine_equals_autograd_trainer(name, dtype):
    model, images, targets = _setup(name, dtype)
    ref = TestTimeTrainer(model, steps=STEPS, lr=LR, backend="reference").fit(images, targets)
    got = _engine(model, students=2).fit(images, targets)       # 5 images: batches 2, 2, 1
    assert got.cls.dtype == ref.cls.dtype and got.cls.shape == ref.cls.shape
    assert got.losses.shape == ref.losses.shape == (5, STEPS) and got.losses.dtype == torch.float32
    torch.testing.assert_close(got.losses, ref.losses, **TOL[torch.float32 if dtype == torch.float32 else dtype])
    torch.testing.assert_close(got.cls, ref.cls, **TOL[dtype])
    assert len(got.seconds) == 5 and all(s >= 0 for s in got.seconds)
    # the students did train: every loss curve goes down
    assert bool((got.losses[:, -1] < got.losses[:, 0]).all())


def test_one_trainer_reference_loop_or_engine():
    """backend="reference": the autograd loop; a table: the engine. Same results, model untouched."""
    model, images, targets = _setup("two-layer", torch.float64, n=3)
    auto = TestTimeTrainer(model, steps=STEPS, lr=LR, backend="torch", students=2)
    r_auto = auto.fit(images, targets)
    assert auto.engine is not None and auto.engine.backend == "torch"
    plain = TestTimeTrainer(model, steps=STEPS, lr=LR, backend="reference")
    r_plain = plain.fit(images, targets)
    assert plain.engine is None
    torch.testing.assert_close(r_auto.cls, r_plain.cls, **TOL[torch.float64])
    # the model is left at its snapshot either way
    for k, p in model.named_parameters():
        assert torch.equal(p, auto.snapshot[k])
    with pytest.raises(ValueError, match="no compiled program"):
        plain.program(1)
    with pytest.raises(ValueError, match=r"precision: the reference backend trains the plain model in its own "
                                         r"dtype \(fp64\); expected no precision, got 'bf16'"):
        TestTimeTrainer(model, backend="reference", precision="bf16")
    with pytest.raises(ValueError, match="shards: the reference backend trains on one device"):
        TestTimeTrainer(model, backend="reference", shards=object())


def test_second_fit_is_identical_reset_is_complete():
    model, images, targets = _setup("three-layer", torch.float32, n=4)
    eng = _engine(model, students=3)
    first = eng.fit(images, targets)
    other = eng.fit(images.flip(0) * 0.5, targets.roll(1, 0))      # different work in between
    second = eng.fit(images, targets)
    assert torch.equal(first.cls, second.cls) and torch.equal(first.losses, second.losses)
    assert not torch.equal(other.cls, first.cls)
    # the engine never touched the model
    for k, p in model.named_parameters():
        assert torch.equal(p, eng.snapshot[k])


def test_the_reset_leaves_the_moments_to_an_adam_that_reads_none_at_step_one(monkeypatch):
    """``adam_fresh_at_step_one`` (the Triton table's): the batch's reset leaves Adam's moments as
    the last batch left them, and the next batch trains as from zeroed ones; the plain table's
    reset zeroes them. A table that said so but read them would train the second batch from the
    first's moments: the check below sees it."""
    model, images, targets = _setup("three-layer", torch.float64, n=3)
    plain = _engine(model, students=3)
    first = plain.fit(images, targets)
    prog = plain.engine.program(3)
    prog.reset()
    assert prog.store.exp_avg.abs().sum() == 0 and prog.store.exp_avg_sq.abs().sum() == 0
    check_fresh_adam(TorchPrimitives(), "cpu")              # it reads them at step 1: it must zero them
    reads = TorchPrimitives._adam_

    def fresh(self, params, grads, exp_avg, exp_avg_sq, step, *rest):   # an Adam that reads none at step 1
        first_update = step.reshape(()) == 1
        exp_avg.copy_(torch.where(first_update, torch.zeros_like(exp_avg), exp_avg))
        exp_avg_sq.copy_(torch.where(first_update, torch.zeros_like(exp_avg_sq), exp_avg_sq))
        return reads(self, params, grads, exp_avg, exp_avg_sq, step, *rest)

    monkeypatch.setattr(TorchPrimitives, "adam_fresh_at_step_one", True, raising=False)
    for adam, same in ((fresh, True), (reads, False)):
        monkeypatch.setattr(TorchPrimitives, "_adam_", adam)
        t = _engine(model, students=3)
        a = t.fit(images, targets)
        prog = t.engine.program(3)
        moments = prog.store.exp_avg.clone(), prog.store.exp_avg_sq.clone()
        prog.reset()
        assert torch.equal(prog.store.exp_avg, moments[0]) and torch.equal(prog.store.exp_avg_sq, moments[1])
        assert moments[0].abs().sum() > 0
        b = t.fit(images, targets)
        assert torch.equal(a.cls, first.cls) and torch.equal(a.losses, first.losses)
        assert (torch.equal(b.cls, a.cls) and torch.equal(b.losses, a.losses)) == same


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_side_by_side_equals_one_at_a_time_any_S_any_order(dtype):
    model, images, targets = _setup("three-layer", dtype, n=5, seed=1)
    alone = _engine(model, students=1).fit(images, targets)
    # tight: each student's arithmetic is the same whatever S (batched, never mixed)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for s in (2, 3, 5):
        got = _engine(model, students=s).fit(images, targets)
        torch.testing.assert_close(got.cls, alone.cls, **tol)
        torch.testing.assert_close(got.losses, alone.losses, **tol)
    perm = torch.tensor([3, 0, 4, 2, 1])
    shuffled = _engine(model, students=3).fit(images[perm], targets[perm])
    torch.testing.assert_close(shuffled.cls, alone.cls[perm], **tol)
    torch.testing.assert_close(shuffled.losses, alone.losses[perm], **tol)
    # results belong to their own image: different images give different students
    assert (alone.cls[0] - alone.cls[1]).abs().max() > 1e-4


def test_student_count_defaults_and_program_reuse():
    model, images, targets = _setup("two-layer", torch.float64, n=3)
    eng = _engine(model)
    assert eng.students_for(3) == 1 and choose_students(5, 1 << 20, 0, "cpu") == 1   # CPU: one at a time
    eng.fit(images, targets)
    assert eng.engine._program.students == 1 and eng.engine.mode == "eager"   # no CUDA graphs on a CPU
    fixed = _engine(model, students=3)
    fixed.fit(images, targets)
    prog = fixed.engine._program
    assert prog.students == 3
    fixed.fit(images + 1, targets)
    assert fixed.engine._program is prog                                 # same S: not rebuilt
    assert fixed.students_for(1) == 1 and fixed.students_for(7) == 3


def test_graphs_requested_on_cpu_run_eagerly_without_warning():
    """No CUDA graphs on a CPU: the same functions run eagerly, noted in the log (not a warning)."""
    model, images, targets = _setup("two-layer", torch.float64, n=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eng = _engine(model, graphs=True, students=2)
        got = eng.fit(images, targets)
    assert eng.engine.mode == "eager"
    ref = _engine(model, graphs=False, students=2).fit(images, targets)
    assert torch.equal(got.cls, ref.cls)


@pytest.mark.parametrize("factors,halves", [(None, None), (True, None), (True, True)],
                         ids=["written", "factored", "factored-halves"])
def test_adam_slices_equal_one_pass(monkeypatch, factors, halves):
    model, images, targets = _setup("three-layer", torch.float64, n=2)
    whole_engine = _engine(model, students=2)
    whole_engine.engine.trigger_factors = factors
    whole_engine.engine.position_halves = halves
    one = whole_engine.fit(images, targets)
    monkeypatch.setattr(program_mod, "_adam_chunks", lambda prim, total: 3)
    sliced_engine = _engine(model, students=2)
    sliced_engine.engine.trigger_factors = factors
    sliced_engine.engine.position_halves = halves
    sliced = sliced_engine.fit(images, targets)
    assert sliced_engine.engine._program.n_chunks == 3
    assert ("mlp.0.weight" in sliced_engine.engine._program.factored) == bool(factors)
    assert torch.equal(one.cls, sliced.cls) and torch.equal(one.losses, sliced.losses)


def test_the_trigger_columns_are_updated_from_their_factors_and_never_written():
    """The engine's step gives the first layer's trigger columns to Adam by their gradient's
    factors: their part of the flat gradient buffer is never written (the position columns' is),
    and the training equals the autograd trainer's (test_engine_equals_autograd_trainer) with
    these columns moving."""
    model, images, targets = _setup("three-layer", torch.float64, n=2)
    t = _engine(model, students=2)
    assert t.engine.trigger_factors is None and TorchPrimitives.adam_from_factors is False   # the table's default
    t.engine.trigger_factors = True
    t.fit(images, targets)
    prog = t.engine._program
    a, b = prog.factors["mlp.0.weight"]
    d = model.config.pos_dim
    assert a.shape == (2, 1, model.config.hidden[0]) and b.shape == (2, 1, d)
    grad = prog.store.grad_views["mlp.0.weight"]
    assert bool((grad[:, :, :d] == 0).all()) and bool((grad[:, :, d:] != 0).any())
    moved = prog.store.master_views["mlp.0.weight"] - dict(model.named_parameters())["mlp.0.weight"].detach()
    assert bool((moved[:, :, :d] != 0).any())
    assert prog._numel(TRIGGER_COLUMNS) + prog._numel("mlp.0.weight") == prog.store.numels[
        prog.store.names.index("mlp.0.weight")]
    factored = t.fit(images, targets)
    t.engine.trigger_factors = None                  # the torch table's default: written out
    written = t.fit(images, targets)
    assert "mlp.0.weight" not in t.engine._program.factored
    torch.testing.assert_close(factored.cls, written.cls, rtol=1e-12, atol=0)
    torch.testing.assert_close(factored.losses, written.losses, rtol=1e-12, atol=0)


def test_with_the_halves_the_position_columns_are_updated_from_their_factors_too():
    """With the code's halves and the trigger columns by their factors, the position columns'
    gradient goes to Adam by its factors as well (G = E^T g1 with the halves, rank width +
    height): no part of the first layer's flat gradient is written, its weights move, and the
    training equals the written-out step's (float64)."""
    model, images, targets = _setup("three-layer", torch.float64, n=2)
    t = _engine(model, students=2)
    t.engine.trigger_factors = t.engine.position_halves = True
    factored = t.fit(images, targets)
    prog = t.engine._program
    g, d = model.config.grid, model.config.pos_dim
    blocks = prog.factors[POSITION_COLUMNS]
    assert [(c0, c1, tuple(a.shape), tuple(b.shape)) for c0, c1, a, b in blocks] == [
        (0, blocks[0][1], (2, g, model.config.hidden[0]), (2, g, blocks[0][1])),
        (blocks[0][1], d, (2, g, model.config.hidden[0]), (2, g, d - blocks[0][1]))]
    assert bool((prog.store.grad_views["mlp.0.weight"] == 0).all())
    moved = prog.store.master_views["mlp.0.weight"] - dict(model.named_parameters())["mlp.0.weight"].detach()
    assert bool((moved[:, :, d:] != 0).all(-1).any())
    t.engine.trigger_factors = t.engine.position_halves = False
    written = t.fit(images, targets)
    assert "mlp.0.weight" not in t.engine._program.factored and t.engine._program.pos_grid is None
    torch.testing.assert_close(factored.cls, written.cls, rtol=1e-12, atol=0)
    torch.testing.assert_close(factored.losses, written.losses, rtol=1e-12, atol=0)


def test_position_products_from_the_codes_halves_train_the_same(monkeypatch):
    """The engine with the position products from the code's separable form trains exactly as
    with one GEMM each (float64); the default follows the table, with several students, or at one
    image when the first layer's gradient goes by its factors."""
    model, images, targets = _setup("three-layer", torch.float64, n=3)
    t = _engine(model, students=3)
    t.fit(images, targets)
    assert t.engine.position_halves is None and t.engine._program.pos_grid is None   # the torch table's default
    gemm = t.fit(images, targets)
    t.engine.position_halves = True
    halves = t.fit(images, targets)
    g = model.config.grid
    assert t.engine._program.pos_grid == (g, g)
    torch.testing.assert_close(halves.cls, gemm.cls, rtol=1e-12, atol=0)
    torch.testing.assert_close(halves.losses, gemm.losses, rtol=1e-12, atol=0)
    monkeypatch.setattr(TorchPrimitives, "position_halves", True, raising=False)   # a table that has them on
    t.engine.position_halves = None
    assert t.engine.program(3).pos_grid == (g, g) and t.engine.program(1).pos_grid is None
    # ... at one image too where dW_P goes to Adam by its factors (the table's default or asked for)
    t.engine.trigger_factors = True
    assert t.engine.program(1).pos_grid == (g, g)
    t.engine.trigger_factors = None
    monkeypatch.setattr(TorchPrimitives, "adam_from_factors", True, raising=False)
    assert t.engine.program(1).pos_grid == (g, g)


def test_a_table_can_write_the_trigger_gradient_out_at_one_image_only(monkeypatch):
    """``written_at_one_image`` (the cuda table's setting): the trigger columns (and the pool's
    weights) go to Adam by their factors with several students and written out at one image, the position products then
    by one GEMM at one image; an explicit ``trigger_factors`` still wins; both ways train the same."""
    model, images, targets = _setup("three-layer", torch.float64, n=3)
    monkeypatch.setattr(TorchPrimitives, "adam_from_factors", True, raising=False)
    monkeypatch.setattr(TorchPrimitives, "position_halves", True, raising=False)
    g = model.config.grid
    before = _engine(model, students=3)
    assert "mlp.0.weight" in before.engine.program(1).factored and before.engine.program(1).pos_grid == (g, g)
    monkeypatch.setattr(TorchPrimitives, "written_at_one_image", True, raising=False)
    t = _engine(model, students=3)
    one, several = t.engine.program(1), t.engine.program(3)
    assert "mlp.0.weight" not in one.factored and one.pos_grid is None
    assert "mlp.0.weight" in several.factored and several.pos_grid == (g, g)
    # the pool's weights likewise (pool_factors_by_default)
    assert one.factored == [] and several.factored == ["mlp.0.weight", "attn.in_proj_weight", "attn.out_proj.weight"]
    t.engine.trigger_factors = True
    assert "mlp.0.weight" in t.engine.program(1).factored and t.engine.program(1).pos_grid == (g, g)
    t.engine.trigger_factors = None
    written = t.fit(images[:1], targets[:1])
    t.engine.trigger_factors = True
    factored = t.fit(images[:1], targets[:1])
    torch.testing.assert_close(written.cls, factored.cls, rtol=1e-12, atol=0)
    torch.testing.assert_close(written.losses, factored.losses, rtol=1e-12, atol=0)


def test_adam_beside_the_backward_by_default_where_each_table_measured_it_faster():
    """``overlap_by_default``: the table's ``adam_beside_at_one_image`` at one image, its
    ``adam_beside_backward`` with several students (the Triton table at both; the cuda table at
    one image only; the plain table at neither); the bench measures the other schedule beside the
    default at each S."""
    from apm_fast.backends.cuda import CudaPrimitives
    from apm_fast.backends.triton import TritonPrimitives
    from apm_fast.bench.context import Context
    from apm_fast.bench.options import BenchOptions

    on = program_mod.overlap_by_default
    assert on(TritonPrimitives(), 1) and on(TritonPrimitives(), 64)
    assert on(CudaPrimitives(), 1) and not on(CudaPrimitives(), 2)
    assert not on(TorchPrimitives(), 1) and not on(TorchPrimitives(), 64)
    ctx = Context(BenchOptions.quick_defaults(device="cpu", presets=("ttt-b16",), out=None), log=lambda s: None)
    assert ctx.other_adam("cuda", 1)[:2] == (False, "adam-after-backward")
    assert ctx.other_adam("cuda", 64)[:2] == (True, "adam-beside-backward")
    assert ctx.other_adam("triton", 64)[:2] == (False, "adam-after-backward")


def test_a_table_can_keep_the_first_layer_activation_for_the_backward(monkeypatch):
    """``first_layer_act_kept`` (the cuda table's setting): the step writes ReLU(P + u) out once
    (``first_layer_act``) and hands it to the backward (the weight gradient's operand, the input
    gradient's mask), never asking the primitives that build it again; an explicit engine setting
    wins; both ways train the same, with one student and with several."""
    model, images, targets = _setup("three-layer", torch.float64, n=3)
    calls = []
    for name in ("first_layer_act", "first_layer_linear", "first_layer_bwd_weight", "first_layer_bwd_input"):
        real = getattr(TorchPrimitives, name)

        def spy(self, *args, _name=name, _real=real, **kw):
            calls.append((_name, kw.get("act") is not None))
            return _real(self, *args, **kw)
        monkeypatch.setattr(TorchPrimitives, name, spy)
    rebuilt = _engine(model, students=3)
    assert rebuilt.engine.program(1).first_layer_act_kept is False
    calls.clear()
    rebuilt.engine.program(1).step()
    assert ("first_layer_act", False) not in calls and ("first_layer_bwd_weight", False) in calls
    assert ("first_layer_bwd_input", False) in calls
    monkeypatch.setattr(TorchPrimitives, "first_layer_act_kept", True, raising=False)
    kept = _engine(model, students=3)
    prog = kept.engine.program(1)
    assert prog.first_layer_act_kept is True
    calls.clear()
    prog.step()
    assert sorted(set(calls)) == [("first_layer_act", False), ("first_layer_bwd_input", True)]
    assert calls.count(("first_layer_act", False)) == 1
    kept.engine.first_layer_act_kept = False
    assert kept.engine.program(1).first_layer_act_kept is False
    kept.engine.first_layer_act_kept = None
    for s in (1, 3):
        a = _engine(model, students=s).fit(images, targets)
        monkeypatch.setattr(TorchPrimitives, "first_layer_act_kept", False, raising=False)
        b = _engine(model, students=s).fit(images, targets)
        monkeypatch.setattr(TorchPrimitives, "first_layer_act_kept", True, raising=False)
        torch.testing.assert_close(a.cls, b.cls, rtol=1e-12, atol=0)
        torch.testing.assert_close(a.losses, b.losses, rtol=1e-12, atol=0)


@pytest.mark.parametrize("students", [1, 3])
def test_a_kept_activation_is_made_from_the_position_halves(monkeypatch, students):
    """With the activation kept and the position products from the code's halves, the step makes
    the activation straight from Q (``first_layer_act(q, u, grid=)``): no P is written (one product
    fewer, the one with the code's 0/1 factor), the backward reads its mask from the activation
    without P, and it trains the same as the halves with P written and the activation rebuilt."""
    model, images, targets = _setup("three-layer", torch.float64, n=3)
    calls = []
    for name in ("first_layer_act", "first_layer_bwd_input", "linear"):
        real = getattr(TorchPrimitives, name)

        def spy(self, *args, _name=name, _real=real, **kw):
            calls.append((_name, kw.get("grid") is not None, args[2] is None if _name == "first_layer_bwd_input"
                          else None, tuple(args[0].shape)))
            return _real(self, *args, **kw)
        monkeypatch.setattr(TorchPrimitives, name, spy)

    def run(kept):
        monkeypatch.setattr(TorchPrimitives, "first_layer_act_kept", kept, raising=False)
        t = _engine(model, students=students)
        t.engine.position_halves = True
        prog = t.engine.program(students)
        assert prog.pos_grid is not None and prog.first_layer_act_kept is kept
        calls.clear()
        prog.step()
        step_calls = list(calls)
        return t.fit(images, targets), step_calls

    kept, kept_calls = run(True)
    rebuilt, rebuilt_calls = run(False)
    g = model.config.grid
    assert [c[:3] for c in kept_calls if c[0] == "first_layer_act"] == [("first_layer_act", True, None)]
    assert [c[:3] for c in kept_calls if c[0] == "first_layer_bwd_input"] == [("first_layer_bwd_input", False, True)]
    # the products with the code's factors: Q = C W_P^T only (P = E Q not formed) when kept
    e_rows = [c for c in rebuilt_calls if c[0] == "linear" and c[3][0] == g * g]
    assert e_rows and not [c for c in kept_calls if c[0] == "linear" and c[3][0] == g * g]
    torch.testing.assert_close(kept.cls, rebuilt.cls, rtol=1e-12, atol=0)
    torch.testing.assert_close(kept.losses, rebuilt.losses, rtol=1e-12, atol=0)


@pytest.mark.parametrize("factored", [False, True], ids=["written", "factored"])
@pytest.mark.parametrize("students", [1, 3])
def test_the_update_after_the_backward_starts_at_its_tail(monkeypatch, students, factored):
    """Adam after the backward (no early updates): the group of parameters with a compute copy is
    updated at the backward's tail (``on_tail``), once its gradients are final and before the conv's
    are announced; the rest (the conv's among them) after the backward returns; every parameter
    once, and the same training as the whole update after the backward."""
    model, images, targets = _setup("three-layer", torch.float32, n=3)
    monkeypatch.setattr(TorchPrimitives, "adam_from_factors", factored, raising=False)
    t = _engine(model, students=students, precision="bf16")
    prog = t.engine.program(students)
    assert not prog.overlap and ("mlp.0.weight" in prog.factored) == factored
    calls, real = [], program_mod.StudentProgram._adam
    monkeypatch.setattr(program_mod.StudentProgram, "_adam",
                        lambda self, names=None: (calls.append(list(names)), real(self, names))[1])
    prog.step()
    st = prog.store
    low, rest = st.names[:st.n_lowp], st.names[st.n_lowp:]
    trigger = [program_mod.TRIGGER_COLUMNS] if "mlp.0.weight" in prog.factored else []
    assert low and "conv.weight" in rest
    assert calls == [low + trigger, rest]
    monkeypatch.setattr(program_mod.StudentProgram, "_adam", real)
    at_tail = _engine(model, students=students, precision="bf16").fit(images, targets)
    monkeypatch.setattr(program_mod._TailAdam, "tail", lambda self: None)          # all after the backward
    after = _engine(model, students=students, precision="bf16").fit(images, targets)
    torch.testing.assert_close(at_tail.cls, after.cls, rtol=0, atol=0)
    torch.testing.assert_close(at_tail.losses, after.losses, rtol=0, atol=0)


def test_the_plain_broadcast_resets_every_student():
    check_broadcast(TorchPrimitives(), "cpu")


def test_param_store_layout_and_reset():
    model, _, _ = _setup("two-layer", torch.float64)
    names = weight_names(model.config)
    params = dict(model.named_parameters())
    shapes = [tuple(params[n].shape) for n in names]
    st = ParamStore(names, shapes, 3, master_dtype=torch.float32, compute_dtype=torch.bfloat16,
                    device="cpu", lowp_names=["mlp.1.weight"])
    assert st.numel == count_params(model.config) == sum(params[n].numel() for n in names)
    for n, sh in zip(names, shapes):
        v = st.master_views[n]
        assert v.shape == (3, *sh) and v.is_contiguous()                 # batched-GEMM friendly
        assert v.data_ptr() >= st.master.data_ptr()
    assert st.weights["mlp.1.weight"].dtype == torch.bfloat16 and st.weights["mlp.0.bias"].dtype == torch.float32
    st.exp_avg.fill_(1.0)
    st.exp_avg_sq.fill_(2.0)
    st.load_snapshot({n: params[n] for n in names})
    for n in names:
        for i in range(3):
            assert torch.equal(st.student(i)[n], params[n].float())
    assert st.exp_avg.abs().sum() == 0 and st.exp_avg_sq.abs().sum() == 0
    assert st.names[0] == "mlp.1.weight" and st.lowp.numel() == 3 * params["mlp.1.weight"].numel()
    assert torch.equal(st.lowp, st.master[:st.lowp.numel()].to(torch.bfloat16))
    groups = st.adam_groups()                         # the compute-copy prefix, then the rest
    assert [g[4] is not None for g in groups] == [True, False]
    assert sum(g[0].numel() for g in groups) == st.master.numel() and all(g[0].shape[0] == 3 for g in groups)
    # any subset: adjacent parameters in one group, split where the compute copy ends
    some = ["mlp.1.weight", "head.weight", "head.bias", "mlp.0.bias", "conv.bias"]
    parts = st.adam_groups(some)
    assert sum(g[0].numel() for g in parts) == 3 * sum(params[n].numel() for n in some)
    assert len(parts) < len(some) and [g[4] is not None for g in parts][:1] == [True]
    st.master.zero_()
    for g in parts:
        g[0].fill_(1.0)
    for n in names:
        assert bool((st.master_views[n] == 1.0).all()) == (n in some), n
    with pytest.raises(ValueError, match="unknown parameter"):
        st.adam_groups(["nope"])
    # gradient views write into the one flat buffer that the optimizer sees
    st.grad_views["head.bias"].fill_(7.0)
    assert int((st.flat2d(st.grad) == 7.0).sum()) == 3 * params["head.bias"].numel()


@pytest.mark.parametrize("factored,halves", [(False, False), (True, False), (True, True)],
                         ids=["written", "factored", "factored-halves"])
def test_backward_announces_each_gradient_once_when_it_is_final(factored, halves):
    """on_done(names): every parameter once, and at that moment its gradient is already the final
    one (the engine starts its Adam there); in the order the gradients are made (the updates
    queue in that order): the head, the MLP's layers last to first, the pool's parameters (made
    beside the GEMMs) before the first consumer, not at the pool's backward, the first layer before
    the first consumer, the conv last. ``factors``: the first layer's trigger columns by
    their gradient's factors, announced (with the first bias) before the rest of the first layer,
    never written into grad_out; with the position code's halves (``pos_grid``) its position
    columns by their factors too (two column blocks), never written either."""
    model, images, _ = _setup("three-layer", torch.float64, n=2)
    cfg, prim = model.config, TorchPrimitives()
    names = weight_names(cfg)
    params = dict(model.named_parameters())
    w = {n: params[n].detach().unsqueeze(0).clone() for n in names}
    pos_in, pos_out = model.pos_in(), model.pos_out()
    z, _, ctx = forward(prim, w, images[:, None].transpose(0, 1), cfg, pos_in, pos_out, cdt=torch.float64)
    dz = torch.randn_like(z)
    whole = backward(prim, {n: v.clone() for n, v in w.items()}, ctx, dz, cfg, pos_in, pos_out)
    z, _, ctx = forward(prim, w, images[:, None].transpose(0, 1), cfg, pos_in, pos_out, cdt=torch.float64)
    out = {n: torch.full_like(w[n], 5.0) for n in names}
    factors = {} if factored else None
    d = cfg.pos_dim
    seen = {}

    def on_done(done):
        for n in done:
            assert n not in seen, f"{n} announced twice"
            if n == TRIGGER_COLUMNS:
                a, b = factors["mlp.0.weight"]
                seen[n] = torch.bmm(a.transpose(1, 2), b)
                w["mlp.0.weight"][:, :, :d] = float("nan")     # the backward must not read W_T again
                continue
            seen[n] = out[n].clone()
            if n == "mlp.0.weight" and factored:             # the position columns, then
                seen[n] = seen[n][:, :, d:]
                if halves:
                    blocks = factors[POSITION_COLUMNS]
                    assert [(c0, c1) for c0, c1, *_ in blocks] == [(0, blocks[0][1]), (blocks[0][1], d)]
                    seen[n] = torch.cat([torch.bmm(a.transpose(1, 2), b) for *_, a, b in blocks], dim=2)
                w[n][:, :, d:] = float("nan")
                continue
            w[n].fill_(float("nan"))              # the backward must not read it again

    grid = (cfg.grid, cfg.grid) if halves else None
    backward(prim, w, ctx, dz, cfg, pos_in, pos_out, grad_out=out, on_done=on_done, factors=factors, pos_grid=grid)
    assert sorted(seen) == sorted(names + ([TRIGGER_COLUMNS] if factored else []))
    order = list(seen)
    assert cfg.pool and len(cfg.hidden) >= 3
    mlp = [order.index(f"mlp.{i}.weight") for i in range(len(cfg.hidden))]
    assert order.index("head.weight") < mlp[-1] and mlp[2:] == sorted(mlp[2:], reverse=True), order
    assert mlp[2] < order.index("attn.in_proj_weight") < mlp[0] < mlp[1] < order.index("conv.weight"), order
    if factored:
        trigger = order.index(TRIGGER_COLUMNS)
        assert order.index("attn.in_proj_weight") < trigger < mlp[0], order
        assert order.index("mlp.0.bias") == trigger + 1, order      # announced together
        torch.testing.assert_close(seen[TRIGGER_COLUMNS], whole["mlp.0.weight"][:, :, :d], rtol=1e-12, atol=0)
        assert bool((out["mlp.0.weight"][:, :, :d] == 5.0).all()), "the trigger columns were written"
    if halves:
        assert bool((out["mlp.0.weight"] == 5.0).all()), "the position columns were written"
    for n in names:
        cols = (slice(None), slice(None), slice(d, None)) if n == "mlp.0.weight" and factored else ...
        torch.testing.assert_close(seen[n], whole[n][cols], rtol=1e-12, atol=0)
        if not (halves and n == "mlp.0.weight"):
            torch.testing.assert_close(seen[n], out[n][cols], rtol=0, atol=0)    # not written after
    assert len({id(v) for v in seen.values()}) == len(seen)


@pytest.mark.parametrize("per_student", [1, 2], ids=["one-image", "two-images"])
def test_the_pool_weights_gradients_can_go_by_their_factors(per_student):
    """``factored`` with the pool's in- and out-projection weights: their gradients are given by
    their factors (a, b), sum_k a[:, k, :, None] b[:, k, None, :] equal to the written gradients
    (rank 1 + H + B H and B), their views in grad_out left as they were, every other gradient
    written as without; an unknown name is refused."""
    model, images, _ = _setup("three-layer", torch.float64, n=2 * per_student)
    cfg, prim = model.config, TorchPrimitives()
    names = weight_names(cfg)
    params = dict(model.named_parameters())
    w = {n: torch.stack([params[n].detach(), params[n].detach() * 1.1]) for n in names}   # S = 2
    pos_in, pos_out = model.pos_in(), model.pos_out()
    x = images.view(2, per_student, *images.shape[1:])
    z, _, ctx = forward(prim, w, x, cfg, pos_in, pos_out, cdt=torch.float64)
    dz = torch.randn_like(z)
    whole = backward(prim, w, ctx, dz, cfg, pos_in, pos_out)
    pool = ["attn.in_proj_weight", "attn.out_proj.weight"]
    out = {n: torch.full_like(w[n], 5.0) for n in names}
    factors = {}
    backward(prim, w, ctx, dz, cfg, pos_in, pos_out, grad_out=out, factors=factors, factored=pool)
    assert sorted(factors) == sorted(pool)
    heads = cfg.heads
    ranks = {"attn.in_proj_weight": 1 + heads + per_student * heads, "attn.out_proj.weight": per_student}
    for n in names:
        if n in pool:
            a, b = factors[n]
            assert a.shape == (2, ranks[n], w[n].shape[1]) and b.shape == (2, ranks[n], w[n].shape[2]), n
            torch.testing.assert_close(torch.bmm(a.transpose(1, 2), b), whole[n], rtol=1e-12, atol=1e-15)
            assert bool((out[n] == 5.0).all()), f"{n} was written"
        else:
            torch.testing.assert_close(out[n], whole[n], rtol=0, atol=0)
    with pytest.raises(ValueError, match="factored: unknown weight"):
        backward(prim, w, ctx, dz, cfg, pos_in, pos_out, grad_out=out, factors={}, factored=["head.bias"])


def test_the_pool_weights_are_updated_from_their_factors_and_never_written():
    """The engine's ``pool_factors``: the pool's two weights go to Adam by their gradients'
    factors, in one launch each, their part of the flat gradient buffer never written; they come
    first after the compute copy's prefix, so the other parameters without a copy stay one launch;
    and the training equals the written-out step's (float64)."""
    model, images, targets = _setup("three-layer", torch.float64, n=3)
    t = _engine(model, students=3)
    assert t.engine.pool_factors is None and not program_mod.pool_factors_by_default(TorchPrimitives(), 3)
    t.engine.pool_factors = True
    factored = t.fit(images, targets)
    prog = t.engine._program
    pool = ["attn.in_proj_weight", "attn.out_proj.weight"]
    st = prog.store
    # first after the compute copy's prefix: their blocks start 16-byte aligned (the prefix's
    # widths are multiples of 4 here), not behind the conv's one-element bias
    assert prog.factored == pool and st.names[st.n_lowp:st.n_lowp + 2] == pool
    assert [st.offsets[st.n_lowp + i] * 3 % 4 for i in range(2)] == [0, 0]
    # the blocks whose widths are not multiples of 4 (the conv's) last: every block before them
    # starts aligned for any S
    odd = [k % 4 != 0 for k in st.numels[st.n_lowp:]]
    assert odd == sorted(odd) and odd[-1] and st.names[-1] == "conv.bias"
    assert all(st.offsets[st.n_lowp + i] % 4 == 0 for i, o in enumerate(odd) if not o)
    for n in pool:
        assert bool((prog.store.grad_views[n] == 0).all()), f"{n}'s gradient was written"
        moved = prog.store.master_views[n] - dict(model.named_parameters())[n].detach()
        assert bool((moved != 0).all(-1).any()), n
    rest = prog.store.names[prog.store.n_lowp:]
    updates = prog._updates(rest)
    assert [u[5] is not None for u in updates] == [True, True, False]
    assert updates[2][0].shape[1] == sum(st.numels[st.n_lowp + 2:])
    t.engine.pool_factors = False
    written = t.fit(images, targets)
    assert t.engine._program.factored == []
    torch.testing.assert_close(factored.cls, written.cls, rtol=1e-12, atol=0)
    torch.testing.assert_close(factored.losses, written.losses, rtol=1e-12, atol=0)


def test_backward_grad_out_equals_returned_grads():
    model, images, _ = _setup("three-layer", torch.float64, n=2)
    cfg, prim = model.config, TorchPrimitives()
    names = weight_names(cfg)
    params = dict(model.named_parameters())
    w = {n: torch.stack([params[n].detach(), params[n].detach() * 1.1]) for n in names}   # S = 2
    pos_in, pos_out = model.pos_in(), model.pos_out()
    z, _, ctx = forward(prim, w, images[:, None], cfg, pos_in, pos_out, cdt=torch.float64)
    dz = torch.randn_like(z)
    g = backward(prim, w, ctx, dz, cfg, pos_in, pos_out)
    out = {n: torch.full_like(w[n], float("nan")) for n in names}           # unwritten -> NaN
    backward(prim, w, ctx, dz, cfg, pos_in, pos_out, grad_out=out)
    for n in names:
        torch.testing.assert_close(out[n], g[n], rtol=0, atol=0)
    # release=True: same gradients, and the saved activations are gone afterwards
    _, _, ctx2 = forward(prim, w, images[:, None], cfg, pos_in, pos_out, cdt=torch.float64)
    out2 = {n: torch.full_like(w[n], float("nan")) for n in names}
    backward(prim, w, ctx2, dz, cfg, pos_in, pos_out, grad_out=out2, release=True)
    for n in names:
        torch.testing.assert_close(out2[n], g[n], rtol=0, atol=0)
    assert ctx2.p is None and ctx2.f is None and all(a is None for a in ctx2.acts)


def test_torch_adam_matches_torch_optim():
    torch.manual_seed(0)
    p0 = torch.randn(2, 37, dtype=torch.float64)
    grads = [torch.randn(2, 37, dtype=torch.float64) for _ in range(3)]
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=3e-3, betas=(0.8, 0.95), eps=1e-6)
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    lowp = torch.empty(2, 37, dtype=torch.float32)
    step, lr = torch.zeros(1), torch.full((1,), 3e-3, dtype=torch.float64)
    for g in grads:
        ref.grad = g.clone()
        opt.step()
        step += 1
        TorchPrimitives().adam_(p, g, m, v, step, lr, 0.8, 0.95, 1e-6, lowp=lowp)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-13, atol=1e-15)
    assert torch.equal(lowp, p.float())


def test_torch_adam_with_bf16_moments_is_the_fp32_update_rounded_once():
    torch.manual_seed(1)
    p, g = torch.randn(2, 41), torch.randn(2, 41)
    m, v = torch.randn(2, 41).bfloat16(), torch.rand(2, 41).bfloat16()
    p32, m32, v32 = p.clone(), m.float(), v.float()
    step, lr = torch.full((1,), 3.0), torch.full((1,), 1e-3)
    TorchPrimitives().adam_(p, g, m, v, step, lr, 0.9, 0.999, 1e-8)
    TorchPrimitives().adam_(p32, g, m32, v32, step, lr, 0.9, 0.999, 1e-8)
    assert m.dtype == v.dtype == torch.bfloat16
    assert torch.equal(p, p32) and torch.equal(m, m32.bfloat16()) and torch.equal(v, v32.bfloat16())
    with pytest.raises(ValueError, match="one dtype for both moments"):
        TorchPrimitives().adam_(p, g, m, v.float(), step, lr, 0.9, 0.999, 1e-8)
    with pytest.raises(TypeError, match="exp_avg"):
        TorchPrimitives().adam_(p.double(), g, m, v, step, lr, 0.9, 0.999, 1e-8)   # fp64 masters: fp64 moments


@pytest.mark.parametrize("shape", BLOCK_SHAPES)
@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
def test_torch_adam_over_column_blocks_and_from_factors(moments, shape):
    check_block_adam(TorchPrimitives(), "cpu", moments, shape)


def test_adam_says_which_gradient_argument_is_wrong():
    p, g, m, v = (torch.zeros(2, 5, 3) for _ in range(4))
    step, lr = torch.ones(1), torch.full((1,), 1e-3)
    a, b = torch.zeros(2, 1, 5), torch.zeros(2, 1, 3)
    adam = TorchPrimitives().adam_
    with pytest.raises(ValueError, match="grads, outer: expected exactly one.*both"):
        adam(p, g, m, v, step, lr, 0.9, 0.999, 1e-8, outer=(a, b))
    with pytest.raises(ValueError, match="grads, outer: expected exactly one.*neither"):
        adam(p, None, m, v, step, lr, 0.9, 0.999, 1e-8)
    with pytest.raises(ValueError, match="outer: expected a pair"):
        adam(p.view(2, 15), None, m.view(2, 15), v.view(2, 15), step, lr, 0.9, 0.999, 1e-8, outer=(a, b))
    with pytest.raises(ValueError, match=r"outer\[1\]: expected shape \(2, 1, 3\), got \(2, 1, 4\)"):
        adam(p, None, m, v, step, lr, 0.9, 0.999, 1e-8, outer=(a, torch.zeros(2, 1, 4)))
    with pytest.raises(TypeError, match=r"outer\[0\]: expected dtype"):
        adam(p, None, m, v, step, lr, 0.9, 0.999, 1e-8, outer=(a.double(), b))
    with pytest.raises(ValueError, match="exp_avg: expected 3 dimensions"):
        adam(p, g, m.view(2, 15), v, step, lr, 0.9, 0.999, 1e-8)


def test_bf16_moments_halve_the_moments_and_keep_the_result():
    """moments='bf16': m and v stored in bf16 (4 B per parameter less), cls within a bf16 moment's
    rounding of the fp32-moment run (Adam divides m by sqrt(v): both round at 2^-9 relative, so a
    step moves by lr x ~1e-2 more or less; over 4 steps at lr 1e-2 a few 1e-3 of cls)."""
    model, images, targets = _setup("three-layer", torch.float32, n=3)
    full = _engine(model, students=3)
    half = _engine(model, students=3, moments="bf16")
    a, b = full.fit(images, targets), half.fit(images, targets)
    assert half.moments == "bf16" and full.moments == "fp32" and half.precision == full.precision == "fp32"
    st_a, st_b = full.engine.program(3).store, half.engine.program(3).store
    assert st_b.exp_avg.dtype == st_b.exp_avg_sq.dtype == torch.bfloat16 and st_a.exp_avg.dtype == torch.float32
    assert st_a.nbytes() - st_b.nbytes() == 2 * 2 * st_a.exp_avg.numel()
    rel = float((b.cls - a.cls).norm() / a.cls.norm())
    assert 0 < rel < 2e-2, rel
    torch.testing.assert_close(b.losses[:, 0], a.losses[:, 0])          # the first loss: before any update
    model64, images64, targets64 = _setup("two-layer", torch.float64, n=1)
    with pytest.raises(ValueError, match="'bf16' moments need fp32 master weights"):
        _engine(model64, moments="bf16")
    with pytest.raises(ValueError, match="moments: expected 'fp32', 'bf16' or None, got 'int8'"):
        _engine(model, moments="int8")


def test_a_table_without_bf16_moments_refuses_them_at_construction(monkeypatch):
    from apm_fast.ttt import engine as engine_mod

    class NoHalfMoments(TorchPrimitives):
        bf16_moments = False
    monkeypatch.setattr(engine_mod, "get_backend", lambda name, device=None: NoHalfMoments())
    model, _, _ = _setup("two-layer", torch.float32, n=1)
    with pytest.raises(ValueError, match="Adam keeps fp32 moments; moments='bf16' runs on"):
        _engine(model, moments="bf16")
    _engine(model)                                                        # fp32 moments: fine


def test_memory_budget_formula_for_ttt_l14():
    cfg = preset("ttt-l14")
    assert abs(count_params(cfg) - 22.0e6) < 0.1e6                          # spec: 22.0 M
    est = estimate_student_bytes(cfg, torch.bfloat16)
    assert 18 * count_params(cfg) < est <= 0.45e9                           # state + activations


def test_bad_arguments_are_named():
    model, images, targets = _setup("two-layer", torch.float64, n=2)
    with pytest.raises(ValueError, match="students"):
        _engine(model, students=0)
    with pytest.raises(ValueError, match="steps"):
        _engine(model, steps=0)
    with pytest.raises(ValueError, match="lr: expected a positive finite number, got inf"):
        _engine(model, lr=float("inf"))
    with pytest.raises(ValueError, match="precision"):
        _engine(model, precision="int8")
    with pytest.raises(ValueError, match="unknown name 'nope'"):
        _engine(model, backend="nope")
    with pytest.raises(ValueError, match="targets"):
        _engine(model).fit(images, targets[:1])
    with pytest.raises(ValueError, match="pool=False"):
        _engine(APM(preset("ttt-l14", **CONFIGS["two-layer"], pool=False)))


def test_the_engine_itself_checks_its_settings_and_program_calls():
    """TTTEngine (not only the trainer in front of it) refuses settings by name; the program
    refuses a students count that is not a positive integer and a step past its ``steps``; the
    trajectory's ``at`` takes integer step counts only."""
    from apm_fast.ttt.engine import TTTEngine

    model, images, targets = _setup("two-layer", torch.float64, n=2)
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    kw = dict(steps=2, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, backend="torch", snapshot=snap)
    for bad, match in ((dict(students=0), "students: expected a positive integer"),
                       (dict(students=-3), "students: expected a positive integer"),
                       (dict(steps=0), "steps: expected a positive integer"),
                       (dict(lr=-1.0), "lr: expected a positive finite number, got -1.0")):
        with pytest.raises(ValueError, match=match):
            TTTEngine(model, **{**kw, **bad})
    trainer = _engine(model, steps=2)
    for students in (2.5, None, True):
        with pytest.raises(ValueError, match="students: expected a positive integer"):
            trainer.program(students)
    prog = trainer.program(1)
    prog.load(images[:1], targets[:1])
    prog.step()
    prog.step()
    with pytest.raises(ValueError, match="step: this program takes 2 steps a batch"):
        prog.step()
    prog.reset()
    prog.step()                                   # a reset starts the count again
    for at in ((1.7,), (True,), ("2",)):
        with pytest.raises(TypeError, match="at: expected integer step counts"):
            trainer.trajectory(images, targets, at)
    for at in (3, None):
        with pytest.raises(TypeError, match="at: expected step counts"):
            trainer.trajectory(images, targets, at)
