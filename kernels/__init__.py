"""Triton kernels of apm-fast (installed as ``apm_fast.kernels``).

One file per fused operation, kernel and host launcher together; the primitive table that uses
them is ``apm_fast.backends.triton_backend.TritonPrimitives`` (semantics: ``apm_fast.ops.primitives``).

* ``gemm.py``    row-tiled GEMM: ``linear`` (bias/ReLU/cast epilogue), ``first_layer_linear``
                 (ReLU(P_l + u_b) built in the A-operand prologue), ``linear_bwd_input`` (ReLU mask
                 epilogue), ``first_layer_bwd_input`` (mask from P + u, per-image row sums r).
* ``wgrad.py``   weight gradients dy^T X with X rebuilt on load (plain, ReLU(P + u), f + pos_out),
                 bias gradient fused, split-K with fp32 atomics when the output has few tiles.
* ``pool.py``    single-query pool: forward with an online softmax (split over L + exact merge for
                 few programs), backward (df and the key-gradient coefficients; dkt via wgrad).
* ``adam.py``    fused capturable Adam over flat fp32 buffers, refreshing the bf16 copy.
* ``library.py`` the same as ``torch.library`` custom ops with fake implementations (torch.compile).
* ``_common.py`` interpreter detection, dtype mapping, SM count, autotuning policy, NaN poisoning.

Importing this package imports nothing heavy; the submodules import Triton.
"""
