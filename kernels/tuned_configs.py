"""Measured best launch configs per shape (16-bit operands, H100), from one run of
``benchmarks/sweep_triton.py`` (it prints this table ready to paste; ``--out`` also gets it as
``tuned_configs.py``). An entry is used as it is for its exact shape, before the heuristic ranking
and without autotuning; a config the operands cannot take (e.g. TMA on a misaligned view) falls
back to the ranking.

Keys: ``(primitive, S, NSEG, L, N, K)``; rows are NSEG segments of L (images of L queries; one
segment of M rows for the plain layers), N the output columns, K the reduction (for the weight
gradients: dW is N x K and the reduction runs over the NSEG * L rows). Primitives: ``linear``,
``linear_shared`` (one x for every student: the position codes), ``first_layer_linear``,
``linear_bwd_input``, ``first_layer_bwd_input``, ``linear_bwd_weight``,
``linear_bwd_weight_shared``, ``first_layer_bwd_weight``. Values: the fields of
``configs.GemmCfg`` / ``configs.WgradCfg``.
"""

TUNED = {
}
