"""``apm-fast info``: versions, the GPU, which backends can run here and which one each preset
runs on by default, for training and for inference (and the measurement behind it)."""
from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata

HELP = ("print versions (python, torch, triton, open_clip, CUDA), the available backends and the default one "
        "per preset and workload")

PACKAGES = ("apm-fast", "torch", "triton", "open_clip_torch", "torchvision", "numpy", "safetensors")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("info", help=HELP, description=HELP)
    p.add_argument("--teachers", action="store_true",
                   help="also list the open_clip model names and their pretrained tags")
    return p


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _extension_row() -> str:
    """Whether apm_fast._C_cuda is built, and for which GPUs (the SM targets it records)."""
    from .._ext import extension_archs, load_extension

    mod, _ = load_extension()
    if mod is None:
        return "not built (the cuda backend below says why)"
    archs = extension_archs(mod)
    return f"built for sm_{', sm_'.join(archs)}" if archs else "built (its SM targets are not recorded)"


def tuned_configs_row(gpu: str, capability) -> str:
    """Where the Triton GEMMs' launch configs come from on a GPU: the measured table's block of
    this GPU, or of another of its compute capability, or none (the shape heuristic ranks them)."""
    try:
        from ..kernels.configs import tuned_block
    except ImportError:
        return "Triton is not installed"
    blocks = tuned_block(gpu, capability)
    sm = f"sm_{capability[0]}{capability[1]}"
    if not blocks:
        return f"none measured for {sm}: ranked by the shape heuristic, the top few autotuned"
    shapes = len({k for _, block in blocks for k in block["configs"]})
    where = ["this GPU" if name == gpu else f"{name} (also {sm})" for name, _ in blocks]
    return f"measured on {', then '.join(where)}: {shapes} shapes; other shapes ranked by the shape heuristic"


def _print_defaults(torch):
    """The table each preset runs on by default here, per workload, and why (the measurement
    behind it)."""
    from ..backends import explain_default
    from ..backends.measured import WORKLOADS
    from ..config import PRESETS

    if not torch.cuda.is_available():
        name, why = explain_default("cpu")
        print(f"default backend on cpu: {name} ({why})")
        return
    for dev in [torch.device("cuda", i) for i in range(torch.cuda.device_count())]:
        print(f"default backend on {dev} ({torch.cuda.get_device_name(dev)}), per preset and workload "
              f"(ttt_step: the TTT trainer and the other training loops; forward: model(x)):")
        for preset, cfg in PRESETS.items():
            for workload in WORKLOADS:
                name, why = explain_default(dev, cfg, workload)
                print(f"  {preset:8s} {workload:8s} {name}: {why}")


def run(args) -> int:
    import torch

    from ..backends import available_backends

    rows = [("python", f"{platform.python_version()} ({sys.executable})"),
            ("platform", platform.platform())]
    rows += [(name, _version(name)) for name in PACKAGES]
    rows.append(("torch CUDA build", torch.version.cuda or "none (CPU build)"))
    rows.append(("CUDA extension", _extension_row()))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"))
            rows.append((f"cuda:{i} Triton configs", tuned_configs_row(p.name, (p.major, p.minor))))
    else:
        rows.append(("GPU", "none visible to torch"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    print("backends:")
    for name, state in available_backends().items():
        print(f"  {name.ljust(width - 2)}  {state}")
    _print_defaults(torch)
    if args.teachers:
        from .common import setup_errors

        with setup_errors():
            from .._compat import import_open_clip

            oc = import_open_clip()
        print("open_clip teachers (name: pretrained tags):")
        for name in oc.list_models():
            tags = oc.list_pretrained_tags_by_model(name)
            print(f"  {name}: {', '.join(tags) if tags else '(no tags; pass a checkpoint file or none)'}")
    return 0
