"""Loading image files robustly and preprocessing them for the student."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from apm_fast import preset
from apm_fast.images import (IMAGENET_MEAN, IMAGENET_STD, ImageLoadError, find_images, load_image, normalize,
                             pixels, preprocess, preprocess_batch, to_pil)
from apm_fast.validation import check_images


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


# ---------------------------------------------------------------- loading
def test_modes_are_converted_to_rgb(tmp_path):
    gray = _save(Image.new("L", (5, 4), 77), tmp_path / "gray.png")
    rgba = _save(Image.new("RGBA", (5, 4), (10, 20, 30, 0)), tmp_path / "rgba.png")
    pal = Image.new("P", (5, 4), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal = _save(pal, tmp_path / "pal.gif", transparency=0)
    for path, pixel in ((gray, (77, 77, 77)), (rgba, (10, 20, 30)), (pal, (200, 100, 50))):
        img = load_image(path)
        assert img.mode == "RGB" and img.size == (5, 4)
        assert img.getpixel((2, 2)) == pixel, path.name


def test_16_bit_gray_is_scaled_not_clipped(tmp_path):
    a = np.full((4, 6), 32896, dtype=np.uint16)  # mid-gray in 16 bits (128 * 257)
    path = _save(Image.fromarray(a), tmp_path / "deep.png")
    img = load_image(path)
    assert img.mode == "RGB" and abs(img.getpixel((0, 0))[0] - 128) <= 1


def test_16_bit_gray_keeps_its_brightness_order(tmp_path):
    """A 16-bit file's values are scaled by the mode's range (0 to 65535), not by the image's own
    maximum: a dark 16-bit image stays dark, and brighter files give brighter pixels."""
    seen = []
    for v in (200, 255, 300, 1000, 32896, 65535):
        path = _save(Image.fromarray(np.full((4, 6), v, dtype=np.uint16)), tmp_path / f"deep{v}.png")
        assert Image.open(path).mode.startswith("I;16")
        seen.append(load_image(path).getpixel((0, 0))[0])
    assert seen == sorted(seen) and seen[0] <= 1 and seen[-1] == 255 and abs(seen[-2] - 128) <= 1


def test_corrupt_file_is_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\x00 definitely not a jpeg" * 20)
    with pytest.raises(ImageLoadError, match=r"broken.jpg'.*not an image") as info:
        load_image(bad)
    assert info.value.path == str(bad)


def test_truncated_file_is_named(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match=r"cut.jpg'.*cannot be read as an image"):
        load_image(cut)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageLoadError, match=r"nothere.png': no such file"):
        load_image(tmp_path / "nothere.png")
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


def test_to_pil_from_arrays():
    a = np.zeros((3, 4, 3), dtype=np.uint8)
    a[..., 0] = 255
    assert to_pil(a).getpixel((0, 0)) == (255, 0, 0)
    assert to_pil(np.full((3, 4), 0.5)).getpixel((1, 1)) == (128, 128, 128)
    with pytest.raises(ValueError, match="expected an H x W or H x W x 3/4 array, got shape"):
        to_pil(np.zeros((3, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="NaN/Inf"):
        to_pil(np.full((3, 4), np.nan))
    with pytest.raises(TypeError, match="expected a PIL image, a file path, a numpy array or uint8 pixels, got int"):
        to_pil(3)


# ---------------------------------------------------------------- preprocessing
def test_preprocess_normalizes_with_imagenet_statistics():
    x = preprocess(Image.new("RGB", (30, 50), (255, 128, 0)), 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    for c, v in enumerate((255, 128, 0)):
        expected = (v / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(x[c], torch.full((16, 16), expected))


def test_preprocess_center_crop_versus_stretch():
    # a wide image whose left quarter is white: the centre crop cuts it away, stretching keeps it
    a = np.zeros((20, 80, 3), dtype=np.uint8)
    a[:, :20] = 255
    crop = preprocess(a, 20)
    stretch = preprocess(a, 20, crop=None)
    black = (0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    torch.testing.assert_close(crop[0], torch.full((20, 20), black))
    assert stretch[0, :, :3].min() > 1.0
    with pytest.raises(ValueError, match="crop: expected 'center' or None"):
        preprocess(a, 20, crop="left")


def test_the_stretch_is_bilinear_and_antialiased_as_the_authors_resize():
    """crop=None is the authors' TTT input, torchvision's Resize((S, S)): bilinear with an
    antialiasing filter when it shrinks (within a level of rounding; bicubic is off by ~8)."""
    import torch.nn.functional as F
    a = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    got = pixels(Image.fromarray(a), 20, crop=None).float()
    want = F.interpolate(torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float(), size=(20, 20),
                         mode="bilinear", antialias=True, align_corners=False)[0].round()
    assert (got - want).abs().max() <= 1


def test_preprocess_for_a_config_fits_the_model_which_refuses_other_sizes():
    cfg = preset("ttt-b16", grid=3, patch=5, hidden=(8,), dim=16)
    batch = preprocess_batch([Image.new("L", (9, 31), 3), np.zeros((40, 20, 4), dtype=np.uint8)], cfg)
    assert batch.shape == (2, 3, 15, 15)
    check_images(batch, cfg)                                     # accepted as is
    with pytest.raises(ValueError, match=r"expected 15 x 15 pixels .* got 16 x 15; resize with apm_fast.images.preprocess"):
        check_images(torch.zeros(1, 3, 16, 15), cfg)
    with pytest.raises(ValueError, match="expected 3 channels .* got 4"):
        check_images(torch.zeros(1, 4, 15, 15), cfg)
    with pytest.raises(ValueError, match="size: expected a positive int or an APMConfig"):
        preprocess(Image.new("RGB", (4, 4)), 0)
    with pytest.raises(ValueError, match="at least one image"):
        preprocess_batch([], cfg)


# ---------------------------------------------------------------- finding files
def test_find_images_expands_directories(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "sub/c.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    found = find_images([tmp_path, tmp_path / "missing.png"])
    assert [p.relative_to(tmp_path).as_posix() for p in found[:3]] == ["a.JPG", "b.png", "sub/c.webp"]
    assert found[3] == tmp_path / "missing.png"   # kept: reported when it fails to load
    assert len(find_images(tmp_path, recursive=False)) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files found"):
        find_images([tmp_path / "empty"])


def test_pixels_tensors_and_normalization():
    img = Image.fromarray(np.arange(30 * 20 * 3, dtype=np.uint8).reshape(20, 30, 3))
    px = pixels(img, 10)
    assert px.shape == (3, 10, 10) and px.dtype == torch.uint8
    # shorter side 20 -> 10 (scale 1/2): the crop is the middle 10 of the 15 resized columns
    full = torch.from_numpy(np.array(img.resize((15, 10), Image.BICUBIC))).permute(2, 0, 1)
    assert torch.equal(px, full[:, :, 2:12])
    t = torch.randint(0, 256, (3, 7, 9), dtype=torch.uint8)
    assert np.array_equal(np.asarray(to_pil(t)), t.permute(1, 2, 0).numpy())
    with pytest.raises(TypeError, match="uint8 pixels"):
        to_pil(torch.zeros(3, 4, 4))                  # float tensors are not pixels
    x = normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                                             (1 - 0.406) / 0.225]))
    # preprocess is exactly pixels then normalize (the loader's two halves)
    assert torch.equal(preprocess(img, 10), normalize(px))
