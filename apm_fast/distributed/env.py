"""Process-group set-up shared by both distributed modes.

Everything goes through ``torch.distributed`` (NCCL between GPUs, gloo on the CPU), started by
``torchrun``, which exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "launched_world_size", "rank_and_world", "cpu_group",
           "NVLS_OFF"]

# NVLink multicast (NVLS) must stay off on the multi-GPU machines the package is measured on; every
# entry point that can reach NCCL sets these before the first NCCL communicator is created.
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}


def _keep_nvls_off():
    for k, v in NVLS_OFF.items():
        os.environ.setdefault(k, v)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank and world size of the default group, its rank on this
    node, the device it should compute on, and whether this call created the process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    created: bool


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when not launched by it)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an integer (set by torchrun), got {raw!r}") from None
    if value < 1:
        raise ValueError(f"WORLD_SIZE: expected a positive integer, got {value}")
    return value


def init_distributed(backend: str | None = None, *, device: str | None = None,
                     timeout: timedelta | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (no-op if already joined).

    ``device``: where this process computes, ``"cuda"`` (then ``cuda:LOCAL_RANK``) or ``"cpu"``;
    ``None``: a GPU when there is one. ``backend``: ``"nccl"`` (GPUs only) or ``"gloo"``;
    ``None``: NCCL on a GPU, gloo on the CPU. Mode 1 needs no GPU collective at all, so
    ``backend="gloo"`` with GPU compute is fine there; mode 2 wants NCCL. Without torchrun
    (WORLD_SIZE unset or 1) and without an existing group, nothing is started and rank 0 of 1
    is returned.
    """
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"backend: expected 'nccl', 'gloo' or None, got {backend!r}")
    if device not in (None, "cuda", "cpu"):
        raise ValueError(f"device: expected 'cuda', 'cpu' or None, got {device!r}")
    _keep_nvls_off()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if backend is None:
        backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl" and device != "cuda":
        raise ValueError("backend: 'nccl' runs between GPUs; with device='cpu' use 'gloo'")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: 'cuda' was asked for but torch sees no GPU")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but this node has only "
                               f"{torch.cuda.device_count()} GPU(s); launch with --nproc-per-node "
                               f"<= {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    created = False
    if not dist.is_initialized():
        if launched_world_size() == 1 and "MASTER_ADDR" not in os.environ:
            return DistInfo(0, 1, local_rank, dev, False)
        kw = {"backend": backend}
        if timeout is not None:
            kw["timeout"] = timeout
        if backend == "nccl":
            kw["device_id"] = dev      # binds the communicator to this GPU up front
        dist.init_process_group(**kw)
        created = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, created)


def rank_and_world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group`` (the default group when None); (0, 1) without one."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise RuntimeError("group: a process group was given but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def cpu_group(timeout: timedelta):
    """A gloo group over every rank, for host-side coordination (barriers, small objects).

    Mode 1 waits at a barrier until the slowest rank has finished its whole share of the images,
    which can take hours; NCCL's watchdog would abort such a wait, so it happens on gloo with its
    own long timeout. A collective: every rank of the default group must call it.
    """
    return dist.new_group(backend="gloo", timeout=timeout)
