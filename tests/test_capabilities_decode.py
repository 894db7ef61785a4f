"""RGB decoding and perceptual interpolation: a tiny model overfit on one image decodes it well,
either checkpoint layout loads, the interpolation's end frames are the decodings of A and B."""
import json
import shutil

import pytest
import torch
from PIL import Image

from apm_fast import APM, preset
from apm_fast.capabilities.decoding import decode, infer_official_config, load_model, psnr
from apm_fast.capabilities.distillation import DistillSettings, distill, export_official
from apm_fast.capabilities.interpolation import interpolate
from apm_fast.cli import main, register_subcommand
from capability_helpers import photo, quiet_log, ssl_config, tiny_dino

for _name in ("decode", "interpolate"):
    register_subcommand(_name, f"apm_fast.commands.{_name}")


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """A tiny SSL model (8 x 8 grid of 4-pixel patches, widths 128, 128, 64) distilled for 250
    steps on 25 copies of one photo (one image per step, the teacher's targets cached)."""
    root = tmp_path_factory.mktemp("overfit")
    img = photo("astronaut")
    (root / "photos").mkdir()
    img.save(root / "photo.png")
    for i in range(25):
        shutil.copy(root / "photo.png", root / "photos" / f"copy{i:02d}.png")
    r = distill(root / "photos", tiny_dino(grid=8), root / "run", config=ssl_config(grid=8, hidden=(128, 128, 64)),
                settings=DistillSettings(epochs=10, batch=1, lr=1e-3, save_every=1000, cache_features=True),
                progress=False, log=quiet_log)
    return root, r.model


def test_a_model_overfit_on_one_image_decodes_it_above_30_db(overfit):
    """30 dB is an RMS error of 0.032 (8 / 255) per channel and cell. A constant colour, the best
    an RGB head can do without reading the image, reaches 10 log10(1 / variance) = 12.4 dB on
    these 64 cells; the untrained head about 11 dB. 250 steps of this tiny model reach 35-39 dB
    depending on the seed: above 30 dB the head has learnt every cell's colour."""
    root, model = overfit
    dec = decode(model, root / "photo.png", crop="center")
    baseline = psnr(float(dec.target.var(0).mean()))                  # the image's mean colour everywhere
    assert baseline < 13.0
    assert dec.psnr > 30.0, dec.psnr
    assert dec.rgb.shape == dec.target.shape == (64, 3) and dec.error.shape == (64,)
    assert dec.mse == pytest.approx(float(dec.error.mean()))


def test_decode_command_on_both_layouts(overfit, tmp_path, capsys):
    root, model = overfit
    ours = root / "run" / "model.safetensors"
    theirs = export_official(model, tmp_path / "authors.pth")
    psnrs = []
    for ckpt, layout in ((ours, "apm-fast"), (theirs, "authors")):
        out = tmp_path / layout
        assert main(["decode", str(root / "photo.png"), "--checkpoint", str(ckpt), "--crop", "center", "--out", str(out)]) == 0
        info = json.loads((out / "decode.json").read_text())
        assert info["layout"] == layout and info["input"] == "ssl"
        assert Image.open(out / "decode.png").size[0] > 4 * 64
        psnrs.append(info["psnr_db"])
    assert psnrs[0] == pytest.approx(psnrs[1], abs=1e-6) and psnrs[0] > 30.0
    assert "PSNR" in capsys.readouterr().out


def test_the_authors_config_is_read_off_the_shapes(tmp_path):
    cfg = preset("ssl-l14", grid=6, patch=3, hidden=(40, 40, 32, 24, 20), dim=12)
    torch.manual_seed(0)
    model = APM(cfg)
    sd = torch.load(export_official(model, tmp_path / "a.pth"), weights_only=True)
    got = infer_official_config(sd)
    assert (got.grid, got.patch, got.hidden, got.dim, got.pool, got.rgb_head) == (6, 3, (40, 40, 32, 24, 20), 12, False, True)
    ttt = APM(preset("ttt-l14", grid=4, patch=4, hidden=(32, 16, 8), dim=16, heads=4, rgb_head=True))
    got = infer_official_config(torch.load(export_official(ttt, tmp_path / "t.pth"), weights_only=True), heads=4)
    assert (got.hidden, got.pool, got.rgb_head, got.heads) == ((32, 16, 8), True, True, 4)
    loaded, layout = load_model(tmp_path / "t.pth", heads=4)
    assert layout == "authors" and torch.equal(loaded.query, ttt.query)
    with pytest.raises(ValueError, match="not in the authors' layout"):
        infer_official_config({"foo": torch.zeros(1)})


def test_decode_after_ttt_trains_the_trunk(tmp_path):
    """A TTT model with an RGB head: --ttt trains it on the image first (a tiny CLIP teacher)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_clip import random_teacher, write_config

    cfgp = write_config(tmp_path)
    ckpt = tmp_path / "teacher.pt"
    torch.save(random_teacher(cfgp, seed=5).model.state_dict(), ckpt)
    torch.manual_seed(0)
    APM(preset("ttt-b16", grid=4, patch=4, hidden=(32, 16), dim=24, heads=4, rgb_head=True, init="pytorch")).save(
        tmp_path / "ttt.safetensors")
    photo("coffee").save(tmp_path / "coffee.png")
    argv = ["decode", str(tmp_path / "coffee.png"), "--checkpoint", str(tmp_path / "ttt.safetensors"), "--out",
            str(tmp_path / "plain")]
    assert main(argv) == 0
    assert main(argv[:-1] + [str(tmp_path / "ttt"), "--ttt", "--teacher", str(cfgp), "--pretrained", str(ckpt),
                             "--steps", "5", "--lr", "1e-2"]) == 0
    plain = json.loads((tmp_path / "plain" / "decode.json").read_text())
    ttt = json.loads((tmp_path / "ttt" / "decode.json").read_text())
    assert plain["ttt"] is None and plain["input"] == "imagenet"
    assert len(ttt["ttt"]["losses"]) == 5 and ttt["ttt"]["losses"][-1] < ttt["ttt"]["losses"][0]
    assert ttt["psnr_db"] != plain["psnr_db"]                      # the trunk changed, so did the read-out
    # how it trained, as apm-fast ttt's records state it (a CPU here: the torch table, fp32)
    assert {k: ttt["ttt"][k] for k in ("backend", "precision", "moments", "teacher_precision")} == {
        "backend": "torch", "precision": "fp32", "moments": "fp32", "teacher_precision": "fp32"}
    assert main(argv[:-1] + [str(tmp_path / "ttt64"), "--ttt", "--teacher", str(cfgp), "--pretrained", str(ckpt),
                             "--steps", "2", "--precision", "fp64"]) == 0
    assert json.loads((tmp_path / "ttt64" / "decode.json").read_text())["ttt"]["precision"] == "fp64"


@pytest.mark.parametrize("extra", [["--precision", "bf16"], ["--steps", "5"], ["--normalize-target"],
                                   ["--teacher", "ViT-B-32"], ["--seed", "1"]])
def test_decode_refuses_the_options_of_ttt_without_ttt(tmp_path, capsys, extra):
    """Nothing would use them: refused in one line naming the option, nothing written."""
    model = APM(preset("ttt-b16", grid=4, patch=4, hidden=(16,), dim=8, heads=2, rgb_head=True))
    model.save(tmp_path / "m.safetensors")
    photo("coffee").save(tmp_path / "c.png")
    argv = ["decode", str(tmp_path / "c.png"), "--checkpoint", str(tmp_path / "m.safetensors"),
            "--out", str(tmp_path / "o")]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert err == f"apm-fast decode: error: {extra[0]}: expected with --ttt (an option of the test-time training), " \
                  f"given without it\n"
    assert not (tmp_path / "o").exists()
    assert main(argv) == 0                                        # the defaults given by no one are fine


@pytest.mark.parametrize("extra, message", [
    (["--backend", "reference"], "--backend: --ttt runs on the engine; expected torch, triton or cuda, got reference"),
    (["--backend", "warp"], "--backend: unknown name 'warp'"),
    (["--precision", "fp64", "--backend", "torch"], None),
])
def test_decode_checks_the_training_options_before_the_teacher(tmp_path, capsys, monkeypatch, extra, message):
    from apm_fast.commands import common

    monkeypatch.setattr(common, "build_teacher", lambda *a, **k: pytest.fail("built the teacher first"))
    APM(preset("ttt-b16", grid=4, patch=4, hidden=(16,), dim=8, heads=2, rgb_head=True)).save(tmp_path / "m.safetensors")
    photo("coffee").save(tmp_path / "c.png")
    argv = ["decode", str(tmp_path / "c.png"), "--checkpoint", str(tmp_path / "m.safetensors"),
            "--out", str(tmp_path / "o"), "--ttt", *extra]
    if message is None:                                           # good options: on to the teacher
        with pytest.raises(pytest.fail.Exception, match="built the teacher first"):
            main(argv)
        return
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"apm-fast decode: error: {message}")


def test_decode_refuses_a_model_without_rgb_head(tmp_path):
    APM(preset("ttt-b16", grid=4, patch=4, hidden=(16,), dim=8, heads=2)).save(tmp_path / "m.safetensors")
    photo("coffee").save(tmp_path / "c.png")
    assert main(["decode", str(tmp_path / "c.png"), "--checkpoint", str(tmp_path / "m.safetensors"),
                 "--out", str(tmp_path / "o")]) == 2


# ---------------------------------------------------------------------------- interpolation
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_interpolation_end_frames_are_the_decodings_of_a_and_b(dtype):
    torch.manual_seed(0)
    model = APM(ssl_config(grid=4, hidden=(32, 32, 24, 16, 16)), dtype=dtype)
    a, b = photo("astronaut"), photo("coffee")
    res = interpolate(model, a, b, 5)
    assert res.weights == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert res.rgb.shape == (5, 16, 3) and res.grids.shape == (5, 16, 16) and len(res.colours) == 5
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
    for frame, img in ((0, a), (-1, b)):
        dec = decode(model, img)
        assert torch.allclose(res.rgb[frame], dec.rgb, **tol)
        from apm_fast.images import pixels
        from apm_fast.capabilities.inputs import student_input

        grid = model(student_input(pixels(img, model.config, crop=None)[None], "ssl").to(dtype), backend="torch").grid
        assert torch.allclose(res.grids[frame].double(), grid[0].double(), atol=1e-5)
    # the middle frame is asked with the mean trigger
    assert torch.allclose(res.triggers[2], (res.triggers[0] + res.triggers[-1]) / 2, atol=1e-6)


def test_interpolate_command(tmp_path):
    torch.manual_seed(0)
    APM(ssl_config(grid=4, hidden=(32, 24, 16))).save(tmp_path / "m.safetensors")
    photo("astronaut").save(tmp_path / "a.png")
    photo("rocket", size=(30, 50)).save(tmp_path / "b.png")
    out = tmp_path / "out"
    assert main(["interpolate", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--checkpoint",
                 str(tmp_path / "m.safetensors"), "--frames", "4", "--size", "32", "--out", str(out)]) == 0
    info = json.loads((out / "interpolation.json").read_text())
    assert info["frames"] == 4 and info["weights"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert Image.open(out / "interpolation.gif").n_frames == 4 + 2            # there and back
    png = Image.open(out / "interpolation.png")
    assert png.width == 6 * 32 + 5 * 4                                        # A, 4 frames, B
    with pytest.raises(SystemExit) as exc:              # argparse: at least the two ends
        main(["interpolate", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--checkpoint",
              str(tmp_path / "m.safetensors"), "--frames", "1", "--out", str(out)])
    assert exc.value.code == 2


def test_the_python_api_names_its_bad_arguments_and_round_trips_a_safetensors_export(tmp_path):
    """export_official to a .safetensors name writes what load_model reads back; a chunk, heads or
    px out of their range is refused by name (a negative chunk used to return unwritten memory)."""
    torch.manual_seed(0)
    model = APM(ssl_config(grid=4, hidden=(24, 16)))
    path = export_official(model, tmp_path / "authors.safetensors")
    loaded, kind = load_model(path)
    assert kind == "authors"
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    a, b = photo("coffee"), photo("astronaut")
    for chunk in (-1, 0, 1.5):
        with pytest.raises(ValueError, match="chunk: expected a positive integer"):
            interpolate(model, a, b, 3, chunk=chunk)
    torch.save(model.state_dict(), tmp_path / "own.pth")
    pth = export_official(model, tmp_path / "authors.pth")
    for heads in (0, -2, True):
        with pytest.raises(ValueError, match="heads: expected a positive integer"):
            load_model(pth, heads=heads)
    s = model.config.image_size
    with pytest.raises(TypeError, match=rf"px: expected 3 x {s} x {s} uint8 pixels, got torch.int64"):
        decode(model, None, px=torch.randint(0, 255, (3, s, s)))


def test_checkpoints_are_told_by_content_not_by_suffix(tmp_path):
    """APM.save writes safetensors whatever the name, and load_model reads it back under any name;
    the authors' layout in safetensors under a torch name, and a torch file under another name,
    load through load_model and load_official_state_dict alike."""
    from apm_fast.checkpoint import is_safetensors_file

    torch.manual_seed(0)
    model = APM(ssl_config(grid=4, hidden=(24, 16)))
    model.save(tmp_path / "model.pt")
    loaded, kind = load_model(tmp_path / "model.pt")
    assert kind == "apm-fast" and loaded.config == model.config
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    export_official(model, tmp_path / "authors.safetensors").rename(tmp_path / "authors.pth")
    export_official(model, tmp_path / "authors.bin")                        # a torch file
    assert is_safetensors_file(tmp_path / "authors.pth") and not is_safetensors_file(tmp_path / "authors.bin")
    for name in ("authors.pth", "authors.bin"):
        loaded, kind = load_model(tmp_path / name)
        assert kind == "authors" and loaded.config == model.config.replace(init="pytorch"), name
        back = APM(model.config)
        back.load_official_state_dict(tmp_path / name)
        for (n, a), b, c in zip(model.state_dict().items(), loaded.state_dict().values(), back.state_dict().values()):
            assert torch.equal(a, b) and torch.equal(a, c), (name, n)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    for load in (load_model, APM(model.config).load_official_state_dict):
        with pytest.raises(ValueError, match=r"garbage.safetensors' is not a safetensors file"):
            load(tmp_path / "garbage.safetensors")
