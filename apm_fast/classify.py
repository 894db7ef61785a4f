"""Zero-shot classification by test-time training (spec section 2, step 4): the one pipeline.

    images --(loader workers: decode, resize; pinned)--> teacher stream: the teacher's embedding of
    each image, once (bf16 autocast on a GPU) --event--> student stream: the trainer's students side
    by side (captured step replayed), logits against the cached class embeddings --> records.

Per image: logits = 100 * norm(z) @ norm(text)^T for the trained pooled feature z, and the
teacher's own zero-shot prediction (its image embedding against the same text) beside it. The
text embeddings are computed once per class set (the teacher's cache). On a GPU two CUDA streams
let the teacher embed batch i+1 while the students train on batch i, and the host keeps one batch
in flight; on the CPU the same code runs in order. The CLI, the evaluation and Python callers all
go through :func:`iter_classify`.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .images import label_of, make_loader, normalize

__all__ = ["Classification", "classify", "iter_classify", "LOGIT_SCALE"]

LOGIT_SCALE = 100.0  # CLIP's learned temperature at the end of training, as the authors use it


@dataclass
class Classification:
    """The result for one image (``index``: its position in the inputs).

    topk / teacher_topk: (class name, probability) pairs, best first, and top_indices /
    teacher_top_indices the class indices (names can repeat, e.g. ImageNet's); the probability
    is the softmax over all classes of the logits 100 * cos(embedding, class text). losses: the
    TTT loss of every step; teacher_ms / ttt_ms: the teacher's and the training's time (a batch's
    time shared among its images). ``error``: why the image could not be read (nothing else set).
    """

    image: str
    index: int
    topk: List[Tuple[str, float]] = field(default_factory=list)
    top_indices: List[int] = field(default_factory=list)
    teacher_topk: List[Tuple[str, float]] = field(default_factory=list)
    teacher_top_indices: List[int] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    teacher_ms: float = 0.0
    ttt_ms: float = 0.0
    error: Optional[str] = None

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
        del d["error"]
        return d


def _as_list(images) -> list:
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ValueError("images: expected at least one image (PIL image or file path), got none")
    return list(images)


def _check_teacher(teacher, dim):
    missing = [a for a in ("preprocess", "embed_images", "class_embeddings", "dim") if not hasattr(teacher, a)]
    if missing:
        raise TypeError(f"teacher: expected an apm_fast.teachers.Teacher (preprocess, embed_images, "
                        f"class_embeddings, dim); {type(teacher).__name__} lacks {missing}")
    if teacher.dim != dim:
        raise ValueError(f"teacher: {getattr(teacher, 'name', type(teacher).__name__)} embeds in {teacher.dim} "
                         f"dims but the model's dim is {dim}; build the model with preset(..., dim={teacher.dim})")


def _stream(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def iter_classify(trainer, images, teacher, classes, *, templates="single", topk: int = 5,
                  num_workers: int | None = None, overlap: bool = True) -> Iterator[Classification]:
    """TTT on each image and zero-shot classification, one :class:`Classification` per image as
    its batch finishes (in input order). An image that cannot be read gives a record with
    ``error`` set and the others go on.

    trainer: a :class:`~apm_fast.TestTimeTrainer` (its model's dim must equal the teacher's);
    images: paths, PIL images, arrays or uint8 pixel tensors (or one of them); classes: a list of
    names, ``"imagenet"`` or a text file; templates: ``"single"``, ``"ensemble"`` or a list of
    strings containing ``{c}``; num_workers: loader processes (None: none on the CPU, up to 8 on a
    GPU); overlap: teacher and students on separate CUDA streams."""
    from .teachers.prompts import resolve_classes

    config = trainer.model.config
    _check_teacher(teacher, config.dim)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected a positive integer, got {topk!r}")
    names = resolve_classes(classes)
    sources = _as_list(images)
    dev = trainer.model.device
    cuda = dev.type == "cuda"
    text = teacher.class_embeddings(names, templates).float().to(dev)        # C x D, unit rows
    k = min(topk, len(names))
    s = trainer.students_for(len(sources))
    if trainer.engine is not None:
        trainer.program(s)                  # build and capture before the loader's workers start
    loader = make_loader(sources, teacher.preprocess, config.image_size, s, pin_memory=cuda,
                         num_workers=num_workers if num_workers is not None or cuda else 0)
    tdev = torch.device(getattr(teacher, "device", dev))
    t_stream = torch.cuda.Stream(dev) if cuda and overlap else None
    s_stream = torch.cuda.Stream(dev) if cuda and overlap else None
    for st in (t_stream, s_stream):
        if st is not None:
            st.wait_stream(torch.cuda.current_stream(dev))

    def top(logits):
        vals, idx = logits.softmax(-1).topk(k)
        return [(names[j], float(v)) for v, j in zip(vals.tolist(), idx.tolist())], idx.tolist()

    def finish(item):
        idx, job, logits, t_logits, t_ev, ready, t_host = item
        if ready is not None:
            ready.synchronize()
        ttt_ms = 1e3 * job.wait() / len(idx)
        teacher_ms = 1e3 * (t_ev[0].elapsed_time(t_ev[1]) / 1e3 if t_ev is not None else t_host) / len(idx)
        losses, logits, t_logits = job.losses.float().cpu(), logits.cpu(), t_logits.cpu()
        for row, i in enumerate(idx.tolist()):
            (tk, ti), (ttk, tti) = top(logits[row]), top(t_logits[row])
            yield Classification(image=label_of(sources[i], i), index=i, topk=tk, top_indices=ti,
                                 teacher_topk=ttk, teacher_top_indices=tti,
                                 losses=[float(v) for v in losses[row].tolist()],
                                 teacher_ms=teacher_ms, ttt_ms=ttt_ms)

    pending: deque = deque()
    try:
        for idx, tpix, spix, failed in loader:
            for i, why in failed:
                yield Classification(image=label_of(sources[i], i), index=i, error=why)
            if tpix is None:                         # nothing readable in this batch
                continue
            t0, t_ev = time.perf_counter(), None
            with _stream(t_stream):
                if cuda:
                    t_ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                    t_ev[0].record()
                targets = teacher.embed_images(tpix.to(tdev, non_blocking=True)).to(dev, torch.float32)
                students = normalize(spix.to(dev, non_blocking=True))
                if t_ev is not None:
                    t_ev[1].record()
            t_host = time.perf_counter() - t0
            with _stream(s_stream):
                if s_stream is not None:
                    s_stream.wait_stream(t_stream)
                    targets.record_stream(s_stream)     # made on the teacher stream, used here
                    students.record_stream(s_stream)
                job = trainer.launch(students, targets, students=s)
                with torch.no_grad():
                    logits = LOGIT_SCALE * F.normalize(job.cls.float(), dim=-1) @ text.t()
                    t_logits = LOGIT_SCALE * F.normalize(targets, dim=-1) @ text.t()
                ready = None
                if cuda:
                    ready = torch.cuda.Event()          # results and logits ready after this point
                    ready.record()
            pending.append((idx, job, logits, t_logits, t_ev, ready, t_host))
            while len(pending) > 1:                  # one batch in flight: the host never stalls the device
                yield from finish(pending.popleft())
        while pending:
            yield from finish(pending.popleft())
    finally:
        if s_stream is not None:
            torch.cuda.current_stream(dev).wait_stream(s_stream)


def classify(trainer, images, teacher, classes, *, templates="single", topk: int = 5,
             **kw) -> List[Classification]:
    """:func:`iter_classify` as a list; an image that cannot be read raises ValueError naming it."""
    out = []
    for r in iter_classify(trainer, images, teacher, classes, templates=templates, topk=topk, **kw):
        if r.error is not None:
            raise ValueError(f"images[{r.index}]: {r.error}")
        out.append(r)
    return out
