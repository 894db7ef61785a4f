"""Checkpoints: the authors' two state_dict layouts, and the package's own safetensors files.

Every file is checked *before* anything is built or overwritten, and every error is one line
naming the file: a checkpoint may come from anywhere, and a crafted one must not make this
process allocate gigabytes (a model built from a forged config), load silently wrong weights
(bool/int/complex tensors cast to floats, NaN/Inf) or leave a model half overwritten.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

__all__ = ["official_key_map", "load_official_state_dict", "save_apm", "load_apm", "CheckpointKeyError",
           "is_torchscript_archive", "is_safetensors_file", "torch_load_weights_only", "describe_load_error"]

_MHA_KEYS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
_FORMAT = "apm-fast/1"
_SHOWN = 5      # keys named per kind in a key-mismatch error (the counts give the rest)
_ST_HEADER_MAX = 100_000_000    # the largest header the safetensors format allows

# safetensors dtype names -> torch dtypes, for the check before any tensor is read
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointKeyError(KeyError):
    """The keys of a checkpoint do not fit the model (a KeyError, printed as a plain sentence:
    ``str(KeyError(msg))`` would quote it)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


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


# ---------------------------------------------------------------------------- reading files
def is_torchscript_archive(path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``: a zip holding code/ and
    constants.pkl, as OpenAI's CLIP .pt files are), told from the zip's directory alone."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names) and \
        any("/code/" in n or n.startswith("code/") for n in names)


def is_safetensors_file(path) -> bool:
    """Whether ``path`` holds safetensors bytes, told by its content whatever its suffix (``APM.save``
    writes safetensors to any name): an 8-byte little-endian header length, then the JSON header,
    which starts with ``{``. A torch file (a zip, or a pickle) never starts that way."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= _ST_HEADER_MAX


def torch_load_weights_only(path, what: str):
    """``torch.load(path, weights_only=True)`` on the CPU; a failure is one ValueError naming
    ``what`` (e.g. "state_dict 'x.pth'") and saying what the file is. torch's own text is not
    passed on: it recommends ``weights_only=False``, which would run code from the file."""
    if is_torchscript_archive(path):
        raise ValueError(f"{what} is a TorchScript archive, not a state_dict; save the weights with "
                         f"torch.save(model.state_dict(), path)")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, truncation, pickles: anything torch.load raises on foreign bytes
        raise ValueError(describe_load_error(exc, what)) from None


def describe_load_error(exc: BaseException, what: str) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused ``what``."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text \
            and "Unsupported operand" not in text:
        # a pickle, but of more than tensors: "GLOBAL module.Class" names what it refers to
        found = re.search(r"GLOBAL ([\w.]+)", text)
        held = f" (it holds {found.group(1)})" if found else ""
        return (f"{what} is not a weights-only checkpoint: it pickles Python objects other than "
                f"tensors and plain containers{held}, which are refused because unpickling them can "
                f"run code; save a plain dict of tensors (torch.save(model.state_dict(), path))")
    if "TorchScript" in text:
        return f"{what} is a TorchScript archive, not a state_dict"
    return f"{what} is not a readable PyTorch checkpoint ({_first_line(exc)})"


def _first_line(exc) -> str:
    """``Type: first line`` of an exception, without torch's advice about ``weights_only``."""
    text = str(exc).strip()
    line = (text.splitlines() or [""])[0]
    if "weights_only" in line or "Weights only" in line:
        inner = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        line = inner.group(1).strip() if inner else "refused by torch.load"
    return f"{type(exc).__name__}: {line[:200]}" if line else type(exc).__name__


def _read_state_dict(obj, name="state_dict"):
    """(dict of tensors, how errors name it) from a dict or a file: the one reader of state-dict
    files, which tells safetensors from a torch file by content (a file named ``.safetensors``
    that is not one is refused as such). A ``{"state_dict": {...}}`` wrapper is unwrapped, from a
    file or a dict alike."""
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        what = f"{name} {str(path)!r}"
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no checkpoint file at {str(path)!r}")
        if is_safetensors_file(path) or path.suffix == ".safetensors":
            from safetensors.torch import load_file
            try:
                return load_file(str(path)), what
            except Exception as exc:
                raise ValueError(f"{what} is not a safetensors file ({_first_line(exc)})") from None
        obj = torch_load_weights_only(path, what)
        held = "the file holds"
    else:
        what, held = name, "got"
        if not isinstance(obj, dict):
            raise TypeError(f"{name}: expected a dict of tensors or a path, got {type(obj).__name__}")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise TypeError(f"{what}: expected a dict of tensors, {held} {type(obj).__name__}")
    return obj, what


def _shape(t):
    return "(" + ", ".join(str(s) for s in t) + ")"


def _few(keys) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:_SHOWN])
    return shown + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def _key_mismatch(what, missing, unexpected, layout) -> str:
    """One line: how many keys are missing and unexpected, and the first few of each."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key{'s' if len(missing) > 1 else ''}: {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key{'s' if len(unexpected) > 1 else ''}: {_few(unexpected)}")
    return f"{what}: the keys do not fit {layout}; " + "; ".join(parts)


def _check_tensor(what, key, v, expected_shape=None):
    """A floating-point tensor of the expected shape with finite values, else one error naming
    the key (bool/int/complex would be cast silently: a bool tensor turns every weight to 1.0)."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{what}: key {key!r} holds {type(v).__name__}, expected a tensor")
    if expected_shape is not None and tuple(v.shape) != tuple(expected_shape):
        raise ValueError(f"{what}: key {key!r} has shape {_shape(v.shape)}, but this config expects "
                         f"{_shape(expected_shape)}")
    if not v.is_floating_point():
        raise TypeError(f"{what}: key {key!r} has dtype {v.dtype}, expected a floating-point tensor")
    finite = torch.isfinite(v)
    if not bool(finite.all()):
        raise ValueError(f"{what}: key {key!r} holds NaN/Inf ({int((~finite).sum())} of {v.numel()} "
                         f"values), expected finite weights")


# ---------------------------------------------------------------------------- the authors' layout
def zero_rgb_head(state_dict) -> bool:
    """Whether the ``rgb_head_*`` tensors of a state dict in the authors' layout are all zeros:
    the place-holders that :func:`~apm_fast.capabilities.export_official` writes for a config
    without an RGB head (so that the authors' TTT model, which always has one, loads the file
    strictly). False when there are none."""
    heads = [v for k, v in state_dict.items() if isinstance(k, str) and k.startswith("rgb_head_")]
    return bool(heads) and all(isinstance(v, torch.Tensor) and not bool(v.any()) for v in heads)


@torch.no_grad()
def load_official_state_dict(model, state_dict, *, strict_unexpected: bool = True):
    """Copy the authors' weights into ``model``: all of them, or none.

    ``state_dict``: a dict of tensors, or a path (``.safetensors``, or a torch file read with
    ``weights_only=True``: a file that pickles other Python objects is refused, in one line).
    Every key the config needs must be present with exactly the expected shape, a floating-point
    dtype (cast to the model's) and finite values; all of this is checked before the first
    parameter is written, and a failure while copying restores the parameters already written.
    Key mismatches name the first few missing and unexpected keys, with their counts.
    ``norm.*`` (unused by the authors' forward) is ignored; ``rgb_head_*`` is ignored when the
    config has no RGB head, with a warning unless they are all zeros (the place-holders of
    :func:`~apm_fast.capabilities.export_official`); ``little_*`` is ignored with a warning when
    it has no pool. Other unknown keys are an error unless ``strict_unexpected=False``. A
    ``{"state_dict": ...}`` wrapper (a dict or a file) is unwrapped and a leading ``module.``
    (DataParallel) is stripped.
    """
    sd, what = _read_state_dict(state_dict)
    sd = {(k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k): v for k, v in sd.items()}
    cfg = model.config
    kmap = official_key_map(cfg)
    own = dict(model.named_parameters())
    ignored_rgb, ignored_pool, unexpected = [], [], []
    for k in sd:
        if k in kmap:
            continue
        if not isinstance(k, str):
            unexpected.append(k)
        elif k.startswith("norm."):
            continue
        elif k.startswith("rgb_head_") and not cfg.rgb_head:
            ignored_rgb.append(k)
        elif k.startswith(("little_self_attention.", "little_query")) and not cfg.pool:
            ignored_pool.append(k)
        else:
            unexpected.append(k)
    missing = [k for k in kmap if k not in sd]
    if missing or (unexpected and strict_unexpected):
        layout = (f"this config ({len(cfg.hidden)}-layer MLP {cfg.hidden}, pool={cfg.pool}, "
                  f"rgb_head={cfg.rgb_head}; {len(kmap)} keys in the authors' layout)")
        raise CheckpointKeyError(_key_mismatch(what, missing, unexpected if strict_unexpected else [], layout))
    for ok, mk in kmap.items():
        _check_tensor(what, ok, sd[ok], own[mk].shape)
    # stage every value on the parameters' device and dtype first: a failure here writes nothing
    staged = {mk: sd[ok].to(device=own[mk].device, dtype=own[mk].dtype) for ok, mk in kmap.items()}
    backup = {mk: own[mk].detach().clone() for mk in staged}
    done = []
    try:
        for mk, v in staged.items():
            own[mk].copy_(v)
            done.append(mk)
    except BaseException:
        for mk in done:                      # all or nothing
            own[mk].copy_(backup[mk])
        raise
    if ignored_rgb and not zero_rgb_head(sd):
        warnings.warn(f"load_official_state_dict: the config has no RGB head; ignored {len(ignored_rgb)} "
                      f"rgb_head_* keys", stacklevel=3)
    if ignored_pool:
        warnings.warn(f"load_official_state_dict: the config has no pool; ignored {len(ignored_pool)} "
                      f"little_* keys", stacklevel=3)
    return {"loaded": sorted(kmap), "ignored": sorted(ignored_rgb + ignored_pool), "unexpected": unexpected}


# ---------------------------------------------------------------------------- the package's own files
def save_apm(model, path):
    """Weights and config to ``path`` (safetensors, whatever its suffix), atomically: a killed save
    leaves the old file or the new one, never half of one; the folder is created, the file gets the
    usual permissions. A model whose tensors do not all share one dtype (:func:`load_apm` builds
    the model in one) is refused before anything is written."""
    from safetensors.torch import save

    from .capabilities.files import atomic_write

    by_dtype = {}
    for k, v in model.state_dict().items():
        by_dtype.setdefault(v.dtype, []).append(k)
    if len(by_dtype) > 1:
        raise TypeError(f"model: expected one dtype for all tensors to save it to {str(path)!r}, found "
                        + ", ".join(f"{str(dt).replace('torch.', '')} ({_few(keys)})" for dt, keys in by_dtype.items())
                        + "; convert it first, e.g. model.to(torch.float32)")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": _FORMAT, "config": json.dumps(model.config.to_dict())}
    atomic_write(path, lambda f: f.write(save(tensors, metadata=meta)))


def _expected_shapes(cfg) -> dict:
    """name -> shape of every tensor of an APM with ``cfg``, from a model on the meta device
    (no memory is allocated, whatever the config's size)."""
    from .model import APM

    return {k: tuple(v.shape) for k, v in APM(cfg, device="meta").state_dict().items()}


def load_apm(path, *, device=None):
    """An APM from a file written by :func:`save_apm` (``APM.load``).

    Nothing is built from the file's metadata before it is checked against the file's tensors,
    read as headers (names, shapes, dtypes) without loading them: the config must be valid, its
    tensors must be exactly the file's (so a forged config cannot ask for more parameters than
    the file holds), all of one floating-point dtype; the values must be finite. Every error is
    one line naming the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .config import APMConfig
    from .model import APM

    path = Path(path)
    what = f"path {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"path: no apm-fast checkpoint at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            heads = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as exc:
        raise ValueError(f"{what} is not a safetensors file ({_first_line(exc)})") from None
    if meta.get("format") != _FORMAT or "config" not in meta:
        raise ValueError(f"path: {str(path)!r} is not an apm-fast checkpoint (no '{_FORMAT}' metadata); "
                         f"for the authors' files use APM.load_official_state_dict")
    try:
        cfg = APMConfig.from_dict(json.loads(meta["config"]))
    except (ValueError, TypeError) as exc:   # json.JSONDecodeError is a ValueError
        raise type(exc)(f"{what}: the config in its metadata is invalid: {exc}") from None
    expected = _expected_shapes(cfg)
    missing = [k for k in expected if k not in heads]
    unexpected = [k for k in heads if k not in expected]
    if missing or unexpected:
        raise ValueError(_key_mismatch(what, missing, unexpected, f"its config ({cfg})"))
    for k, shape in expected.items():
        if heads[k][0] != shape:
            raise ValueError(f"{what}: tensor {k!r} has shape {_shape(heads[k][0])}, but the config in its "
                             f"metadata needs {_shape(shape)}: the file does not hold that model")
    dtypes = {}
    for k, (_, st) in heads.items():
        dt = _ST_DTYPES.get(st)
        if dt is None or not dt.is_floating_point:
            raise TypeError(f"{what}: tensor {k!r} has dtype {dt or st}, expected a floating-point tensor")
        dtypes.setdefault(dt, k)
    if len(dtypes) > 1:
        raise TypeError(f"{what}: expected one dtype for all tensors, found "
                        + ", ".join(f"{str(dt).replace('torch.', '')} ({k!r})" for dt, k in dtypes.items()))
    sd = load_file(str(path))
    for k, v in sd.items():
        _check_tensor(what, k, v)
    model = APM(cfg, dtype=next(iter(dtypes)) if dtypes else None)
    model.load_state_dict(sd, strict=True)
    return model.to(device) if device is not None else model
