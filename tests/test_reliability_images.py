"""Image files that must not hang, blow up memory or vanish silently: bombs, FIFOs, sockets,
devices, symlink loops; in-memory images of no size or absurd shape."""
import io
import os
import re
import socket
import struct
import threading
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from apm_fast import images as images_mod
from apm_fast.images import (ImageDataset, ImageLoadError, SkippedFilesWarning, find_images, load_image,
                             normalize, pixels, preprocess, preprocess_batch, to_pil)


def _within(seconds, fn, *args, unblock=None):
    """fn(*args) in a thread; its exception or result, or a failure when it is still running
    after ``seconds`` (``unblock()`` then frees the stuck thread, e.g. by opening a FIFO's other end)."""
    box = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if unblock is not None:
            unblock()
        t.join(5)
        pytest.fail(f"{getattr(fn, '__name__', fn)} still running after {seconds} s (it hangs)")
    return box


def _png_declaring(path, width, height):
    """A tiny valid-looking PNG whose header declares width x height (its data is 1 x 1)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    # IHDR starts at byte 8: length (4), b"IHDR" (4), width (4), height (4), ..., CRC over type+data
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


# ---------------------------------------------------------------- item 1: image bombs
def test_extreme_aspect_ratio_is_refused_before_decoding(tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("L", (100_000, 1), 7).save(strip)       # 100 KB of pixels: resizing it keeps the ratio
    with pytest.raises(ImageLoadError, match=r"strip.png'.*100000 x 1 .*aspect ratio.*50") as info:
        load_image(strip)
    assert info.value.path == str(strip)
    assert images_mod.MAX_ASPECT_RATIO == 50


def test_declared_size_over_the_pixel_limit_is_refused_without_a_warning(tmp_path):
    big = _png_declaring(tmp_path / "big.png", 11_000, 10_000)      # 110 M pixels declared
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ImageLoadError, match=r"big.png'.*11000 x 10000 .*more than .*pixels"):
            load_image(big)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    huge = _png_declaring(tmp_path / "huge.png", 100_000, 100_000)  # PIL's own error: same message
    with pytest.raises(ImageLoadError, match=r"huge.png'.*more than .*pixels"):
        load_image(huge)


def test_pil_decompression_bomb_warning_becomes_the_error(tmp_path, monkeypatch):
    warned, refused = tmp_path / "warned.png", tmp_path / "refused.png"
    Image.new("RGB", (12, 12)).save(warned)      # 144 pixels: PIL warns (over 100) and would decode
    Image.new("RGB", (20, 20)).save(refused)     # 400 pixels: PIL raises (over twice 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)     # a stricter PIL limit is honoured
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no process-wide warning either
        with pytest.raises(ImageLoadError, match=r"warned.png'.*12 x 12 .*more than 100 pixels"):
            load_image(warned)
        with pytest.raises(ImageLoadError, match=r"refused.png'.*400 pixels, more than 100 pixels"):
            load_image(refused)


def test_a_bomb_is_one_skipped_image_in_a_run(tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("L", (5_000, 2)).save(strip)
    ok = tmp_path / "ok.png"
    Image.new("RGB", (10, 8)).save(ok)
    in_memory = Image.new("RGB", (5_000, 2))

    def teacher_preprocess(im):        # stands in for the teacher's resize: must not see a strip
        assert max(im.size) <= 50 * min(im.size), im.size
        return np.zeros(1)

    ds = ImageDataset([strip, ok, in_memory], teacher_preprocess, 8)
    item = ds[0]                       # (index, teacher view, ..., reason): the reason is last
    assert item[1] is None and "aspect ratio" in item[-1]
    assert ds[1][-1] is None
    assert "images[2]: 5000 x 2 pixels, an aspect ratio over 50:1" in ds[2][-1]


def test_in_memory_images_with_extreme_aspect_ratio_are_refused():
    with pytest.raises(ValueError, match=r"image: 200 x 1 pixels.*aspect ratio"):
        pixels(Image.new("RGB", (200, 1)), 8)
    assert pixels(Image.new("RGB", (200, 1)), 8, crop=None).shape == (3, 8, 8)   # a stretch is bounded


# ---------------------------------------------------------------- item 2: hangs and silent drops
@pytest.fixture
def odd_folder(tmp_path):
    """good.png, a FIFO, a socket, a link to /dev/null, a symlink loop and a broken symlink, all
    named like images, and a text file."""
    d = tmp_path / "photos"
    d.mkdir()
    Image.new("RGB", (6, 5), (1, 2, 3)).save(d / "good.png")
    os.mkfifo(d / "fifo.png")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(d / "sock.png"))
    except OSError as exc:   # path too long for AF_UNIX
        pytest.skip(f"cannot bind a unix socket here: {exc}")
    os.symlink(os.devnull, d / "null.png")
    os.symlink(d / "loop_b.png", d / "loop_a.png")
    os.symlink(d / "loop_a.png", d / "loop_b.png")
    os.symlink(d / "gone.png", d / "broken.png")
    (d / "notes.txt").write_text("ignored by extension, silently")
    yield d
    sock.close()


def _open_writer(fifo):
    """Free a reader stuck on ``fifo``: open and close its writing end."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_a_fifo_is_refused_without_hanging(odd_folder):
    fifo = odd_folder / "fifo.png"
    box = _within(10, load_image, fifo, unblock=lambda: _open_writer(fifo))
    assert isinstance(box.get("error"), ImageLoadError), box
    assert "fifo.png'" in str(box["error"]) and "FIFO" in str(box["error"])


@pytest.mark.parametrize("name, what", [("sock.png", "socket"), ("null.png", "character device"),
                                        ("loop_a.png", "symbolic link loop"),
                                        ("broken.png", "broken symbolic link")])
def test_other_non_regular_files_say_what_they_are(odd_folder, name, what):
    with pytest.raises(ImageLoadError, match=f"{name}'.*{what}"):
        load_image(odd_folder / name)


def test_find_images_reports_what_it_skips_in_a_folder(odd_folder):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        found = find_images([odd_folder])
    assert found == [odd_folder / "good.png"]
    (w,) = [w for w in seen if issubclass(w.category, SkippedFilesWarning)]
    text = str(w.message)
    assert "skipped 6" in text
    for name, what in (("fifo.png", "FIFO"), ("sock.png", "socket"), ("null.png", "character device"),
                       ("loop_a.png", "symbolic link loop"), ("broken.png", "broken symbolic link")):
        assert name in text and what in text, (name, text)
    assert "notes.txt" not in text
    # the same as a list, without a warning
    skipped = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_images(odd_folder, skipped=skipped) == [odd_folder / "good.png"]
    assert sorted(p.name for p, _ in skipped) == ["broken.png", "fifo.png", "loop_a.png", "loop_b.png",
                                                 "null.png", "sock.png"]


def test_an_explicitly_named_fifo_is_kept_and_reported_when_loaded(odd_folder):
    fifo = odd_folder / "fifo.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_images([fifo]) == [fifo]
    ds = ImageDataset([fifo], lambda im: im, 8)
    box = _within(10, ds.__getitem__, 0, unblock=lambda: _open_writer(fifo))
    assert "FIFO" in box["result"][-1]


# ---------------------------------------------------------------- item 5: images of no size
@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (4, 0, 3), (0, 0, 1)])
def test_empty_arrays_are_refused_naming_the_argument(shape):
    with pytest.raises(ValueError, match=r"images\[2\]: expected an image of at least 1 x 1 pixels"):
        to_pil(np.zeros(shape, dtype=np.uint8), name="images[2]")
    with pytest.raises(ValueError, match=r"image: expected an image of at least 1 x 1 pixels"):
        preprocess(np.zeros(shape, dtype=np.float32), 8)


def test_empty_pil_image_and_tensor_are_refused():
    import torch

    with pytest.raises(ValueError, match="image: expected an image of at least 1 x 1 pixels, got 0 x 0"):
        pixels(Image.new("RGB", (0, 0)), 8)
    with pytest.raises(ValueError, match="expected an image of at least 1 x 1 pixels"):
        to_pil(torch.zeros(3, 0, 4, dtype=torch.uint8))


def test_a_pil_image_is_upright_as_its_file_is(tmp_path):
    """A camera JPEG whose EXIF says "rotate": the path and the opened PIL image give the same
    upright picture (the one pipeline whatever the caller passes)."""
    from PIL import Image

    img = Image.new("RGB", (60, 40), (200, 10, 10))
    exif = img.getexif()
    exif[0x0112] = 6                                 # Orientation: rotate 90 degrees clockwise
    path = tmp_path / "camera.jpg"
    img.save(path, exif=exif)
    from_path, from_pil = load_image(path), to_pil(Image.open(path))
    assert from_path.size == from_pil.size == (40, 60)
    assert torch.equal(pixels(from_path, 16), pixels(Image.open(path), 16))


def test_float_pixels_outside_0_1_are_refused_not_clipped():
    import numpy as np

    assert pixels(np.full((8, 8, 3), 0.5, np.float32), 8)[0, 0, 0] == 128
    for bad, shown in ((np.full((8, 8, 3), 100.0), "[100, 100]"), (np.full((8, 8, 3), -1.5), "[-1.5, -1.5]")):
        with pytest.raises(ValueError, match=rf"image: expected float pixels in \[0, 1\], got values in {re.escape(shown)}"):
            pixels(bad, 8)
    with pytest.raises(TypeError, match="px: expected uint8 pixels"):
        normalize(torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match=r"images\[2\]: expected an H x W or H x W x 3/4 array"):
        preprocess_batch([np.zeros((8, 8, 3), np.uint8)] * 2 + [np.zeros((8, 8, 2), np.uint8)], 8)


def test_find_images_leaves_hidden_entries_out_and_reports_linked_folders(tmp_path):
    from PIL import Image

    (tmp_path / "real").mkdir()
    for rel in ("a.jpg", "real/c.png", ".hidden/h.png", "._a.jpg", "b.avif"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.jpg")
    (tmp_path / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    skipped = []
    found = find_images(tmp_path, skipped=skipped)
    assert found == [tmp_path / "a.jpg", tmp_path / "b.avif", tmp_path / "real" / "c.png"]
    assert skipped == [(tmp_path / "linked", "a symbolic link to a directory (not followed)")]
    (tmp_path / "x.heic").write_bytes(b"not really")
    with pytest.raises(ImageLoadError, match=r"\.heic files need pillow-heif"):
        load_image(tmp_path / "x.heic")
