"""End-to-end zero-shot classification with test-time training (spec section 2), on the GPU.

    images --(DataLoader workers: decode, resize; pinned)--> teacher stream: teacher embeddings
    (bf16 autocast, one batch of S images at a time) --event--> student stream: S students side
    by side (captured step replayed), logits against the cached class embeddings --> host.

The two CUDA streams let the teacher embed batch i+1 while the students train on batch i; the host
keeps one batch in flight and reads a batch's results only after the next one is queued, so the
device never waits for the host. On the CPU the same code runs in order, without streams.
"""
from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .data import make_loader, normalize_student
from .engine import TTTEngine
from .teacher import check_teacher, class_embeddings, teacher_autocast

__all__ = ["classify_images", "iter_classify_batches", "ClassifyResult", "BatchResult"]


@dataclass
class ClassifyResult:
    """Per image (in input order): top-1 / top-k class indices, logits (100 cos), the trained
    pooled feature, the loss curve; plus timing of the whole run."""

    classes: List[str]
    top1: torch.Tensor                 # N (long)
    topk: torch.Tensor                 # N x k (long)
    logits: torch.Tensor               # N x C (fp32)
    cls: torch.Tensor                  # N x D (fp32)
    losses: torch.Tensor               # N x steps (fp32)
    teacher_logits: torch.Tensor       # N x C: the teacher's own zero-shot logits, for comparison
    seconds: float                     # from the first batch's arrival to the last result
    startup_seconds: float = 0.0       # building the program (capture) and the first batch's load
    students: int = 1
    mode: str = "eager"
    extra: dict = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.top1.numel() / self.seconds if self.seconds > 0 else float("inf")

    def labels(self) -> List[str]:
        return [self.classes[i] for i in self.top1.tolist()]

    def teacher_labels(self) -> List[str]:
        return [self.classes[i] for i in self.teacher_logits.argmax(1).tolist()]


def _stream_ctx(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


@dataclass
class BatchResult:
    """One batch of images, finished (CPU tensors, rows in the order of ``indices``)."""

    indices: torch.Tensor              # k positions in ``sources``
    cls: torch.Tensor                  # k x D
    losses: torch.Tensor               # k x steps
    logits: torch.Tensor               # k x C
    teacher_logits: torch.Tensor       # k x C
    teacher_ms: float = 0.0            # per image: the batch's teacher time shared among its images
    ttt_ms: float = 0.0                # per image: the batch's training time shared among its images
    failed: List[Tuple[int, str]] = field(default_factory=list)   # (position, why) of unreadable images


@dataclass
class _Run:
    """What ``iter_classify_batches`` learned before the first batch (for the caller's report)."""

    students: int = 1
    mode: str = "eager"
    started: float = 0.0
    first_batch: Optional[float] = None


def iter_classify_batches(sources: Sequence, model, teacher, classes: Sequence[str], *, templates=None,
                          steps: int = 20, lr: float = 1e-4, backend: str | None = None,
                          students: int | None = None, engine: Optional[TTTEngine] = None,
                          num_workers: int | None = None, normalize_target: bool = False,
                          overlap: bool = True, run: Optional[_Run] = None) -> Iterator[BatchResult]:
    """The pipeline of :func:`classify_images`, yielding each batch as it finishes (in order).
    An image that cannot be read is reported in its batch's ``failed`` and skipped."""
    check_teacher(teacher)
    n = len(sources)
    if n == 0:
        raise ValueError("sources: expected at least one image, got none")
    classes = [str(c) for c in classes]
    eng = engine or TTTEngine(model, steps=steps, lr=lr, backend=backend, students=students,
                              normalize_target=normalize_target)
    run = run if run is not None else _Run()
    run.started = time.perf_counter()
    dev = eng.device
    cuda = dev.type == "cuda"
    tdev = torch.device(getattr(teacher, "device", dev))
    text = class_embeddings(teacher, classes, templates, device=dev)           # C x D, cached
    if text.shape[1] != eng.config.dim:
        raise ValueError(f"teacher: its embeddings have width {text.shape[1]}, the model's dim is "
                         f"{eng.config.dim}; use a preset matching the teacher (e.g. ttt-l14 for ViT-L/14)")
    s = eng.students_for(n)
    eng.program(s)                          # build and capture before the loader's threads start
    run.students, run.mode = s, eng.mode or "eager"
    loader = make_loader(sources, teacher.preprocess, eng.config.image_size, s,
                         num_workers=num_workers, pin_memory=cuda)
    t_stream = torch.cuda.Stream(dev) if cuda and overlap else None
    s_stream = torch.cuda.Stream(dev) if cuda and overlap else None
    for st in (t_stream, s_stream):
        if st is not None:
            st.wait_stream(torch.cuda.current_stream(dev))

    def event():
        return torch.cuda.Event(enable_timing=True) if cuda else None

    def finish(item) -> BatchResult:
        idx, failed, job, logits, t_logits, t_ev, ready, t_host = item
        if ready is not None:
            ready.synchronize()
        ttt_s = job.wait()
        teacher_s = t_ev[0].elapsed_time(t_ev[1]) / 1e3 if t_ev is not None else t_host
        k = max(1, len(idx))
        return BatchResult(idx, job.cls.float().cpu(), job.losses.float().cpu(), logits.cpu(), t_logits.cpu(),
                           1e3 * teacher_s / k, 1e3 * ttt_s / k, failed)

    pending: deque = deque()
    try:
        for idx, tpix, spix, failed in loader:
            if run.first_batch is None:
                run.first_batch = time.perf_counter()
            if tpix is None:                         # nothing readable in this batch
                while pending:
                    yield finish(pending.popleft())
                yield BatchResult(idx, *(torch.empty(0),) * 4, failed=failed)
                continue
            t0, t_ev = time.perf_counter(), ((event(), event()) if cuda else None)
            with _stream_ctx(t_stream):
                if t_ev is not None:
                    t_ev[0].record()
                tpix = tpix.to(tdev, non_blocking=True)
                spix = spix.to(dev, non_blocking=True)
                with torch.no_grad(), teacher_autocast(tdev):
                    targets = teacher.embed_images(tpix)
                targets = targets.to(device=dev, dtype=torch.float32)
                images = normalize_student(spix)
                if t_ev is not None:
                    t_ev[1].record()
            t_host = time.perf_counter() - t0
            with _stream_ctx(s_stream):
                if s_stream is not None:
                    s_stream.wait_stream(t_stream)
                    targets.record_stream(s_stream)     # made on the teacher stream, used here
                    images.record_stream(s_stream)
                job = eng.launch(images, targets, students=s)
                with torch.no_grad():
                    logits = 100.0 * F.normalize(job.cls.float(), dim=-1) @ text.t()
                    t_logits = 100.0 * F.normalize(targets, dim=-1) @ text.t()
                ready = None
                if cuda:
                    ready = torch.cuda.Event()          # results and logits ready after this point
                    ready.record()
            pending.append((idx, failed, job, logits, t_logits, t_ev, ready, t_host))
            while len(pending) > 1:                  # one batch in flight: the host never stalls the device
                yield finish(pending.popleft())
        while pending:
            yield finish(pending.popleft())
    finally:
        if s_stream is not None:
            torch.cuda.current_stream(dev).wait_stream(s_stream)


def classify_images(sources: Sequence, model, teacher, classes: Sequence[str], *, templates=None,
                    steps: int = 20, lr: float = 1e-4, backend: str | None = None,
                    students: int | None = None, engine: Optional[TTTEngine] = None,
                    num_workers: int | None = None, topk: int = 5, normalize_target: bool = False,
                    overlap: bool = True, progress: bool = True) -> ClassifyResult:
    """Classify ``sources`` (paths, PIL images, uint8 arrays/tensors) among ``classes`` with TTT.

    model: the APM whose parameters are the init (on the device to run on); teacher: see
    :class:`apm_fast.engine.teacher.TeacherLike` (e.g. ``apm_fast.teachers.OpenCLIPTeacher``);
    templates: prompt templates (the teacher's "single"/"ensemble", or strings), averaged per
    class; students: images trained side by side (None: from free memory);
    engine: reuse a TTTEngine (its steps/lr/backend then apply); overlap: teacher and students
    on separate CUDA streams. An image that cannot be read raises ValueError naming it (the
    ``apm-fast ttt`` command skips such images instead: :func:`iter_classify_batches`)."""
    n = len(sources)
    run = _Run()
    cls = losses = logits = t_logits = None
    pbar = None
    for br in iter_classify_batches(sources, model, teacher, classes, templates=templates, steps=steps, lr=lr,
                                    backend=backend, students=students, engine=engine,
                                    num_workers=num_workers, normalize_target=normalize_target,
                                    overlap=overlap, run=run):
        if br.failed:
            i, why = br.failed[0]
            raise ValueError(f"images[{i}]: {why}")
        if cls is None:
            cls, losses = torch.empty(n, br.cls.shape[1]), torch.empty(n, br.losses.shape[1])
            logits, t_logits = torch.empty(n, br.logits.shape[1]), torch.empty(n, br.logits.shape[1])
            pbar = _progress(n, progress)
        cls[br.indices], losses[br.indices] = br.cls, br.losses
        logits[br.indices], t_logits[br.indices] = br.logits, br.teacher_logits
        pbar.update(len(br.indices))
    t_end = time.perf_counter()
    if pbar is not None:
        pbar.close()
    top = logits.topk(min(topk, logits.shape[1]), dim=1).indices
    first = run.first_batch or t_end
    return ClassifyResult(classes=[str(c) for c in classes], top1=top[:, 0].clone(), topk=top, logits=logits,
                          cls=cls, losses=losses, teacher_logits=t_logits, seconds=t_end - first,
                          startup_seconds=first - run.started, students=run.students, mode=run.mode)


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:                             # tqdm is a dependency; keep working without it
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass
        return _Null()
    return tqdm(total=total, unit="img", desc="ttt", dynamic_ncols=True, smoothing=0.1)
