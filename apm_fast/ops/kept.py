"""Captured graphs kept for later calls (``driver._ChunkGraph``, ``autograd._ForwardGraph``): their
static buffers serve one call at a time."""
from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["KeptGraph", "CACHE_LOCK"]

CACHE_LOCK = threading.Lock()    # finding or building the kept graph of a cache, one thread at a time


class KeptGraph:
    """Base of a captured graph kept between calls. ``with kept.exclusive():`` one caller at a
    time fills its static inputs, replays and reads its outputs: a host lock, and on CUDA the
    caller's stream first waits for the previous caller's work on those buffers (an event
    recorded on that caller's stream when it left), so callers on different streams or threads
    never see each other's inputs."""

    def __init__(self, device):
        self._device = torch.device(device)
        self._lock = threading.Lock()
        self._left = None

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
