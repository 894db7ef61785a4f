"""The authors' two checkpoint layouts load into the package's modules; own files round-trip."""
import os
import stat
import warnings

import pytest
import torch
import torch.nn as nn

from apm_fast import APM, preset
from helpers import images_for, rel_err


def _authors_ttt_state_dict(cfg, seed=3):
    """A state_dict shaped like the authors' TTT model (fc1, fc4, fc5, feat_proj_head,
    little_self_attention, little_query, an unused norm, rgb_head_*), random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.1
    h, d, D, c = cfg.hidden, cfg.column_dim, cfg.dim, cfg.pos_dim
    sd = {"conv1.weight": r(1, 3, cfg.patch, cfg.patch), "conv1.bias": r(1),
          "norm.weight": r(c), "norm.bias": r(c)}
    names = ["fc1", "fc4", "fc5"] if len(h) == 3 else [f"fc{i + 1}" for i in range(len(h))]
    widths = (d,) + tuple(h)
    for i, n in enumerate(names):
        sd[f"{n}.weight"], sd[f"{n}.bias"] = r(widths[i + 1], widths[i]), r(widths[i + 1])
    sd["feat_proj_head.weight"], sd["feat_proj_head.bias"] = r(D, h[-1]), r(D)
    if cfg.pool:
        sd["little_self_attention.in_proj_weight"] = r(3 * D, D)
        sd["little_self_attention.in_proj_bias"] = r(3 * D)
        sd["little_self_attention.out_proj.weight"] = r(D, D)
        sd["little_self_attention.out_proj.bias"] = r(D)
        sd["little_query"] = r(D)
    sd["rgb_head_1.weight"], sd["rgb_head_1.bias"] = r(256, D + d), r(256)
    sd["rgb_head_2.weight"], sd["rgb_head_2.bias"] = r(256, 256), r(256)
    sd["rgb_head_3.weight"], sd["rgb_head_3.bias"] = r(3, 256), r(3)
    return sd


def _independent_forward(sd, cfg, x):
    """The authors' forward written out from their layout, without the package's modules."""
    from apm_fast.posenc import position_code

    names = ["fc1", "fc4", "fc5"] if len(cfg.hidden) == 3 else [f"fc{i + 1}" for i in range(len(cfg.hidden))]
    t = torch.nn.functional.conv2d(x, sd["conv1.weight"], sd["conv1.bias"], stride=cfg.patch).flatten(1)
    pos = position_code(cfg.pos_dim, cfg.grid, cfg.grid, dtype=torch.float64)
    B, L = t.shape[0], pos.shape[0]
    col = torch.cat([t[:, None].expand(B, L, -1), pos[None].expand(B, L, -1)], -1)
    h = col
    for n in names:
        h = torch.relu(h @ sd[f"{n}.weight"].T + sd[f"{n}.bias"])
    f = h @ sd["feat_proj_head.weight"].T + sd["feat_proj_head.bias"]
    z = None
    if cfg.pool:
        mha = nn.MultiheadAttention(cfg.dim, cfg.heads, batch_first=True, dtype=torch.float64)
        mha.load_state_dict({k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("little_self")})
        kv = f + position_code(cfg.dim, cfg.grid, cfg.grid, dtype=torch.float64)[None]
        z = mha(sd["little_query"].expand(B, 1, -1), kv, kv)[0][:, 0]
    return z, f


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_ttt_layout_loads_and_matches_independent_forward(backend):
    cfg = preset("ttt-l14", grid=5, patch=3, hidden=(40, 24, 16), dim=24, heads=4)
    sd = _authors_ttt_state_dict(cfg)
    model = APM(cfg, dtype=torch.float64)
    with pytest.warns(UserWarning, match="no RGB head; ignored 6 rgb_head"):
        info = model.load_official_state_dict(sd)
    assert "norm.weight" not in info["loaded"]
    x = images_for(model, 2)
    z_ref, f_ref = _independent_forward(sd, cfg, x)
    out = model(x, backend=backend)
    assert rel_err(out.cls, z_ref) < 1e-12 and rel_err(out.grid, f_ref) < 1e-12


def test_five_layer_ssl_layout_with_rgb_head_loads():
    cfg = preset("ssl-l14", grid=4, patch=2, hidden=(30, 28, 26, 20, 12), dim=16)
    sd = _authors_ttt_state_dict(cfg)
    model = APM(cfg, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.load_official_state_dict(sd)
    assert torch.equal(model.mlp[3].weight, sd["fc4.weight"])
    assert torch.equal(model.rgb[4].weight, sd["rgb_head_3.weight"])
    z_ref, f_ref = _independent_forward(sd, cfg, images_for(model, 1))
    assert rel_err(model(images_for(model, 1), backend="torch").grid, f_ref) < 1e-12


def test_shape_mismatch_names_first_bad_key():
    cfg = preset("ttt-l14", grid=5, patch=3, hidden=(40, 24, 16), dim=24, heads=4)
    sd = _authors_ttt_state_dict(cfg)
    sd["fc4.weight"] = torch.zeros(24, 41, dtype=torch.float64)
    model = APM(cfg, dtype=torch.float64)
    before = model.mlp[0].weight.clone()
    with pytest.raises(ValueError, match=r"'fc4.weight' has shape \(24, 41\), but this config expects \(24, 40\)"):
        model.load_official_state_dict(sd)
    assert torch.equal(model.mlp[0].weight, before), "nothing may be copied when a key does not fit"


def test_missing_and_unexpected_keys():
    cfg = preset("ttt-l14", grid=5, patch=3, hidden=(40, 24, 16), dim=24, heads=4)
    model = APM(cfg, dtype=torch.float64)
    sd = _authors_ttt_state_dict(cfg)
    del sd["little_query"]
    with pytest.raises(KeyError, match="missing 1 key: 'little_query'"):
        model.load_official_state_dict(sd)
    sd = _authors_ttt_state_dict(cfg)
    sd["fc2.weight"] = torch.zeros(3)
    with pytest.raises(KeyError, match="unexpected 1 key: 'fc2.weight'"):
        model.load_official_state_dict(sd)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        model.load_official_state_dict("/nonexistent/apm.pth")


def test_loads_from_torch_file_with_module_prefix(tmp_path):
    cfg = preset("ttt-l14", grid=5, patch=3, hidden=(40, 24, 16), dim=24, heads=4)
    sd = {f"module.{k}": v for k, v in _authors_ttt_state_dict(cfg).items() if not k.startswith("rgb")}
    path = tmp_path / "apm.pth"
    torch.save(sd, path)
    model = APM(cfg, dtype=torch.float64)
    model.load_official_state_dict(str(path))
    assert torch.equal(model.query, sd["module.little_query"])


def test_own_safetensors_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = APM(preset("ttt-b16", grid=4, patch=2, hidden=(24, 16), dim=16, heads=2, rgb_head=True))
    path = tmp_path / "new" / "folder" / "m.safetensors"        # the folder is made
    old_mask = os.umask(0o022)
    try:
        model.save(path)
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644                  # not a temporary file's 0600
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temporary file left
    loaded = APM.load(path)
    assert loaded.config == model.config
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.safetensors.pth")
    with pytest.raises(FileNotFoundError):
        APM.load(tmp_path / "missing.safetensors")


def test_save_refuses_a_model_of_mixed_dtypes_before_writing(tmp_path):
    """APM.load builds the model in one dtype, so APM.save refuses a model whose tensors have
    several, naming them and the way out, and writes nothing (an older file stays as it was)."""
    model = APM(preset("ssl-l14", grid=4, patch=2, hidden=(32, 32, 32, 16, 8), dim=16))
    path = tmp_path / "m.safetensors"
    model.save(path)
    before = path.read_bytes()
    model.rgb.double()
    with pytest.raises(TypeError) as info:
        model.save(path)
    msg = str(info.value)
    assert msg.startswith(f"model: expected one dtype for all tensors to save it to {str(path)!r}, found float32 (")
    assert "float64 ('rgb.0.weight', 'rgb.0.bias'" in msg and "model.to(torch.float32)" in msg and "\n" not in msg
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    with pytest.raises(TypeError, match="expected one dtype"):
        model.save(tmp_path / "new" / "m.safetensors")
    assert not (tmp_path / "new").exists()
    model.to(torch.float64).save(path)                  # the way out the message names
    assert APM.load(path).dtype == torch.float64


def test_a_state_dict_wrapper_is_unwrapped_from_a_dict_as_from_a_file(tmp_path):
    """{"state_dict": ...} loads the same given as a dict or as a file."""
    cfg = preset("ttt-l14", grid=5, patch=3, hidden=(40, 24, 16), dim=24, heads=4, rgb_head=True)
    sd = _authors_ttt_state_dict(cfg)
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pth")
    for source in ({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pth"):
        model = APM(cfg, dtype=torch.float64)
        model.load_official_state_dict(source)
        assert torch.equal(model.query, sd["little_query"])
        assert torch.equal(model.rgb[0].weight, sd["rgb_head_1.weight"])
