"""What the pipeline needs from a teacher, and the class-embedding cache.

A teacher is any object with

* ``preprocess``: a picklable callable, PIL image -> C x h x w float tensor (its own resize,
  crop and normalization; it runs in DataLoader workers);
* ``embed_images(batch)``: B x C x h x w tensor on the teacher's device -> B x D embeddings;
* ``embed_texts(texts)``: list of strings -> len(texts) x D embeddings;
* optionally ``device`` (where ``embed_images`` wants its input; default: the model's device).

Every ``apm_fast.teachers.Teacher`` (e.g. ``OpenCLIPTeacher``) is one; tests also use a tiny random one.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Protocol, Sequence, Union, runtime_checkable

import torch
import torch.nn.functional as F

__all__ = ["TeacherLike", "check_teacher", "class_embeddings", "DEFAULT_TEMPLATE", "teacher_autocast"]

DEFAULT_TEMPLATE = "a photo of a {}."
Template = Union[str, Callable[[str], str]]


@runtime_checkable
class TeacherLike(Protocol):
    preprocess: Callable

    def embed_images(self, images: torch.Tensor) -> torch.Tensor: ...

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


def check_teacher(teacher):
    missing = [a for a in ("preprocess", "embed_images", "embed_texts") if not hasattr(teacher, a)]
    if missing:
        raise TypeError(f"teacher: expected an object with preprocess, embed_images and embed_texts "
                        f"(see apm_fast.engine.teacher.TeacherLike); {type(teacher).__name__} lacks {missing}")
    return teacher


def teacher_autocast(device):
    """bf16 autocast for the teacher on CUDA (its towers are big GEMMs); nothing elsewhere."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _fill(template: Template, name: str) -> str:
    if callable(template):
        return template(name)
    if "{c}" in template:
        return template.replace("{c}", name)
    if "{}" in template:
        return template.format(name)
    raise ValueError(f"templates: expected strings with '{{}}' or '{{c}}' (or callables), got {template!r}")


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@torch.no_grad()
def class_embeddings(teacher, classes: Sequence[str], templates: Sequence[Template] | None = None, *,
                     device=None, batch: int = 256) -> torch.Tensor:
    """C x D unit-norm class embeddings (fp32): each class's prompt embeddings normalized and
    averaged over the templates (the usual zero-shot ensemble; one template: just that prompt),
    then normalized. Computed once per (teacher, classes, templates) and cached.

    A teacher with its own ``class_embeddings(classes, templates)`` (``apm_fast.teachers``) is
    asked directly, its own cache and template names ("single", "ensemble") included."""
    own = getattr(teacher, "class_embeddings", None)
    if callable(own):
        emb = own(list(classes), "single" if templates is None else templates).float()
        return emb.to(device) if device is not None else emb
    classes = [str(c) for c in classes]
    if not classes:
        raise ValueError("classes: expected at least one class name, got none")
    templates = list(templates) if templates else [DEFAULT_TEMPLATE]
    key = (tuple(classes), tuple(t if isinstance(t, str) else id(t) for t in templates), str(device))
    try:
        per = _CACHE.setdefault(teacher, {})
    except TypeError:                          # not weak-referenceable: no cache
        per = {}
    if key in per:
        return per[key]
    prompts = [_fill(t, c) for c in classes for t in templates]
    dev = device if device is not None else getattr(teacher, "device", "cpu")
    outs = []
    with teacher_autocast(dev):
        for a in range(0, len(prompts), batch):
            outs.append(teacher.embed_texts(prompts[a:a + batch]).float())
    emb = F.normalize(torch.cat(outs), dim=-1).view(len(classes), len(templates), -1)
    emb = F.normalize(emb.mean(1), dim=-1)
    if device is not None:
        emb = emb.to(device)
    per[key] = emb
    return emb
