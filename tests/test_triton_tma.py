"""The TMA-descriptor variants of the GEMM and weight-gradient kernels, the materialized first layer,
and how a config is chosen (explicit, measured table, ranking, autotuning).

Without a GPU these run in Triton's interpreter (TMA descriptors included), on small shapes whose
widths are multiples of 8 (a descriptor needs 16-byte aligned rows) and whose row counts are odd
(L = 25: tiles run past an image's last row into the next image's or student's rows, which TMA
loads as they are; the kernels must keep them out of every stored value and of the r sums).
fp32 checks the indexing exactly; fp16 (right in the interpreter, unlike bf16) checks the 16-bit
path: the reference is float64 on the same fp16 inputs, so the error is the fp16 rounding of the
outputs (2^-11) and, in the first layer, of ReLU(P + u) before the product: 4e-3 of the largest
magnitude is ~4x that.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from apm_fast.kernels import _common, configs, gemm, wgrad                # noqa: E402
from apm_fast.kernels.configs import GemmCfg, WgradCfg                     # noqa: E402
from apm_fast.ops.contract import TorchPrimitives, first_layer_act         # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
REF = TorchPrimitives()
INTERP = _common.INTERPRET
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}
# the interpreter's tile; on a GPU a real one (these tests then run the compiled kernels)
T = (16, 16, 16, 4, 1) if INTERP else (64, 64, 32, 4, 3)
TMA = GemmCfg(*T, group=2, tma=True)
TMA_P = GemmCfg(*T, group=2, tma=True, persistent=True)
PTR = GemmCfg(*T, group=2)
WT = (16, 16, 16, 4, 1) if INTERP else (64, 64, 16, 4, 3)      # (bn, bk, bm: rows per step)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv("APM_FAST_POISON_OUTPUTS", "1")


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEV, dtype=dtype)


def f64(*ts):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in ts]


def close(got, ref, tol, name):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    got = got.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten or broken element)"
    err = (got - ref).abs().max().item() / (ref.abs().max().item() or 1.0)
    assert err <= tol, f"{name}: max error {err:.3e} of the reference's magnitude (tolerance {tol:.1e})"


# In the interpreter fp32 checks the indexing exactly and fp16 the 16-bit path; on a GPU the TMA
# kernels serve 16-bit operands (fp32 mode keeps the pointer kernels): fp16 and bf16 (outputs
# rounded to 2^-9: 1e-2 of the largest magnitude).
DTYPES = [torch.float32, torch.float16] if INTERP else [torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16"] if INTERP else ["fp16", "bf16"]
TOL[torch.bfloat16] = 1e-2


# ------------------------------------------------------------------------------------ GEMMs
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("cfg", [TMA, TMA_P], ids=["tma", "persistent"])
def test_linear_tma(dtype, cfg):
    torch.manual_seed(0)
    w, b = rand(2, 24, 40, dtype=dtype, scale=0.3), rand(2, 24, dtype=dtype)
    for x in (rand(2, 50, 40, dtype=dtype), rand(2, 48, 40, dtype=dtype), rand(50, 40, dtype=dtype)):
        # 50 rows: tiles run into the next student's rows (pointer stores); 48: TMA stores
        got = gemm.linear(x, w, b, relu=True, config=cfg)
        close(got, REF.linear(*f64(x, w, b), relu=True).to(dtype).double(), TOL[dtype], f"linear {tuple(x.shape)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_first_layer_linear_tma_fused_and_materialized(dtype, monkeypatch):
    torch.manual_seed(1)
    p, u, w, b = rand(2, 25, 40, dtype=dtype), rand(2, 3, 40), rand(2, 24, 40, dtype=dtype, scale=0.3), rand(2, 24)
    ref = REF.first_layer_linear(*f64(p, u, w, b), relu=True)
    close(gemm.first_layer_linear(p, u, w, b, config=TMA_P), ref, TOL[dtype], "fused, TMA")
    monkeypatch.setattr(gemm, "ACT_CHUNK_ROWS", 50)            # chunks of 2 images: 2 + 1
    for cfg in (GemmCfg(*T, tma=True, materialize=True), GemmCfg(*T, materialize=True)):
        close(gemm.first_layer_linear(p, u, w, b, config=cfg), ref, TOL[dtype], cfg.name())


def test_first_layer_act_kernel():
    torch.manual_seed(2)
    p, u = rand(2, 25, 40), rand(2, 3, 40)
    close(gemm.first_layer_act(p, u, b0=1, nb=2), first_layer_act(*f64(p, u[:, 1:])), 1e-7, "act")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_linear_bwd_input_tma(dtype):
    torch.manual_seed(3)
    dy, w = rand(2, 50, 32, dtype=dtype), rand(2, 32, 40, dtype=dtype, scale=0.3)
    mask = torch.relu(rand(2, 50, 40, dtype=dtype))
    got = gemm.linear_bwd_input(dy, w, mask=mask, config=TMA)
    close(got, REF.linear_bwd_input(*f64(dy, w), mask=mask.double()).to(dtype).double(), TOL[dtype], "dx")
    assert (got[mask == 0] == 0).all()
    # a reduction width that is no multiple of the K tile would read the next student's rows of w
    with pytest.raises(ValueError, match="TMA"):
        gemm.linear_bwd_input(rand(2, 50, 24, dtype=dtype), rand(2, 24, 40, dtype=dtype), config=TMA)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_first_layer_bwd_input_tma(dtype):
    """25 rows per image: the last row tile of each image holds the next image's products, which
    must stay out of g1 and of r."""
    torch.manual_seed(4)
    dy, w, p, u = rand(2, 75, 32, dtype=dtype), rand(2, 32, 40, dtype=dtype, scale=0.3), rand(2, 25, 40, dtype=dtype), \
        rand(2, 3, 40)
    g1_ref, r_ref = REF.first_layer_bwd_input(*f64(dy, w, p, u))
    for cfg in (TMA, TMA_P):
        g1, r = gemm.first_layer_bwd_input(dy, w, p, u, config=cfg)
        close(g1, g1_ref.to(dtype).double(), TOL[dtype], "g1")
        close(r, r_ref, TOL[dtype], "r")


# ------------------------------------------------------------------------------------ weight grads
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("split", [1, 3])
def test_linear_bwd_weight_tma(dtype, split):
    torch.manual_seed(5)
    cfg = WgradCfg(*WT, split=split, tma=True)
    cases = [(rand(2, 48, 24, dtype=dtype), rand(2, 48, 40, dtype=dtype)),     # 2 students, 48 = 3 x 16 rows
             (rand(1, 50, 24, dtype=dtype), rand(1, 50, 40, dtype=dtype)),     # one: TMA zero-fills the tail
             (rand(2, 48, 24, dtype=dtype), rand(48, 40, dtype=dtype))]        # shared x
    for dy, x in cases:
        dw, db = wgrad.linear_bwd_weight(dy, x, config=cfg)
        dw_ref, db_ref = REF.linear_bwd_weight(*f64(dy, x))
        close(dw, dw_ref, TOL[dtype], f"dw {tuple(x.shape)}")
        close(db, db_ref, TOL[dtype], "db")
    with pytest.raises(ValueError, match="TMA"):       # 50 rows per student, several students
        wgrad.linear_bwd_weight(rand(2, 50, 24, dtype=dtype), rand(2, 50, 40, dtype=dtype), config=cfg)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_first_layer_bwd_weight_tma(dtype):
    torch.manual_seed(6)
    for s_, b_, l_ in ((2, 2, 32), (1, 1, 25)):
        dy, p, u = rand(s_, b_ * l_, 24, dtype=dtype), rand(s_, l_, 40, dtype=dtype), rand(s_, b_, 40)
        dw_ref, db_ref = REF.first_layer_bwd_weight(*f64(dy, p, u))
        for split in (1, 2):
            dw, db = wgrad.first_layer_bwd_weight(dy, p, u, config=WgradCfg(*WT, split=split, tma=True))
            close(dw, dw_ref, TOL[dtype], f"dw S={s_} L={l_} split={split}")
            close(db, db_ref, TOL[dtype], "db")


def test_weight_grad_into_given_buffers():
    """out / out_db: strided views of a flat buffer are written in place (split-K zeroes them first)."""
    torch.manual_seed(7)
    dy, x = rand(2, 50, 24), rand(2, 50, 40)
    flat = torch.full((2, 24 * 40 + 24 + 5), float("nan"), device=DEV)
    out = flat[:, :960].view(2, 24, 40)
    out_db = flat[:, 960:984]
    for split in (None, 3):
        dw, db = wgrad.linear_bwd_weight(dy, x, split=split, out=out, out_db=out_db)
        assert dw.data_ptr() == out.data_ptr() and db.data_ptr() == out_db.data_ptr()
        dw_ref, db_ref = REF.linear_bwd_weight(*f64(dy, x))
        close(out, dw_ref, TOL[torch.float32], "dw in place")
        close(out_db, db_ref, TOL[torch.float32], "db in place")
    assert torch.isnan(flat[:, 984:]).all(), "nothing outside the views may be written"


# ------------------------------------------------------------------------------------ choosing
def test_views_that_tma_can_describe():
    w = rand(2, 24, 48)
    assert _common.tma_ok(_common.as_rows(w))
    assert _common.tma_ok(_common.as_rows(w[:, :, 16:]))              # column slice: rows still 16-byte aligned
    assert not _common.tma_ok(_common.as_rows(w[:, :, 3:]))           # misaligned base
    assert _common.as_rows(w[:, :12]) is None                          # students not back to back
    assert not _common.tma_ok(_common.as_rows(rand(2, 24, 17)))        # 68-byte rows


def test_ranking_prefers_big_tiles_for_big_problems_and_one_wave_for_one_image():
    rank = lambda rows, n: configs.rank_gemm(configs.gemm_candidates(2, True), S=1, NSEG=1, L=rows, N=n,  # noqa: E731
                                             sms=132, elt=2, out_elt=2)[0]
    big = rank(65536, 2048)            # fc2 at 64 images
    assert big.tma and (big.bm, big.bn) in ((128, 256), (256, 128)) and big.persistent
    one = rank(1024, 2048)             # fc2 at one image: 8 x 16 tiles of 128 x 128 fill one wave
    assert one.tma and (one.bm, one.bn) == (128, 128)
    for c in configs.gemm_candidates(2, True):
        assert c.smem(2, 2) <= configs.SMEM_BUDGET or configs.rank_gemm([c], S=1, NSEG=1, L=1024, N=1024, sms=132,
                                                                          elt=2, out_elt=2)
    # the head's weight gradient at one image (48 tiles of 128 x 128): smaller tiles or a split
    tiles_of = lambda bn, bk: -(-768 // bn) * -(-1024 // bk)           # noqa: E731
    w = configs.rank_wgrad(configs.wgrad_candidates(2, True, tiles_of=tiles_of, rows=1024, sms=132),
                           tiles_of=tiles_of, rows=1024, sms=132, elt=2)[0]
    assert tiles_of(w.bn, w.bk) * w.split >= 66


def test_table_entry_is_used_as_is_for_its_gpu_then_its_architecture(monkeypatch):
    """A GPU's own entry first; a shape its block lacks from another GPU of the same compute
    capability; nothing from another architecture, for fp32, or off a GPU."""
    from apm_fast.kernels import tuned_configs

    key = ("linear", 1, 1, 1024, 768, 1024)
    other = ("linear", 1, 1, 1024, 1024, 2048)
    mine, theirs, old = (GemmCfg(128, 64, 64, 4, 4, tma=True), GemmCfg(64, 128, 64, 4, 3, tma=True),
                         GemmCfg(64, 64, 64, 4, 2))

    def block(cap, **entries):
        return {"capability": cap, "source": "test",
                "configs": {k: {"config": c.to_dict(), "tflops": 1, "cublas_tflops": 1} for k, c in entries.values()}}

    monkeypatch.setattr(tuned_configs, "TUNED", {
        "GPU A": block((9, 0), a=(key, theirs), b=(other, theirs)),
        "GPU B": block((9, 0), a=(key, mine)),
        "GPU C": block((8, 0), a=(key, old), b=(other, old))})
    monkeypatch.setattr(configs, "INTERPRET", False)
    gpus = {0: ("GPU B", (9, 0)), 1: ("GPU D", (9, 0)), 2: ("GPU E", (10, 0)), 3: ("GPU C", (8, 0))}
    monkeypatch.setattr(configs, "gpu_identity", lambda device: gpus[device.index] if device.type == "cuda"
                        else (None, None))
    cuda = [torch.device("cuda", i) for i in range(4)]
    assert configs.tuned_entry(*key[:1], key[1:], GemmCfg, 2, cuda[0]) == mine         # its own block
    assert configs.tuned_entry(*other[:1], other[1:], GemmCfg, 2, cuda[0]) == theirs   # its architecture's
    assert configs.tuned_entry(*key[:1], key[1:], GemmCfg, 2, cuda[1]) == theirs       # not swept: the first
    assert configs.tuned_entry(*key[:1], key[1:], GemmCfg, 2, cuda[2]) is None         # another architecture
    assert configs.tuned_entry(*key[:1], key[1:], GemmCfg, 2, cuda[3]) == old
    assert configs.tuned_entry(*key[:1], key[1:], GemmCfg, 4, cuda[0]) is None         # fp32: not measured
    assert configs.tuned_entry("linear", (2, 1, 1024, 768, 1024), GemmCfg, 2, cuda[0]) is None
    assert configs.tuned_entry(*key[:1], key[1:], GemmCfg, 2, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="unknown fields"):
        GemmCfg.from_dict({"bm": 128, "bn": 64, "bk": 64, "warps": 4, "stages": 4, "bogus": 1})


def test_the_tuned_table_is_what_the_sweep_writes():
    """kernels/tuned_configs.py is the rendering of its own TUNED that the sweep writes (so a
    sweep's file can be copied over it), every entry a valid config of its primitive."""
    from apm_fast.kernels import tuned_configs

    with open(tuned_configs.__file__) as fh:
        assert configs.render_tuned(tuned_configs.TUNED, tuned_configs.__doc__) == fh.read()
    for gpu, block in tuned_configs.TUNED.items():
        assert len(block["capability"]) == 2 and block["source"] and block["configs"], gpu
        for key, entry in block["configs"].items():
            (WgradCfg if "bwd_weight" in key[0] else GemmCfg).from_dict(entry["config"])
            assert entry["tflops"] > 0 and entry["cublas_tflops"] > 0, key


def test_autotuning_picks_the_fastest_once_and_outputs_stay_right(monkeypatch):
    """With autotuning on, every candidate runs on the same (NaN-poisoned) outputs before the real
    launch; r (atomics) and split-K outputs are zeroed by each launch. A stand-in clock makes the
    last candidate the fastest: it is picked, remembered, and never measured again."""
    calls = []

    def fake_bench(fn):
        fn()
        calls.append(1)
        return 10.0 - len(calls)

    monkeypatch.setattr(_common, "autotune_enabled", lambda: True)
    monkeypatch.setattr(_common, "bench", fake_bench)
    monkeypatch.setattr(_common, "_PICKED", {})
    monkeypatch.setenv("APM_FAST_AUTOTUNE_TOP", "3")
    torch.manual_seed(8)
    dy, w, p, u = rand(2, 75, 32), rand(2, 32, 40), rand(2, 25, 40), rand(2, 3, 40)
    g1_ref, r_ref = REF.first_layer_bwd_input(*f64(dy, w, p, u))
    for _ in range(2):
        g1, r = gemm.first_layer_bwd_input(dy, w, p, u)
        close(g1, g1_ref, TOL[torch.float32], "g1")
        close(r, r_ref, TOL[torch.float32], "r after the tuning runs")
    n_gemm = len(calls)
    picked = [v for k, v in _common._PICKED.items() if k[0] == "first_layer_bwd_input"]
    assert len(picked) == 1
    if INTERP:     # the interpreter's candidates: pointer, TMA, TMA persistent
        assert n_gemm == (3 if _common.HAS_TMA else 1)
        assert picked[0].persistent or not _common.HAS_TMA
    dy2, x = rand(1, 50, 24), rand(1, 50, 40)
    dw_ref, db_ref = REF.linear_bwd_weight(*f64(dy2, x))
    for _ in range(2):
        dw, db = wgrad.linear_bwd_weight(dy2, x)
        close(dw, dw_ref, TOL[torch.float32], "dw after the tuning runs")
        close(db, db_ref, TOL[torch.float32], "db")
    assert len(calls) > n_gemm and len(calls) - n_gemm <= 3


def test_variant_override_forbids_tma(monkeypatch):
    monkeypatch.setenv("APM_FAST_GEMM_VARIANT", "ptr")
    x, w = rand(1, 48, 40), rand(1, 24, 40)
    prob = gemm._linear_problem(x, w, None, torch.empty(1, 48, 24, device=DEV), relu=False, S=1, M=48, N=24, K=40)
    assert prob.ranked() and not any(c.tma for c in prob.ranked())


def test_backward_writes_weight_grads_in_place_with_the_triton_table():
    """The driver's backward with grad_out (views of one flat fp32 buffer): the Triton table's weight-gradient
    kernels get the views as out= (nothing copied) and the result equals the returned gradients; a
    table without ``wgrad_out`` gets the copy path, with the same result."""
    from apm_fast.backends.triton import TritonPrimitives
    from apm_fast.config import APMConfig
    from apm_fast.model import APM
    from apm_fast.ops.driver import backward, forward, weight_names

    cfg = APMConfig(grid=4, patch=2, hidden=(24, 16, 8), dim=8, heads=2)
    torch.manual_seed(9)
    model = APM(cfg, dtype=torch.float32, device=DEV)
    names = weight_names(cfg)
    params = dict(model.named_parameters())
    w = {n: params[n].detach()[None] for n in names}
    pos_in, pos_out = model.pos_in(), model.pos_out()
    images = rand(1, 2, 3, 8, 8)

    class Spy(TritonPrimitives):
        outs = []

        def linear_bwd_weight(self, dy, x, **kw):
            self.outs.append(kw.get("out") is not None)
            return super().linear_bwd_weight(dy, x, **kw)

    class NoOut(TritonPrimitives):
        """A table whose weight gradients cannot write into given buffers: the contract copies."""
        wgrad_out = False

    results = []
    for prim in (Spy(), NoOut()):
        z, _, ctx = forward(prim, w, images, cfg, pos_in, pos_out, cdt=torch.float32)
        dz = torch.ones_like(z)
        g = backward(prim, w, ctx, dz, cfg, pos_in, pos_out)
        sizes = [w[n].numel() for n in names]
        flat = torch.full((1, sum(sizes)), float("nan"), device=DEV)
        views = {n: c.view(w[n].shape) for n, c in zip(names, flat.split(sizes, dim=1))}
        z, _, ctx = forward(prim, w, images, cfg, pos_in, pos_out, cdt=torch.float32)
        backward(prim, w, ctx, dz, cfg, pos_in, pos_out, grad_out=views)
        for n in names:
            torch.testing.assert_close(views[n], g[n], rtol=1e-5, atol=1e-6, msg=n)
        results.append(flat)
    assert Spy.outs[-3:] == [True, True, True], "head, fc3 and dW_P went straight into the buffer"
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_miscompiled_first_layer_configs_are_never_chosen():
    """The fused-prologue TMA variants that the H100 runs showed wrong (configs.known_bad) are not
    candidates for the first layer, are not in the tuned table for it, and stay candidates for the
    plain layers (where they are right)."""
    bad = [c for c in configs.gemm_candidates(2, True) if configs.known_bad(c, prologue=True)]
    assert {(c.bm, c.bn, c.warps) for c in bad} == {(128, 256, 8), (128, 64, 4)}
    first = configs.gemm_candidates(2, True, prologue=True)
    assert not set(bad) & set(first) and len(first) == len(configs.gemm_candidates(2, True)) - len(bad)
    assert all(not c.tma for c in configs.gemm_candidates(2, False, prologue=True)) \
        and len(configs.gemm_candidates(2, False, prologue=True)) == len(configs.gemm_candidates(2, False))
    from apm_fast.kernels.tuned_configs import TUNED

    for gpu, block in TUNED.items():
        for key, entry in block["configs"].items():
            if key[0] == "first_layer_linear":
                assert not configs.known_bad(GemmCfg.from_dict(entry["config"]), prologue=True), (gpu, key)
