"""Captured graphs kept for later calls (``driver._ChunkGraph``, ``autograd._ForwardGraph``): one
per cache, found or built under one lock, serving one call at a time, all freed by
:func:`release_graphs`; and the few streams captured work runs on (:func:`side_stream`)."""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Dict

import torch

__all__ = ["KeptGraph", "LOCK", "cache", "kept", "release_graphs", "side_stream"]

LOCK = threading.Lock()       # finding or building a cache's graph, one thread at a time
_CACHES: list = []             # every cache of kept graphs (release_graphs)
_SIDE: dict = {}               # (device, role) -> stream (side_stream)


def cache() -> Dict:
    """A new cache of kept graphs (key -> graph; one at a time), registered for release_graphs."""
    c: Dict = {}
    _CACHES.append(c)
    return c


def kept(store: Dict, key, build: Callable[[], "KeptGraph"]) -> "KeptGraph":
    """``store``'s graph for ``key``; on a miss the old one is freed, then ``build()`` makes the new."""
    with LOCK:
        got = store.get(key)
        if got is None:
            store.clear()
            got = store[key] = build()
        return got


def release_graphs():
    """Drop every captured inference graph kept for the next call (columns' chunk, the replayed
    inference forward) and the memory they hold; the next call captures again when it needs to."""
    with LOCK:
        for c in _CACHES:
            c.clear()


class KeptGraph:
    """Base of a captured graph kept between calls. :meth:`capture` records ``fn`` (a function of
    the object's static buffers) as a CUDA graph, and :meth:`replay` replays it, or runs ``fn``
    eagerly where there is no capture (the CPU, a failed capture). ``with kept.exclusive():`` one
    caller at a time fills its static inputs, replays and reads its outputs: a host lock, and on
    CUDA the caller's stream first waits for the previous caller's work on those buffers (an event
    recorded on that caller's stream when it left), so callers on different streams or threads
    never see each other's inputs."""

    def __init__(self, device):
        self._device = torch.device(device)
        self._lock = threading.Lock()
        self._left = None
        self._fn = self.graph = None

    def capture(self, fn: Callable[[], None], reset: Callable[[], None], key: str):
        from ..ttt.graph import capture_phases

        self._fn = fn
        graphs = capture_phases({"graph": fn}, reset, self._device, key=key)
        self.graph = None if graphs is None else graphs["graph"]

    def replay(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self._fn()

    @contextlib.contextmanager
    def exclusive(self):
        with self._lock:
            cuda = self._device.type == "cuda"
            if cuda and self._left is not None:
                torch.cuda.current_stream(self._device).wait_event(self._left)
            try:
                yield self
            finally:
                if cuda:
                    self._left = torch.cuda.Event()
                    self._left.record(torch.cuda.current_stream(self._device))


def side_stream(device, role: str = "capture"):
    """One stream per device and role for every caller: ``"capture"``, the warm-up/capture stream
    of the TTT programs; ``"adam"`` and ``"adam.2"``, the streams a step's early optimizer updates
    run on beside the backward; ``"beside"``, the driver's small independent work beside its main
    stream (``driver.Beside``); ``"wgrad"``, the backward's weight gradients beside its input
    gradients. cuBLAS keeps a workspace per stream it has seen, so a fresh stream per program
    would leave one more workspace each time.

    Every stream but the updates' has the device's highest priority, theirs the default (the
    lowest): PyTorch instantiates graphs with each kernel's priority from capture time, so in a
    replayed step the SMs that free up go to the forward's and backward's kernels first and the
    Adam updates beside them fill the rest, instead of a large update holding the GPU while the
    backward waits."""
    key = (str(device), role)
    if key not in _SIDE:
        _SIDE[key] = torch.cuda.Stream(device, priority=0 if role.startswith("adam") else -100)   # clamped
    return _SIDE[key]
