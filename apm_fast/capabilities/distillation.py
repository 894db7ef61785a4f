"""SSL grid distillation (the authors' COCO model): an APM learns a DINOv2 teacher's patch token
at every grid cell, and the image's colour at every cell through its RGB head.

Per batch of images (the loss the authors trained with, spec section 1):

    loss = MSE(grid f, teacher tokens)  +  rgb_weight * MSE(rgb, pixels averaged per cell in [0, 1])

both averaged over every cell and channel; the model's forward on the tables
(``model(x, backend=...)``: the driver's fused path as an ``autograd.Function``, the RGB head in
PyTorch) and ``torch.optim.AdamW`` (weight decay 0 by default: the authors' Adam). The teacher's
targets are computed on the fly (bf16 on a GPU) or once and cached on disk (``cache_features``).

**Resumable, exactly.** Everything a step depends on is a function of the run's seed and of what
the checkpoint holds: the order of the images in epoch e is a permutation drawn from (seed, e)
alone, and ``RUN_DIR/state.safetensors`` holds the weights, AdamW's state, the position (epoch,
batches done, global step), the running loss sums and the RNG states. It is written atomically
every ``save_every`` steps and at every epoch's end, so a killed run, started again with the same
command, continues at the first step after the last checkpoint: no step repeated or lost, and the
same weights as an uninterrupted run with the same seed (the tests check it). A run directory
remembers its settings (``run.json``); continuing with other settings is refused, naming them
(``epochs`` and ``save_every`` may change: more epochs extend a finished run).

Files of ``RUN_DIR``: ``run.json`` (settings, teacher, config, images), ``state.safetensors``
(the checkpoint above), ``model.safetensors`` (the model at the last epoch's end, for
``APM.load``), ``history.json`` and ``loss.png`` (the losses of every epoch), ``features/`` (the
teacher's cache).
:func:`export_official` writes the authors' state-dict layout.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .files import atomic_write as _atomic_write, write_json as _write_json
from .inputs import INPUT_KINDS, cell_colours, student_input

__all__ = ["DistillSettings", "DistillResult", "distill", "epoch_order", "export_official",
           "official_state_dict", "teacher_targets", "train_step", "STATE_FILE", "MODEL_FILE"]

STATE_FILE = "state.safetensors"
MODEL_FILE = "model.safetensors"
RUN_FILE = "run.json"
HISTORY_FILE = "history.json"
LOSS_FILE = "loss.png"
_FORMAT = "apm-fast-distill/1"
_CROPS = ("center", "stretch")
# settings a continued run may change; every other one must match the run directory's
_MAY_CHANGE = ("epochs", "save_every")


@dataclass(frozen=True)
class DistillSettings:
    """epochs, batch (images per step), AdamW's lr / betas / weight_decay (0: the authors' Adam);
    rgb_weight: the RGB loss's weight (the authors: 1); authors_shift: cell l learns token l of
    [prefix tokens ; patches] (their ``[:-5]``, see :mod:`apm_fast.teachers.dinov2`) instead of
    patch l; input: the student's input convention (``"ssl"``: the authors' BGR min-max input,
    ``"imagenet"``: :mod:`apm_fast.capabilities.inputs`); crop: ``"center"`` (shorter side to S,
    centre square; the authors trained on centre crops) or ``"stretch"``; seed: the init and
    every epoch's order; save_every: steps between checkpoints (and at every epoch's end);
    cache_features: the teacher's targets computed once, kept in ``RUN_DIR/features/`` (fp16);
    backend: the table (None: the fastest here); precision: ``"bf16"`` (autocast; the default on
    a GPU) or ``"fp32"`` (the default on a CPU)."""

    epochs: int = 1
    batch: int = 8
    lr: float = 1e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    rgb_weight: float = 1.0
    authors_shift: bool = False
    input: str = "ssl"
    crop: str = "center"
    seed: int = 0
    save_every: int = 200
    cache_features: bool = False
    backend: Optional[str] = None
    precision: Optional[str] = None

    def __post_init__(self):
        for name in ("epochs", "batch", "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed: expected an integer in [0, 2**63 - 1], got {self.seed!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr <= 1):
            raise ValueError(f"lr: expected a learning rate in (0, 1], got {self.lr!r}")
        for name in ("weight_decay", "rgb_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < math.inf):
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
        b = self.betas
        if not (isinstance(b, (tuple, list)) and len(b) == 2 and all(0 <= x < 1 for x in b)):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {b!r}")
        object.__setattr__(self, "betas", (float(b[0]), float(b[1])))
        if self.input not in INPUT_KINDS:
            raise ValueError(f"input: expected one of {list(INPUT_KINDS)}, got {self.input!r}")
        if self.crop not in _CROPS:
            raise ValueError(f"crop: expected one of {list(_CROPS)}, got {self.crop!r}")
        if self.precision not in (None, "bf16", "fp32"):
            raise ValueError(f"precision: expected 'bf16', 'fp32' or None, got {self.precision!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class DistillResult:
    """model: the trained APM; history: one dict per finished epoch (loss, feat_loss, rgb_loss,
    images, steps, seconds); step: global steps done; finished: every epoch done (False when
    ``stop_after`` stopped it: run again to continue); skipped: images that could not be read."""

    model: object
    history: List[dict]
    step: int
    finished: bool
    skipped: List[str] = field(default_factory=list)


def epoch_order(seed: int, epoch: int, n: int) -> List[int]:
    """The order of n images in epoch ``epoch``: a permutation drawn from (seed, epoch) alone, so
    that a resumed run sees exactly the batches an uninterrupted one would."""
    return np.random.default_rng([int(seed), int(epoch), 0x41504D]).permutation(n).tolist()


# ---------------------------------------------------------------------------- the authors' layout
def official_state_dict(model) -> dict:
    """The model's weights under the authors' keys (the inverse of
    :func:`apm_fast.checkpoint.official_key_map`), as CPU tensors. A pool config also gets the keys
    that the authors' TTT model has and this package's model has not: ``norm`` (a LayerNorm over
    G^2 that their forward never uses) at its initial values (weight ones, bias zeros), and, when
    the config has no RGB head, ``rgb_head_1..3`` as zeros of their shapes (256 x (D + 2 G^2),
    256 x 256, 3 x 256, and their biases), which :meth:`APM.load_official_state_dict` and
    :func:`~apm_fast.capabilities.load_model` take for no RGB head."""
    from ..checkpoint import official_key_map

    cfg = model.config
    inverse = {ours: theirs for theirs, ours in official_key_map(cfg).items()}
    sd = model.state_dict()
    left = sorted(set(sd) - set(inverse))
    if left:
        raise ValueError(f"model: {left[:5]} have no key in the authors' layout")
    out = {inverse[k]: v.detach().cpu().clone().contiguous() for k, v in sd.items()}
    if cfg.pool:
        like = dict(dtype=next(iter(out.values())).dtype)
        out["norm.weight"], out["norm.bias"] = torch.ones(cfg.pos_dim, **like), torch.zeros(cfg.pos_dim, **like)
        if not cfg.rgb_head:
            for name, shape in (("rgb_head_1", (256, cfg.dim + cfg.column_dim)), ("rgb_head_2", (256, 256)),
                                ("rgb_head_3", (3, 256))):
                out[f"{name}.weight"], out[f"{name}.bias"] = torch.zeros(shape, **like), torch.zeros(shape[0], **like)
    return out


def export_official(model, path) -> Path:
    """Write the model as a state_dict in the authors' layout (:func:`official_state_dict`),
    atomically: a torch file, or safetensors for a name ending in ``.safetensors``. It loads back
    with ``APM.load_official_state_dict`` and ``load_model``. Into the authors' own model code
    with ``load_state_dict(strict=True)``: a pool config with a 3-layer MLP (an RGB head or not)
    has the keys of their TTT model, with the shapes of one built for the same sizes (3 input
    channels); a config without a pool, with a 5-layer MLP and an RGB head, those of their COCO
    model. Other configs have no counterpart in their code."""
    sd = official_state_dict(model)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save

        return _atomic_write(path, lambda f: f.write(save(sd)))
    return _atomic_write(path, lambda f: torch.save(sd, f))


# ---------------------------------------------------------------------------- the feature cache
class FeatureCache:
    """The teacher's targets of each image, one fp16 safetensors file per image in ``folder``,
    named by a hash of (what identifies the teacher and the targets, the image file's path, size
    and modification time): a changed image or teacher is a different file, never a stale hit."""

    def __init__(self, folder: Path, key: dict):
        self.folder = Path(folder)
        self.key = json.dumps(key, sort_keys=True)

    def path(self, image: str) -> Path:
        try:
            st = os.stat(image)
            ident = [os.path.realpath(image), st.st_size, st.st_mtime_ns]
        except OSError:
            ident = [str(image)]
        h = hashlib.sha256((self.key + json.dumps(ident)).encode()).hexdigest()[:40]
        return self.folder / f"{h}.safetensors"

    def read(self, image: str, shape) -> Optional[torch.Tensor]:
        p = self.path(image)
        if not p.is_file():
            return None
        try:
            from safetensors.torch import load_file

            t = load_file(str(p))["targets"]
        except Exception:
            return None                       # corrupt or foreign: computed again and replaced
        return t if tuple(t.shape) == tuple(shape) and t.dtype == torch.float16 else None

    def write(self, image: str, targets: torch.Tensor):
        t = targets.detach().to("cpu", torch.float16).contiguous()
        _atomic_write(self.path(image), lambda f: f.write(_safetensors_bytes({"targets": t})))


def _safetensors_bytes(tensors, metadata=None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


# ---------------------------------------------------------------------------- data
class _Batches(torch.utils.data.Dataset):
    """Item i: batch i of the epoch (a list of image indices) loaded by the one image pipeline:
    (indices, student pixels k x 3 x S x S uint8, teacher pixels or None, cached targets (k x L x D
    fp16, or None where an image has none yet), [(index, reason)] of unreadable images)."""

    def __init__(self, paths, batches, size, teacher_size, crop, cache, target_shape):
        self.paths, self.batches = paths, batches
        self.size, self.teacher_size = size, teacher_size
        self.crop = None if crop == "stretch" else "center"
        self.cache, self.target_shape = cache, target_shape

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        from ..images import pixels, to_pil

        good, spix, tpix, cached, failed = [], [], [], [], []
        for j in self.batches[i]:
            try:
                img = to_pil(self.paths[j], name=f"images[{j}]")
                s = pixels(img, self.size, crop=self.crop)
                hit = self.cache.read(str(self.paths[j]), self.target_shape) if self.cache is not None else None
                t = None
                if hit is None:
                    t = s if self.teacher_size == self.size else pixels(img, self.teacher_size, crop=self.crop)
            except (OSError, ValueError, TypeError) as exc:
                failed.append((j, str(exc)))
                continue
            good.append(j)
            spix.append(s)
            tpix.append(t)
            cached.append(hit)
        return good, spix, tpix, cached, failed


def _loader(dataset, device, num_workers):
    if num_workers is None:
        num_workers = 0 if device.type == "cpu" else max(0, min(8, (os.cpu_count() or 1) - 1))
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                                       pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers else None)


# ---------------------------------------------------------------------------- the checkpoint
def _save_state(path, model, opt, progress: dict, sums: torch.Tensor):
    """Weights, AdamW's state, the position and loss sums, the RNG states: one safetensors file,
    written atomically (a kill never leaves half a checkpoint, and the previous one stands)."""
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{idx}/{key}"] = v.detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    tensors["loss_sums"] = sums.detach().double().cpu()
    meta = {"format": _FORMAT, "config": json.dumps(model.config.to_dict()), "progress": json.dumps(progress),
            "param_groups": json.dumps(groups)}
    _atomic_write(path, lambda f: f.write(_safetensors_bytes(tensors, meta)))


def _load_state(path, model, opt):
    """(progress, loss sums) after loading weights, AdamW's state and the RNG states from a
    checkpoint of :func:`_save_state`; one error naming the file when it does not fit."""
    from safetensors import safe_open

    what = f"checkpoint {str(path)!r}"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ValueError(f"{what} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
                         f"delete it to start the run again") from None
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{what} is not an apm-fast distillation checkpoint (format {meta.get('format')!r})")
    weights = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{what}: its weights do not fit this model ({str(exc).splitlines()[0]})") from None
    state = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, idx, key = k.split("/", 2)
            state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    torch.set_rng_state(tensors["rng/cpu"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return json.loads(meta["progress"]), tensors["loss_sums"]


def _run_identity(config, settings, teacher, paths) -> dict:
    h = hashlib.sha256("\n".join(os.path.realpath(str(p)) for p in paths).encode()).hexdigest()
    return {"format": _FORMAT, "config": config.to_dict(), "settings": settings.to_dict(),
            "teacher": {"name": getattr(teacher, "name", type(teacher).__name__),
                        "arch": getattr(teacher, "arch", None), "pretrained": getattr(teacher, "pretrained", None),
                        "random_weights": bool(getattr(teacher, "random_weights", False)),
                        "dim": int(teacher.dim), "image_size": int(teacher.image_size),
                        "weights": teacher.weights_id() if hasattr(teacher, "weights_id") else None},
            "images": {"count": len(paths), "sha256": h}}


def _check_same_run(path: Path, new: dict):
    """Refuse to continue a run directory with other settings, naming what differs."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"out: {str(path)!r} cannot be read ({exc}); use another run directory") from None
    diffs = []
    for part in ("config", "settings", "teacher", "images"):
        a, b = old.get(part, {}), new[part]
        for k in sorted(set(a) | set(b)):
            if part == "settings" and k in _MAY_CHANGE:
                continue
            if a.get(k) != b.get(k):
                diffs.append(f"{part}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
    if diffs:
        raise ValueError(f"out: the run directory {str(path.parent)!r} holds a run with other settings ("
                         + "; ".join(diffs[:6]) + (f"; +{len(diffs) - 6} more" if len(diffs) > 6 else "")
                         + "); use another --out, or the same settings to continue it")


# ---------------------------------------------------------------------------- training
def distill(images, teacher, out, *, config=None, settings: DistillSettings = DistillSettings(), device=None,
            stop_after: Optional[int] = None, progress: bool = True, num_workers: Optional[int] = None,
            log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> DistillResult:
    """Train (or continue training) an APM on ``images`` against ``teacher``'s grid targets.

    images: files or directories (searched by :func:`apm_fast.images.find_images`); teacher: a
    :class:`~apm_fast.teachers.dinov2.DINOv2Teacher` (or any object with ``grid``, ``dim``,
    ``image_size``, ``normalize_pixels`` and ``grid_targets``); out: the run directory (created;
    a run already there is continued); config: the student (default ``preset("ssl-l14",
    grid=teacher.grid, dim=teacher.dim)``; an RGB head is needed unless ``rgb_weight`` is 0);
    stop_after: stop, with a checkpoint, after this many steps of this call (run again to
    continue: a time-limited job, or the tests' simulated kill); num_workers: loader processes
    (None: none on a CPU, up to 8 on a GPU)."""
    from tqdm import tqdm

    from ..backends import resolve_backend
    from ..config import preset
    from ..images import find_images
    from ..model import APM

    if not isinstance(settings, DistillSettings):
        raise TypeError(f"settings: expected a DistillSettings, got {type(settings).__name__}")
    s = settings
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after: expected a positive integer or None, got {stop_after!r}")
    for attr in ("grid", "dim", "image_size", "normalize_pixels", "grid_targets"):
        if not hasattr(teacher, attr):
            raise TypeError(f"teacher: expected a grid teacher (apm_fast.teachers.dinov2.DINOv2Teacher); "
                            f"{type(teacher).__name__} lacks {attr!r}")
    cfg = config or preset("ssl-l14", grid=teacher.grid, dim=teacher.dim)
    if cfg.grid != teacher.grid or cfg.dim != teacher.dim:
        raise ValueError(f"config: the student's grid {cfg.grid} x dim {cfg.dim} must equal the teacher's "
                         f"grid {teacher.grid} x dim {teacher.dim} (one token per cell)")
    if not cfg.rgb_head and s.rgb_weight > 0:
        raise ValueError("config: rgb_weight > 0 needs a model with an RGB head (rgb_head=True), "
                         "or set rgb_weight=0")
    paths = [str(p) for p in find_images(images if isinstance(images, (list, tuple)) else [images])]
    dev = torch.device(device) if device is not None else teacher.device
    backend = resolve_backend(s.backend, dev, cfg)
    amp = (s.precision or ("bf16" if dev.type == "cuda" else "fp32")) == "bf16"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ident = _run_identity(cfg, s, teacher, paths)
    run_file, state_file = out / RUN_FILE, out / STATE_FILE
    if run_file.exists():
        _check_same_run(run_file, ident)
    _write_json(run_file, ident)

    torch.manual_seed(s.seed)
    model = APM(cfg, device=dev)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay, eps=1e-8)
    prog = {"epoch": 0, "batch": 0, "step": 0, "history": [], "skipped": [], "epoch_seconds": 0.0}
    sums = torch.zeros(4, dtype=torch.float64)         # feat, rgb, total (sums over images), images
    if state_file.exists():
        prog, sums = _load_state(state_file, model, opt)
        log(f"apm-fast distill: continuing {str(out)!r} at epoch {prog['epoch'] + 1}, step {prog['step']}")
    sums = sums.to(dev)
    n = len(paths)
    per_epoch = -(-n // s.batch)
    target_shape = (cfg.queries, cfg.dim)
    cache = None
    if s.cache_features:
        cache = FeatureCache(out / "features", {"teacher": ident["teacher"], "grid": cfg.grid,
                                                "authors_shift": s.authors_shift, "crop": s.crop,
                                                "size": teacher.image_size})
    skipped = set(prog.get("skipped", []))
    done_now = 0
    finished = prog["epoch"] >= s.epochs

    def save():
        prog["skipped"] = sorted(skipped)
        _save_state(state_file, model, opt, prog, sums)
        _write_json(out / HISTORY_FILE, prog["history"])
        if prog["history"]:
            _loss_picture(out / LOSS_FILE, prog["history"])

    while prog["epoch"] < s.epochs:
        e = prog["epoch"]
        order = epoch_order(s.seed, e, n)
        batches = [order[a:a + s.batch] for a in range(0, n, s.batch)]
        data = _Batches(paths, batches[prog["batch"]:], cfg.image_size, teacher.image_size, s.crop, cache,
                        target_shape)
        t_epoch = time.perf_counter()
        bar = tqdm(total=per_epoch, initial=prog["batch"], unit="step", desc=f"epoch {e + 1}/{s.epochs}",
                   file=sys.stderr, disable=not progress, dynamic_ncols=True, leave=False)
        stopped = False
        try:
            for good, spix, tpix, cached, failed in _loader(data, dev, num_workers):
                for j, why in failed:
                    if paths[j] not in skipped:
                        skipped.add(paths[j])
                        bar.write(f"apm-fast distill: skipped {paths[j]}: {why}", file=sys.stderr)
                if good:
                    targets = teacher_targets(teacher, tpix, cached, [paths[j] for j in good], cache, s, dev)
                    px = torch.stack(spix).to(dev, non_blocking=True)
                    feat_loss, rgb_loss = train_step(model, opt, px, targets, cfg, s, backend, amp)
                    k = len(good)
                    sums += torch.stack([feat_loss * k, rgb_loss * k, (feat_loss + s.rgb_weight * rgb_loss) * k,
                                         torch.tensor(float(k), device=dev, dtype=torch.float64)])
                prog["batch"] += 1
                prog["step"] += 1
                done_now += 1
                bar.update(1)
                if progress and (prog["step"] % 10 == 0 or prog["batch"] == per_epoch):
                    c = float(sums[3])
                    bar.set_postfix_str(f"loss {float(sums[2]) / max(c, 1):.4g}", refresh=False)
                if prog["batch"] == per_epoch:
                    break                                    # the epoch's end is saved below
                if prog["step"] % s.save_every == 0:
                    prog["epoch_seconds"] += time.perf_counter() - t_epoch
                    t_epoch = time.perf_counter()
                    save()
                if stop_after is not None and done_now >= stop_after:
                    stopped = True
                    break
        finally:
            bar.close()
        prog["epoch_seconds"] += time.perf_counter() - t_epoch
        if stopped:
            save()
            break
        c = float(sums[3])
        if c == 0:                      # not one image could be read: nothing was trained
            raise ValueError(f"images: none of the {len(paths)} image(s) could be read (each reported above), "
                             f"so nothing was trained")
        rec = {"epoch": e + 1, "loss": float(sums[2]) / max(c, 1), "feat_loss": float(sums[0]) / max(c, 1),
               "rgb_loss": float(sums[1]) / max(c, 1), "images": int(c), "steps": per_epoch,
               "seconds": round(prog["epoch_seconds"], 3),
               "images_per_s": c / prog["epoch_seconds"] if prog["epoch_seconds"] > 0 else None}
        prog["history"].append(rec)
        prog.update(epoch=e + 1, batch=0, epoch_seconds=0.0)
        sums.zero_()
        model.save(out / MODEL_FILE)        # the model first: a state that says the epoch is done has it
        save()
        log(f"apm-fast distill: epoch {e + 1}/{s.epochs}: loss {rec['loss']:.5g} (features {rec['feat_loss']:.5g}, "
            f"rgb {rec['rgb_loss']:.5g}), {rec['images']} images, {rec['seconds']:.1f} s")
        if stop_after is not None and done_now >= stop_after:
            break
    finished = prog["epoch"] >= s.epochs
    if finished:                        # the file is this model's, whatever an earlier call left there
        model.save(out / MODEL_FILE)
    return DistillResult(model=model, history=list(prog["history"]), step=prog["step"], finished=finished,
                         skipped=sorted(skipped))


def _loss_picture(path, history):
    """``loss.png``: the loss of every finished epoch, total, features and RGB side by side."""
    from . import pictures

    marks = [h["epoch"] for h in history] if len(history) <= 10 else []
    panels = [pictures.loss_curve([h[key] for h in history], (220, 150), marks=marks, title=title)
              for key, title in (("loss", "loss per epoch"), ("feat_loss", "features"), ("rgb_loss", "RGB"))]
    pictures.save_png(pictures.strip(panels), path)


def teacher_targets(teacher, tpix, cached, names, cache, s, dev) -> torch.Tensor:
    """k x L x D float32 targets on ``dev``: from the cache where it has them, else from the
    teacher (and then cached). With a cache, fresh targets are rounded to its fp16 first, so a
    step computes the same whatever epoch first computed them (a resumed run stays exact)."""
    missing = [i for i, c in enumerate(cached) if c is None]
    fresh = None
    if missing:
        x = teacher.normalize_pixels(torch.stack([tpix[i] for i in missing]).to(teacher.device))
        fresh = teacher.grid_targets(x, authors_shift=s.authors_shift)
        if cache is not None:
            fresh = fresh.half()
            for row, i in enumerate(missing):
                cache.write(names[i], fresh[row])
        fresh = fresh.float().to(dev)
    out = [None] * len(cached)
    for row, i in enumerate(missing):
        out[i] = fresh[row]
    for i, c in enumerate(cached):
        if c is not None:
            out[i] = c.to(dev, torch.float32)
    return torch.stack(out)


def train_step(model, opt, px, targets, cfg, s, backend, amp):
    """One AdamW step on a batch; returns the two losses (detached, float64, on the device)."""
    x = student_input(px, s.input)
    ctx = torch.autocast(px.device.type, dtype=torch.bfloat16) if amp else _null()
    with ctx:
        out = model(x, backend=backend, want_rgb=s.rgb_weight > 0)
    feat_loss = F.mse_loss(out.grid.float(), targets)
    loss = feat_loss
    rgb_loss = torch.zeros((), device=px.device)
    if s.rgb_weight > 0:
        rgb_loss = F.mse_loss(out.rgb.float(), cell_colours(px, s.input, cfg.patch))
        loss = feat_loss + s.rgb_weight * rgb_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return feat_loss.detach().double(), rgb_loss.detach().double()


def _null():
    import contextlib

    return contextlib.nullcontext()
