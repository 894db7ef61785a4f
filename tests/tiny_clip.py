"""A tiny open_clip model for fast teacher tests (a 1-layer ViT and text transformer, D = 24)."""
import json
import warnings

import numpy as np
import torch
from PIL import Image

TINY_NAME = "apm-test-tiny-clip"
TINY_DIM = 24
TINY_CONFIG = {
    "embed_dim": TINY_DIM,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_config(folder):
    """The config as a .json file open_clip can register (the model is named after the stem)."""
    path = folder / f"{TINY_NAME}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def random_teacher(config_path, seed=0, **kw):
    from apm_fast.teachers import OpenCLIPTeacher, RandomWeightsWarning

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return OpenCLIPTeacher(str(config_path), None, device="cpu", **kw)


def photo(seed, size=(40, 30)):
    """A random RGB PIL image (W x H = size)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def counting_text_calls(teacher, monkeypatch):
    """The lists of texts the teacher's text tower is run on from now on (one per batch)."""
    calls = []
    inner = teacher._encode_texts

    def counted(texts):
        calls.append(list(texts))
        return inner(texts)

    monkeypatch.setattr(teacher, "_encode_texts", counted)
    return calls
