"""Where the reset's time goes on each kernel table (64 ``ttt-l14`` students, the engine's own
store): the reset timed, its kernels profiled, each large parameter's broadcast timed with its
bandwidth; then the broadcast of one 8.4 M-element weight and its bf16 copy by each table and by
inline CUDA variants of the kernel (v0: the cuda table's kernel at 8b9631e; v1: 8 elements a
thread; v2: the Triton kernel's layout, two 4-element groups 512 apart; v3: v0 with streaming
(evict-first) stores, what the cuda table's kernel became at 897b88d; v4: the fp32 stores for
every student, then the bf16 ones). Run from the repository root on the H200, after the build:
``python3 reset_probe.py`` (``reset_probe.log``; the log's first lines come from the run with
the images at the preset's 448 pixels)."""
import torch, time, sys
from torch.utils.cpp_extension import load_inline
from apm_fast.config import preset
from apm_fast.model import APM
from apm_fast.ttt import TestTimeTrainer

dev = "cuda"
S = 64
def ev_time(fn, reps=10):
    fn(); torch.cuda.synchronize()
    a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts)//2]

m = APM(preset("ttt-l14")).to(dev)
x = torch.randn(S, 3, 448, 448, device=dev); y = torch.randn(S, 768, device=dev)
for be in ["triton", "cuda"]:
    tr = TestTimeTrainer(m, steps=20, lr=1e-4, backend=be, students=S, precision=torch.bfloat16)
    tr.fit(x, y)
    prog = tr.engine.program(S)
    print(be, "reset eager ms", ev_time(prog.reset))
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        prog.reset(); torch.cuda.synchronize()
    for e in p.key_averages():
        if getattr(e, "device_time_total", 0) > 0:
            print(f"  {e.key[:70]:70s} n={e.count} {e.device_time_total/1e3:.3f} ms")
    st = prog.store
    for i, (n, sh) in enumerate(zip(st.names, st.shapes)):
        lowp = st._view(st.lowp, i) if i < st.n_lowp else None
        src = prog.snapshot[n].reshape(sh).float().contiguous()
        dst = st.master_views[n]
        t = ev_time(lambda: prog.prim.broadcast_(dst, src, lowp=lowp))
        gb = dst.numel() * (4 + (2 if lowp is not None else 0)) / 1e9
        if dst.numel() > 1e6:
            print(f"  {be} {n:24s} {t:.3f} ms {gb/t:.2f} TB/s  dst%16={dst.data_ptr()%16} lowp%16={None if lowp is None else lowp.data_ptr()%16}")
    del tr, prog
    torch.cuda.empty_cache()

src_code = r"""
#include <cuda_bf16.h>
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
struct alignas(8) B4 { __nv_bfloat16 x[4]; };
struct alignas(16) B8 { __nv_bfloat16 x[8]; };
template <int T>
__global__ void __launch_bounds__(T) v0(float* __restrict__ dst, const float* __restrict__ src, __nv_bfloat16* __restrict__ lowp, int64_t n, int64_t S) {
  const int64_t e = blockIdx.x * int64_t(4 * T) + 4 * threadIdx.x;
  if (e >= n) return;
  const float4 x = *reinterpret_cast<const float4*>(src + e);
  B4 xl; xl.x[0] = __float2bfloat16_rn(x.x); xl.x[1] = __float2bfloat16_rn(x.y); xl.x[2] = __float2bfloat16_rn(x.z); xl.x[3] = __float2bfloat16_rn(x.w);
  for (int64_t s = 0; s < S; ++s) {
    *reinterpret_cast<float4*>(dst + s * n + e) = x;
    *reinterpret_cast<B4*>(lowp + s * n + e) = xl;
  }
}
// 8 elements a thread, two float4 and one 16-byte bf16 store a student
__global__ void __launch_bounds__(128) v1(float* __restrict__ dst, const float* __restrict__ src, __nv_bfloat16* __restrict__ lowp, int64_t n, int64_t S) {
  const int64_t e = blockIdx.x * int64_t(1024) + 8 * threadIdx.x;
  if (e >= n) return;
  const float4 a = *reinterpret_cast<const float4*>(src + e);
  const float4 b = *reinterpret_cast<const float4*>(src + e + 4);
  B8 xl; float v[8] = {a.x,a.y,a.z,a.w,b.x,b.y,b.z,b.w};
  for (int j = 0; j < 8; ++j) xl.x[j] = __float2bfloat16_rn(v[j]);
  for (int64_t s = 0; s < S; ++s) {
    *reinterpret_cast<float4*>(dst + s * n + e) = a;
    *reinterpret_cast<float4*>(dst + s * n + e + 4) = b;
    *reinterpret_cast<B8*>(lowp + s * n + e) = xl;
  }
}
// the Triton layout: 128 threads, a 1024 tile, each thread 4 elements twice (512 apart)
__global__ void __launch_bounds__(128) v2(float* __restrict__ dst, const float* __restrict__ src, __nv_bfloat16* __restrict__ lowp, int64_t n, int64_t S) {
  const int64_t e = blockIdx.x * int64_t(1024) + 4 * threadIdx.x;
  if (e + 512 >= n + 0 && e >= n) return;
  const float4 a = *reinterpret_cast<const float4*>(src + e);
  const float4 b = *reinterpret_cast<const float4*>(src + e + 512);
  B4 la, lb;
  la.x[0] = __float2bfloat16_rn(a.x); la.x[1] = __float2bfloat16_rn(a.y); la.x[2] = __float2bfloat16_rn(a.z); la.x[3] = __float2bfloat16_rn(a.w);
  lb.x[0] = __float2bfloat16_rn(b.x); lb.x[1] = __float2bfloat16_rn(b.y); lb.x[2] = __float2bfloat16_rn(b.z); lb.x[3] = __float2bfloat16_rn(b.w);
  for (int64_t s = 0; s < S; ++s) {
    *reinterpret_cast<float4*>(dst + s * n + e) = a;
    *reinterpret_cast<float4*>(dst + s * n + e + 512) = b;
    *reinterpret_cast<B4*>(lowp + s * n + e) = la;
    *reinterpret_cast<B4*>(lowp + s * n + e + 512) = lb;
  }
}
// v0, streaming stores
__global__ void __launch_bounds__(256) v3(float* __restrict__ dst, const float* __restrict__ src, __nv_bfloat16* __restrict__ lowp, int64_t n, int64_t S) {
  const int64_t e = blockIdx.x * int64_t(1024) + 4 * threadIdx.x;
  if (e >= n) return;
  const float4 x = *reinterpret_cast<const float4*>(src + e);
  B4 xl; xl.x[0] = __float2bfloat16_rn(x.x); xl.x[1] = __float2bfloat16_rn(x.y); xl.x[2] = __float2bfloat16_rn(x.z); xl.x[3] = __float2bfloat16_rn(x.w);
  const uint2 lw = *reinterpret_cast<uint2*>(&xl);
  for (int64_t s = 0; s < S; ++s) {
    __stcs(reinterpret_cast<float4*>(dst + s * n + e), x);
    __stcs(reinterpret_cast<uint2*>(lowp + s * n + e), lw);
  }
}
// the fp32 stores first for every student, then the bf16 ones
__global__ void __launch_bounds__(256) v4(float* __restrict__ dst, const float* __restrict__ src, __nv_bfloat16* __restrict__ lowp, int64_t n, int64_t S) {
  const int64_t e = blockIdx.x * int64_t(1024) + 4 * threadIdx.x;
  if (e >= n) return;
  const float4 x = *reinterpret_cast<const float4*>(src + e);
  B4 xl; xl.x[0] = __float2bfloat16_rn(x.x); xl.x[1] = __float2bfloat16_rn(x.y); xl.x[2] = __float2bfloat16_rn(x.z); xl.x[3] = __float2bfloat16_rn(x.w);
  for (int64_t s = 0; s < S; ++s) *reinterpret_cast<float4*>(dst + s * n + e) = x;
  for (int64_t s = 0; s < S; ++s) *reinterpret_cast<B4*>(lowp + s * n + e) = xl;
}
void run(int which, torch::Tensor dst, torch::Tensor src, torch::Tensor lowp) {
  const int64_t n = src.numel(), S = dst.size(0);
  auto st = c10::cuda::getCurrentCUDAStream();
  float* d = dst.data_ptr<float>(); const float* s = src.data_ptr<float>();
  auto* l = reinterpret_cast<__nv_bfloat16*>(lowp.data_ptr());
  const unsigned g = (n + 1023) / 1024;
  if (which == 0) v0<256><<<g, 256, 0, st>>>(d, s, l, n, S);
  if (which == 1) v1<<<g, 128, 0, st>>>(d, s, l, n, S);
  if (which == 2) v2<<<g, 128, 0, st>>>(d, s, l, n, S);
  if (which == 3) v3<<<g, 256, 0, st>>>(d, s, l, n, S);
  if (which == 4) v4<<<g, 256, 0, st>>>(d, s, l, n, S);
}
"""
t0 = time.time()
ext = load_inline("bcast_probe", cpp_sources="void run(int which, torch::Tensor dst, torch::Tensor src, torch::Tensor lowp);",
                  cuda_sources=src_code, functions=["run"], extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"], verbose=False)
print("inline build s", time.time() - t0)
n = 4096 * 2048
src = torch.randn(n, device=dev)
dst = torch.empty(S, n, device=dev); lowp = torch.empty(S, n, device=dev, dtype=torch.bfloat16)
gb = S * n * 6 / 1e9
from apm_fast.backends import get_backend
for be in ["triton", "cuda"]:
    prim = get_backend(be)
    t = ev_time(lambda: prim.broadcast_(dst, src, lowp=lowp))
    print(f"table {be}: {t:.3f} ms {gb/t:.2f} TB/s")
for w in range(5):
    t = ev_time(lambda: ext.run(w, dst, src, lowp))
    ok = bool((dst[-1] == src).all()) and bool((lowp[-1] == src.bfloat16()).all())
    dst.zero_(); lowp.zero_()
    print(f"v{w}: {t:.3f} ms {gb/t:.2f} TB/s ok={ok}")
t = ev_time(lambda: (dst.copy_(src.expand(S, n)), lowp.copy_(dst)))
print(f"torch copies: {t:.3f} ms")
t = ev_time(lambda: dst.fill_(1.0))
print(f"fill fp32: {t:.3f} ms {S*n*4/1e9/t:.2f} TB/s")
