"""NVFP4 linear / routed-expert kernels and the FP8 lm_head vs cuBLAS BF16 on real layer shapes (DESIGN.md protocol).

One process, one GPU; baseline (F.linear on BF16 weights) and candidate on the same inputs. Every timed
call reads a different copy of the weights, from a set larger than L2 (cold weights, as in a real decode
step). Calls are captured in a CUDA graph (launch overhead out, as in graph-mode decode) and timed with
CUDA events; the median over repeats is reported per call. The floor: bytes moved (packed weights +
scales + x + y) / copy bandwidth, the copy bandwidth measured in the same run (large D2D copy, read +
write bytes). Each JSON row names its op (nvfp4_linear, nvfp4_moe_linear, fp8_linear) and its time (t_us), bytes
and rate; files written before the FP8 rows existed called these t_nvfp4_us, bytes_nvfp4, gbs_nvfp4, tflops_nvfp4.

  python benchmarks/bench_linear.py [--out benchmarks/results/linear.json] [--quick] [--decode]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import adallm_ops  # noqa: E402,F401  (registers the ops, builds/loads the CUDA kernels)
from adallm.bench import copy_bandwidth, git_commit  # noqa: E402

DEV = "cuda"
# (model, layer, N, K)
DENSE = [
    ("qwen3-8b", "q/o", 4096, 4096),
    ("qwen3-8b", "k/v", 1024, 4096),
    ("qwen3-8b", "qkv", 6144, 4096),
    ("qwen3-8b", "gate_up", 24576, 4096),
    ("qwen3-8b", "down", 4096, 12288),
    ("qwen3-8b", "lm_head", 151936, 4096),  # NVFP4 with --lm-head nvfp4
    ("gemma3-27b", "qkv", 8192, 5376),
    ("gemma3-27b", "o", 5376, 4096),
    ("gemma3-27b", "gate_up", 43008, 5376),
    ("gemma3-27b", "down", 5376, 21504),
]
# lm_heads for the FP8 option (--lm-head fp8): decode only (generate's prefill computes the last token's logits).
FP8 = [("qwen3-8b", "lm_head", 151936, 4096), ("gemma3-27b", "lm_head", 262208, 5376)]
# Qwen3-30B-A3B routed experts: 128 experts, top-8.
MOE = [("qwen3-30b-a3b", "expert gate_up", 1536, 2048), ("qwen3-30b-a3b", "expert down", 2048, 768)]
MOE_E, MOE_TOPK = 128, 8
DECODE_M = [1, 4, 16]
PREFILL_M = [512, 2048, 8192]


def median_time_us(fn_calls, reps=10, warmup=3):
    """Captures the list of zero-arg callables in one CUDA graph; returns the median us per call."""
    for f in fn_calls:  # eager warm-up (allocator, cuBLAS handles) outside the capture
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fn_calls:
            f()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fn_calls))
    del graph
    times.sort()
    return times[len(times) // 2]


def random_nvfp4(n, k, copies):
    w = torch.randint(0, 256, (copies, n, k // 2), dtype=torch.uint8, device=DEV)
    s = (torch.randint(0x30, 0x48, (copies, n, k // 16), dtype=torch.uint8, device=DEV)).view(torch.float8_e4m3fn)
    g = torch.full((copies,), 1 / 2688, device=DEV)
    return w, s, g


def n_copies(bytes_one, l2):
    return max(2, math.ceil(4 * l2 / bytes_one))


def random_fp8(n, k, copies):
    w = torch.randint(0, 0x7F, (copies, n, k), dtype=torch.uint8, device=DEV).view(torch.float8_e4m3fn)
    return w, torch.rand(copies, n, device=DEV) * 1e-3


def bench_dense(n, k, ms, l2, quick, fmt="nvfp4"):
    """fmt: "nvfp4" (nvfp4_linear) or "fp8" (fp8_linear), each against F.linear on BF16 weights."""
    rows = []
    q_bytes = n * k // 2 + n * k // 16 if fmt == "nvfp4" else n * k + 4 * n
    bf_bytes = n * k * 2
    cn, cb = n_copies(q_bytes, l2), n_copies(bf_bytes, l2)
    if fmt == "nvfp4":
        w, s, g = random_nvfp4(n, k, cn)
        def op(x, i):
            return torch.ops.adallm.nvfp4_linear(x, w[i], s[i], g[i], None)
    else:
        w, s = random_fp8(n, k, cn)
        def op(x, i):
            return torch.ops.adallm.fp8_linear(x, w[i], s[i])
    wb = torch.randn(cb, n, k, device=DEV, dtype=torch.bfloat16) * 0.02
    for m in ms:
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        calls = max(cn, 8 if m >= 512 else 32)
        q = [lambda i=i: op(x, i % cn) for i in range(calls)]
        calls_b = max(cb, 8 if m >= 512 else 32)
        bf = [lambda i=i: F.linear(x, wb[i % cb]) for i in range(calls_b)]
        reps = 5 if quick else 10
        t_q, t_bf = median_time_us(q, reps), median_time_us(bf, reps)
        io = m * k * 2 + m * n * 2
        rows.append(dict(m=m, t_us=t_q, t_bf16_us=t_bf, bytes=q_bytes + io, bytes_bf16=bf_bytes + io,
                         flops=2 * m * n * k))
        del x
    del w, s, wb
    torch.cuda.empty_cache()
    return rows


def bench_moe(n, k, tokens, quick):
    """T tokens x top-8 of 128 experts; a fresh random routing per call (cold experts)."""
    rows = []
    w, s, g = random_nvfp4(n, k, MOE_E)
    wb = torch.randn(MOE_E, n, k, device=DEV, dtype=torch.bfloat16) * 0.02
    for t in tokens:
        x = torch.randn(t, k, device=DEV, dtype=torch.bfloat16)
        calls = 32
        ids = [torch.stack([torch.randperm(MOE_E, device=DEV)[:MOE_TOPK] for _ in range(t)]).int()
               for _ in range(calls)]
        nv = [lambda i=i: torch.ops.adallm.nvfp4_moe_linear(x, w, s, g, ids[i]) for i in range(calls)]
        # Baseline: BF16 experts, one F.linear per routed (token, expert) pair (what a plain loop does);
        # the routing is read on the host before capture, as static routing.
        host_ids = [i.cpu().tolist() for i in ids]
        bf = [lambda i=i: [F.linear(x[tt:tt + 1], wb[e]) for tt, row in enumerate(host_ids[i]) for e in row]
              for i in range(calls)]
        reps = 5 if quick else 10
        t_nv, t_bf = median_time_us(nv, reps), median_time_us(bf, reps)
        pairs = t * MOE_TOPK
        distinct = len({e for row in host_ids[0] for e in row})
        io = t * k * 2 + pairs * n * 2
        rows.append(dict(m=t, t_us=t_nv, t_bf16_us=t_bf, pairs=pairs,
                         bytes=pairs * (n * k // 2 + n * k // 16) + io,
                         bytes_bf16=distinct * n * k * 2 + io, flops=2 * pairs * n * k))
    del w, s, g, wb
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "linear.json"))
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--decode", action="store_true", help=f"only the decode rows (M in {DECODE_M}), no prefill")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    bw = copy_bandwidth() / 1e9
    print(f"{props.name}: copy bandwidth {bw:.0f} GB/s (read + write), L2 {l2 >> 20} MB")
    results = []
    dense = DENSE[:3] if args.quick else DENSE
    for model, layer, n, k in dense:
        # generate's prefill computes logits for the last token only: lm_head never sees prefill's M.
        prefill = [] if args.quick or args.decode or layer == "lm_head" else PREFILL_M
        for r in bench_dense(n, k, DECODE_M + prefill, l2, args.quick):
            results.append(dict(model=model, layer=layer, n=n, k=k, op="nvfp4_linear", **r))
    for model, layer, n, k in [] if args.quick else FP8:
        for r in bench_dense(n, k, DECODE_M, l2, args.quick, fmt="fp8"):
            results.append(dict(model=model, layer=layer, n=n, k=k, op="fp8_linear", **r))
    for model, layer, n, k in MOE:
        for r in bench_moe(n, k, [1, 4], args.quick):
            results.append(dict(model=model, layer=layer, n=n, k=k, op="nvfp4_moe_linear", **r))

    hdr = (f"{'model':13} {'layer':15} {'op':17} {'N':>6} {'K':>6} {'M':>5} {'us':>9} {'GB/s':>6} {'%copy':>6} "
           f"{'bf16 us':>9} {'x bf16':>7} {'TFLOP/s':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        r["gbs"] = r["bytes"] / r["t_us"] / 1e3
        r["pct_copy_bw"] = 100 * r["gbs"] / bw
        r["speedup_vs_bf16"] = r["t_bf16_us"] / r["t_us"]
        r["tflops"] = r["flops"] / r["t_us"] / 1e6
        r["tflops_bf16"] = r["flops"] / r["t_bf16_us"] / 1e6
        print(f"{r['model']:13} {r['layer']:15} {r['op']:17} {r['n']:>6} {r['k']:>6} {r['m']:>5} {r['t_us']:>9.1f} "
              f"{r['gbs']:>6.0f} {r['pct_copy_bw']:>5.1f}% {r['t_bf16_us']:>9.1f} {r['speedup_vs_bf16']:>6.2f}x "
              f"{r['tflops']:>8.1f}")
    meta = dict(gpu=props.name, sm_count=props.multi_processor_count, l2_bytes=l2, torch=torch.__version__,
                cuda=torch.version.cuda, commit=git_commit(), copy_bandwidth_gbs=bw,
                method="CUDA graph of calls over rotated weight copies (> 4x L2), CUDA events, median of repeats; "
                       "M = rows of x (tokens for MoE, 8 experts each)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
