"""Labelled evaluation: APM's test-time training beside the baselines, on the datasets users have.

    apm-fast eval ROOT --dataset imagenet-a --methods zeroshot,ensemble,apm,tpt,zero --out DIR

For every image of every dataset (``apm_fast.datasets``), in one loop through the one pipeline
(``apm_fast.classify.iter_classify``): the teacher embeds the image once; zero-shot (one prompt,
``a photo of a {c}.``), the prompt ensemble (the dataset's templates), APM (test-time training of
the student on that embedding, classified against the ensemble), TPT and ZERO (``apm_fast.baselines``,
on the same teacher, with views made in the loader's workers and embedded once for both) all
classify it against the same class list. Labels and predictions are class indices.

``DIR/records.jsonl`` gets one line per image as it finishes (image, label, per method the
predicted class, the top-5 classes and their probabilities and the time in ms; APM's loss curve),
flushed and fsynced, so a run killed at any point (SIGKILL included) and started again with the
same ``DIR`` goes on where it stopped: complete lines are kept, a torn last line is cut, no image
is done twice (a records file holding other lines is refused). ``DIR/run.json`` holds the run's
settings, each dataset's class list (count and short sha256), the precision and the backend the
training resolved and the teacher's precision; a run with other settings into the same ``DIR`` is
refused (more datasets, or a larger ``limit``, may be added to a run). Nothing is written before the datasets and options are checked. At the end
``summary.csv``, ``summary.md`` (dataset x method: top-1, top-5, images, images/s; settings and
machine line) and ``summary.png`` (grouped bars) are written from every record in ``DIR``.

The number of TTT steps is a choice (default 20): the paper does not publish the count behind its
tables; every output states it.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["METHODS", "EvalSettings", "evaluate", "summarize", "write_summary"]

METHODS = ("zeroshot", "ensemble", "apm", "tpt", "zero")
SINGLE = "a photo of a {c}."


@dataclass(frozen=True)
class EvalSettings:
    """What makes two runs comparable (``run.json``); checked once, where a run starts."""

    methods: tuple = ("zeroshot", "ensemble", "apm")
    teacher: str = "ViT-B-16"
    pretrained: Optional[str] = "openai"
    preset: str = "auto"
    grid: Optional[int] = None
    hidden: Optional[tuple] = None
    steps: int = 20
    lr: float = 1e-4
    seed: int = 0
    precision: Optional[str] = None
    moments: str = "fp32"
    apm_templates: str = "ensemble"
    views: int = 64
    keep: float = 0.1
    tpt_lr: float = 5e-3
    tpt_steps: int = 1
    crop: str = "center"

    def __post_init__(self):
        from .validation import check_training

        methods = tuple(m.strip() for m in self.methods)
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods or len(set(methods)) != len(methods):
            raise ValueError(f"methods: expected distinct names among {list(METHODS)}, got {list(self.methods)}")
        object.__setattr__(self, "methods", methods)
        check_training(steps=self.steps, lr=self.lr)
        if self.moments not in ("fp32", "bf16"):
            raise ValueError(f"moments: expected 'fp32' or 'bf16', got {self.moments!r}")
        if self.apm_templates not in ("single", "ensemble"):
            raise ValueError(f"apm_templates: expected 'single' or 'ensemble', got {self.apm_templates!r}")
        if isinstance(self.views, bool) or not isinstance(self.views, int) or self.views < 2:
            raise ValueError(f"views: expected an integer >= 2 (the image and augmented views), got {self.views!r}")
        from .config import PRESETS
        from .ops.precision import PRECISIONS
        from .validation import _finite, _is_real, _positive_int

        if not isinstance(self.teacher, str) or not self.teacher:
            raise ValueError(f"teacher: expected an open_clip model name or config file, got {self.teacher!r}")
        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained):
            raise ValueError(f"pretrained: expected a tag, a checkpoint path or None, got {self.pretrained!r}")
        if self.preset != "auto" and self.preset not in PRESETS:
            raise ValueError(f"preset: expected 'auto' or one of {sorted(PRESETS)}, got {self.preset!r}")
        _positive_int("grid", self.grid, none_ok=True)
        if self.hidden is not None:
            if not isinstance(self.hidden, (tuple, list)) or not self.hidden:
                raise ValueError(f"hidden: expected a tuple of positive layer widths, got {self.hidden!r}")
            for i, h in enumerate(self.hidden):
                _positive_int(f"hidden[{i}]", h)
            object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {sorted(PRECISIONS)} or None, got {self.precision!r}")
        _finite("tpt_lr", self.tpt_lr, 0.0, float("inf"), "a positive finite number")
        _positive_int("tpt_steps", self.tpt_steps)
        if not _is_real(self.keep) or not 0 < float(self.keep) <= 1:
            raise ValueError(f"keep: expected a fraction in (0, 1], got {self.keep!r}")
        if self.crop not in ("center", "stretch"):
            raise ValueError(f"crop: expected 'center' or 'stretch' (the authors' TTT input), got {self.crop!r}")
        if not 0 < self.keep <= 1:
            raise ValueError(f"keep: expected a fraction in (0, 1], got {self.keep!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed: expected an integer in [0, 2**63), got {self.seed!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["methods"], d["hidden"] = list(self.methods), None if self.hidden is None else list(self.hidden)
        return d


def _check_out(out: Path, settings: EvalSettings, classes: dict) -> dict:
    """Make ``out`` (before any long work) and refuse a run whose settings or class lists differ
    from the one already there; returns the run file's content to write once the run starts
    (``classes``: per dataset, the class list's count and short sha256; datasets may be added)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"out: cannot write into {str(out)!r} ({exc.strerror or exc})") from None
    run = out / "run.json"
    mine = settings.to_dict()
    if not run.exists():
        return {"settings": mine, "classes": classes}
    try:
        data = json.loads(run.read_text())
        theirs = data["settings"]
        diff = [(k, theirs.get(k), mine.get(k)) for k in sorted(set(mine) | set(theirs))
                if mine.get(k) != theirs.get(k)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"out: {str(run)!r} is not a run file of apm-fast eval ({exc}); use another --out") from None
    known = data.get("classes")
    if not isinstance(known, dict):             # a run file that does not say which classes
        diff.append(("classes", known, classes))
        known = {}
    diff += [(f"classes of {k}", known[k], classes[k]) for k in sorted(set(known) & set(classes))
             if known[k] != classes[k]]
    _refuse(out, diff)
    return dict(data, classes={**known, **classes})


def _refuse(out: Path, diff) -> None:
    if diff:
        raise ValueError(f"out: {str(out)!r} holds a run with other settings ("
                         + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diff[:4])
                         + "); use another --out, or the same settings to continue it")


def _start_run(out: Path, content: dict, precision, teacher_precision=None, backend=None) -> None:
    """The run file, with what the trainer and the teacher resolved once they are known: the
    precision of the training and its backend (None without APM) and the teacher's
    (``teacher.image_precision``). A run continued at another precision or teacher precision is
    refused; another backend (where and how, not what: eval has no option for it) is added to the
    one stated, ``"torch,triton"``."""
    run = out / "run.json"
    if run.exists():
        _refuse(out, [(k, content.get(k), v) for k, v in (("precision", precision),
                                                          ("teacher_precision", teacher_precision))
                      if content.get(k) != v])
        before = content.get("backend")
        if before and backend and backend not in before.split(","):
            backend = f"{before},{backend}"
        if json.loads(run.read_text()) == dict(content, precision=precision, teacher_precision=teacher_precision,
                                               backend=backend):
            return                               # nothing new (datasets added: rewritten)
    content = dict(content, precision=precision, teacher_precision=teacher_precision, backend=backend)
    tmp = run.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(content, indent=1))
    os.replace(tmp, run)


def _check_teacher(teacher, settings: EvalSettings) -> None:
    """The teacher is the one ``settings`` names (its results are recorded under that name): the
    open_clip model (by name, or a config file named after it) and random weights or not."""
    given = str(settings.teacher)
    names = {given, Path(given).stem, given.replace("/", "-")}
    if teacher.name not in names:
        raise ValueError(f"teacher: settings name {given!r}, the teacher given is {teacher.name!r}; build "
                         f"both from the same options (results are recorded under the settings' name)")
    own = teacher.name.startswith(("hf-hub:", "local-dir:"))     # weights of its own, whatever pretrained
    if not own and (settings.pretrained is None) != bool(teacher.random_weights):
        raise ValueError(f"teacher: settings say pretrained={settings.pretrained!r}, the teacher given has "
                         f"{'random' if teacher.random_weights else 'pretrained'} weights")


def _trainer(settings: EvalSettings, teacher, device):
    from .commands.common import PRESET_FOR_DIM, student_memory
    from .config import preset
    from .model import APM
    from .ttt import TestTimeTrainer

    name = settings.preset if settings.preset != "auto" else PRESET_FOR_DIM.get(teacher.dim, "ttt-b16")
    over = {k: v for k, v in (("grid", settings.grid), ("hidden", settings.hidden)) if v is not None}
    config = preset(name, dim=teacher.dim, **over)
    with student_memory(config, device):
        torch.manual_seed(settings.seed)
        model = APM(config, device=device)
        return TestTimeTrainer(model, steps=settings.steps, lr=settings.lr, precision=settings.precision,
                               moments=settings.moments)


def _methods(settings: EvalSettings, teacher, evalset, device):
    """The baselines of this run on this set, and the views they need (None if none does)."""
    from .baselines import TPT, Views, Zero, ZeroShot

    single = teacher.class_embeddings(evalset.classnames, [SINGLE]).float().to(device)
    out = []
    for m in settings.methods:
        if m == "zeroshot":
            out.append(ZeroShot("zeroshot", single))
        elif m == "ensemble":
            out.append(ZeroShot("ensemble", teacher.class_embeddings(evalset.classnames, evalset.templates)
                                .float().to(device)))
        elif m == "zero":
            out.append(Zero("zero", single, keep=settings.keep))
        elif m == "tpt":
            out.append(TPT("tpt", teacher, evalset.classnames, steps=settings.tpt_steps, lr=settings.tpt_lr,
                           keep=settings.keep))
    views = None
    if any(m.needs_views for m in out):
        fine_grained = not evalset.id.startswith("imagenet")
        views = Views.for_teacher(teacher, settings.views, augmix=fine_grained, seed=settings.seed)
    return out, views


def _key(evalset, path) -> str:
    """An image's key in records.jsonl: the set's id and the path within the set's folder (the same
    image reached through a link or a moved root is the same key)."""
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(evalset.root))
    return f"{evalset.id}:{rel.replace(os.sep, '/')}"


def _record(evalset, r, label, path) -> dict:
    rec = {"key": _key(evalset, path), "dataset": evalset.id, "image": r.image, "label": label,
           "methods": {}}
    if r.top_indices:
        finite = all(math.isfinite(x) for x in r.losses) and all(math.isfinite(p) for _, p in r.topk)
        # a diverged training predicts nothing: a miss, not class 0 of NaN scores
        rec["methods"]["apm"] = ({"pred": r.top_indices[0], "top5": r.top_indices, "probs": [p for _, p in r.topk]}
                                 if finite else {"pred": None, "top5": [], "probs": []})
        rec["methods"]["apm"]["ms"] = r.teacher_ms + r.ttt_ms
        rec["apm_losses"] = [x if math.isfinite(x) else None for x in r.losses]
        rec["apm_diverged"] = not finite
    for name, p in r.predictions.items():
        rec["methods"][name] = {"pred": p["top"][0], "top5": p["top"], "probs": p["probs"], "ms": p["ms"]}
    return rec


def evaluate(root, datasets: Sequence[str], *, teacher, out, settings: EvalSettings = EvalSettings(),
             limit: int | None = None, corruption: str | None = None, severity: int | None = None,
             classes_file=None, device=None, progress: bool | None = None, log=None) -> List[dict]:
    """Run (or continue) the evaluation into ``out`` and write its summary; returns the summary
    rows (one per dataset and method). ``teacher``: an ``apm_fast.teachers.Teacher`` whose name
    and weights match ``settings`` (the CLI builds both from one set of options), or a function
    returning one, called once the datasets, the options and ``out`` are checked (so that their
    errors come before a long load). ``corruption``/``severity`` (``imagenet-c``) and
    ``classes_file`` (``folder``) are refused when no listed dataset uses them."""
    from .classify import iter_classify
    from .commands.common import class_list_id
    from .datasets import load_dataset
    from .distributed.results import RecordWriter, ResultsFileError, read_records
    from .teachers import Teacher
    from .validation import refuse_repeats

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if not isinstance(settings, EvalSettings):
        raise TypeError(f"settings: expected an apm_fast.EvalSettings, got {type(settings).__name__}")
    if not (isinstance(teacher, Teacher) or callable(teacher)):
        raise TypeError(f"teacher: expected an apm_fast.teachers.Teacher or a function returning one, "
                        f"got {type(teacher).__name__}")
    if isinstance(datasets, str) or not all(isinstance(d, str) for d in datasets):
        raise TypeError(f"datasets: expected a list of dataset ids, got {datasets!r}")
    datasets = list(datasets)
    if not datasets:
        raise ValueError("datasets: expected at least one dataset id, got none")
    if device is not None:
        from .commands.common import pick_device

        try:
            device = pick_device(device)
        except Exception as exc:                  # CLIError: the same one line, from Python too
            raise ValueError(str(exc).replace("--device", "device")) from None
    out = Path(out)
    refuse_repeats(datasets, lambda d, a, b: f"datasets: {d!r} is listed twice (positions {a} and {b}); "
                                             f"each dataset is evaluated once")
    # the sets first, then the run folder, then the teacher: a wrong argument is refused before
    # anything is written or loaded. An option no listed set uses goes to the first, which refuses it.
    has_c, has_folder = "imagenet-c" in datasets, "folder" in datasets
    sets = [load_dataset(root, d, corruption=corruption if d == "imagenet-c" or not has_c else None,
                         severity=severity if d == "imagenet-c" or not has_c else None,
                         classes_file=classes_file if d == "folder" or not has_folder else None, limit=limit)
            for d in datasets]
    run = _check_out(out, settings, {s.id: {"count": len(s.classnames), "sha256": class_list_id(s.classnames)}
                                     for s in sets})
    records_path = out / "records.jsonl"
    try:
        done = {r["key"] for r in read_records(records_path, "key")}
    except ResultsFileError as exc:
        raise ValueError(f"out: {exc}; use another --out") from None
    if not isinstance(teacher, Teacher):
        teacher = teacher()
        if not isinstance(teacher, Teacher):
            raise TypeError(f"teacher: the function returned {type(teacher).__name__}, not a Teacher")
    _check_teacher(teacher, settings)
    device = torch.device(device) if device is not None else teacher.device
    trainer = _trainer(settings, teacher, device) if "apm" in settings.methods else None
    _start_run(out, run, trainer.precision if trainer is not None else None, teacher.image_precision,
               trainer.backend if trainer is not None else None)
    skipped = 0
    with RecordWriter(records_path) as writer:
        for evalset in sets:
            todo = [(i, p, y) for i, (p, y) in enumerate(evalset.items) if _key(evalset, p) not in done]
            log(f"{evalset.id}: {len(evalset.items)} images ({len(evalset.items) - len(todo)} already in "
                f"{records_path}), {evalset.num_classes} classes")
            if not todo:
                continue
            methods, views = _methods(settings, teacher, evalset, device)
            if views is not None:            # each image's views by its index in the set, resumed or not
                views = views.of([i for i, _, _ in todo])
            apm_text = evalset.templates if settings.apm_templates == "ensemble" else [SINGLE]
            bar = _bar(len(todo), evalset.id, progress)
            hits: Dict[str, int] = {}
            n, t0 = 0, time.perf_counter()
            for r in iter_classify(trainer, [p for _, p, _ in todo], teacher, list(evalset.classnames),
                                   templates=apm_text, topk=5, methods=methods, views=views,
                                   crop=None if settings.crop == "stretch" else "center"):
                if r.error is not None:
                    skipped += 1
                    bar.write(f"apm-fast eval: skipped {todo[r.index][1]}: {r.error}", file=sys.stderr)
                    bar.update(1)
                    continue
                rec = _record(evalset, r, todo[r.index][2], todo[r.index][1])
                writer.append(rec)
                n += 1
                for name, m in rec["methods"].items():
                    hits[name] = hits.get(name, 0) + (m["pred"] == rec["label"])
                bar.set_postfix_str(" ".join(f"{k} {100 * v / n:.1f}" for k, v in hits.items())
                                    + f" | {n / (time.perf_counter() - t0):.1f} img/s", refresh=False)
                bar.update(1)
            bar.close()
    # the summary of this run's images (a smaller --limit than before leaves the others out)
    wanted = {_key(s, p) for s in sets for p, _ in s.items}
    rows = summarize([r for r in read_records(records_path, "key") if r["key"] in wanted], settings.methods)
    write_summary(out, rows, settings, device, trainer.precision if trainer is not None else None)
    if skipped:
        log(f"apm-fast eval: {skipped} image(s) could not be read (see above)")
    return rows


def _bar(total, desc, enabled):
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def summarize(records: Sequence[dict], methods: Sequence[str]) -> List[dict]:
    """Dataset x method: top-1 and top-5 accuracy (%), images, images/s (the images over the
    method's own time per image, the teacher's share included), diverged APM runs."""
    groups: Dict[tuple, list] = {}
    order: List[str] = []
    for rec in records:
        if rec["dataset"] not in order:
            order.append(rec["dataset"])
        for name, m in rec["methods"].items():
            groups.setdefault((rec["dataset"], name), []).append((rec, m))
    rows = []
    for ds in order:
        for name in methods:
            items = groups.get((ds, name), [])
            if not items:
                continue
            n = len(items)
            ms = sum(m["ms"] for _, m in items)
            rows.append({"dataset": ds, "method": name, "images": n,
                         "top1": 100.0 * sum(m["pred"] == r["label"] for r, m in items) / n,
                         "top5": 100.0 * sum(r["label"] in m["top5"] for r, m in items) / n,
                         "images_per_s": 1e3 * n / ms if ms > 0 else None,
                         "diverged": sum(bool(r.get("apm_diverged")) for r, _ in items) if name == "apm" else 0})
    return rows


def write_summary(out: Path, rows: List[dict], settings: EvalSettings, device, precision: str | None = None) -> None:
    """summary.csv, summary.md and summary.png in ``out`` (each written atomically); ``precision``:
    the one the training resolved (stated in the machine line)."""
    from .bench.machine import machine_info, machine_line

    out = Path(out)
    fields = ["dataset", "method", "top1", "top5", "images", "images_per_s", "diverged"]
    tmp = out / "summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.2f}" if isinstance(r[k], float) else r[k]) for k in fields})
    os.replace(tmp, out / "summary.csv")
    line = machine_line(machine_info(device, precision or settings.precision or "default"))
    md = ["# apm-fast eval", "", "| dataset | method | top-1 % | top-5 % | images | images/s |",
          "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ips = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
        md.append(f"| {r['dataset']} | {r['method']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['images']} | {ips} |")
    md += ["", f"Settings: {json.dumps(settings.to_dict())}", "", f"Machine: {line}", "",
           f"APM: {settings.steps} Adam steps per image (the paper does not publish its count), lr {settings.lr}."]
    (out / "summary.md.tmp").write_text("\n".join(md) + "\n")
    os.replace(out / "summary.md.tmp", out / "summary.md")
    try:
        _plot(out / "summary.png", rows, settings)
    except ImportError:                        # matplotlib is optional: the tables are written
        pass


def _plot(path: Path, rows: List[dict], settings: EvalSettings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = [m for m in settings.methods if any(r["method"] == m for r in rows)]
    if not datasets or not methods:
        return
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(datasets) + 2), 4.2))
    for j, m in enumerate(methods):
        xs, ys = [], []
        for i, d in enumerate(datasets):
            hit = [r for r in rows if r["dataset"] == d and r["method"] == m]
            if hit:
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(hit[0]["top1"])
        bars = ax.bar(xs, ys, width, label=m)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels(datasets, fontsize=8)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"teacher {settings.teacher} ({settings.pretrained or 'random weights'}), "
                 f"APM {settings.steps} steps", fontsize=9)
    ax.legend(fontsize=8, ncol=len(methods))
    ax.set_ylim(0, max(100.0, max(r["top1"] for r in rows) * 1.1))
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
