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

Other methods can run in the same loop on the same teacher embeddings (``methods``: the test-time
baselines of ``apm_fast.baselines``); those that need augmented views get them from the loader's
workers (``views``), embedded by the teacher once and shared.
"""
from __future__ import annotations

import contextlib
import math
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
    # other methods (``methods=``): name -> {"top": class indices best first, "probs": theirs, "ms"}
    predictions: dict = field(default_factory=dict)

    @property
    def top1(self) -> str:
        return self.topk[0][0]

    @property
    def teacher_top1(self) -> str:
        return self.teacher_topk[0][0]

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")

    @property
    def diverged(self) -> bool:
        """The training blew up: a loss or a probability is not finite."""
        return not all(math.isfinite(x) for x in self.losses + [p for _, p in self.topk])

    def to_dict(self) -> dict:
        """A JSON-able dict; strict JSON (non-finite numbers become null, ``diverged`` says so)."""
        d = asdict(self)
        d["topk"] = [[c, _finite(s)] for c, s in self.topk]
        d["teacher_topk"] = [[c, _finite(s)] for c, s in self.teacher_topk]
        d["losses"] = [_finite(x) for x in self.losses]
        d["diverged"] = self.diverged
        if self.topk:
            d["top1"], d["teacher_top1"] = self.top1, self.teacher_top1
        del d["error"]
        if not self.predictions:
            del d["predictions"]
        return d


def _finite(x: float):
    return x if math.isfinite(x) else None


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
                  num_workers: int | None = None, overlap: bool = True, methods: Sequence = (),
                  views=None, crop: str | None = "center") -> Iterator[Classification]:
    """TTT on each image and zero-shot classification, one :class:`Classification` per image as
    its batch finishes (in input order). An image that cannot be read gives a record with
    ``error`` set and the others go on.

    trainer: a :class:`~apm_fast.TestTimeTrainer` (its model's dim must equal the teacher's);
    images: paths, PIL images, arrays or uint8 pixel tensors (or one of them); classes: a list of
    names, ``"imagenet"`` or a text file; templates: ``"single"``, ``"ensemble"`` or a list of
    strings containing ``{c}``; num_workers: loader processes (None: none on the CPU, up to 8 on a
    GPU); overlap: teacher and students on separate CUDA streams. ``trainer=None``: no TTT (only
    ``methods``). ``methods``: more classifiers of the same teacher embeddings (objects with
    ``name``, ``needs_views`` and ``__call__(targets, views) -> logits``, ``apm_fast.baselines``),
    their results in each record's ``predictions`` with their time per image (the teacher's
    share included, as if each ran alone); ``views``: makes the augmented views they need
    (``apm_fast.baselines.Views``). ``crop``: the student's view of each image, ``"center"``
    (shorter side to S, the centre square; the teacher's own preprocessing does the same) or None
    (the whole image stretched to S x S, bilinear and antialiased: the authors' TTT input)."""
    from .teachers.prompts import resolve_classes

    if trainer is None and not methods:
        raise ValueError("trainer: expected a TestTimeTrainer, or methods= to run without one")
    if any(m.needs_views for m in methods) and views is None:
        raise ValueError("views: the methods " + str([m.name for m in methods if m.needs_views])
                         + " need augmented views; pass views=apm_fast.baselines.Views(...)")
    config = trainer.model.config if trainer is not None else None
    _check_teacher(teacher, config.dim if config is not None else teacher.dim)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected a positive integer, got {topk!r}")
    if crop not in ("center", None):
        raise ValueError(f"crop: expected 'center' or None (the authors' stretch), got {crop!r}")
    names = resolve_classes(classes)
    sources = _as_list(images)
    dev = trainer.model.device if trainer is not None else torch.device(getattr(teacher, "device", "cpu"))
    cuda = dev.type == "cuda"
    text = teacher.class_embeddings(names, templates).float().to(dev)        # C x D, unit rows
    k = min(topk, len(names))
    s = trainer.students_for(len(sources)) if trainer is not None else 8
    if trainer is not None and trainer.engine is not None:
        trainer.program(s)                  # build and capture before the loader's workers start
    view_methods = [m for m in methods if m.needs_views]
    loader = make_loader(sources, teacher.preprocess, config.image_size if config else 16, s, pin_memory=cuda,
                         num_workers=num_workers if num_workers is not None or cuda else 0,
                         views=views if view_methods else None, crop=crop)
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
        idx, job, logits, t_logits, t_ev, ready, t_host, others = item
        if ready is not None:
            ready.synchronize()
        ttt_ms = 1e3 * job.wait() / len(idx) if job is not None else 0.0
        teacher_ms = 1e3 * (t_ev[0].elapsed_time(t_ev[1]) / 1e3 if t_ev is not None else t_host) / len(idx)
        losses = job.losses.float().cpu() if job is not None else None
        logits = logits.cpu() if logits is not None else None
        t_logits = t_logits.cpu()
        others = {name: (lg.cpu(), ms) for name, (lg, ms) in others.items()}
        for row, i in enumerate(idx.tolist()):
            r = Classification(image=label_of(sources[i], i), index=i, teacher_ms=teacher_ms, ttt_ms=ttt_ms)
            r.teacher_topk, r.teacher_top_indices = top(t_logits[row])
            if logits is not None:
                r.topk, r.top_indices = top(logits[row])
                r.losses = [float(v) for v in losses[row].tolist()]
            for name, (lg, ms) in others.items():
                probs, top_i = lg[row].softmax(-1).topk(k)
                # classes a method rules out (a logit of -inf: ZERO's classes without a vote) are
                # not in its top-k; an arbitrary order among them would count as predictions
                ranked = [(j, float(p)) for j, p in zip(top_i.tolist(), probs.tolist())
                          if lg[row, j] > float("-inf")]
                r.predictions[name] = {"top": [j for j, _ in ranked], "probs": [p for _, p in ranked],
                                       "ms": teacher_ms + ms}
            yield r

    pending: deque = deque()
    try:
        for idx, tpix, spix, vpix, failed in loader:
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
            others = _run_methods(methods, teacher, targets, vpix, tdev, dev, cuda)
            with _stream(s_stream):
                if s_stream is not None:
                    s_stream.wait_stream(t_stream)
                    targets.record_stream(s_stream)     # made on the teacher stream, used here
                    students.record_stream(s_stream)
                job = trainer.launch(students, targets, students=s) if trainer is not None else None
                with torch.no_grad():
                    logits = LOGIT_SCALE * F.normalize(job.cls.float(), dim=-1) @ text.t() if job is not None else None
                    t_logits = LOGIT_SCALE * F.normalize(targets, dim=-1) @ text.t()
                ready = None
                if cuda:
                    ready = torch.cuda.Event()          # results and logits ready after this point
                    ready.record()
            pending.append((idx, job, logits, t_logits, t_ev, ready, t_host, others))
            while len(pending) > 1:                  # one batch in flight: the host never stalls the device
                yield from finish(pending.popleft())
        while pending:
            yield from finish(pending.popleft())
    finally:
        if s_stream is not None:
            torch.cuda.current_stream(dev).wait_stream(s_stream)


def _run_methods(methods, teacher, targets, vpix, tdev, dev, cuda):
    """name -> (logits B x C, ms per image) of every other method on this batch. The views (when
    a method needs them) are embedded once, their time added to each view method's own."""
    if not methods:
        return {}
    b = targets.shape[0]

    def clock():
        if cuda:
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    views, views_ms = None, 0.0
    if vpix is not None:
        t0 = clock()
        flat = vpix.reshape(-1, *vpix.shape[2:])
        views = torch.cat([teacher.embed_images(flat[a:a + 256].to(tdev, non_blocking=True))
                           for a in range(0, flat.shape[0], 256)]).to(dev, torch.float32)
        views = torch.cat([targets[:, None], views.view(b, vpix.shape[1], -1)], dim=1)   # the image is view 0
        views_ms = 1e3 * (clock() - t0) / b
    out = {}
    for m in methods:
        t0 = clock()
        with torch.no_grad():
            logits = m(targets, views if m.needs_views else None)
        out[m.name] = (logits.float(), 1e3 * (clock() - t0) / b + (views_ms if m.needs_views else 0.0))
    return out


def classify(trainer, images, teacher, classes, *, templates="single", topk: int = 5,
             **kw) -> List[Classification]:
    """:func:`iter_classify` as a list; an image that cannot be read raises ValueError naming it.
    A progress bar shows on a terminal (``progress=False`` hides it)."""
    import sys

    from tqdm import tqdm

    progress = kw.pop("progress", None)
    items = _as_list(images)
    out = []
    with tqdm(total=len(items), unit="img", desc="classify", file=sys.stderr, dynamic_ncols=True,
              disable=not (sys.stderr.isatty() if progress is None else progress)) as bar:
        for r in iter_classify(trainer, items, teacher, classes, templates=templates, topk=topk, **kw):
            if r.error is not None:            # named once (an in-memory image's error names it already)
                where = f"images[{r.index}]"
                raise ValueError(r.error if r.error.startswith(where) else f"{where}: {r.error}")
            out.append(r)
            bar.update(1)
    return out
