"""Measured best launch configs per GPU and shape, from ``benchmarks/sweep_triton.py`` (its
``--out`` gets this whole file back, with the swept GPU's block updated and every other block as
it is, ready to copy here).

``TUNED`` maps a GPU's name (as ``torch.cuda.get_device_name`` gives it) to a block:
``capability`` (its compute capability), ``source`` (the run that measured it) and ``configs``,
``{key: {"config", "tflops", "cublas_tflops"}}`` (16-bit operands; the winner's fields and, beside
it, the throughput of the winner and of cuBLAS on the same shape in that run). A launcher looks
its exact key up in the device's own block first, then in the blocks of the other GPUs of the same
compute capability (``configs.tuned_block``: a GPU not swept, or a shape its sweep did not cover,
takes the winners measured on its architecture); an entry found is used as it is, before the
heuristic ranking and without autotuning; a config the operands cannot take (e.g. TMA on a
misaligned view) falls back to the ranking.

Keys: ``(primitive, S, NSEG, L, N, K)``; rows are NSEG segments of L (images of L queries; one
segment of M rows for the plain layers), N the output columns, K the reduction (for the weight
gradients: dW is N x K and the reduction runs over the NSEG * L rows). Primitives: ``linear``,
``linear_shared`` (one x for every student: the position codes), ``first_layer_linear``,
``linear_bwd_input``, ``first_layer_bwd_input``, ``linear_bwd_weight``,
``linear_bwd_weight_shared``, ``first_layer_bwd_weight``. Configs: the fields of
``configs.GemmCfg`` / ``configs.WgradCfg``.
"""

TUNED = {
    'NVIDIA H100 80GB HBM3': {
        'capability': (9, 0),
        'source': 'benchmarks/results/h100/sweep_triton.json (triton 3.6.0, torch 2.11.0+cu130)',
        'configs': {
            ('linear_shared', 1, 1, 1024, 4096, 1024): {'config': {'bm': 256, 'bn': 128, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False}, 'tflops': 572, 'cublas_tflops': 589},
            ('first_layer_linear', 1, 1, 1024, 2048, 4096): {'config': {'bm': 64, 'bn': 256, 'bk': 64, 'warps': 4, 'stages': 4, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False}, 'tflops': 518, 'cublas_tflops': 770},
            ('linear', 1, 1, 1024, 1024, 2048): {'config': {'bm': 64, 'bn': 128, 'bk': 64, 'warps': 4, 'stages': 4, 'group': 8, 'tma': True, 'persistent': False, 'materialize': False}, 'tflops': 415, 'cublas_tflops': 464},
            ('linear', 1, 1, 1024, 768, 1024): {'config': {'bm': 64, 'bn': 128, 'bk': 64, 'warps': 4, 'stages': 4, 'group': 8, 'tma': True, 'persistent': False, 'materialize': False}, 'tflops': 233, 'cublas_tflops': 294},
            ('linear_shared', 8, 1, 1024, 4096, 1024): {'config': {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False}, 'tflops': 631, 'cublas_tflops': 704},
            ('first_layer_linear', 8, 1, 1024, 2048, 4096): {'config': {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': True}, 'tflops': 591, 'cublas_tflops': 801},
            ('linear', 8, 1, 1024, 1024, 2048): {'config': {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False}, 'tflops': 623, 'cublas_tflops': 706},
            ('linear', 8, 1, 1024, 768, 1024): {'config': {'bm': 128, 'bn': 128, 'bk': 64, 'warps': 8, 'stages': 5, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False}, 'tflops': 440, 'cublas_tflops': 581},
            ('first_layer_linear', 1, 64, 1024, 2048, 4096): {'config': {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': True}, 'tflops': 658, 'cublas_tflops': 810},
            ('linear', 1, 1, 65536, 1024, 2048): {'config': {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': False, 'materialize': False}, 'tflops': 677, 'cublas_tflops': 771},
            ('linear', 1, 1, 65536, 768, 1024): {'config': {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False}, 'tflops': 620, 'cublas_tflops': 686},
            ('linear_bwd_input', 1, 1, 1024, 1024, 768): {'config': {'bm': 64, 'bn': 128, 'bk': 64, 'warps': 4, 'stages': 4, 'group': 8, 'tma': True, 'persistent': False, 'materialize': False}, 'tflops': 249, 'cublas_tflops': 307},
            ('linear_bwd_input', 1, 1, 1024, 2048, 1024): {'config': {'bm': 64, 'bn': 128, 'bk': 64, 'warps': 4, 'stages': 4, 'group': 8, 'tma': True, 'persistent': False, 'materialize': False}, 'tflops': 420, 'cublas_tflops': 506},
            ('first_layer_bwd_input', 1, 1, 1024, 4096, 2048): {'config': {'bm': 256, 'bn': 128, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': False, 'materialize': False}, 'tflops': 512, 'cublas_tflops': 706},
            ('linear_bwd_weight', 1, 1, 1024, 768, 1024): {'config': {'bn': 64, 'bk': 128, 'bm': 64, 'warps': 4, 'stages': 4, 'split': 1, 'tma': True}, 'tflops': 95, 'cublas_tflops': 287},
            ('linear_bwd_weight', 1, 1, 1024, 1024, 2048): {'config': {'bn': 64, 'bk': 128, 'bm': 64, 'warps': 4, 'stages': 4, 'split': 1, 'tma': True}, 'tflops': 176, 'cublas_tflops': 506},
            ('first_layer_bwd_weight', 1, 1, 1024, 2048, 4096): {'config': {'bn': 128, 'bk': 256, 'bm': 64, 'warps': 8, 'stages': 3, 'split': 1, 'tma': True}, 'tflops': 164, 'cublas_tflops': 685},
            ('linear_bwd_weight_shared', 1, 1, 1024, 4096, 1024): {'config': {'bn': 128, 'bk': 256, 'bm': 64, 'warps': 8, 'stages': 3, 'split': 1, 'tma': True}, 'tflops': 494, 'cublas_tflops': 618},
            ('linear_bwd_input', 8, 1, 1024, 1024, 768): {'config': {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': False, 'materialize': False}, 'tflops': 358, 'cublas_tflops': 584},
            ('linear_bwd_input', 8, 1, 1024, 2048, 1024): {'config': {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False}, 'tflops': 453, 'cublas_tflops': 664},
            ('first_layer_bwd_input', 8, 1, 1024, 4096, 2048): {'config': {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False}, 'tflops': 512, 'cublas_tflops': 747},
            ('linear_bwd_weight', 8, 1, 1024, 768, 1024): {'config': {'bn': 64, 'bk': 128, 'bm': 64, 'warps': 4, 'stages': 4, 'split': 1, 'tma': True}, 'tflops': 181, 'cublas_tflops': 606},
            ('linear_bwd_weight', 8, 1, 1024, 1024, 2048): {'config': {'bn': 128, 'bk': 256, 'bm': 64, 'warps': 8, 'stages': 3, 'split': 1, 'tma': True}, 'tflops': 207, 'cublas_tflops': 670},
            ('first_layer_bwd_weight', 8, 1, 1024, 2048, 4096): {'config': {'bn': 128, 'bk': 256, 'bm': 64, 'warps': 8, 'stages': 3, 'split': 1, 'tma': True}, 'tflops': 169, 'cublas_tflops': 753},
            ('linear_bwd_weight_shared', 8, 1, 1024, 4096, 1024): {'config': {'bn': 128, 'bk': 256, 'bm': 64, 'warps': 8, 'stages': 3, 'split': 1, 'tma': True}, 'tflops': 506, 'cublas_tflops': 703},
            ('linear_bwd_input', 1, 1, 65536, 1024, 768): {'config': {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False}, 'tflops': 419, 'cublas_tflops': 689},
            ('linear_bwd_input', 1, 1, 65536, 2048, 1024): {'config': {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False}, 'tflops': 489, 'cublas_tflops': 701},
            ('first_layer_bwd_input', 1, 64, 1024, 4096, 2048): {'config': {'bm': 128, 'bn': 256, 'bk': 64, 'warps': 8, 'stages': 3, 'group': 8, 'tma': True, 'persistent': True, 'materialize': False}, 'tflops': 557, 'cublas_tflops': 777},
            ('linear_bwd_weight', 1, 1, 65536, 768, 1024): {'config': {'bn': 128, 'bk': 256, 'bm': 64, 'warps': 8, 'stages': 3, 'split': 11, 'tma': False}, 'tflops': 213, 'cublas_tflops': 737},
            ('linear_bwd_weight', 1, 1, 65536, 1024, 2048): {'config': {'bn': 128, 'bk': 256, 'bm': 64, 'warps': 8, 'stages': 3, 'split': 2, 'tma': False}, 'tflops': 239, 'cublas_tflops': 805},
            ('first_layer_bwd_weight', 1, 64, 1024, 2048, 4096): {'config': {'bn': 128, 'bk': 256, 'bm': 64, 'warps': 8, 'stages': 3, 'split': 1, 'tma': True}, 'tflops': 196, 'cublas_tflops': 865},
        },
    },
}
