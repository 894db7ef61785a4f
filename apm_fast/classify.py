"""Zero-shot classification by test-time training (spec section 2, step 4).

Per image: the teacher's embedding is computed once (teacher's own preprocessing), the student is
trained on it from the init snapshot (:meth:`TestTimeTrainer.fit`), and its pooled feature z is
classified against the teacher's class embeddings: logits = 100 * norm(z) @ norm(text)^T. The
teacher's own zero-shot prediction (its image embedding against the same text) is reported beside
it. Text embeddings are computed once per class set (cached by the teacher).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import images as _images

__all__ = ["Classification", "classify", "iter_classify", "LOGIT_SCALE"]

LOGIT_SCALE = 100.0  # CLIP's learned temperature at the end of training, as the authors use it


@dataclass
class Classification:
    """The result for one image.

    topk / teacher_topk: (class name, probability) pairs, best first; the probability is the
    softmax over all classes of the logits 100 * cos(embedding, class text).
    losses: the TTT loss of every step; teacher_ms / ttt_ms: wall time of the teacher's embedding
    (with its preprocessing) and of the training loop.
    """

    image: str
    topk: List[Tuple[str, float]]
    teacher_topk: List[Tuple[str, float]]
    losses: List[float] = field(default_factory=list)
    teacher_ms: float = 0.0
    ttt_ms: float = 0.0

    @property
    def top1(self) -> str:
        return self.topk[0][0]

    @property
    def teacher_top1(self) -> str:
        return self.teacher_topk[0][0]

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["topk"] = [[c, s] for c, s in self.topk]
        d["teacher_topk"] = [[c, s] for c, s in self.teacher_topk]
        d["top1"], d["teacher_top1"] = self.top1, self.teacher_top1
        return d


def _topk(logits: torch.Tensor, names: Sequence[str], k: int) -> List[Tuple[str, float]]:
    probs = logits.softmax(dim=-1)
    vals, idx = probs.topk(k)
    return [(names[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]


def _as_list(images) -> list:
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ValueError("images: expected at least one image (PIL image or file path), got none")
    return list(images)


def iter_classify(trainer, images, teacher, classes, *, templates="single",
                  topk: int = 5) -> Iterator[Classification]:
    """Like :func:`classify`, one result at a time (an image that fails raises when reached)."""
    from .teachers.prompts import resolve_classes, resolve_templates

    config = trainer.model.config
    if teacher.dim != config.dim:
        raise ValueError(
            f"teacher: {teacher.name} embeds in {teacher.dim} dims but the model's dim is "
            f"{config.dim}; build the model with preset(..., dim={teacher.dim})")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected a positive integer, got {topk!r}")
    names = resolve_classes(classes)
    temps = resolve_templates(templates)
    items = _as_list(images)
    text = teacher.class_embeddings(names, temps).float().cpu()        # C x D, unit rows
    k = min(topk, len(names))
    for i, item in enumerate(items):
        label, pil = _images.describe(item, i)
        t0 = time.perf_counter()
        target = teacher.embed_images([pil]).float().cpu()            # 1 x D, raw (not normalized)
        teacher_ms = 1e3 * (time.perf_counter() - t0)
        x = _images.preprocess(pil, config).unsqueeze(0)
        result = trainer.fit(x, target)
        z = result.cls.float().cpu()
        apm_logits = LOGIT_SCALE * F.normalize(z, dim=-1) @ text.T
        teacher_logits = LOGIT_SCALE * F.normalize(target, dim=-1) @ text.T
        yield Classification(
            image=label,
            topk=_topk(apm_logits[0], names, k),
            teacher_topk=_topk(teacher_logits[0], names, k),
            losses=[float(v) for v in result.losses[0].tolist()],
            teacher_ms=teacher_ms,
            ttt_ms=1e3 * result.seconds[0],
        )


def classify(trainer, images, teacher, classes, *, templates="single", topk: int = 5) -> List[Classification]:
    """Test-time train on each image and classify it zero-shot; see the module docstring.

    trainer: a :class:`~apm_fast.TestTimeTrainer` (its model's dim must equal the teacher's).
    images: PIL images or file paths (or one of them). classes: a list of names, ``"imagenet"``,
    or a text file with one name per line. templates: ``"single"``, ``"ensemble"`` or a list of
    strings containing ``{c}``.
    """
    return list(iter_classify(trainer, images, teacher, classes, templates=templates, topk=topk))
