"""CUDA graph capture of the TTT phases, with a clean eager fallback that says so once.

At one image a TTT step is a few hundred small launches: eager execution is bound by the host
(spec section 4). Captured once, the whole step is one ``cudaGraphLaunch``. The recipe:

* warm up eagerly on a side stream first (JIT compilation, autotuning and cuBLAS workspace
  allocation must not happen during capture), resetting the state before every warm-up step so
  that device-side counters stay in range;
* capture every phase on that same side stream into graphs that share one private memory pool
  (the phases replay in order, never concurrently, so they can reuse each other's memory);
* ``capture_error_mode="thread_local"``: a DataLoader's pin-memory thread may call
  cudaHostAlloc while we capture; only this thread's calls must be capture-safe.

Anything that goes wrong during capture (an op that synchronizes, a kernel that allocates pinned
memory, an old driver) is caught: the caller runs the same functions eagerly, with the same
results, and a warning names the reason once per configuration.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable, Dict, Optional

import torch

from ..ops.kept import side_stream

__all__ = ["capture_phases", "say_once", "side_stream"]

log = logging.getLogger("apm_fast.engine")
_SAID: set = set()


def say_once(key, message: str, *, warn: bool = True):
    """Warn (or log at INFO when ``warn`` is False) once per ``key`` per process."""
    if key in _SAID:
        return
    _SAID.add(key)
    if warn:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    else:
        log.info(message)


def capture_phases(phases: Dict[str, Callable[[], None]], reset: Callable[[], None], device, *,
                   warmup: int = 3, key=None) -> Optional[Dict[str, "torch.cuda.CUDAGraph"]]:
    """Capture each of ``phases`` (name -> function without arguments that only touches static
    tensors) into a CUDA graph. ``reset`` puts the state back to where a batch starts.

    Returns {name: graph}, or None (after warning once under ``key``) when capture is not
    possible; the state is reset either way."""
    device = torch.device(device)
    if device.type != "cuda":
        say_once(("no-graphs", device.type, key),
                 f"apm_fast.engine: CUDA graphs need a CUDA device (got {device}); the TTT step "
                 "runs eagerly", warn=False)
        return None
    caller_stream = torch.cuda.current_stream(device)
    try:
        with torch.cuda.device(device):
            side = side_stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(max(1, warmup)):
                    reset()
                    for fn in phases.values():
                        fn()
                reset()
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            graphs, pool = {}, None
            for name, fn in phases.items():
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=side, capture_error_mode="thread_local"):
                    fn()
                pool = g.pool()
                graphs[name] = g
            torch.cuda.synchronize(device)
        return graphs
    except Exception as exc:  # any capture failure means: run eagerly, same functions
        # a failing capture_end() skips torch.cuda.graph's own stream restore: put the caller's back
        torch.cuda.set_stream(caller_stream)
        try:
            torch.cuda.synchronize(device)
        except Exception:
            pass
        say_once(("capture-failed", key),
                 f"apm_fast.engine: CUDA graph capture failed for {key} "
                 f"({type(exc).__name__}: {exc}); running the TTT step eagerly (same results, "
                 "slower)")
        reset()
        return None
