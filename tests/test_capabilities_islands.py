"""Islands of agreement: the engine keeps the grid after chosen steps without changing the
training, the frames have the input's aspect and one per requested iteration, the CLI writes the
strip and the GIF."""
import json

import pytest
import torch
from PIL import Image

from apm_fast import APM, TestTimeTrainer, preset
from apm_fast.capabilities.agreement import islands, iterations, render_islands
from apm_fast.capabilities.pictures import fit_pca, project
from capability_helpers import photo

CFG = dict(grid=4, patch=4, hidden=(32, 24), dim=16, heads=4)


def _trainer(steps=12, lr=1e-2, backend="torch"):
    torch.manual_seed(0)
    return TestTimeTrainer(APM(preset("ttt-b16", init="pytorch", **CFG)), steps=steps, lr=lr, backend=backend)


def _inputs(n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randn(n, 16, generator=g)


def test_trajectory_trains_exactly_as_fit_does():
    """The same program, replayed with the eval phase in between: the same cls and losses (bit
    for bit at one image; two images side by side agree to rounding, as fit's students do)."""
    tr = _trainer()
    x, t = _inputs(2)
    one = tr.trajectory(x[:1], t[:1], at=[0, 5, 12])
    fit = tr.fit(x[:1], t[:1])
    assert sorted(one.grids) == [0, 5, 12] and one.grids[5].shape == (1, 16, 16)
    assert torch.equal(one.cls, fit.cls) and torch.equal(one.losses, fit.losses)
    two = tr.trajectory(x, t, at=[5])
    fit2 = tr.fit(x, t)
    assert two.grids[5].shape == (2, 16, 16)
    assert torch.allclose(two.cls, fit2.cls, atol=1e-3) and torch.allclose(two.losses, fit2.losses, rtol=1e-3)


def test_the_grid_kept_after_step_k_is_the_grid_of_the_weights_after_k_steps():
    x, t = _inputs(1)
    long = _trainer(steps=12).trajectory(x, t, at=[0, 7])
    short = _trainer(steps=7).trajectory(x, t, at=[], weights=True)
    model = _trainer().model
    assert torch.allclose(long.grids[0], model(x, backend="torch").grid, atol=1e-6)     # 0: the init
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in short.weights:
                p.copy_(short.weights[name][0])
    assert torch.allclose(long.grids[7], model(x, backend="torch").grid, atol=1e-6, rtol=1e-5)


def test_trajectory_needs_the_engine_and_valid_steps():
    x, t = _inputs(1)
    with pytest.raises(ValueError, match="not 'reference'"):
        _trainer(backend="reference").trajectory(x, t, at=[1])
    with pytest.raises(ValueError, match=r"at: expected step counts in \[0, 12\]"):
        _trainer().trajectory(x, t, at=[13])


def test_iterations():
    assert iterations(250, 50) == [50, 100, 150, 200, 250]
    assert iterations(10, 4) == [4, 8, 10]
    assert iterations(10, 4, at=[7, 0, 7]) == [0, 7]
    with pytest.raises(ValueError, match="every: expected a positive integer"):
        iterations(10, 0)


def test_frames_have_the_inputs_aspect_and_one_per_iteration(tmp_path):
    tr = _trainer()
    img = photo("astronaut", size=(90, 45))                                      # 2:1, not square
    x = torch.randn(3, 16, 16)
    res = islands(tr, x, torch.randn(16), [2, 6, 12])
    assert res.iterations == [2, 6, 12] and len(res.colours) == 3 and len(res.losses) == 12
    files = render_islands(res, img, tmp_path, height=40)
    assert [f.size for f in files["frames"]] == [(80, 40)] * 3                   # the input's 2:1
    gif = Image.open(files["gif"])
    assert gif.n_frames == 3
    strip = Image.open(files["png"])
    assert strip.height == 40 + 18                                                # panels and their captions


def test_pca_is_fitted_on_the_reference_and_shared():
    g = torch.Generator().manual_seed(0)
    last = torch.randn(64, 8, generator=g) * torch.tensor([5.0, 3, 1, 0.1, 0.1, 0.1, 0.1, 0.1])
    early = 0.01 * last
    c_early, c_last = project([early, last], [1])
    pca = fit_pca(last)
    assert torch.equal(c_last, pca(last)) and torch.equal(c_early, pca(early))
    assert float(c_last.std(0).min()) > 0.1                     # the reference uses the colour range
    assert float(c_early.std()) < float(c_last.std())           # early features: near the mean colour


def test_tsne_projection_when_scikit_learn_is_there():
    pytest.importorskip("sklearn")
    g = torch.Generator().manual_seed(0)
    cols = project([torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)], [1], "tsne")
    assert [c.shape for c in cols] == [(16, 3), (16, 3)]
    assert float(torch.cat(cols).min()) == 0.0 and float(torch.cat(cols).max()) == 1.0


def test_islands_command(tmp_path):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from tiny_clip import random_teacher, write_config

    from apm_fast.cli import main, register_subcommand

    register_subcommand("islands", "apm_fast.commands.islands")
    cfg = write_config(tmp_path)
    ckpt = tmp_path / "teacher.pt"
    torch.save(random_teacher(cfg, seed=5).model.state_dict(), ckpt)
    img = tmp_path / "wide.png"
    photo("chelsea", size=(60, 40)).save(img)
    out = tmp_path / "out"
    rc = main(["islands", str(img), "--teacher", str(cfg), "--pretrained", str(ckpt), "--grid", "4", "--patch", "4",
               "--hidden", "32,16", "--heads", "4", "--steps", "9", "--every", "3", "--lr", "1e-3", "--height", "30",
               "--out", str(out)])
    assert rc == 0
    info = json.loads((out / "islands.json").read_text())
    assert info["iterations"] == [3, 6, 9] and len(info["losses"]) == 9 and info["steps"] == 9
    assert (info["backend"], info["precision"], info["moments"], info["teacher_precision"]) == \
        ("torch", "fp32", "fp32", "fp32")
    gif = Image.open(out / "islands.gif")
    assert gif.n_frames == 3
    assert Image.open(out / "islands.png").height == 30 + 18


@pytest.mark.gpu
def test_gpu_trajectory_is_the_captured_fit_and_its_grids_match_eager():
    """On a GPU: the trajectory replays the same captured step as ``fit`` (bit-identical cls and
    losses), and its grids equal an eager run's to bf16 rounding."""
    import torch

    from apm_fast import APM, TestTimeTrainer, preset

    dev = torch.device("cuda")
    cfg = preset("ttt-l14", grid=8, patch=14, hidden=(512, 384, 256), dim=128, heads=8)
    at = [0, 4, 8]
    torch.manual_seed(0)
    tr = TestTimeTrainer(APM(cfg, device=dev), steps=8, lr=1e-3, backend="triton")
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size, device=dev)
    y = torch.randn(1, cfg.dim, device=dev)
    fit = tr.fit(x, y)
    traj = tr.trajectory(x, y, at)
    assert tr.engine.mode == "graph"
    assert torch.equal(traj.cls, fit.cls) and torch.equal(traj.losses, fit.losses)
    torch.manual_seed(0)
    eager = TestTimeTrainer(APM(cfg, device=dev), steps=8, lr=1e-3, backend="triton")
    eager.engine.graphs = False
    et = eager.trajectory(x, y, at)
    for k in at:
        a, b = traj.grids[k].float(), et.grids[k].float()
        assert float((a - b).abs().max() / b.abs().max()) < 2e-2, k


def test_islands_refuses_training_options_before_the_teacher_loads(tmp_path, monkeypatch, capsys):
    from apm_fast.cli import main, register_subcommand
    from apm_fast.commands import common

    register_subcommand("islands", "apm_fast.commands.islands")
    img = tmp_path / "a.png"
    photo("chelsea", size=(40, 40)).save(img)

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was built before the options were checked")

    monkeypatch.setattr(common, "build_teacher", no_teacher)
    for extra, flag in ((["--backend", "reference"], "--backend"), (["--backend", "warp"], "--backend")):
        try:
            rc = main(["islands", str(img), "--out", str(tmp_path / "o"), "--steps", "2", "--device", "cpu", *extra])
        except SystemExit as e:         # argparse's own refusals
            rc = e.code
        assert rc == 2
        err = capsys.readouterr().err
        assert flag in err and len(err.strip().splitlines()) == 1, err


def test_islands_steps_are_integer_counts_as_the_trajectory_takes():
    from apm_fast.capabilities.agreement import iterations

    assert iterations(10, 5) == [5, 10] and iterations(10, 5, at=[0, 10, 3]) == [0, 3, 10]
    for at in ("50", [2.7], [True], 3):
        with pytest.raises(TypeError, match="at: expected"):
            iterations(10, 5, at=at)
    with pytest.raises(ValueError, match="steps: expected a positive integer, got -5"):
        iterations(-5, 5)
