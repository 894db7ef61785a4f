"""FLOP counts: analytic (spec section 3) and measured with ``torch.utils.flop_counter``.

A multiply-add is 2 FLOPs. Like ``FlopCounterMode``, the analytic counts include matrix products
and convolutions only (element-wise work, softmax and the optimizer are not counted), so the two
can be compared line by line. For ``ttt-l14`` at L = 1024 the plain form gives 42.7 GF forward
and 128.1 GF per TTT step, the rewritten form 31.7 GF and 86.5 GF (spec section 3).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict

import torch

__all__ = ["FLOPS_CONVENTION", "apm_flops", "vit_flops", "count_flops", "mha_fastpath_disabled"]

# How every FLOP count and rate of the harness is counted (printed, plotted and in the JSON)
FLOPS_CONVENTION = "1 multiply-add = 2 FLOPs"


def _linear(rows, fan_in, fan_out):
    return 2 * rows * fan_in * fan_out


def apm_flops(cfg, *, form: str = "plain", batch: int = 1, queries: int | None = None,
              want_rgb: bool = False) -> Dict[str, object]:
    """Forward and TTT-step (forward + backward) FLOPs of an APM, term by term.

    ``form``: "plain" (the reference: every column materialized, ``nn.MultiheadAttention``) or
    "rewritten" (trigger split and single-query pool of spec section 3). ``queries``: L (default
    the config's G^2). The backward counts what is computed for the TTT loss (autograd for the
    plain form, the driver's hand-written backward for the rewritten one): the image needs no
    gradient, every parameter (the conv's included) does, so in the plain form the column's
    gradient is formed (it feeds the conv through the trigger) while the rewritten form only
    needs dT_b = W_T^T sum_l g1_{b,l}.
    """
    if form not in ("plain", "rewritten"):
        raise ValueError(f"form: expected 'plain' or 'rewritten', got {form!r}")
    B = int(batch)
    L = cfg.queries if queries is None else int(queries)
    d, D, heads = cfg.pos_dim, cfg.dim, cfg.heads
    widths = list(cfg.hidden)
    fwd: Dict[str, int] = {}
    bwd: Dict[str, int] = {}
    conv = 2 * B * d * cfg.in_chans * cfg.patch * cfg.patch
    fwd["conv"] = conv
    bwd["conv"] = conv                                     # weight gradient only
    if form == "plain":
        fwd["fc1"] = _linear(B * L, 2 * d, widths[0])
        bwd["fc1"] = 2 * fwd["fc1"]                        # dW and the column's gradient
    else:
        fwd["fc1.P"] = _linear(L, d, widths[0])            # P = pos W_P^T, shared by the batch
        fwd["fc1.u"] = _linear(B, d, widths[0])            # u_b = W_T T_b + b1
        bwd["fc1.P"] = fwd["fc1.P"]                        # dW_P = (sum_b g1_b)^T pos
        bwd["fc1.u"] = 2 * fwd["fc1.u"]                    # dW_T and dT
    for i in range(1, len(widths)):
        k = f"fc{i + 1}"
        fwd[k] = _linear(B * L, widths[i - 1], widths[i])
        bwd[k] = 2 * fwd[k]
    fwd["head"] = _linear(B * L, widths[-1], D)
    bwd["head"] = 2 * fwd["head"]
    if cfg.pool:
        if form == "plain":
            fwd["pool.q"] = _linear(B, D, D)
            fwd["pool.kv"] = 2 * _linear(B * L, D, D)      # key and value projections of every cell
            fwd["pool.attn"] = 2 * 2 * B * L * D           # q k^T and a v over all heads
            fwd["pool.out"] = _linear(B, D, D)
            bwd["pool.q"] = 2 * fwd["pool.q"]
            bwd["pool.kv"] = 2 * fwd["pool.kv"]
            bwd["pool.attn"] = 2 * fwd["pool.attn"]
            bwd["pool.out"] = 2 * fwd["pool.out"]
        else:
            fwd["pool.q"] = _linear(1, D, D) + 2 * D * D   # q = W_q query, k~ = W_k^T q
            fwd["pool.scores"] = 2 * B * L * D * heads     # kv k~^T
            fwd["pool.sum"] = 2 * B * L * heads * D        # sum_l a_l kv_l per head
            fwd["pool.v"] = 2 * B * D * D                  # W_v,h s_h
            fwd["pool.out"] = _linear(B, D, D)
            # the driver's hand-written backward: dq and dquery are products (W_k kt, W_q^T dq); the
            # weight gradients of W_q and W_k are rank-one outer products (element-wise work); the
            # pool's backward recomputes the scores before its two products per score
            bwd["pool.q"] = 2 * D * D + 2 * D * D
            bwd["pool.scores"] = 3 * fwd["pool.scores"]
            bwd["pool.sum"] = 2 * fwd["pool.sum"]
            bwd["pool.v"] = 2 * fwd["pool.v"]
            bwd["pool.out"] = 2 * fwd["pool.out"]
    if cfg.rgb_head and want_rgb:
        rest = _linear(B * L, 256, 256) + _linear(B * L, 256, 3)
        if form == "plain":
            fwd["rgb"] = _linear(B * L, D + 2 * d, 256) + rest
        else:
            fwd["rgb"] = (_linear(B * L, D, 256) + _linear(B, d, 256) + _linear(L, d, 256) + rest)
    f, b = sum(fwd.values()), sum(bwd.values())
    return {"form": form, "batch": B, "queries": L, "forward": f, "backward": b, "step": f + b,
            "forward_terms": fwd, "backward_terms": bwd}


def vit_flops(*, width: int, layers: int, patch: int, image: int, mlp_width: int, out_dim: int,
              in_chans: int = 3, cls_token: bool = True, batch: int = 1) -> Dict[str, int]:
    """One forward of a ViT image tower (open_clip layout): patch embedding, ``layers`` blocks of
    attention (qkv and output projections, and q k^T / a v over all N^2 token pairs) and MLP,
    and the final projection."""
    n = (image // patch) ** 2 + (1 if cls_token else 0)
    per_layer = (_linear(n, width, 3 * width) + _linear(n, width, width)
                 + 4 * n * n * width + _linear(n, width, mlp_width) + _linear(n, mlp_width, width))
    terms = {"patch_embed": _linear((image // patch) ** 2, in_chans * patch * patch, width),
             "blocks": layers * per_layer, "attention_n2": layers * 4 * n * n * width,
             "proj": _linear(1, width, out_dim)}
    total = terms["patch_embed"] + terms["blocks"] + terms["proj"]
    return {"tokens": n, "forward": batch * total,
            "terms": {k: batch * v for k, v in terms.items()}}


@contextmanager
def mha_fastpath_disabled():
    """``nn.MultiheadAttention``'s inference fast path runs as one fused op that the flop
    counter does not know (it would count 0); the decomposed path goes through counted ops."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` as counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with mha_fastpath_disabled():
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
    return int(counter.get_total_flops())
