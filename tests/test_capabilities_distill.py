"""SSL grid distillation: the loss goes down, a killed run resumes to the same weights, the
authors' layout round-trips, the SSL input and the token alignment are what the spec says."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from apm_fast import APM
from apm_fast.capabilities.distillation import (STATE_FILE, DistillSettings, distill, epoch_order, export_official,
                                           official_state_dict)
from apm_fast.capabilities.inputs import cell_colours, preprocess_ssl, ssl_normalize
from capability_helpers import photo, photo_folder, quiet_log, ssl_config, tiny_dino, write_dino_json

SETTINGS = DistillSettings(epochs=3, batch=4, lr=1e-3, save_every=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return photo_folder(tmp_path_factory.mktemp("distill") / "photos")


def _run(folder, out, settings=SETTINGS, **kw):
    return distill(folder, tiny_dino(), out, config=ssl_config(), settings=settings, progress=False, log=quiet_log, **kw)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_distillation_lowers_the_loss_and_writes_the_run(folder, tmp_path):
    r = _run(folder, tmp_path / "run", DistillSettings(epochs=4, batch=3, lr=2e-3, save_every=100))
    losses = [h["loss"] for h in r.history]
    assert r.finished and r.step == 4 * 2 and len(losses) == 4
    assert losses[-1] < 0.9 * losses[0], losses
    assert r.history[-1]["rgb_loss"] < r.history[0]["rgb_loss"]
    for name in ("run.json", STATE_FILE, "model.safetensors", "history.json"):
        assert (tmp_path / "run" / name).is_file(), name
    saved = APM.load(tmp_path / "run" / "model.safetensors")
    _same_weights(saved, r.model)
    assert json.loads((tmp_path / "run" / "history.json").read_text())[-1]["loss"] == pytest.approx(losses[-1])
    assert not list((tmp_path / "run").glob(".*.tmp"))          # no temporary file left behind


def test_a_stopped_run_resumes_to_the_same_weights(folder, tmp_path):
    """Stopping after k steps (a kill right after a checkpoint) and running again gives exactly
    the weights and the per-epoch losses of an uninterrupted run with the same seed."""
    whole = _run(folder, tmp_path / "whole")
    part = _run(folder, tmp_path / "part", stop_after=3)       # mid-epoch 2 (2 steps per epoch)
    assert not part.finished and part.step == 3 and len(part.history) == 1
    rest = _run(folder, tmp_path / "part")
    assert rest.finished and rest.step == whole.step == 6
    _same_weights(rest.model, whole.model)
    assert [h["loss"] for h in rest.history] == [h["loss"] for h in whole.history]


def test_a_stopped_run_with_cached_features_resumes_exactly(folder, tmp_path):
    s = DistillSettings(epochs=2, batch=4, lr=1e-3, save_every=1, cache_features=True)
    whole = _run(folder, tmp_path / "whole", s)
    assert len(list((tmp_path / "whole" / "features").glob("*.safetensors"))) == 6
    _run(folder, tmp_path / "part", s, stop_after=1)           # half of epoch 1's features cached
    rest = _run(folder, tmp_path / "part", s)
    _same_weights(rest.model, whole.model)


def test_more_epochs_extend_a_finished_run_and_other_settings_are_refused(folder, tmp_path):
    s1 = DistillSettings(epochs=1, batch=4, lr=1e-3)
    _run(folder, tmp_path / "run", s1)
    longer = _run(folder, tmp_path / "run", DistillSettings(epochs=2, batch=4, lr=1e-3))
    whole = _run(folder, tmp_path / "whole", DistillSettings(epochs=2, batch=4, lr=1e-3))
    _same_weights(longer.model, whole.model)
    with pytest.raises(ValueError, match=r"other settings.*settings\.lr: 0\.001 -> 0\.002"):
        _run(folder, tmp_path / "run", DistillSettings(epochs=2, batch=4, lr=2e-3))


def test_sigkill_then_resume_gives_the_uninterrupted_weights(folder, tmp_path):
    """A real kill (SIGKILL: no chance to clean up) of the command line while it trains: the same
    command run again continues from the last checkpoint and ends with the uninterrupted run's
    weights. The killed process sleeps 0.1 s per step so that the kill lands mid-run."""
    cfg = write_dino_json(tmp_path)
    out = tmp_path / "killed"
    argv = ["distill", str(folder), "--teacher", str(cfg), "--pretrained", "none", "--grid", "4", "--patch", "4",
            "--hidden", "48,48,32", "--epochs", "10", "--batch", "4", "--lr", "1e-3", "--save-every", "1",
            "--no-progress", "--out", str(out)]
    code = ("import sys, time, torch; torch.set_num_threads(%d)\n"
            "import apm_fast.capabilities.distillation as d\n"
            "step = d.train_step\n"
            "d.train_step = lambda *a: (time.sleep(0.1), step(*a))[1]\n"
            "from apm_fast.cli import main, register_subcommand\n"
            "register_subcommand('distill', 'apm_fast.commands.distill')\n"
            "sys.exit(main(sys.argv[1:]))" % torch.get_num_threads())
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and _saved_step(out / STATE_FILE) < 3:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    killed_at = _saved_step(out / STATE_FILE)
    assert 3 <= killed_at < 20
    from apm_fast.cli import main, register_subcommand

    register_subcommand("distill", "apm_fast.commands.distill")
    assert main(argv) == 0
    whole = _run(folder, tmp_path / "whole", DistillSettings(epochs=10, batch=4, lr=1e-3, save_every=1))
    _same_weights(APM.load(out / "model.safetensors"), whole.model)


def _saved_step(path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["progress"])["step"]
    except Exception:
        return -1


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = epoch_order(3, 5, 100)
    assert sorted(a) == list(range(100)) and a == epoch_order(3, 5, 100)
    assert a != epoch_order(3, 6, 100) and a != epoch_order(4, 5, 100)


def test_export_writes_the_authors_layout_that_loads_back(tmp_path):
    torch.manual_seed(0)
    cfg = ssl_config(hidden=(32, 32, 24, 16, 16))           # 5 layers, as the COCO model: fc1 ... fc5
    model = APM(cfg)
    path = export_official(model, tmp_path / "apm_coco_like.pth")
    sd = torch.load(path, weights_only=True)
    assert {"conv1.weight", "fc1.weight", "fc3.bias", "feat_proj_head.weight", "rgb_head_3.bias"} <= set(sd)
    assert not any(k.startswith(("mlp.", "rgb.", "head.")) for k in sd)
    back = APM(cfg)
    back.load_official_state_dict(str(path))
    _same_weights(back, model)
    # a TTT model (pool, 3-layer MLP: fc1, fc4, fc5) too
    from apm_fast import preset

    ttt = APM(preset("ttt-l14", grid=4, patch=4, hidden=(32, 16, 8), dim=16, heads=4, rgb_head=True))
    keys = set(official_state_dict(ttt))
    assert {"fc1.weight", "fc4.weight", "fc5.weight", "little_query", "little_self_attention.in_proj_weight"} <= keys


class _AuthorsTTTModel(torch.nn.Module):
    """The modules of the authors' TTT model (their code's names and shapes, for grid G, width
    widths of fc1, fc4, fc5 and D), which always has an RGB head and an unused LayerNorm over G^2."""

    def __init__(self, grid, patch, widths, dim):
        super().__init__()
        nn, c = torch.nn, grid * grid
        self.fc1, self.fc4, self.fc5 = nn.Linear(2 * c, widths[0]), nn.Linear(*widths[:2]), nn.Linear(*widths[1:])
        self.feat_proj_head = nn.Linear(widths[2], dim)
        self.rgb_head_1 = nn.Linear(dim + 2 * c, 256)
        self.rgb_head_2, self.rgb_head_3 = nn.Linear(256, 256), nn.Linear(256, 3)
        self.conv1 = nn.Conv2d(3, 1, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(c)
        self.little_self_attention = nn.MultiheadAttention(dim, 8, batch_first=True)
        self.little_query = nn.Parameter(torch.randn(dim))


@pytest.mark.parametrize("rgb_head", [False, True])
def test_a_pool_export_loads_strictly_into_the_authors_ttt_model(tmp_path, rgb_head):
    """A TTT config's export has every key of the authors' TTT model (their norm at its initial
    values; their RGB head as zeros when the config has none), so their code loads it with
    strict=True; it loads back here without a warning and with the config it came from."""
    import warnings

    from apm_fast import preset
    from apm_fast.capabilities.decoding import load_model

    torch.manual_seed(0)
    cfg = preset("ttt-l14", grid=4, patch=4, hidden=(32, 16, 8), dim=16, heads=4, rgb_head=rgb_head)
    model = APM(cfg)
    path = export_official(model, tmp_path / "ttt.pth")
    sd = torch.load(path, weights_only=True)
    theirs = _AuthorsTTTModel(4, 4, (32, 16, 8), 16)
    theirs.load_state_dict(sd, strict=True)
    assert torch.equal(theirs.norm.weight, torch.ones(16)) and torch.equal(theirs.norm.bias, torch.zeros(16))
    assert torch.equal(theirs.fc4.weight, model.mlp[1].weight) and torch.equal(theirs.little_query, model.query)
    heads = [p for n, p in theirs.named_parameters() if n.startswith("rgb_head_")]
    assert all(bool((p == 0).all()) for p in heads) != rgb_head
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = APM(cfg)
        back.load_official_state_dict(path)
        loaded, _ = load_model(path, heads=4)
    _same_weights(back, model)
    assert loaded.config == cfg.replace(init="pytorch")
    _same_weights(loaded, model)
    if not rgb_head:                   # a real RGB head in a config without one is still told
        sd["rgb_head_3.bias"] = torch.ones(3)
        with pytest.warns(UserWarning, match="no RGB head; ignored 6 rgb_head"):
            APM(cfg).load_official_state_dict(sd)
    assert not any(k.startswith("norm.") for k in official_state_dict(APM(ssl_config())))   # their COCO model has none


def test_preprocess_ssl_is_bgr_stretched_and_min_max_scaled():
    img = photo("coffee", size=(60, 40))
    x = preprocess_ssl(img, 28)
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0          # one global min-max
    from apm_fast.images import pixels

    px = pixels(img, 28, crop=None).float()                          # stretched, RGB
    lo, hi = px.min(), px.max()
    assert torch.allclose(x, ((px - lo) / (hi - lo)).flip(0), atol=1e-6)   # BGR
    assert torch.equal(ssl_normalize(torch.full((3, 4, 4), 7, dtype=torch.uint8)), torch.zeros(3, 4, 4))


def test_cell_colours_are_per_patch_averages_in_the_inputs_order():
    px = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    rgb = cell_colours(px, "imagenet", 4)
    assert rgb.shape == (1, 4, 3)
    assert torch.allclose(rgb[0, 1], px[0, :, 0:4, 4:8].float().mean((1, 2)) / 255)    # cell (y=0, x=1)
    bgr = cell_colours(px, "ssl", 4)
    assert torch.allclose(bgr[0, 2], ssl_normalize(px)[0, :, 4:8, 0:4].mean((1, 2)))


def test_cells_align_with_patch_tokens_and_the_authors_shift():
    t = tiny_dino(grid=4)
    x = t.preprocess(photo("astronaut"))[None]
    with torch.no_grad():
        tokens = t.model.forward_features(x)
    assert tokens.shape[1] == 1 + 16 and t.num_prefix_tokens == 1
    assert torch.equal(t.grid_targets(x), tokens[:, 1:])              # cell l <- patch l
    assert torch.equal(t.grid_targets(x, authors_shift=True), tokens[:, :16])   # token l: the [:-5] of reg4
    with pytest.raises(ValueError, match=r"expected B x 3 x 56 x 56"):
        t.grid_targets(x[:, :, :28])


def test_teacher_checkpoint_file_loads_weights_only(tmp_path):
    t = tiny_dino(grid=4)
    path = tmp_path / "dino.pth"
    torch.save(t.model.state_dict(), path)
    from apm_fast.teachers.dinov2 import DINOv2Teacher

    other = DINOv2Teacher("vit_small_patch14_dinov2", str(path), grid=6, device="cpu",
                          model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2})
    assert not other.random_weights and other.image_size == 84     # position embeddings resampled to 6 x 6
    assert torch.equal(other.model.blocks[0].mlp.fc1.weight, t.model.blocks[0].mlp.fc1.weight)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        DINOv2Teacher("vit_small_patch14_dinov2", str(tmp_path / "junk.pth"), grid=4, device="cpu",
                      model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2})


def test_distill_refuses_a_student_that_does_not_fit_the_teacher(folder, tmp_path):
    with pytest.raises(ValueError, match=r"grid 6 x dim 16 must equal the teacher's grid 4"):
        distill(folder, tiny_dino(), tmp_path, config=ssl_config(grid=6), progress=False, log=quiet_log)
    with pytest.raises(ValueError, match="batch: expected a positive integer, got 0"):
        DistillSettings(batch=0)


def test_a_distillation_without_one_readable_image_is_refused_not_finished(tmp_path):
    from apm_fast.capabilities.distillation import DistillSettings, distill
    from capability_helpers import ssl_config, tiny_dino

    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"images: none of the 2 image\(s\) could be read"):
        distill([tmp_path / "typo_folder", tmp_path / "broken.png"], tiny_dino(), tmp_path / "out",
                config=ssl_config(), settings=DistillSettings(epochs=1, batch=4), progress=False)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_the_model_file_of_a_finished_run_is_its_final_model(tmp_path):
    """A run stopped mid-way and continued with fewer epochs, or one killed while it wrote its
    model file: model.safetensors holds the model the finished run returns."""
    from apm_fast import APM
    from apm_fast.capabilities.distillation import DistillSettings, distill
    from capability_helpers import photo, ssl_config, tiny_dino

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, name in enumerate(("coffee", "astronaut", "chelsea", "rocket", "coffee", "astronaut")):
        photo(name).save(folder / f"{i}.png")
    out = tmp_path / "run"
    kw = dict(config=ssl_config(), progress=False)
    distill(folder, tiny_dino(), out, settings=DistillSettings(epochs=3, batch=2, lr=1e-3), stop_after=4, **kw)
    done = distill(folder, tiny_dino(), out, settings=DistillSettings(epochs=1, batch=2, lr=1e-3), **kw)
    assert done.finished
    saved = APM.load(out / "model.safetensors")
    for (n, a), b in zip(done.model.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a.cpu(), b), n
