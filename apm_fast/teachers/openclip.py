"""A teacher backed by any open_clip model (OpenAI CLIP, OpenCLIP, SigLIP, ...)."""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import socket
import urllib.parse
import warnings
from pathlib import Path
from typing import List, Optional

import torch

from .._compat import import_open_clip
from ..checkpoint import is_torchscript_archive
from .base import Teacher

__all__ = ["OpenCLIPTeacher", "RandomWeightsWarning", "WeightsUnavailable", "list_openclip_models"]

log = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")


class RandomWeightsWarning(UserWarning):
    """The teacher runs with random weights: its embeddings and predictions mean nothing."""


class WeightsUnavailable(RuntimeError):
    """The weights named by a pretrained tag are not cached here and cannot be downloaded. The
    message gives both spellings of the alternatives (Python ``pretrained=None``, command line
    ``--pretrained none``): the same error reaches users of both."""


def list_openclip_models() -> List[str]:
    """Model names open_clip knows (``OpenCLIPTeacher(model_name=...)``)."""
    return list(import_open_clip().list_models())


def _reachable(url: str, timeout: float) -> Optional[str]:
    """None when a TCP connection to the URL's host opens within ``timeout``, else the reason.
    A quick probe so that an offline machine fails in a second instead of after minutes of
    retries inside the download libraries; skipped when a proxy is configured."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as exc:
        return f"cannot reach {host}:{port} ({exc})"


class OpenCLIPTeacher(Teacher):
    """An open_clip model as teacher.

    model_name: any name of ``open_clip.list_models()`` (e.g. ``ViT-B-16``, ``ViT-L-14``,
        ``ViT-H-14``), an ``hf-hub:``/``local-dir:`` name, or a path to a model config ``.json``
        file (registered with open_clip under the file's stem).
    pretrained: a tag of that model (``open_clip.list_pretrained_tags_by_model(name)``, e.g.
        ``"openai"``), downloaded and cached where the network allows; a local checkpoint file
        (open_clip's formats, read weights-only, or one of OpenAI's TorchScript archives such as
        ``ViT-B-16.pt``, loaded with QuickGELU as OpenAI trained them); or None for random weights
        (a :class:`RandomWeightsWarning` is issued and logged).
    device: defaults to CUDA when available, else the CPU. dtype: e.g. ``torch.float16``
        (default float32).
    normalize: whether :meth:`embed_images` returns unit vectors by default (the student regresses
        the raw embedding, as the authors do, so the default is False).
    """

    def __init__(self, model_name: str = "ViT-B-16", pretrained: str | os.PathLike | None = None, *,
                 device=None, dtype=None, normalize: bool = False, cache_dir: str | None = None,
                 probe_timeout: float = 5.0):
        super().__init__(normalize=normalize)
        oc = import_open_clip()
        if not isinstance(model_name, str) or not model_name:
            raise TypeError(f"model_name: expected an open_clip model name (str), got {model_name!r}")
        model_name = self._resolve_name(oc, model_name)
        self.name = model_name
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")

        kw = {}
        own = model_name.startswith(("hf-hub:", "local-dir:"))   # the repo or folder holds its weights
        if own and pretrained is not None:
            raise ValueError(f"pretrained: {model_name!r} loads the weights of its own repository or "
                             f"folder; give pretrained=None (command line: --pretrained none), got "
                             f"{str(pretrained)!r}")
        self.pretrained = None if pretrained is None else str(pretrained)
        self.random_weights = pretrained is None and not own
        if pretrained is None:
            checkpoint = None
        else:
            checkpoint, kw = self._resolve_pretrained(oc, model_name, pretrained, cache_dir, probe_timeout)
        jit_state = None
        if checkpoint is not None and is_torchscript_archive(checkpoint):
            # OpenAI's own CLIP files (e.g. ViT-B-16.pt) are TorchScript archives, which open_clip's
            # weights-only loader refuses: their state_dict is read here and loaded below, the way
            # open_clip's load_openai_model does; those models were trained with QuickGELU
            jit_state = _openai_archive_state_dict(checkpoint)
            kw = dict(kw, force_quick_gelu=True)
        try:
            model, _, preprocess = oc.create_model_and_transforms(
                model_name, pretrained=None if jit_state is not None else checkpoint, device=self.device,
                cache_dir=cache_dir, **kw)
        except Exception as exc:
            if checkpoint is None:
                raise
            raise ValueError(f"pretrained: could not load checkpoint {checkpoint!r} into open_clip model "
                             f"{model_name!r}: {_load_failure(exc)}") from exc
        if jit_state is not None:
            _load_openai_state_dict(oc, model, jit_state, checkpoint, model_name)
        if dtype is not None:
            model = model.to(dtype=dtype)
        self.dtype = dtype or torch.float32
        self.model = model.eval().requires_grad_(False)
        self._preprocess = preprocess
        self.tokenizer = oc.get_tokenizer(model_name)
        size = getattr(model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        cfg = oc.get_model_config(model_name) or {}
        self.dim = int(cfg["embed_dim"]) if "embed_dim" in cfg else int(self._encode_texts(["a"]).shape[-1])
        # what the disk cache keys on; none for a hub repository (its files may change under its
        # name): its class embeddings are computed in every process
        self._weights_ident = None if checkpoint is None else _file_identity(
            checkpoint, tag=None if Path(str(pretrained)).is_file() else str(pretrained), model_config=cfg,
            load_options={k: v for k, v in kw.items() if v is not None}, open_clip=getattr(oc, "__version__", "?"))
        if model_name.startswith("local-dir:"):
            folder = Path(model_name[len("local-dir:"):])
            files = sorted(f for f in folder.glob("open_clip_*") if f.is_file())
            self._weights_ident = {"folder": os.path.realpath(folder), "open_clip": getattr(oc, "__version__", "?"),
                                   "files": [_file_identity(f) for f in files]} if files else None

        if self.random_weights:
            warn_random_weights(model_name, "embeddings and zero-shot predictions", "a pretrained tag (e.g. 'openai')")

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _resolve_name(oc, model_name: str) -> str:
        if model_name.startswith(("hf-hub:", "local-dir:")):
            return model_name
        if model_name.endswith(".json"):
            p = Path(model_name)
            if not p.is_file():
                raise ValueError(f"model_name: model config file {model_name!r} does not exist")
            oc.add_model_config(p)
            if p.stem not in oc.list_models():
                raise ValueError(f"model_name: {model_name!r} is not an open_clip model config "
                                 f"(expected the keys embed_dim, vision_cfg and text_cfg)")
            return p.stem
        known = oc.list_models()
        if model_name in known or model_name.replace("/", "-") in known:
            return model_name.replace("/", "-")
        close = difflib.get_close_matches(model_name, known, n=5, cutoff=0.5)
        raise ValueError(
            f"model_name: unknown open_clip model {model_name!r}"
            + (f"; close matches: {close}" if close else "")
            + f". All {len(known)} names: `apm-fast info --teachers` or "
              f"apm_fast.teachers.list_openclip_models()")

    @staticmethod
    def _resolve_pretrained(oc, model_name, pretrained, cache_dir, probe_timeout):
        """(checkpoint file, extra create_model_and_transforms kwargs) for a tag or a file."""
        if not isinstance(pretrained, (str, os.PathLike)):
            raise TypeError(f"pretrained: expected a tag, a checkpoint path or None, got {type(pretrained).__name__}")
        p = Path(pretrained)
        if p.is_file():
            return str(p), {}
        tag_cfg = oc.get_pretrained_cfg(model_name, str(pretrained)) if not model_name.startswith(
            ("hf-hub:", "local-dir:")) else {}
        if not tag_cfg:
            if isinstance(pretrained, os.PathLike) or os.sep in str(pretrained) or \
                    p.suffix.lower() in _CHECKPOINT_SUFFIXES:
                raise FileNotFoundError(f"pretrained: checkpoint file {str(pretrained)!r} does not exist")
            tags = oc.list_pretrained_tags_by_model(model_name)
            raise ValueError(f"pretrained: {str(pretrained)!r} is neither a known tag of {model_name} "
                             f"(known tags: {tags}) nor an existing checkpoint file")
        path = OpenCLIPTeacher._fetch_tag(oc, model_name, str(pretrained), tag_cfg, cache_dir, probe_timeout)
        # what open_clip would derive from the tag itself: its activation and preprocessing
        kw = dict(force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                  image_mean=tag_cfg.get("mean"), image_std=tag_cfg.get("std"),
                  image_interpolation=tag_cfg.get("interpolation"),
                  image_resize_mode=tag_cfg.get("resize_mode"))
        return path, kw

    @staticmethod
    def _fetch_tag(oc, model_name, tag, cfg, cache_dir, probe_timeout) -> str:
        """The local file of a tag's weights: from the cache, else downloaded."""
        from open_clip import pretrained as ocp

        cached = OpenCLIPTeacher._cached_file(ocp, cfg, cache_dir)
        if cached:
            return cached
        use_hub = bool(cfg.get("hf_hub")) and ocp.has_hf_hub()
        if use_hub:
            endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        else:
            endpoint = cfg.get("url") or "https://huggingface.co"
        reason = _reachable(endpoint, probe_timeout)
        if reason is None:
            try:
                path = ocp.download_pretrained(cfg, cache_dir=cache_dir)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                if path:
                    return path
                reason = "open_clip returned no file"
        raise WeightsUnavailable(
            f"pretrained: the weights of {model_name} tagged {tag!r} are not cached on this machine "
            f"and could not be downloaded ({reason}). Download them once where the network allows "
            f"(they are cached), pass a local checkpoint file (Python: pretrained=PATH; command "
            f"line: --pretrained PATH), or use random weights (Python: pretrained=None; command "
            f"line: --pretrained none).")

    @staticmethod
    def _cached_file(ocp, cfg, cache_dir) -> Optional[str]:
        if cfg.get("file"):
            return cfg["file"]
        if cfg.get("hf_hub") and ocp.has_hf_hub():
            from huggingface_hub import try_to_load_from_cache
            from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

            repo, filename = os.path.split(cfg["hf_hub"])
            filename = filename or HF_WEIGHTS_NAME
            # open_clip prefers a .safetensors twin of the named file when the hub has one
            names = [filename]
            if filename == HF_WEIGHTS_NAME:
                names.insert(0, HF_SAFE_WEIGHTS_NAME)
            elif filename.endswith((".bin", ".pth")):
                names.insert(0, filename[:-4] + ".safetensors")
            for name in names:
                hit = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return hit
            return None
        if cfg.get("url"):
            f = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
            return f if os.path.isfile(f) else None
        return None

    # ------------------------------------------------------------------ Teacher interface
    def weights_id(self) -> Optional[dict]:
        """The checkpoint file (path, size, modification time; and the tag it came from), the
        model's config and the loading options: what the disk cache of class embeddings is keyed
        by. None for random weights: they differ with the seed and are never cached on disk."""
        return None if self.random_weights else self._weights_ident

    def preprocess(self, image) -> torch.Tensor:
        return self._preprocess(image)

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(device=self.device, dtype=self.dtype))

    def _encode_texts(self, texts: List[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens)

    def __repr__(self):
        src = "RANDOM weights" if self.random_weights else f"pretrained={self.pretrained!r}"
        return f"OpenCLIPTeacher({self.name!r}, {src}, dim={self.dim}, device={self.device})"


# ---------------------------------------------------------------------- helpers
def warn_random_weights(name: str, meaningless: str, tag_hint: str) -> None:
    """Logs and warns (:class:`RandomWeightsWarning`) that teacher ``name`` has random weights."""
    msg = (f"teacher {name} has RANDOM weights (pretrained=None, --pretrained none): its {meaningless} "
           f"are meaningless. Pass {tag_hint} or a checkpoint file for real results.")
    log.warning(msg)
    warnings.warn(msg, RandomWeightsWarning, stacklevel=3)


def _file_identity(path, **extra) -> dict:
    """Identifies the weights a file holds without reading it: the resolved path, inode, size,
    modification and change times (a rewritten or replaced file is a different identity, even one
    of the same size whose modification time was copied over: its change time cannot be set),
    plus ``extra``."""
    st = os.stat(path)
    ident = {"file": os.path.realpath(path), "inode": st.st_ino, "size": st.st_size,
             "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    if "model_config" in extra:
        extra["model_config"] = hashlib.sha256(
            json.dumps(extra["model_config"], sort_keys=True, default=str).encode()).hexdigest()
    ident.update(extra)
    return ident


def _few(keys, n: int = 5) -> str:
    """The first ``n`` keys and how many more: an error stays one readable line."""
    return ", ".join(repr(k) for k in keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _load_failure(exc: BaseException) -> str:
    """One line for a checkpoint open_clip could not load: torch.load's refusal without its
    advice to unpickle with weights_only=False, load_state_dict's key lists cut to a few keys, or
    (an assertion or a shape complaint while the weights were fitted: a checkpoint of another
    architecture) that its weights do not fit."""
    from ..checkpoint import _first_line, describe_load_error

    text = str(exc)
    if "Error(s) in loading state_dict" not in text:
        if isinstance(exc, AssertionError) or (isinstance(exc, RuntimeError) and re.search(
                r"size mismatch|\bshapes?\b.*(mismatch|cannot|must)", text)):
            return f"its weights do not fit this model ({_first_line(exc)})"
        return describe_load_error(exc, "the file")
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*?)\.\s*(?:\n|$|Unexpected)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*?)\.\s*(?:\n|$)")):
        found = re.search(pattern, text, re.S)
        if found:
            keys = re.findall(r'"([^"]+)"', found.group(1))
            parts.append(f"{label} {len(keys)} key{'s' if len(keys) != 1 else ''}: {_few(keys)}")
    sizes = re.findall(r"size mismatch for ([^:]+):", text)
    if sizes:
        first = re.search(r"size mismatch for [^:]+: ([^\n]+)", text).group(1).strip()
        parts.append(f"{len(sizes)} shape mismatch{'es' if len(sizes) > 1 else ''}, first {sizes[0]!r}: {first}")
    return "its weights do not fit this model (" + ("; ".join(parts) or text.splitlines()[0]) + ")"


# The integer attributes of OpenAI's archives that are not weights (dropped as open_clip does)
_OPENAI_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")


def _openai_archive_state_dict(path) -> dict:
    """The state_dict of a TorchScript archive (``torch.jit.load``: a zip of TorchScript code and
    tensors; no Python object is unpickled), on the CPU."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            sd = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except Exception as exc:
        raise ValueError(f"pretrained: {str(path)!r} looks like a TorchScript archive but cannot be read "
                         f"as one ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    for key in _OPENAI_NON_WEIGHTS:
        sd.pop(key, None)
    return sd


def _load_openai_state_dict(oc, model, sd: dict, path, model_name: str):
    """Load an OpenAI archive's weights into the open_clip ``model`` (all keys, exact shapes), the
    conversion open_clip's load_checkpoint applies to such a state_dict; one line naming the file
    and the first few mismatches otherwise (e.g. an archive of another model)."""
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = oc.model.convert_to_custom_text_state_dict(sd)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{what} {len(keys)}: {_few(keys)}" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ValueError(f"pretrained: {str(path)!r} is a TorchScript archive whose weights do not fit "
                         f"open_clip model {model_name!r} (expected OpenAI's CLIP archive of that model); "
                         + "; ".join(parts))
    with torch.no_grad():
        model.load_state_dict(sd, strict=True)   # half-precision archives are cast to the model's dtype
