"""Triton kernels of apm-fast (installed as ``apm_fast.kernels``).

One file per fused operation, kernel and host launcher together; the table that uses them is
``apm_fast.backends.triton.TritonPrimitives`` (semantics: ``apm_fast.ops.contract``).

* ``gemm.py``    row-tiled GEMM: ``linear`` (bias/ReLU/cast epilogue), ``first_layer_linear``
                 (ReLU(P_l + u_b) built in the A-operand prologue), ``linear_bwd_input`` (ReLU mask
                 epilogue), ``first_layer_bwd_input`` (mask from P + u, per-image row sums r).
* ``gemm_tma.py`` the same GEMM with TMA-descriptor operands (wgmma from shared memory), optionally
                 persistent, and the kernel that materializes ReLU(P + u) per chunk of images.
* ``wgrad.py``   weight gradients dy^T X with X rebuilt on load (plain, ReLU(P + u), f + pos_out),
                 bias gradient fused, split-K with fp32 atomics when the output has few tiles;
                 optionally written into given buffers (views of a flat gradient buffer).
* ``wgrad_tma.py`` the weight-gradient kernel with TMA-descriptor operands.
* ``configs.py`` launch configs (GemmCfg, WgradCfg), candidates, the shape heuristic ranking them.
* ``tuned_configs.py`` measured best config per GPU and shape (from benchmarks/sweep_triton.py): overrides
                 the ranking for those shapes.
* ``pool.py``    single-query pool: forward with an online softmax (split over L + exact merge for
                 few programs), backward (df and the key-gradient coefficients; dkt via wgrad).
* ``heads.py``   the pool's per-head products against per-student weights (matrix-vector, one
                 read of each student's weights).
* ``adam.py``    fused capturable Adam over flat fp32 buffers, refreshing the bf16 copy.
* ``_common.py`` interpreter detection, dtype mapping, SM count, autotuning policy and per-shape
                 picking, TMA descriptor helpers.

Importing this package imports nothing heavy; the submodules import Triton.
"""
