"""``apm-fast info``: versions, the GPU, and which backends can run here."""
from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata

HELP = "print versions (python, torch, triton, open_clip, CUDA) and the available backends"

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
    else:
        rows.append(("GPU", "none visible to torch"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    print("backends:")
    for name, state in available_backends().items():
        print(f"  {name.ljust(width - 2)}  {state}")
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
