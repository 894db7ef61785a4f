"""The GEMMs of ttt-l14 (forward and backward, B = 1 and 64 images, one student): the cuda
backend's kernels against cuBLAS through torch.matmul, and against the Triton backend's
primitives when that backend is importable. bf16 operands, fp32 accumulation.

Each case is first checked against an fp32 PyTorch computation on the same bf16 inputs (relative
Frobenius error below 1e-2 for bf16 outputs, 1e-3 for fp32 ones); a case that fails the check is
reported and not timed. Timing: 10 back-to-back calls captured in one CUDA graph (so Python and
launch overheads do not count), replayed `--reps` times, each replay timed with CUDA events;
median and 10th/90th percentiles per call. Without graph capture (--no-graph, or if capture fails)
the same calls are timed eagerly.

    python benchmarks/bench_cuda_gemm.py --out results/bench_cuda_gemm.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

# ttt-l14: L = 32 x 32 cells, position code d = 1024, hidden 4096 / 2048 / 1024, D = 768
L, D_POS, H1, H2, H3, DIM = 1024, 1024, 4096, 2048, 1024, 768
INNER = 10


def cases(b):
    m = b * L
    return [
        # name, kind, M, N, K (y = x w^T: x M x K, w N x K; dx = dy w: dy M x N; dw = dy^T x: N x K)
        ("P = pos W_P^T", "fwd_nobias", L, H1, D_POS),
        ("fc2 first layer (act + GEMM)", "first_fwd", m, H2, H1),
        ("fc2 GEMM (bias, ReLU)", "fwd", m, H2, H1),
        ("fc3 (bias, ReLU)", "fwd", m, H3, H2),
        ("head (bias)", "fwd_norelu", m, DIM, H3),
        ("head dx (mask)", "bwd_input", m, DIM, H3),
        ("fc3 dx (mask)", "bwd_input", m, H3, H2),
        ("fc2 dx -> g1, r (first layer)", "first_bwd_input", m, H2, H1),
        ("head dW", "bwd_weight", m, DIM, H3),
        ("fc3 dW", "bwd_weight", m, H3, H2),
        ("fc2 dW (act rebuilt)", "first_bwd_weight", m, H2, H1),
        ("W_P dW = g1^T pos", "bwd_weight_shared", L, H1, D_POS),
    ]


def rel_err(x, ref):
    x, ref = x.float(), ref.float()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_case(kind, b, m, n, k, dev):
    """(ours(prims), cublas(), reference(), flops, tol): the three computations of one case."""
    bf = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=dev) * scale).to(bf)
    flops = 2.0 * m * n * k
    if kind in ("fwd", "fwd_norelu", "fwd_nobias"):
        relu, bias = kind == "fwd", kind != "fwd_nobias"
        x = rnd(m, k) if kind == "fwd_nobias" else rnd(1, m, k)
        w, bb = rnd(1, n, k, scale=k ** -0.5), (rnd(1, n) if bias else None)
        ours = lambda P: P.linear(x, w, bb, relu=relu)
        cublas = lambda: torch.matmul(x, w[0].t())
        def ref():
            y = x.float() @ w[0].float().t() + (bb.float() if bias else 0)
            return torch.relu(y) if relu else y
        return ours, cublas, ref, flops, 1e-2
    if kind in ("first_fwd", "first_bwd_input", "first_bwd_weight"):
        p = rnd(1, L, k)
        u = rnd(1, b, k).float()
        a = torch.relu(p.float()[:, None] + u[:, :, None]).reshape(1, m, k)
        if kind == "first_fwd":
            w, bb = rnd(1, n, k, scale=k ** -0.5), rnd(1, n)
            ours = lambda P: P.first_layer_linear(p, u, w, bb, relu=True)
            a16 = a.to(bf)
            cublas = lambda: torch.matmul(a16, w[0].t())
            ref = lambda: torch.relu(a.to(bf).float() @ w[0].float().t() + bb.float())
            return ours, cublas, ref, flops, 1e-2
        if kind == "first_bwd_input":
            dy, w = rnd(1, m, n), rnd(1, n, k, scale=n ** -0.5)
            ours = lambda P: P.first_layer_bwd_input(dy, w, p, u)[0]
            cublas = lambda: torch.matmul(dy, w[0])
            ref = lambda: (dy.float() @ w[0].float()) * (a > 0)
            return ours, cublas, ref, 2.0 * m * n * k, 1e-2
        dy = rnd(1, m, n)
        ours = lambda P: P.first_layer_bwd_weight(dy, p, u, bias=False)[0]
        a16 = a.to(bf)
        cublas = lambda: torch.matmul(dy[0].t(), a16[0])
        ref = lambda: dy[0].float().t() @ a.to(bf)[0].float()
        return ours, cublas, ref, flops, 1e-3
    if kind == "bwd_input":
        dy, w = rnd(1, m, n), rnd(1, n, k, scale=n ** -0.5)
        mask = torch.relu(rnd(1, m, k))
        ours = lambda P: P.linear_bwd_input(dy, w, mask=mask)
        cublas = lambda: torch.matmul(dy, w[0])
        ref = lambda: (dy.float() @ w[0].float()) * (mask > 0)
        return ours, cublas, ref, flops, 1e-2
    if kind in ("bwd_weight", "bwd_weight_shared"):
        dy = rnd(1, m, n)
        x = rnd(m, k) if kind == "bwd_weight_shared" else rnd(1, m, k)
        x2 = x if x.dim() == 2 else x[0]
        ours = lambda P: P.linear_bwd_weight(dy, x, bias=False)[0]
        cublas = lambda: torch.matmul(dy[0].t(), x2)  # bf16 output (ours: fp32)
        ref = lambda: dy[0].float().t() @ x2.float()
        return ours, cublas, ref, flops, 1e-3
    raise ValueError(kind)


def time_fn(fn, reps, use_graph):
    """(median, p10, p90) milliseconds per call, and whether a CUDA graph was used."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = None
    if use_graph:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(INNER):
                    fn()
            torch.cuda.synchronize()
        except Exception as exc:  # fall back to eager timing, say so
            print(f"    (graph capture failed: {type(exc).__name__}: {exc}; timing eagerly)")
            graph = None
            torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        if graph is not None:
            graph.replay()
        else:
            for _ in range(INNER):
                fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / INNER)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return statistics.median(times), q(0.1), q(0.9), graph is not None


def machine_info(ext):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "commit": commit,
        "sm90_kernels": bool(ext.sm90_available(torch.empty(1, device="cuda"))),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file to write, or a folder (then bench_cuda_gemm.json in it)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_cuda_gemm: needs a CUDA GPU")
    from apm_fast.backends import get_backend
    from apm_fast.backends.cuda_backend import CudaPrimitives, cuda_extension

    ext = cuda_extension()
    tables = {"cuda": CudaPrimitives()}
    try:
        import apm_fast.backends.triton_backend  # noqa: F401  (registers "triton")
        tables["triton"] = get_backend("triton").primitives
    except Exception as exc:
        print(f"(no Triton comparison: {type(exc).__name__}: {exc})")
    info = machine_info(ext)
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    results = []
    head = f"{'case':34s} {'B':>3s} {'M':>6s} {'N':>5s} {'K':>5s} {'path':>9s} {'ours ms':>9s} {'TF/s':>6s} " \
           f"{'cuBLAS ms':>9s} {'TF/s':>6s}" + ("  triton ms   TF/s" if "triton" in tables else "") + "  ours/best"
    print(head)
    for b in args.batches:
        for name, kind, m, n, k in cases(b):
            ours_fn, cublas_fn, ref_fn, flops, tol = make_case(kind, b, m, n, k, "cuda")
            row = {"case": name, "kind": kind, "B": b, "M": m, "N": n, "K": k, "flops": flops, "tol": tol}
            ref = ref_fn()
            for tname, prims in tables.items():
                ext.reset_gemm_counts()
                err = rel_err(ours_fn(prims), ref)
                torch.cuda.synchronize()
                counts = ext.gemm_counts()
                row[f"{tname}_rel_err"] = err
                row[f"{tname}_ok"] = err < tol
                if tname == "cuda":
                    row["cuda_path"] = "sm90" if counts[0] and not counts[1] else \
                        "portable" if counts[1] and not counts[0] else f"mixed{tuple(counts)}"
                if row[f"{tname}_ok"]:
                    med, p10, p90, graphed = time_fn(lambda: ours_fn(prims), args.reps, not args.no_graph)
                    row.update({f"{tname}_ms": med, f"{tname}_p10_ms": p10, f"{tname}_p90_ms": p90,
                                f"{tname}_tflops": flops / med / 1e9, f"{tname}_graph": graphed})
            del ref
            med, p10, p90, graphed = time_fn(cublas_fn, args.reps, not args.no_graph)
            row.update({"cublas_ms": med, "cublas_p10_ms": p10, "cublas_p90_ms": p90,
                        "cublas_tflops": flops / med / 1e9})
            best = min([row["cublas_ms"]] + [row[f"{t}_ms"] for t in tables if t != "cuda" and f"{t}_ms" in row])
            row["cuda_vs_best"] = row["cuda_ms"] / best if "cuda_ms" in row else None
            results.append(row)
            fmt = lambda key: f"{row[key]:9.4f}" if key in row else f"{'FAIL':>9s}"
            tf = lambda key: f"{row[key]:6.0f}" if key in row else f"{'-':>6s}"
            line = f"{name:34s} {b:3d} {m:6d} {n:5d} {k:5d} {row['cuda_path']:>9s} {fmt('cuda_ms')} " \
                   f"{tf('cuda_tflops')} {fmt('cublas_ms')} {tf('cublas_tflops')}"
            if "triton" in tables:
                line += f"  {fmt('triton_ms')} {tf('triton_tflops')}"
            line += f"  {row['cuda_vs_best']:.2f}" if row["cuda_vs_best"] else "  -"
            if not row["cuda_ok"]:
                line += f"  [correctness gate failed: rel err {row['cuda_rel_err']:.2e} >= {tol}]"
            print(line, flush=True)
            torch.cuda.empty_cache()
    out = {"machine": info, "inner_calls_per_timing": INNER, "reps": args.reps, "results": results}
    if args.out is not None:
        path = args.out if args.out.suffix == ".json" else args.out / "bench_cuda_gemm.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        print(f"wrote {path}")
    return 0 if all(r["cuda_ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
