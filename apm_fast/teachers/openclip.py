"""A teacher backed by any open_clip model (OpenAI CLIP, OpenCLIP, SigLIP, ...)."""
from __future__ import annotations

import difflib
import logging
import os
import socket
import urllib.parse
import warnings
from pathlib import Path
from typing import List, Optional

import torch

from .._compat import import_open_clip
from .base import Teacher

__all__ = ["OpenCLIPTeacher", "RandomWeightsWarning", "WeightsUnavailable", "list_openclip_models"]

log = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")


class RandomWeightsWarning(UserWarning):
    """The teacher runs with random weights: its embeddings and predictions mean nothing."""


class WeightsUnavailable(RuntimeError):
    """The weights named by a pretrained tag are not cached here and cannot be downloaded."""


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
        ``"openai"``), downloaded and cached where the network allows; a local checkpoint file;
        or None for random weights (a :class:`RandomWeightsWarning` is issued and logged).
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
        self.pretrained = None if pretrained is None else str(pretrained)
        self.random_weights = pretrained is None
        if pretrained is None:
            checkpoint = None
        else:
            checkpoint, kw = self._resolve_pretrained(oc, model_name, pretrained, cache_dir, probe_timeout)
        try:
            model, _, preprocess = oc.create_model_and_transforms(
                model_name, pretrained=checkpoint, device=self.device, cache_dir=cache_dir, **kw)
        except Exception as exc:
            if checkpoint is None:
                raise
            raise ValueError(f"pretrained: could not load checkpoint {checkpoint!r} into open_clip "
                             f"model {model_name!r}: {type(exc).__name__}: {exc}") from exc
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

        if self.random_weights:
            msg = (f"teacher {model_name} has RANDOM weights (pretrained=None): its embeddings and "
                   f"zero-shot predictions are meaningless. Pass a pretrained tag (e.g. 'openai') "
                   f"or a checkpoint file for real results.")
            log.warning(msg)
            warnings.warn(msg, RandomWeightsWarning, stacklevel=2)

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
            f"(they are cached), pass a local checkpoint file (pretrained=PATH), or use "
            f"pretrained=None for random weights.")

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
