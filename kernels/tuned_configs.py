"""Measured best launch configs per shape (16-bit operands, H100 80GB, triton 3.6; the sweep of
benchmarks/results/h100/sweep_triton.json), from one run of
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
    ('linear_shared', 1, 1, 1024, 4096, 1024): {'bm': 256, 'bn': 128, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False},  # 572 TFLOP/s (cuBLAS 589)
    ('first_layer_linear', 1, 1, 1024, 2048, 4096): {'bm': 64, 'bn': 256, 'bk': 64, 'warps': 4, 'stages': 4, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False},  # 518 TFLOP/s (cuBLAS 770)
    ('linear', 1, 1, 1024, 1024, 2048): {'bm': 64, 'bn': 128, 'bk': 64, 'warps': 4, 'stages': 4, 'group': 8, 'tma': True, 'persistent': False, 'materialize': False},  # 415 TFLOP/s (cuBLAS 464)
    ('linear', 1, 1, 1024, 768, 1024): {'bm': 64, 'bn': 128, 'bk': 64, 'warps': 4, 'stages': 4, 'group': 8, 'tma': True, 'persistent': False, 'materialize': False},  # 233 TFLOP/s (cuBLAS 294)
    ('linear_shared', 8, 1, 1024, 4096, 1024): {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False},  # 631 TFLOP/s (cuBLAS 704)
    ('first_layer_linear', 8, 1, 1024, 2048, 4096): {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': True},  # 591 TFLOP/s (cuBLAS 801)
    ('linear', 8, 1, 1024, 1024, 2048): {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False},  # 623 TFLOP/s (cuBLAS 706)
    ('linear', 8, 1, 1024, 768, 1024): {'bm': 128, 'bn': 128, 'bk': 64, 'warps': 8, 'stages': 5, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False},  # 440 TFLOP/s (cuBLAS 581)
    ('first_layer_linear', 1, 64, 1024, 2048, 4096): {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': True},  # 658 TFLOP/s (cuBLAS 810)
    ('linear', 1, 1, 65536, 1024, 2048): {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': False, 'materialize': False},  # 677 TFLOP/s (cuBLAS 771)
    ('linear', 1, 1, 65536, 768, 1024): {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False},  # 620 TFLOP/s (cuBLAS 686)
    ('linear_bwd_input', 1, 1, 1024, 1024, 768): {'bm': 64, 'bn': 128, 'bk': 64, 'warps': 4, 'stages': 4, 'group': 8, 'tma': True, 'persistent': False, 'materialize': False},  # 249 TFLOP/s (cuBLAS 307)
    ('linear_bwd_input', 1, 1, 1024, 2048, 1024): {'bm': 64, 'bn': 128, 'bk': 64, 'warps': 4, 'stages': 4, 'group': 8, 'tma': True, 'persistent': False, 'materialize': False},  # 420 TFLOP/s (cuBLAS 506)
    ('first_layer_bwd_input', 1, 1, 1024, 4096, 2048): {'bm': 256, 'bn': 128, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': False, 'materialize': False},  # 512 TFLOP/s (cuBLAS 706)
    ('linear_bwd_weight', 1, 1, 1024, 768, 1024): {'bn': 64, 'bk': 128, 'bm': 64, 'warps': 4, 'stages': 4, 'split': 1, 'tma': True},  # 95 TFLOP/s (cuBLAS 287)
    ('linear_bwd_weight', 1, 1, 1024, 1024, 2048): {'bn': 64, 'bk': 128, 'bm': 64, 'warps': 4, 'stages': 4, 'split': 1, 'tma': True},  # 176 TFLOP/s (cuBLAS 506)
    ('first_layer_bwd_weight', 1, 1, 1024, 2048, 4096): {'bn': 128, 'bk': 256, 'bm': 64, 'warps': 8, 'stages': 3, 'split': 1, 'tma': True},  # 164 TFLOP/s (cuBLAS 685)
    ('linear_bwd_weight_shared', 1, 1, 1024, 4096, 1024): {'bn': 128, 'bk': 256, 'bm': 64, 'warps': 8, 'stages': 3, 'split': 1, 'tma': True},  # 494 TFLOP/s (cuBLAS 618)
    ('linear_bwd_input', 8, 1, 1024, 1024, 768): {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': False, 'materialize': False},  # 358 TFLOP/s (cuBLAS 584)
    ('linear_bwd_input', 8, 1, 1024, 2048, 1024): {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False},  # 453 TFLOP/s (cuBLAS 664)
    ('first_layer_bwd_input', 8, 1, 1024, 4096, 2048): {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False},  # 512 TFLOP/s (cuBLAS 747)
    ('linear_bwd_weight', 8, 1, 1024, 768, 1024): {'bn': 64, 'bk': 128, 'bm': 64, 'warps': 4, 'stages': 4, 'split': 1, 'tma': True},  # 181 TFLOP/s (cuBLAS 606)
    ('linear_bwd_weight', 8, 1, 1024, 1024, 2048): {'bn': 128, 'bk': 256, 'bm': 64, 'warps': 8, 'stages': 3, 'split': 1, 'tma': True},  # 207 TFLOP/s (cuBLAS 670)
    ('first_layer_bwd_weight', 8, 1, 1024, 2048, 4096): {'bn': 128, 'bk': 256, 'bm': 64, 'warps': 8, 'stages': 3, 'split': 1, 'tma': True},  # 169 TFLOP/s (cuBLAS 753)
    ('linear_bwd_weight_shared', 8, 1, 1024, 4096, 1024): {'bn': 128, 'bk': 256, 'bm': 64, 'warps': 8, 'stages': 3, 'split': 1, 'tma': True},  # 506 TFLOP/s (cuBLAS 703)
    ('linear_bwd_input', 1, 1, 65536, 1024, 768): {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False},  # 419 TFLOP/s (cuBLAS 689)
    ('linear_bwd_input', 1, 1, 65536, 2048, 1024): {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False},  # 489 TFLOP/s (cuBLAS 701)
    ('first_layer_bwd_input', 1, 64, 1024, 4096, 2048): {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False},  # 557 TFLOP/s (cuBLAS 777)
    ('linear_bwd_weight', 1, 1, 65536, 768, 1024): {'bn': 128, 'bk': 256, 'bm': 64, 'warps': 8, 'stages': 3, 'split': 11, 'tma': False},  # 213 TFLOP/s (cuBLAS 737)
    ('linear_bwd_weight', 1, 1, 65536, 1024, 2048): {'bn': 128, 'bk': 256, 'bm': 64, 'warps': 8, 'stages': 3, 'split': 2, 'tma': False},  # 239 TFLOP/s (cuBLAS 805)
    ('first_layer_bwd_weight', 1, 64, 1024, 2048, 4096): {'bn': 128, 'bk': 256, 'bm': 64, 'warps': 8, 'stages': 3, 'split': 1, 'tma': True},  # 196 TFLOP/s (cuBLAS 865)
}
