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
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .data import make_loader, normalize_student
from .engine import TTTEngine
from .teacher import check_teacher, class_embeddings, teacher_autocast

__all__ = ["classify_images", "ClassifyResult"]


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


def classify_images(sources: Sequence, model, teacher, classes: Sequence[str], *, templates=None,
                    steps: int = 20, lr: float = 1e-4, backend: str | None = None,
                    students: int | None = None, engine: Optional[TTTEngine] = None,
                    num_workers: int | None = None, topk: int = 5, normalize_target: bool = False,
                    overlap: bool = True, progress: bool = True) -> ClassifyResult:
    """Classify ``sources`` (paths, PIL images, uint8 arrays/tensors) among ``classes`` with TTT.

    model: the APM whose parameters are the init (on the device to run on); teacher: see
    :class:`apm_fast.engine.teacher.Teacher`; templates: prompt templates ("a photo of a {}.":
    default), averaged per class; students: images trained side by side (None: from free memory);
    engine: reuse a TTTEngine (its steps/lr/backend then apply); overlap: teacher and students
    on separate CUDA streams."""
    check_teacher(teacher)
    n = len(sources)
    if n == 0:
        raise ValueError("sources: expected at least one image, got none")
    classes = [str(c) for c in classes]
    eng = engine or TTTEngine(model, steps=steps, lr=lr, backend=backend, students=students,
                              normalize_target=normalize_target)
    dev = eng.device
    cuda = dev.type == "cuda"
    tdev = torch.device(getattr(teacher, "device", dev))
    t_start = time.perf_counter()
    text = class_embeddings(teacher, classes, templates, device=dev)           # C x D, cached
    if text.shape[1] != eng.config.dim:
        raise ValueError(f"teacher: its embeddings have width {text.shape[1]}, the model's dim is "
                         f"{eng.config.dim}; use a preset matching the teacher (e.g. ttt-l14 for ViT-L/14)")
    k = min(topk, len(classes))
    s = eng.students_for(n)
    eng.program(s)                          # build and capture before the loader's threads start
    loader = make_loader(sources, teacher.preprocess, eng.config.image_size, s,
                         num_workers=num_workers, pin_memory=cuda)
    t_stream = torch.cuda.Stream(dev) if cuda and overlap else None
    s_stream = torch.cuda.Stream(dev) if cuda and overlap else None
    for st in (t_stream, s_stream):
        if st is not None:
            st.wait_stream(torch.cuda.current_stream(dev))

    D, C = eng.config.dim, len(classes)
    out_cls = torch.empty(n, D)
    out_loss = torch.empty(n, eng.steps)
    out_logits = torch.empty(n, C)
    out_teacher = torch.empty(n, C)
    pbar = _progress(n, progress)
    pending: deque = deque()
    t_first = None

    def collect(item):
        idx, job, logits, t_logits, ready = item
        if ready is not None:
            ready.synchronize()
        else:
            job.wait()
        out_cls[idx] = job.cls.float().cpu()
        out_loss[idx] = job.losses.float().cpu()
        out_logits[idx] = logits.cpu()
        out_teacher[idx] = t_logits.cpu()
        pbar.update(len(idx))

    for idx, tpix, spix in loader:
        if t_first is None:
            t_first = time.perf_counter()
        with _stream_ctx(t_stream):
            tpix = tpix.to(tdev, non_blocking=True)
            spix = spix.to(dev, non_blocking=True)
            with torch.no_grad(), teacher_autocast(tdev):
                targets = teacher.embed_images(tpix)
            targets = targets.to(device=dev, dtype=torch.float32)
            images = normalize_student(spix)
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
        pending.append((idx, job, logits, t_logits, ready))
        while len(pending) > 1:                      # one batch in flight, the host never stalls the device
            collect(pending.popleft())
    while pending:
        collect(pending.popleft())
    if s_stream is not None:
        torch.cuda.current_stream(dev).wait_stream(s_stream)
    t_end = time.perf_counter()
    pbar.close()
    top = out_logits.topk(k, dim=1).indices
    t_first = t_first or t_end
    return ClassifyResult(classes=classes, top1=top[:, 0].clone(), topk=top, logits=out_logits,
                          cls=out_cls, losses=out_loss, teacher_logits=out_teacher, seconds=t_end - t_first,
                          startup_seconds=t_first - t_start, students=s, mode=eng.mode or "eager")


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
