"""The numbers measured on an H100 that the results are compared against (spec section 4,
and the FLOP counts of spec section 3). Only for printing beside ours: nothing is derived from them."""

H100_TTT_STEP_MS = {                      # ttt-l14, one image, bf16 unless said
    "authors": 424.0,                     # authors' style, 8 copies, chunks of 16, fp16 AMP
    "authors (chunks of 512)": 20.3,
    "eager": 5.7,                         # plain eager PyTorch, bf16 autocast, fused Adam
    "compile": 4.8,                       # the same under torch.compile
    "floor": 0.12,                        # 86.5 GF at 738 TFLOP/s
}
H100_EAGER_PEAK_GB = 0.59                 # plain eager step, ttt-l14
H100_BF16_GEMM_TFLOPS = (738, 768)        # 8192^3
H100_CLIP_FORWARD_MS = {"ViT-B-16": 8.1, "ViT-L-14": 8.7, "ViT-H-14": 15.2}   # timm, eager, B = 1
CLIP_FORWARD_GFLOPS = {"ViT-B-16": 35, "ViT-L-14": 162, "ViT-H-14": 335}
TTT_L14_GFLOPS = {"forward plain": 42.7, "forward rewritten": 31.7, "step plain": 128.1,
                  "step rewritten": 86.5, "params M": 22.0}
TARGETS = {"captured step ms": 0.35, "engine step ms": 0.25, "side-by-side images/s": 250,
           "end-to-end images/s": 200, "student peak GB": 0.45}


def as_dict() -> dict:
    return {"source": "APM_SPEC sections 3-4 (H100, torch 2.11)",
            "ttt_step_ms_ttt_l14": H100_TTT_STEP_MS, "eager_peak_gb_ttt_l14": H100_EAGER_PEAK_GB,
            "bf16_gemm_tflops": list(H100_BF16_GEMM_TFLOPS), "clip_forward_ms": H100_CLIP_FORWARD_MS,
            "clip_forward_gflops": CLIP_FORWARD_GFLOPS, "ttt_l14_gflops": TTT_L14_GFLOPS,
            "targets": TARGETS}
