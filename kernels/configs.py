"""Launch configs of the GEMM and weight-gradient kernels: what a config holds, the candidates,
the shape heuristic that ranks them, and the lookup in the measured table (``tuned_configs``).

A config names the kernel variant (TMA descriptors or plain pointers, persistent or one tile per
program, for the first layer the activation fused or materialized) and its tile, warps and
stages. ``rank_gemm`` / ``rank_wgrad`` order the candidates best first for a shape by a cheap cost
estimate; the table's entry for that exact shape (``tuned_entry``) is used instead when there is one.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields

from ._common import INTERPRET, cdiv

__all__ = ["GemmCfg", "WgradCfg", "gemm_candidates", "rank_gemm", "wgrad_candidates", "rank_wgrad", "tuned_entry",
           "tuned_block", "gpu_identity", "render_tuned", "known_bad", "SMEM_BUDGET"]

# H100: 227 KB of shared memory per block; a little is kept for the compiler's own scratch.
SMEM_BUDGET = 220 * 1024


class _Cfg:
    """A launch config that round-trips through a dict (the sweep's JSON, the tuned table)."""

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)} (known: {sorted(names)})")
        return cls(**d)

    def to_dict(self):
        return asdict(self)


@dataclass(frozen=True)
class GemmCfg(_Cfg):
    """C = epilogue(prologue(A) @ B) tiles of bm x bn, bk deep per step.

    tma: operands loaded through TMA descriptors (16-bit tiles straight into shared memory for
    wgmma) instead of pointer loads. persistent: one program per SM looping over the tiles
    (otherwise one program per tile). materialize (first_layer_linear only): ReLU(P + u) is
    written once per chunk of images by an elementwise kernel and the plain GEMM reads it, instead
    of being built in the A-operand prologue (registers)."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    group: int = 8
    tma: bool = False
    persistent: bool = False
    materialize: bool = False

    def name(self):
        v = ("tma" + ("-pers" if self.persistent else "")) if self.tma else "ptr"
        return (f"{v}{'+mat' if self.materialize else ''} {self.bm}x{self.bn}x{self.bk} "
                f"w{self.warps} s{self.stages} g{self.group}")

    def smem(self, elt: int, out_elt: int = 0) -> int:
        """Bytes of shared memory: the operand pipeline, plus the output tile for a TMA store."""
        return self.stages * (self.bm * self.bk + self.bk * self.bn) * elt + self.bm * self.bn * out_elt


@dataclass(frozen=True)
class WgradCfg(_Cfg):
    """dW tiles of bn x bk reduced over the rows bm at a time, the rows split ``split`` ways
    (fp32 atomics into a zeroed output when split > 1); tma as for GemmCfg."""

    bn: int
    bk: int
    bm: int
    warps: int
    stages: int
    split: int = 1
    tma: bool = False

    def name(self):
        return (f"{'tma' if self.tma else 'ptr'} {self.bn}x{self.bk} step {self.bm} w{self.warps} "
                f"s{self.stages} split {self.split}")

    def smem(self, elt: int) -> int:
        return self.stages * (self.bn * self.bm + self.bm * self.bk) * elt


# ------------------------------------------------------------------------------------ GEMM
# (bm, bn, bk, warps, stages) for 16-bit operands: 128 x 256 for the big batched GEMMs, 128 x 128
# when one image fills about one wave (fc2 at B = 1: 8 x 16 = 128 tiles on 132 SMs), smaller tiles
# for fc3 / head at B = 1.
_TILES16 = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
            (128, 128, 128, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]
# fp32 ("ieee" products on the FMA units): small tiles keep the registers in bounds.
_TILES32 = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (32, 64, 32, 4, 3)]
GEMM_INTERP = GemmCfg(16, 16, 16, 4, 1, group=2)


# (bm, bn, warps) of the first layer's fused prologue on TMA tiles that Triton 3.6 miscompiles.
_BAD_PROLOGUE_TMA = {(128, 256, 8), (128, 64, 4)}


def known_bad(cfg: GemmCfg, *, prologue: bool) -> bool:
    """Configs that compile and run but compute wrong results, so they are never ranked nor taken
    from the table. Found on the H100 (Triton 3.6) by the sweep's correctness check
    (benchmarks/results/h100/sweep_triton.json) and by the GPU test of every candidate in
    tests/test_triton_kernels.py, both for the first layer's fused prologue (ReLU(P + u) built in
    registers from a TMA tile): on 128 x 256 tiles with 8 warps every output is wrong (relative
    error 0.28 to 0.42 at every shape tried); on 128 x 64 tiles with 4 warps some elements are
    (Frobenius 3.5e-3 instead of 1.7e-3, the worst element off by 3.8% of the largest, with
    several images). The same tiles with pointer loads, with the activation materialized, or
    256 x 128 are right."""
    return (prologue and cfg.tma and not cfg.materialize
            and (cfg.bm, cfg.bn, cfg.warps) in _BAD_PROLOGUE_TMA)


def gemm_candidates(elt: int, tma: bool, *, prologue: bool = False):
    """Candidates for operands of ``elt`` bytes; TMA ones only for 16-bit operands when ``tma``
    (fp32 mode exists for accuracy: it keeps the plain pointer kernel). ``prologue``: for the first
    layer's fused A-operand prologue (drops the ``known_bad`` ones)."""
    tiles = _TILES16 if elt <= 2 else _TILES32
    tma = tma and elt <= 2
    out = []
    for bm, bn, bk, w, s in tiles:
        if tma:
            out.append(GemmCfg(bm, bn, bk, w, s, tma=True, persistent=True))
            out.append(GemmCfg(bm, bn, bk, w, s, tma=True))
        out.append(GemmCfg(bm, bn, bk, w, s))
    return [c for c in out if not known_bad(c, prologue=prologue)]


def _reuse(a: int, b: int) -> float:
    """FLOPs per loaded element of an a x b tile, relative to 128 x 256."""
    return (a * b / (a + b)) / (128 * 256 / 384)


def rank_gemm(cands, *, S, NSEG, L, N, sms, elt, out_elt):
    """Best first by an estimated time: whole waves of tiles, each costing its area over the
    square root of its operand reuse; TMA preferred (operands straight to shared memory), a
    persistent loop preferred once there are several waves; configs over the shared-memory budget
    last."""

    def cost(c):
        if c.smem(elt, out_elt if c.tma else 0) > SMEM_BUDGET:
            return float("inf")
        tiles = S * NSEG * cdiv(L, c.bm) * cdiv(N, c.bn)
        t = cdiv(tiles, sms) * c.bm * c.bn / _reuse(c.bm, c.bn) ** 0.5
        if c.tma:
            t *= 0.8
            if c.persistent:
                t *= 0.97 if tiles > 2 * sms else 1.01
        return t

    return sorted(cands, key=cost)


# ------------------------------------------------------------------------------------ weight grads
_WTILES16 = [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (64, 128, 64, 4, 4),
             (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)]
_WTILES32 = [(64, 64, 32, 4, 3), (32, 64, 32, 4, 3)]
WGRAD_INTERP = WgradCfg(16, 16, 16, 4, 1)


def splits_for(tiles: int, rows: int, bm: int, sms: int):
    """Split factors worth trying for ``tiles`` output tiles over ``rows`` rows: 1, and when the tiles
    leave SMs idle, the factors that fill one or two waves most evenly (>= 4 steps of bm rows each)."""
    cap = max(1, rows // (4 * bm))
    out = {1}
    if tiles < sms:
        for waves in (1, 2):
            k = max(1, min(cap, (waves * sms) // tiles))
            out.add(k)
    return sorted(out)


def wgrad_candidates(elt: int, tma: bool, *, tiles_of, rows: int, sms: int):
    """tiles_of(bn, bk) -> output tiles of the problem (all students); TMA only for 16-bit operands."""
    tma = tma and elt <= 2
    out = []
    for bn, bk, bm, w, s in (_WTILES16 if elt <= 2 else _WTILES32):
        for split in splits_for(tiles_of(bn, bk), rows, bm, sms):
            if tma:
                out.append(WgradCfg(bn, bk, bm, w, s, split, tma=True))
            out.append(WgradCfg(bn, bk, bm, w, s, split))
    return out


def rank_wgrad(cands, *, tiles_of, rows: int, sms: int, elt: int):
    """Best first by an estimated time: waves of (tile x split) programs, each reducing rows/split
    rows at a cost of its area over the square root of its reuse, plus the atomic read-modify-write
    of its tile when split."""

    def cost(c):
        if c.smem(elt) > SMEM_BUDGET:
            return float("inf")
        progs = tiles_of(c.bn, c.bk) * c.split
        per = cdiv(rows, c.split) * c.bn * c.bk / _reuse(c.bn, c.bk) ** 0.5
        atomics = c.bn * c.bk * 8 if c.split > 1 else 0
        t = cdiv(progs, sms) * (per + atomics)
        return t * (0.8 if c.tma else 1.0)

    return sorted(cands, key=cost)


# ------------------------------------------------------------------------------------ the table
def tuned_block(gpu: str, capability) -> list:
    """The tuned table's GPUs to consult for ``gpu`` (a device name, as
    ``torch.cuda.get_device_name`` gives it) of compute ``capability`` (major, minor), in order:
    its own block, then every other GPU's of the same capability (a GPU not swept, or a shape its
    sweep did not cover, takes the winners measured on its architecture). [(name, block)]."""
    from .tuned_configs import TUNED

    cap = tuple(capability) if capability is not None else None
    own = [(gpu, TUNED[gpu])] if gpu in TUNED else []
    same = [(n, b) for n, b in TUNED.items()
            if n != gpu and cap is not None and b["capability"] is not None and tuple(b["capability"]) == cap]
    return own + same


@functools.lru_cache(maxsize=None)
def _gpu_of(index: int):
    import torch

    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


def gpu_identity(device) -> tuple:
    """(name, (major, minor)) of a CUDA ``device``; (None, None) elsewhere."""
    if device is None or getattr(device, "type", None) != "cuda":
        return None, None
    import torch

    return _gpu_of(device.index if device.index is not None else torch.cuda.current_device())


def tuned_entry(prim: str, key: tuple, cls, elt: int, device=None):
    """The measured best config for (prim, *key) on ``device`` from ``tuned_configs.TUNED``
    (measured with 16-bit operands on a GPU: not used for fp32 nor under the interpreter): the
    device's own entry, else one measured on another GPU of its compute capability
    (:func:`tuned_block`), else None."""
    if INTERPRET or elt > 2:
        return None
    for _, block in tuned_block(*gpu_identity(device)):
        d = block["configs"].get((prim, *key))
        if d is not None:
            return cls.from_dict(d["config"])
    return None


def render_tuned(table: dict, doc: str) -> str:
    """The text of ``apm_fast/kernels/tuned_configs.py`` holding ``table`` ({gpu: {"capability",
    "source", "configs": {key: {"config", "tflops", "cublas_tflops"}}}}) under the docstring ``doc``."""
    lines = ['"""' + doc.strip("\n") + "\n" + '"""', "", "TUNED = {"]
    for gpu, block in table.items():
        cap = block["capability"]
        lines += [f"    {gpu!r}: {{",
                  f"        'capability': {tuple(cap) if cap is not None else None!r},",
                  f"        'source': {block.get('source', '')!r},",
                  "        'configs': {"]
        lines += [f"            {tuple(key)!r}: {entry!r}," for key, entry in block["configs"].items()]
        lines += ["        },", "    },"]
    lines.append("}")
    return "\n".join(lines) + "\n"
