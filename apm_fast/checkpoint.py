"""Checkpoints: the authors' two state_dict layouts, and the package's own safetensors files."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

__all__ = ["official_key_map", "load_official_state_dict", "save_apm", "load_apm"]

_MHA_KEYS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
_FORMAT = "apm-fast/1"


def _mlp_official_names(n_layers: int):
    """A 3-layer MLP is fc1, fc4, fc5 (the authors' TTT model); a 5-layer one fc1 ... fc5; any
    other depth is numbered fc1 ... fcN."""
    if n_layers == 3:
        return ["fc1", "fc4", "fc5"]
    return [f"fc{i + 1}" for i in range(n_layers)]


def official_key_map(config) -> dict:
    """official key -> this package's key, for every key the config can hold."""
    m = {"conv1.weight": "conv.weight", "conv1.bias": "conv.bias",
         "feat_proj_head.weight": "head.weight", "feat_proj_head.bias": "head.bias"}
    for i, name in enumerate(_mlp_official_names(len(config.hidden))):
        m[f"{name}.weight"] = f"mlp.{i}.weight"
        m[f"{name}.bias"] = f"mlp.{i}.bias"
    if config.pool:
        for k in _MHA_KEYS:
            m[f"little_self_attention.{k}"] = f"attn.{k}"
        m["little_query"] = "query"
    if config.rgb_head:
        for i, j in ((1, 0), (2, 2), (3, 4)):
            m[f"rgb_head_{i}.weight"] = f"rgb.{j}.weight"
            m[f"rgb_head_{i}.bias"] = f"rgb.{j}.bias"
    return m


def _read_state_dict(obj, name="state_dict"):
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no checkpoint file at {str(path)!r}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{name}: {str(path)!r} is not a readable state_dict "
                             f"(loaded with weights_only=True): {exc}") from exc
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise TypeError(f"{name}: expected a dict of tensors or a path, got {type(obj).__name__}")
    return obj


def _shape(t):
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


@torch.no_grad()
def load_official_state_dict(model, state_dict, *, strict_unexpected: bool = True):
    """Copy the authors' weights into ``model``.

    Strict: every key the config needs must be present with exactly the expected shape; the
    first key that does not fit is named in the error. ``norm.*`` (unused by the authors'
    forward) is ignored; ``rgb_head_*`` is ignored with a warning when the config has no RGB
    head; ``little_*`` likewise when it has no pool. Other unknown keys are an error unless
    ``strict_unexpected=False``. A leading ``module.`` (DataParallel) is stripped.
    """
    sd = _read_state_dict(state_dict)
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    cfg = model.config
    kmap = official_key_map(cfg)
    own = dict(model.named_parameters())
    ignored_rgb, ignored_pool, unexpected = [], [], []
    for k in sd:
        if k in kmap:
            continue
        if k.startswith("norm."):
            continue
        if k.startswith("rgb_head_") and not cfg.rgb_head:
            ignored_rgb.append(k)
        elif k.startswith(("little_self_attention.", "little_query")) and not cfg.pool:
            ignored_pool.append(k)
        else:
            unexpected.append(k)
    if unexpected and strict_unexpected:
        raise KeyError(
            f"state_dict: key {unexpected[0]!r} has no place in this config ({len(cfg.hidden)}-layer "
            f"MLP {cfg.hidden}, pool={cfg.pool}, rgb_head={cfg.rgb_head}); the layout expects "
            f"{sorted(kmap)}" + (f" ({len(unexpected)} unexpected keys in all)" if len(unexpected) > 1 else ""))
    for ok, mk in kmap.items():
        if ok not in sd:
            raise KeyError(f"state_dict: missing key {ok!r} (for {mk!r}, shape {_shape(own[mk])})")
        v = sd[ok]
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state_dict: key {ok!r} holds {type(v).__name__}, expected a tensor")
        if tuple(v.shape) != tuple(own[mk].shape):
            raise ValueError(f"state_dict: key {ok!r} has shape {_shape(v)}, but this config expects "
                             f"{_shape(own[mk])} (for {mk!r})")
    for ok, mk in kmap.items():
        own[mk].copy_(sd[ok])
    if ignored_rgb:
        warnings.warn(f"load_official_state_dict: the config has no RGB head; ignored {len(ignored_rgb)} "
                      f"rgb_head_* keys", stacklevel=3)
    if ignored_pool:
        warnings.warn(f"load_official_state_dict: the config has no pool; ignored {len(ignored_pool)} "
                      f"little_* keys", stacklevel=3)
    return {"loaded": sorted(kmap), "ignored": sorted(ignored_rgb + ignored_pool), "unexpected": unexpected}


def save_apm(model, path):
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": _FORMAT, "config": json.dumps(model.config.to_dict())}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def load_apm(path, *, device=None):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .config import APMConfig
    from .model import APM

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no apm-fast checkpoint at {str(path)!r}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != _FORMAT or "config" not in meta:
        raise ValueError(f"path: {str(path)!r} is not an apm-fast checkpoint (no '{_FORMAT}' metadata); "
                         f"for the authors' files use APM.load_official_state_dict")
    cfg = APMConfig.from_dict(json.loads(meta["config"]))
    sd = load_file(str(path))
    dtype = next(iter(sd.values())).dtype if sd else None
    model = APM(cfg, dtype=dtype)
    model.load_state_dict(sd, strict=True)
    return model.to(device) if device is not None else model
