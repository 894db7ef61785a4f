"""Crafted or broken checkpoints: refused before anything is built or overwritten, with one line
naming the file."""
import contextlib
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import save_file

from apm_fast import APM, preset

CFG = dict(grid=4, patch=2, hidden=(24, 16), dim=16, heads=2)


class NotATensor:
    """A Python object that a weights-only torch.load refuses to unpickle."""


def _model(**over):
    torch.manual_seed(0)
    return APM(preset("ttt-b16", **{**CFG, **over}))


def _write_own(path, tensors, config):
    save_file(tensors, str(path), metadata={"format": "apm-fast/1", "config": json.dumps(config)})
    return path


# ---------------------------------------------------------------- the package's own safetensors
def test_crafted_config_is_refused_before_building_the_model(tmp_path, monkeypatch):
    model = _model()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    config["grid"] = 64                       # 8192-wide columns: a 270 MB model from a 10 KB file
    config["hidden"] = [8192, 16]
    path = _write_own(tmp_path / "crafted.safetensors", sd, config)
    built = []
    real_init = APM.__init__

    def spy(self, cfg, **kw):
        built.append((cfg, kw))
        return real_init(self, cfg, **kw)

    monkeypatch.setattr(APM, "__init__", spy)
    with pytest.raises(ValueError, match=r"crafted.safetensors'.*'mlp.0.weight'.*\(24, 32\).*\(8192, 8192\)"):
        APM.load(path)
    assert all(str(kw.get("device")) == "meta" for _, kw in built), "no model may be allocated"


@pytest.mark.parametrize("edit, message", [
    (lambda sd, c: c.update(pool="False"), r"bad.safetensors'.*pool: expected True or False"),
    (lambda sd, c: c.update(hidden="24"), r"bad.safetensors'.*hidden: expected a tuple or list"),
    (lambda sd, c: sd.update({"conv.weight": sd["conv.weight"].to(torch.int32)}),
     r"bad.safetensors'.*'conv.weight' has dtype torch.int32.*floating"),
    (lambda sd, c: sd.update({"head.bias": sd["head.bias"].double()}),
     r"bad.safetensors'.*one dtype for all tensors.*float64 \('head.bias'\)"),
    (lambda sd, c: sd.update({"query": torch.full_like(sd["query"], math.nan)}),
     r"bad.safetensors'.*'query'.*NaN/Inf"),
    (lambda sd, c: sd.pop("attn.out_proj.bias"), r"bad.safetensors'.*missing 1 key.*'attn.out_proj.bias'"),
    (lambda sd, c: sd.update({"extra": torch.zeros(1)}), r"bad.safetensors'.*unexpected 1 key.*'extra'"),
])
def test_own_checkpoint_contents_are_checked(tmp_path, edit, message):
    model = _model()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    edit(sd, config)
    path = _write_own(tmp_path / "bad.safetensors", sd, config)
    with pytest.raises((ValueError, TypeError), match=message):
        APM.load(path)


def test_not_a_safetensors_file_is_one_line(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"garbage.safetensors' is not a safetensors file") as info:
        APM.load(bad)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- the authors' layout
@contextlib.contextmanager
def _left_unchanged(model):
    """Every parameter and buffer of ``model`` is as it was when the block ends."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    yield
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _authors(model):
    from apm_fast.checkpoint import official_key_map

    own = dict(model.named_parameters())
    return {ok: own[mk].detach().clone() * 2 for ok, mk in official_key_map(model.config).items()}


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.complex64])
def test_non_floating_tensors_are_refused(dtype):
    model = _model()
    sd = _authors(model)
    sd["fc1.weight"] = sd["fc1.weight"].to(dtype)
    with _left_unchanged(model), \
            pytest.raises(TypeError, match=rf"'fc1.weight' has dtype {dtype}, expected a floating-point tensor"):
        model.load_official_state_dict(sd)


def test_non_finite_weights_are_refused_and_nothing_is_overwritten(tmp_path):
    model = _model()
    sd = _authors(model)
    sd["feat_proj_head.bias"][3] = math.inf      # the last key checked: earlier ones would be copied
    path = tmp_path / "authors.pth"
    torch.save(sd, path)
    with _left_unchanged(model), pytest.raises(ValueError, match=r"authors.pth'.*'feat_proj_head.bias'.*NaN/Inf"):
        model.load_official_state_dict(path)


def test_a_failure_while_copying_leaves_every_parameter_as_it_was(monkeypatch):
    model = _model()
    sd = _authors(model)
    calls = []
    real = torch.Tensor.copy_

    def flaky(self, src, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost (test)")
        return real(self, src, *a, **kw)

    with _left_unchanged(model):
        monkeypatch.setattr(torch.Tensor, "copy_", flaky)
        with pytest.raises(RuntimeError, match="device lost"):
            model.load_official_state_dict(sd)
        monkeypatch.undo()


def test_a_pickle_with_python_objects_gets_one_line_without_torch_advice(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"fc1.weight": torch.zeros(1), "meta": NotATensor()}, path)
    with pytest.raises(ValueError) as info:
        _model().load_official_state_dict(path)
    msg = str(info.value)
    assert "pickled.pth" in msg and "not a weights-only checkpoint" in msg and "NotATensor" in msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg and "\n" not in msg


def test_a_torchscript_archive_and_garbage_get_one_line(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)     # torch.jit.script, deprecated
        torch.jit.script(Tiny()).save(str(tmp_path / "scripted.pt"))
    with pytest.raises(ValueError, match=r"scripted.pt' is a TorchScript archive, not a state_dict") as info:
        _model().load_official_state_dict(tmp_path / "scripted.pt")
    assert "weights_only" not in str(info.value)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint" * 4)
    with pytest.raises(ValueError, match=r"garbage.pth' is not a readable PyTorch checkpoint") as info:
        _model().load_official_state_dict(tmp_path / "garbage.pth")
    assert "\n" not in str(info.value)


def test_wrong_keys_list_a_few_of_each_and_the_counts():
    model = _model()
    sd = {f"encoder.layer{i}.weight": torch.zeros(1) for i in range(20)}     # some other model
    sd["fc1.weight"] = _authors(model)["fc1.weight"]
    with pytest.raises(KeyError) as info:
        model.load_official_state_dict(sd)
    msg = str(info.value)
    assert msg.startswith("state_dict: ") and "missing 12 keys" in msg and "unexpected 20 keys" in msg
    assert "(+7 more)" in msg and "(+15 more)" in msg
    assert sum(f"encoder.layer{i}.weight" in msg for i in range(20)) == 5
    assert len(msg) < 800
