"""Options and set-up shared by the subcommands that train: teacher, student, trainer."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import re
import sys
import warnings

from ..cli import CLIError
from ..teachers.prompts import TEMPLATE_SETS

# The student preset matching a teacher's embedding width (spec section 1).
PRESET_FOR_DIM = {512: "ttt-b16", 768: "ttt-l14", 1024: "ttt-h14"}


def hidden_widths(text: str):
    """``--hidden 4096,2048,1024`` -> (4096, 2048, 1024)."""
    try:
        widths = tuple(int(w) for w in text.replace(" ", "").split(",") if w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 4096,2048,1024, got {text!r}")
    if not widths or min(widths) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive widths like 4096,2048,1024, got {text!r}")
    return widths


def _positive(kind, what):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            v = 0
        if not 0 < v < float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


positive_int = _positive(int, "a positive integer")
positive_float = _positive(float, "a positive finite number")


def non_negative_int(text: str) -> int:
    """An integer >= 0 (a count where 0 means none)."""
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return v


def _preset(auto: bool):
    """``--preset``'s type: a preset's name, or with ``auto`` also 'auto' (the preset follows the
    teacher's width); checked when the command line is read, before any long work such as loading
    a teacher."""
    def parse(text: str) -> str:
        from ..config import PRESETS

        if not (auto and text == "auto") and text not in PRESETS:
            allowed = ("'auto' or " if auto else "") + "one of " + ", ".join(sorted(PRESETS))
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return text
    return parse


preset_name = _preset(auto=False)
preset_or_auto = _preset(auto=True)


# Adam moves every weight by about lr per step; the student's weights are ~0.01, so any lr above 1
# only makes NaN (1e308 is finite, yet the first step overflows): refused before anything runs.
MAX_LR = 1.0


def learning_rate(text: str) -> float:
    """``--lr``: a finite number in (0, MAX_LR]; 'inf', 'nan', '1e308', '-1e-4' are refused."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0.0 < v <= MAX_LR:            # NaN fails every comparison
        raise argparse.ArgumentTypeError(f"expected a learning rate in (0, {MAX_LR:g}], got {text!r}")
    return v


SEED_MAX = 2 ** 63 - 1


def seed(text: str) -> int:
    """``--seed``: an integer in [0, 2**63 - 1] (torch.manual_seed's range is wider, but numpy's
    and a JSON reader's int64 are not; a huge seed failed late with a raw RuntimeError)."""
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63 - 1], got {text!r}")
    return v


BACKEND_HELP = ("reference|torch|triton|cuda (default: torch on a CPU; on a GPU the table measured fastest "
                "there for this preset and workload, else the fixed order triton > cuda > torch; "
                "apm-fast info says which and why)")
PRECISION_CHOICES = ("bf16", "fp16", "fp32", "fp64")
PRECISION_HELP = ("GEMM dtype of the student's training only (default: bf16 on a GPU, fp32 on a CPU); the "
                  "student's weights and Adam's state are kept in fp32 (fp64 with fp64; see --moments). The "
                  "teacher computes in bf16 on a GPU, fp32 on a CPU, whatever this is (teacher_precision in "
                  "the results)")


def add_teacher_args(p: argparse.ArgumentParser, *, pretrained_default="openai"):
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", default="ViT-B-16",
                   help="open_clip model name, or a model config .json (default: %(default)s; "
                        "list: apm-fast info --teachers)")
    g.add_argument("--pretrained", default=pretrained_default, metavar="TAG|PATH|none",
                   help="weights: an open_clip tag (downloaded and cached where the network allows), "
                        "a checkpoint file, or 'none' for random weights (default: %(default)s)")
    g.add_argument("--classes", default="imagenet", metavar="imagenet|FILE",
                   help="class names: 'imagenet' (1000) or a text file, one name per line")
    g.add_argument("--templates", default="single", choices=TEMPLATE_SETS,
                   help="prompts: 'single' ('a photo of a {c}.'), 'simple' (the 7 templates the CLIP "
                        "authors selected from the 80) or 'ensemble' (the 80 of the CLIP paper) "
                        "(default: %(default)s)")


def add_student_args(p: argparse.ArgumentParser, *, steps_default=20):
    g = p.add_argument_group("student and training")
    g.add_argument("--preset", type=preset_or_auto, default="auto",
                   help="student preset; 'auto' picks it from the teacher's width "
                        "(512: ttt-b16, 768: ttt-l14, 1024: ttt-h14). D always follows the teacher.")
    g.add_argument("--grid", type=positive_int, help="override the preset's grid G")
    g.add_argument("--patch", type=positive_int, help="override the preset's patch p")
    g.add_argument("--hidden", type=hidden_widths, metavar="W1,W2,...", help="override the MLP widths")
    g.add_argument("--heads", type=positive_int, help="override the pool's heads")
    g.add_argument("--steps", type=positive_int, default=steps_default, help="Adam steps per image (default: %(default)s)")
    g.add_argument("--lr", type=learning_rate, default=1e-4,
                   help="Adam learning rate, in (0, 1] (default: %(default)s)")
    g.add_argument("--normalize-target", action="store_true", help="regress the unit-norm teacher embedding")
    g.add_argument("--topk", type=positive_int, default=5, help="classes reported per image (default: %(default)s)")
    g.add_argument("--backend", default=None, help=BACKEND_HELP)
    g.add_argument("--precision", default=None, choices=PRECISION_CHOICES, help=PRECISION_HELP)
    g.add_argument("--moments", default="fp32", choices=("fp32", "bf16"),
                   help="Adam's moments: fp32 (the master weights' dtype, as torch.optim.Adam keeps them: fp64 with "
                        "--precision fp64; the default) or bf16 (half their memory "
                        "and traffic; the torch, triton and cuda backends; effect: docs/engine.md)")
    g.add_argument("--students", type=positive_int, default=None, metavar="N",
                   help="images trained side by side (default: as many as fit in memory on a GPU, 1 on a CPU)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--seed", type=seed, default=0,
                   help="seed of the student's (and a random teacher's) init, in [0, 2**63 - 1]")


# the trainer's arguments that the command line sets through options of the same name
TRAINER_FLAGS = ("backend", "precision", "moments")


@contextlib.contextmanager
def setup_errors(flags=()):
    """Turn the library's input errors into one-line CLI errors; a message that starts with the
    name of an argument in ``flags`` (``backend: ...``, ``backend 'x' ...``) names its option
    instead (``--backend: ...``)."""
    from .._compat import TeacherDependencyError
    from ..backends import BackendUnavailable
    from ..teachers import WeightsUnavailable

    try:
        yield
    except (ValueError, TypeError, FileNotFoundError, WeightsUnavailable, TeacherDependencyError,
            BackendUnavailable) as exc:
        text = str(exc)
        for name in flags:
            lead = next((w for w in (name + ": ", name + " ") if text.startswith(w)), None)
            if lead is not None:
                text = f"--{name.replace('_', '-')}: {text[len(lead):]}"
                break
        raise CLIError(text) from exc


def check_trainer_args(args, device) -> None:
    """--backend, --precision and --moments checked against each other and this machine for the
    student (fp32) on ``device``, before any long work (the teacher): the trainer's own check,
    its errors naming the options."""
    from ..ttt.trainer import check_options

    with setup_errors(TRAINER_FLAGS):
        check_options(getattr(args, "backend", None), device, precision=getattr(args, "precision", None),
                      moments=getattr(args, "moments", None))


def pick_device(name):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device: expected cpu, cuda or cuda:N, got {name!r} ({exc})")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device: {name!r} asked for, but torch sees no CUDA GPU here")
    return dev


@contextlib.contextmanager
def _quiet_teacher_logs():
    """open_clip logs routine messages to the root logger; the CLI states what matters itself."""
    from ..teachers import RandomWeightsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def build_teacher(name, pretrained, device, seed):
    """The teacher; ``pretrained`` 'none' (any case) means random weights (seeded)."""
    import torch

    from ..teachers import OpenCLIPTeacher

    if pretrained is not None and str(pretrained).lower() in ("none", "random", ""):
        pretrained = None
    torch.manual_seed(seed)
    with setup_errors(), _quiet_teacher_logs():
        return OpenCLIPTeacher(name, pretrained, device=device)


def random_teacher_banner(teacher, why: str = "") -> str:
    return (f"!! teacher {teacher.name} has RANDOM weights{(' (' + why + ')') if why else ''}: "
            f"its embeddings, and so both predictions below, are meaningless !!")


def build_config(args, teacher_dim: int, **defaults):
    """The student's config: the preset (auto: by teacher width), CLI overrides, dim = teacher's."""
    from ..config import preset

    name = args.preset if args.preset != "auto" else PRESET_FOR_DIM.get(teacher_dim, "ttt-b16")
    overrides = dict(defaults)
    for key in ("grid", "patch", "hidden", "heads"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    overrides["dim"] = teacher_dim
    with setup_errors():
        return name, preset(name, **overrides)


def build_trainer(config, args, device):
    """The student (seeded init on ``device``) and its trainer, from the shared options; a student
    too large for the memory is a CLIError naming its sizes and the bytes asked for."""
    import torch

    from ..model import APM
    from ..ttt import TestTimeTrainer

    with setup_errors(TRAINER_FLAGS), student_memory(config, device):
        torch.manual_seed(args.seed)
        model = APM(config, device=device)
        return TestTimeTrainer(model, steps=args.steps, lr=args.lr, backend=args.backend,
                               normalize_target=args.normalize_target, students=getattr(args, "students", None),
                               precision=getattr(args, "precision", None), moments=getattr(args, "moments", None))


@contextlib.contextmanager
def student_memory(config, device):
    """A failed allocation while a student of ``config`` is built on ``device`` becomes a
    ValueError naming its sizes (--grid, --hidden) and the bytes asked for."""
    import torch

    try:
        yield
    except (MemoryError, RuntimeError) as exc:      # torch.OutOfMemoryError is a RuntimeError
        text = str(exc)
        if not (isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or "tried to allocate" in text.lower()):
            raise
        asked = re.search(r"allocate ([\d.]+ ?(?:bytes|[KMGTP]i?B|B))", text, re.IGNORECASE)
        raise ValueError(f"--grid {config.grid}, --hidden {','.join(map(str, config.hidden))}: the student does "
                         f"not fit in the memory of {device}"
                         + (f" (asked for {asked.group(1)})" if asked else "")
                         + "; give a smaller --grid or --hidden") from None


def class_list_id(names) -> str:
    """A short sha256 of the class names in order: which class list a result was made with."""
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()[:16]


def code_version() -> dict:
    """The package version and the git commit when known, stated beside a run's settings."""
    from .. import __version__
    from ..bench.machine import git_commit

    commit = git_commit()
    return {"version": __version__, "commit": None if commit == "unknown" else commit}


def eprint(*a):
    print(*a, file=sys.stderr, flush=True)
