"""The fused operations of the APM: the primitive contract, the one driver, and where each op lives.

Op map (primitive -> oracle -> Triton -> CUDA -> tests). The oracle is the method of
``contract.TorchPrimitives`` (plain PyTorch, any dtype); every table is checked against it, and
the whole driver against ``apm_fast.reference`` in float64.

==========================  ================================  ============================  =====================================
primitive                   Triton (``kernels/``)             CUDA (``csrc/cuda/``)          tests
==========================  ================================  ============================  =====================================
linear                      gemm.py, gemm_tma.py              gemm_sm90_fwd.cu,             test_triton_kernels,
                            (bias/ReLU/cast epilogue)         gemm_portable.cu              test_triton_tma, test_cuda_backend
first_layer_linear          gemm.py (ReLU(P + u) prologue),   trigger_split.cu + the        same
                            gemm_tma.py (act chunks)          forward GEMM
linear_bwd_input            gemm.py (ReLU-mask epilogue)      gemm_sm90_bwd_input.cu        same
first_layer_act             gemm_tma.py (ReLU(P + u) written, trigger_split.cu (from P or   same
                            from P or Q's halves)             from Q's halves)
first_layer_bwd_input       gemm.py (mask from P + u or a     gemm_sm90_bwd_input.cu +      same
                            kept act, r)                      colsum.cu (mask: a kept act)
linear_bwd_weight           wgrad.py, wgrad_tma.py (split-K;  gemm_sm90_bwd_weight.cu +     same
                            cuBLAS where measured faster)     colsum.cu
first_layer_bwd_weight      wgrad.py (X rebuilt on load)      trigger_split.cu + above      same
pool_fwd                    pool.py (every head at once on    pool.cu                       same, and test_driver (combine_pool)
                            tensor cores; tiles merged)
pool_bwd                    pool.py (+ dkt through wgrad.py)  pool.cu                       same
heads_product               heads.py (matrix-vector, one      the plain form (cuBLAS,       test_triton_kernels (both
                            read of each student's weights)   ``contract.heads_product``)   tables' paths), test_engine
adam_                       adam.py                           adam.cu                       same, and test_engine (vs torch.optim)
==========================  ================================  ============================  =====================================

Around the primitives (``driver.py``, plain PyTorch, shared by every table):

* ``forward`` / ``backward``: the whole model for S students over any slice of the queries (the
  trigger split, the column MLP, the pool's query and output projections, the hand-written
  backward);
* ``combine_pool``: the pool over a union of row slices from their (sbar, lse), used by chunked
  evaluation (``columns``) and across ranks (``apm_fast.distributed``); the Triton pool's split
  merge is the same algebra inside one launch;
* ``columns``: inference over any number of location queries, chunk by chunk;
* ``rgb_head``: the RGB decoder on the fused features.

``autograd.py`` makes the driver an ``autograd.Function`` (the model's forward on a table);
``library.py`` generates the ``torch.library`` custom ops of any opaque table (``torch.compile``);
``precision.py`` says which dtype the GEMMs run in.
"""
from .contract import Primitives, TorchPrimitives, acc_dtype_for
from .driver import backward, columns, combine_pool, forward, weight_names
from .kept import release_graphs
from .precision import compute_dtype

__all__ = ["Primitives", "TorchPrimitives", "acc_dtype_for", "forward", "backward", "columns",
           "combine_pool", "weight_names", "compute_dtype", "release_graphs"]
