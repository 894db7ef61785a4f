"""The 2-D sin/cos position code of the APM (spec section 1), computed in float64 and cached."""
from __future__ import annotations

import math
import threading

import torch

from .validation import _positive_int

__all__ = ["position_code", "position_rows", "position_cells", "position_halves", "position_factors"]

_CACHE: dict = {}
_LOCK = threading.RLock()       # reentrant: a cached value may be built from another (the halves from the code)


def _device(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _cached(key, device: torch.device, build):
    """``_CACHE[key]``, built by ``build()`` on the first call. Built outside any
    inference_mode/no_grad context of the caller, so a cached tensor is an ordinary constant that
    autograd and graph capture can both use. While ``torch.compile`` traces, or while a CUDA graph
    is being captured on ``device``, before any eager call made it: built (in the graph) and not
    kept (no lock, no global write, no tensor of a graph's private memory)."""
    got = _CACHE.get(key)
    if got is not None:
        return got
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return build()
    with _LOCK:
        got = _CACHE.get(key)
        if got is None:
            with torch.inference_mode(False), torch.no_grad():
                got = build()
            _CACHE[key] = got
    return got


def _position_code_f64(d: int, height: int, width: int) -> torch.Tensor:
    """(height*width) x d code; row l = y * width + x.

    For d divisible by 4 this is exactly the authors' code: half = d/2 channels for x, half for
    y, sin on even and cos on odd channels, freq_k = exp(-2k ln(10000) / half). For other d (odd
    test grids such as 5 x 5 -> d = 25) the code is computed at the next multiple of 4 and its
    first d channels are kept, which leaves every channel of the divisible case unchanged.
    """
    half = 2 * ((d + 3) // 4)
    k = torch.arange(half // 2, dtype=torch.float64)
    freq = torch.exp(-2.0 * k * math.log(10000.0) / half)
    xs = torch.arange(width, dtype=torch.float64)
    ys = torch.arange(height, dtype=torch.float64)
    code = torch.empty(height, width, 2 * half, dtype=torch.float64)
    ax = xs[:, None] * freq[None, :]          # width x half/2
    ay = ys[:, None] * freq[None, :]          # height x half/2
    code[:, :, 0:half:2] = torch.sin(ax)[None, :, :]
    code[:, :, 1:half:2] = torch.cos(ax)[None, :, :]
    code[:, :, half::2] = torch.sin(ay)[:, None, :]
    code[:, :, half + 1::2] = torch.cos(ay)[:, None, :]
    return code.reshape(height * width, 2 * half)[:, :d].contiguous()


def position_code(d: int, height: int, width: int | None = None, *, dtype=torch.float32,
                  device=None) -> torch.Tensor:
    """The position code of width ``d`` on a ``height x width`` grid, as an L x d tensor.

    Computed once in float64 and cached per (d, grid, dtype, device); treat it as read-only.
    ``d``, ``height`` and ``width`` are positive integers (numpy integers too).
    """
    width = height if width is None else width
    for name, v in (("d", d), ("height", height), ("width", width)):
        _positive_int(name, v)
    device = _device(device)
    return _cached((int(d), int(height), int(width), dtype, device), device,
                   lambda: _position_code_f64(int(d), int(height), int(width)).to(device=device, dtype=dtype))


def position_rows(d: int, height: int, width: int, start: int, stop: int, *, dtype=torch.float32,
                  device=None) -> torch.Tensor:
    """Rows ``start:stop`` of ``position_code(d, height, width)``, built from the code's two
    halves (x and y parts, each a function of one coordinate) so that the L x d code is never held.
    """
    if not 0 <= start <= stop <= height * width:
        raise ValueError(f"rows: expected 0 <= start <= stop <= {height * width}, got {start}:{stop}")
    return position_cells(d, height, width, torch.arange(start, stop, device=device), dtype=dtype)


def position_halves(d: int, height: int, width: int, *, dtype=torch.float32, device=None, rounded=None):
    """The code's two halves: (X (width, hx), Y (height, d - hx)), with row y * width + x of
    ``position_code(d, height, width)`` equal to [X[x] | Y[y]] exactly (the first channels are
    a function of x alone, the rest of y alone; for widths d not divisible by 4 the y half is
    the part the trim keeps). ``rounded`` (a dtype): the values as that dtype holds them (the code
    a GEMM in it reads), held in ``dtype``. Cached like the code; treat them as read-only."""
    device = _device(device)
    if rounded is not None and rounded != dtype:
        return _cached(("halves", int(d), int(height), int(width), dtype, device, rounded), device,
                       lambda: tuple(h.to(dtype) for h in position_halves(d, height, width, dtype=rounded,
                                                                          device=device)))

    def build():
        hx = min(d, 2 * ((d + 3) // 4))
        # x varies along a 1 x width grid (y = 0), y along a height x 1 grid (x = 0)
        return (position_code(d, 1, width, dtype=dtype, device=device)[:, :hx].contiguous(),
                position_code(d, height, 1, dtype=dtype, device=device)[:, hx:].contiguous())
    return _cached(("halves", int(d), int(height), int(width), dtype, device), device, build)


def position_factors(d: int, height: int, width: int, *, terms: int = 1, dtype=torch.float32, device=None):
    """The code as a product, ``position_code(d, height, width) = E C`` (cached, read-only):
    C ((width + height), d) holds the two halves (:func:`position_halves`) on the block diagonal,
    [X 0; 0 Y], and E (height * width, width + height) is the 0/1 matrix that picks row x and row
    width + y for cell y * width + x. With ``terms`` > 1, C's rows and E's columns are repeated
    that many times ([C; C], [E | E] for two), for a middle operand split into that many terms."""
    device = _device(device)

    def build():
        xs, ys = position_halves(d, height, width, dtype=torch.float64, device=device)
        hx = xs.shape[1]
        c = torch.zeros((width + height, d), dtype=torch.float64, device=device)
        c[:width, :hx], c[width:, hx:] = xs, ys
        cells = torch.arange(height * width, device=device)
        e = torch.zeros((height * width, width + height), dtype=torch.float64, device=device)
        e[cells, cells % width] = 1.0
        e[cells, width + cells // width] = 1.0
        return c.repeat(terms, 1).to(dtype), e.repeat(1, terms).to(dtype)
    return _cached(("factors", int(d), int(height), int(width), int(terms), dtype, device), device, build)


def position_cells(d: int, height: int, width: int, cells: torch.Tensor, *, dtype=torch.float32) -> torch.Tensor:
    """The rows ``cells`` (a long tensor of indices y * width + x, on the code's device) of
    ``position_code(d, height, width)``, from the code's two halves (:func:`position_halves`)
    so that the L x d code is never held. No value is read on the host: the indices may be
    computed on the device (a captured chunk replayed at any offset)."""
    xs, ys = position_halves(d, height, width, dtype=dtype, device=cells.device)
    return torch.cat([xs[cells % width], ys[cells // width]], dim=1)
