"""A DINOv2 teacher (timm) for grid distillation: its patch tokens, one per grid cell.

The student of an SSL distillation (``apm-fast distill``) learns, at every cell of its G x G grid,
the teacher's token of the same image patch. The teacher runs at G * p_t pixels (p_t its patch,
14 for DINOv2), so that its patch grid is the student's grid: token ``num_prefix_tokens + l``
belongs to cell l (row-major, as the student's cells). The CLS and register tokens (timm's
``model.num_prefix_tokens``: 1, or 5 with 4 registers) are dropped.

The authors' COCO checkpoint was trained differently (spec section 1): their tokens
``[CLS, 4 registers, 1024 patches]`` were cut with ``[:-5]``, so cell l learned token l of the
whole sequence (cells 0-4 the CLS and registers, the last 5 patches never). ``authors_shift=True``
reproduces that: cell l <- token l of ``[prefix tokens ; patches]`` (for a teacher with 5 prefix
tokens, exactly their ``[:-5]``), for compatibility with their checkpoint only.

The teacher's input is the standard DINOv2 one (RGB, ImageNet mean/std) through the package's one
image pipeline (:func:`apm_fast.images.pixels` then :func:`~apm_fast.images.normalize`); on a GPU it
runs under bf16 autocast, like the CLIP teachers.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import List, Optional

import torch

from ..images import normalize, pixels
from .base import Teacher
from .openclip import WeightsUnavailable, _file_identity, _load_failure, _reachable, warn_random_weights

__all__ = ["DINOv2Teacher", "import_timm"]


_RANDOM = ("none", "random", "")


def import_timm():
    """``import timm`` after the torchvision guard (see :mod:`apm_fast._compat`); a clear error
    naming the package when it is not installed."""
    import importlib.util

    from .._compat import TeacherDependencyError, ensure_torchvision_importable

    if importlib.util.find_spec("timm") is None:
        raise TeacherDependencyError("timm is not installed; the DINOv2 teachers need it: pip install timm")
    ensure_torchvision_importable()
    import timm

    return timm


class DINOv2Teacher(Teacher):
    """A timm DINOv2 (any timm ViT with patch tokens, e.g. ``vit_large_patch14_dinov2``,
    ``vit_large_patch14_reg4_dinov2``) as a grid teacher.

    name: a timm model name, or a ``.json`` file ``{"architecture": NAME, "kwargs": {...}}``
        (timm's ``create_model`` overrides, e.g. a tiny depth for tests).
    grid: G, the student's grid: the teacher runs at G * patch pixels (``image_size``).
    pretrained: ``"default"`` (timm's default tag of the model), a tag (e.g. ``"lvd142m"``), a
        checkpoint file (a state dict, read weights-only; positional embeddings resampled to
        the teacher's size), or None / ``"none"`` for random weights (seeded by torch's RNG; a
        :class:`RandomWeightsWarning` is issued). Tags are downloaded where the network allows
        and cached by timm.
    """

    def __init__(self, name: str = "vit_large_patch14_dinov2", pretrained: str | os.PathLike | None = "default",
                 *, grid: int = 32, device=None, model_kwargs: Optional[dict] = None, probe_timeout: float = 5.0):
        super().__init__(normalize=False)
        timm = import_timm()
        if not isinstance(name, str) or not name:
            raise TypeError(f"name: expected a timm model name (str) or a .json file, got {name!r}")
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid: expected a positive integer (the student's grid), got {grid!r}")
        arch, kwargs = self._resolve_name(timm, name)
        kwargs.update(model_kwargs or {})
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if pretrained is not None and str(pretrained).lower() in _RANDOM:
            pretrained = None
        self.random_weights = pretrained is None
        self.pretrained = None if pretrained is None else str(pretrained)
        patch = self._patch_of(timm, arch, kwargs)
        self.grid, self.patch = grid, patch
        self.image_size = grid * patch
        kwargs = dict(kwargs, img_size=self.image_size)
        path = None
        if pretrained is not None and Path(str(pretrained)).is_file():
            path = Path(str(pretrained))
            model = self._create(timm, arch, False, kwargs)
            self._load_file(model, path)
        elif pretrained is not None:
            full = arch if str(pretrained) == "default" else f"{arch.split('.')[0]}.{pretrained}"
            self._check_available(timm, full, str(pretrained), probe_timeout)
            model = self._create(timm, full, True, kwargs)
        else:
            model = self._create(timm, arch, False, kwargs)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.name = name
        self.arch = arch
        self.dim = int(model.embed_dim)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self._ident = None if path is None else _file_identity(path)
        if self.random_weights:
            warn_random_weights(name, "patch tokens (the targets)", "a tag ('default')")

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _resolve_name(timm, name: str):
        """(architecture, create_model kwargs) of a timm name or a .json description."""
        if name.endswith(".json"):
            p = Path(name)
            if not p.is_file():
                raise FileNotFoundError(f"teacher: model description file {name!r} does not exist")
            try:
                spec = json.loads(p.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"teacher: {name!r} is not a JSON model description ({exc})") from None
            if not isinstance(spec, dict) or not isinstance(spec.get("architecture"), str) or \
                    not isinstance(spec.get("kwargs", {}), dict):
                raise ValueError(f"teacher: {name!r}: expected {{\"architecture\": a timm model name, "
                                 f"\"kwargs\": {{create_model overrides}}}}, got {spec!r}"[:300])
            arch, kwargs = spec["architecture"], dict(spec.get("kwargs", {}))
        else:
            arch, kwargs = name, {}
        if not timm.is_model(arch.split(".")[0]):
            import difflib

            close = difflib.get_close_matches(arch, timm.list_models("*dinov2*"), n=5, cutoff=0.4)
            raise ValueError(f"teacher: unknown timm model {arch!r}"
                             + (f"; close matches: {close}" if close else "")
                             + "; the DINOv2 models: timm.list_models('*dinov2*')")
        return arch, kwargs

    @staticmethod
    def _patch_of(timm, arch, kwargs) -> int:
        if "patch_size" in kwargs:
            return int(kwargs["patch_size"])
        with torch.device("meta"):
            m = timm.create_model(arch.split(".")[0], pretrained=False, **kwargs)
        ps = getattr(getattr(m, "patch_embed", None), "patch_size", None)
        if ps is None:
            raise ValueError(f"teacher: {arch!r} has no patch embedding (not a ViT with patch tokens)")
        ps = tuple(ps) if isinstance(ps, (tuple, list)) else (ps, ps)
        if ps[0] != ps[1]:
            raise ValueError(f"teacher: {arch!r} has non-square patches {ps}; expected square ones")
        return int(ps[0])

    @staticmethod
    def _create(timm, name, pretrained, kwargs):
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"teacher: timm could not build {name!r} with {kwargs} "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None

    @staticmethod
    def _load_file(model, path: Path):
        """A state dict from a file (weights-only), resampled to the model by timm's ViT filter."""
        from ..checkpoint import describe_load_error, torch_load_weights_only

        what = f"pretrained {str(path)!r}"
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            try:
                sd = load_file(str(path))
            except Exception as exc:
                raise ValueError(f"{what} is not a safetensors file ({type(exc).__name__}: {exc})") from None
        else:
            sd = torch_load_weights_only(path, what)
        for key in ("state_dict", "model", "teacher"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict) and key not in model.state_dict():
                sd = sd[key]
        if not isinstance(sd, dict):
            raise TypeError(f"{what}: expected a dict of tensors, the file holds {type(sd).__name__}")
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        try:
            from timm.models.vision_transformer import checkpoint_filter_fn

            sd = checkpoint_filter_fn(sd, model)
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except Exception as exc:       # the file was read: its weights do not fit this model
            from ..checkpoint import _first_line

            why = (_load_failure(exc) if "Error(s) in loading state_dict" in str(exc)
                   else f"its weights do not fit this model ({_first_line(exc)})")
            raise ValueError(f"{what}: {why.replace('this model', type(model).__name__)}") from None
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            raise ValueError(f"{what}: the keys do not fit {type(model).__name__} "
                             f"(missing {len(missing)}: {missing[:5]}; unexpected {len(unexpected)}: "
                             f"{unexpected[:5]})")

    @staticmethod
    def _check_available(timm, full, tag, probe_timeout):
        """Fail in a second, with the alternatives, when a tag's weights are neither cached nor
        downloadable (offline): timm would otherwise retry for minutes."""
        try:
            cfg = timm.models.get_pretrained_cfg(full)
        except Exception:
            cfg = None
        if cfg is None:
            arch = full.split(".")[0]
            tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
            raise ValueError(f"pretrained: {tag!r} is neither a tag of {arch} (tags: {tags or 'none'}, or "
                             f"'default') nor an existing checkpoint file")
        hub = getattr(cfg, "hf_hub_id", None)
        if hub:
            try:
                from huggingface_hub import try_to_load_from_cache

                for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
                    hit = try_to_load_from_cache(hub, fname)
                    if isinstance(hit, str) and os.path.isfile(hit):
                        return
            except ImportError:
                pass
        endpoint = (os.environ.get("HF_ENDPOINT", "https://huggingface.co") if hub
                    else getattr(cfg, "url", None) or "https://huggingface.co")
        reason = _reachable(endpoint, probe_timeout)
        if reason is not None:
            raise WeightsUnavailable(
                f"pretrained: the weights of {full} are not cached on this machine and could not be "
                f"downloaded ({reason}). Download them once where the network allows (timm caches "
                f"them), pass a checkpoint file (--pretrained PATH), or use random weights "
                f"(--pretrained none).")

    # ------------------------------------------------------------------ Teacher interface
    def weights_id(self) -> Optional[dict]:
        return self._ident

    def pixels(self, image, *, crop: str | None = "center") -> torch.Tensor:
        """3 x s x s uint8 pixels of one image at the teacher's size (the one image pipeline)."""
        return pixels(image, self.image_size, crop=crop)

    def normalize_pixels(self, px: torch.Tensor) -> torch.Tensor:
        """(B x) 3 x s x s uint8 RGB -> the teacher's input (its mean/std)."""
        return normalize(px, self.mean, self.std)

    def preprocess(self, image) -> torch.Tensor:
        return self.normalize_pixels(self.pixels(image)).contiguous()

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x.to(self.device, torch.float32))

    def _encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return self._tokens(x)[:, 0]             # the CLS token

    def _encode_texts(self, texts: List[str]) -> torch.Tensor:
        raise TypeError(f"teacher: {self.name} (DINOv2) has no text tower; it cannot embed class names")

    def grid_targets(self, x: torch.Tensor, *, authors_shift: bool = False) -> torch.Tensor:
        """B x G^2 x D float32 targets of B preprocessed images (B x 3 x s x s, see
        :meth:`normalize_pixels`): the patch tokens (cell l <- patch l), or with
        ``authors_shift`` token l of [prefix tokens ; patches] (the authors' ``[:-5]``)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"images: expected B x 3 x {self.image_size} x {self.image_size} preprocessed "
                             f"pixels for teacher {self.name} (grid {self.grid} x patch {self.patch}), got "
                             f"{tuple(x.shape)}")
        amp_dtype = self.image_autocast()          # as embed_images: one rule, Teacher's
        amp = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            tok = self._tokens(x)
        n = self.grid * self.grid
        start = 0 if authors_shift else self.num_prefix_tokens
        return tok[:, start:start + n].float().clone()

    def __repr__(self):
        src = "RANDOM weights" if self.random_weights else f"pretrained={self.pretrained!r}"
        return (f"DINOv2Teacher({self.name!r}, {src}, dim={self.dim}, grid={self.grid}, "
                f"image_size={self.image_size}, device={self.device})")
