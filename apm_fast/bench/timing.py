"""Timing and peak-memory measurement shared by every benchmark section.

On a GPU each repeat is bracketed by CUDA events on the current stream and followed by a
synchronize, so a sample is the latency of one call from an idle device (launch overhead
included, which is what dominates at one image). On the CPU a sample is ``perf_counter`` around
the call. Every measurement has a warm-up (compilation, autotuning, caches) and at least
``MIN_REPEATS`` samples, summarised by the median and the 20th/80th percentiles.
"""
from __future__ import annotations

import gc
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import torch

__all__ = ["MIN_REPEATS", "Timing", "measure", "measure_graph", "summarize", "quantile", "PeakMemory",
           "peak_memory", "synchronize", "autocast"]

# The harness never reports a spread from fewer samples than this.
MIN_REPEATS = 20


@dataclass
class Timing:
    """Milliseconds per call: median with the 20th and 80th percentiles of ``repeats`` samples."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    mean_ms: float
    repeats: int
    warmup: int
    clock: str
    samples_ms: List[float] = field(default_factory=list)
    # why a call that asked for a CUDA graph (measure_graph) was timed eagerly; None otherwise
    fallback: Optional[str] = None

    @property
    def mode(self) -> str:
        """``"graph"``: replays of a captured CUDA graph; ``"eager"``: the calls themselves."""
        return "graph" if self.clock.startswith("cuda-graph") else "eager"

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["fallback"] is None:
            del d["fallback"]
        return d


def quantile(values, q: float) -> float:
    """Linear-interpolated quantile of a non-empty sequence (q in [0, 1])."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("quantile: expected at least one value, got none")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile: expected q in [0, 1], got {q!r}")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples_ms, *, clock: str, warmup: int = 0, keep_samples: bool = True) -> Timing:
    """A :class:`Timing` from samples taken elsewhere (e.g. per-image times of a TTT run)."""
    samples = [float(s) for s in samples_ms]
    if len(samples) < MIN_REPEATS:
        raise ValueError(f"samples: expected at least {MIN_REPEATS}, got {len(samples)}")
    return Timing(median_ms=quantile(samples, 0.5), p20_ms=quantile(samples, 0.2),
                  p80_ms=quantile(samples, 0.8), min_ms=min(samples),
                  mean_ms=sum(samples) / len(samples), repeats=len(samples), warmup=warmup,
                  clock=clock, samples_ms=[round(s, 6) for s in samples] if keep_samples else [])


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def measure(fn: Callable[[], object], *, device="cpu", warmup: int = 3,
            repeats: int = MIN_REPEATS, keep_samples: bool = True) -> Timing:
    """Time ``fn()`` (no arguments) ``repeats`` times after ``warmup`` untimed calls."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < MIN_REPEATS:
        raise ValueError(f"repeats: expected an integer >= {MIN_REPEATS}, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup: expected a non-negative integer, got {warmup!r}")
    cuda = _is_cuda(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    if cuda:
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples, clock="cuda-events" if cuda else "perf_counter", warmup=warmup,
                     keep_samples=keep_samples)


def measure_graph(fn: Callable[[], object], *, device, inner: int = 5, warmup: int = 2,
                  repeats: int = MIN_REPEATS, reset: Callable[[], None] = lambda: None,
                  keep_samples: bool = True, key: Optional[str] = None) -> Timing:
    """Device time per call of ``fn``: ``inner`` calls captured in one CUDA graph (the engine's
    capture, ``apm_fast.ttt.graph``: warm-up on a side stream, ``reset`` before each), each replay
    timed; so launch overheads do not count. Where capture is impossible (the CPU, an op that
    synchronizes) the calls are timed eagerly, ``clock`` says which (``Timing.mode``), and on a
    CUDA device ``fallback`` says why (the capture's warning, also passed on). ``key`` names the
    capture in that warning."""
    from ..ttt.graph import capture_phases

    graphs, fallback = None, None
    if _is_cuda(device):
        key = key or f"bench-{getattr(fn, '__name__', 'fn')}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graphs = capture_phases({"calls": lambda: [fn() for _ in range(inner)]}, reset, device,
                                    warmup=warmup, key=key)
        for w in caught:               # still loud
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if graphs is None:
            said = [str(w.message) for w in caught if "capture failed" in str(w.message)]
            fallback = said[-1] if said else f"CUDA graph capture failed for {key} (warned earlier in this process)"
    if graphs is None:
        t = measure(fn, device=device, warmup=warmup, repeats=repeats, keep_samples=keep_samples)
        t.fallback = fallback
        return t
    t = measure(graphs["calls"].replay, device=device, warmup=1, repeats=repeats, keep_samples=keep_samples)
    scaled = {k: (v / inner if k.endswith("_ms") and isinstance(v, float) else v) for k, v in t.to_dict().items()}
    scaled["samples_ms"] = [v / inner for v in t.samples_ms]
    scaled["clock"] = f"cuda-graph replay of {inner} call" + ("s" if inner > 1 else "")
    return Timing(**scaled)


def autocast(device, dtype, *, cache_enabled: bool = True):
    """``torch.autocast`` for ``dtype`` (None: a no-op context). Graph capture needs
    ``cache_enabled=False``: the autocast weight cache must not outlive the captured region."""
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=cache_enabled)


@dataclass
class PeakMemory:
    """Bytes allocated by torch on the device above what was allocated when measuring began
    (``peak_bytes``), and that baseline; both None on the CPU, where torch keeps no such count."""

    device: str
    baseline_bytes: Optional[int] = None
    peak_bytes: Optional[int] = None

    @property
    def available(self) -> bool:
        return self.peak_bytes is not None

    def restart(self) -> Optional[int]:
        """The peak so far above the baseline (None on the CPU), then the peak counted afresh from
        what is allocated now (the baseline stays: what was built meanwhile still counts)."""
        if self.baseline_bytes is None:
            return None
        device = torch.device(self.device)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - self.baseline_bytes
        torch.cuda.reset_peak_memory_stats(device)
        return peak


@contextmanager
def peak_memory(device):
    """``with peak_memory(dev) as pm: ...`` then ``pm.peak_bytes`` (``torch.cuda.max_memory_allocated``
    minus the allocation at entry, so objects alive from earlier sections do not count)."""
    device = torch.device(device)
    pm = PeakMemory(device=str(device))
    if device.type != "cuda":
        yield pm
        return
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    pm.baseline_bytes = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield pm
    finally:
        torch.cuda.synchronize(device)
        pm.peak_bytes = torch.cuda.max_memory_allocated(device) - pm.baseline_bytes
