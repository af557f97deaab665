"""FP8 decode attention (adallm::fp8_decode_attention) vs BF16 decode attention (torch SDPA), one GPU.

Protocol (DESIGN.md): one process, same shapes and the same K/V (the FP8 cache is the BF16 one written
through adallm::fp8_kv_write), CUDA graphs of many calls so launch gaps are not measured, CUDA-event
timing, warm-up, median of the trials, caches rotated (several copies, > 4x L2) when one set would fit
in L2. Reports time, achieved bandwidth on the FP8 bytes (K + V + scales), its fraction of the copy
bandwidth measured in this run, and the speedup over SDPA.

    python benchmarks/bench_attention.py [--out benchmarks/results/attention.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics

import torch
import torch.nn.functional as F

import adallm_ops  # noqa: F401  (loads the CUDA kernels)
from adallm.bench import copy_bandwidth, git_commit

# name: (Hq, Hkv, D)
SHAPES = {"qwen3-8b": (32, 8, 128), "qwen3-30b-a3b": (32, 4, 128), "gemma3-27b": (32, 16, 128), "d256": (16, 8, 256)}
CONTEXTS = (4096, 8192, 16384, 32768, 65536, 131072)
BATCHES = (1, 8)
TRIALS = 15


def graph_time_us(calls: list, min_ms: float = 2.0) -> float:
    """Median time of one call (us): a CUDA graph replays the calls (rotating over input sets)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (allocator pools, lazy init)
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(side)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for f in calls:
        f()
    end.record()
    torch.cuda.synchronize()
    reps = max(1, math.ceil(min_ms / max(start.elapsed_time(end), 1e-3)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for f in calls:
                f()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(TRIALS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps * len(calls)))
    del graph
    return statistics.median(times)


def n_sets(bytes_per_set: int, l2: int) -> int:
    return min(16, max(1, math.ceil(4 * l2 / bytes_per_set)))


def bench_case(b: int, ctx: int, hq: int, hkv: int, d: int, l2: int) -> dict:
    sm_scale = d ** -0.5
    fp8_bytes = 2 * b * hkv * ctx * (d + 4)
    bf16_bytes = 2 * b * hkv * ctx * d * 2
    seqlens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    starts = torch.zeros(b, dtype=torch.int32, device="cuda")
    positions = torch.arange(ctx, device="cuda")
    fp8_sets, bf16_sets = [], []
    for i in range(max(n_sets(fp8_bytes, l2), n_sets(bf16_bytes, l2))):
        q = torch.randn(b, hq, d, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(b, hkv, ctx, d, dtype=torch.bfloat16, device="cuda")
        v = torch.randn(b, hkv, ctx, d, dtype=torch.bfloat16, device="cuda")
        if i < n_sets(fp8_bytes, l2):
            kc = torch.empty(b, hkv, ctx, d, dtype=torch.float8_e4m3fn, device="cuda")
            vc = torch.empty_like(kc)
            ks, vs = (torch.empty(b, hkv, ctx, device="cuda") for _ in range(2))
            torch.ops.adallm.fp8_kv_write(k, v, kc, vc, ks, vs, positions)
            fp8_sets.append((q, kc, vc, ks, vs))
        if i < n_sets(bf16_bytes, l2):
            bf16_sets.append((q.unsqueeze(2), k, v))
        del k, v

    def fp8_call(s):
        return lambda: torch.ops.adallm.fp8_decode_attention(*s, seqlens, starts, sm_scale, 0, 0.0)

    def sdpa_call(s):
        return lambda: F.scaled_dot_product_attention(*s, scale=sm_scale, enable_gqa=True)

    # Sanity on sequence 0: FP8 op vs SDPA on the dequantized cache (differences: bf16 rounding only).
    q, kc, vc, ks, vs = (t[:1] for t in fp8_sets[0])
    o8 = fp8_call(fp8_sets[0])()[:1].float()
    o16 = F.scaled_dot_product_attention(q.unsqueeze(2), (kc.float() * ks[..., None]).to(torch.bfloat16),
                                         (vc.float() * vs[..., None]).to(torch.bfloat16), scale=sm_scale,
                                         enable_gqa=True).squeeze(2).float()
    err = ((o8 - o16).norm() / o16.norm()).item()
    us = graph_time_us([fp8_call(s) for s in fp8_sets])
    base_us = graph_time_us([sdpa_call(s) for s in bf16_sets])
    del fp8_sets, bf16_sets, o8, o16
    torch.cuda.empty_cache()
    return dict(batch=b, ctx=ctx, hq=hq, hkv=hkv, d=d, fp8_us=us, fp8_bytes=fp8_bytes, fp8_gbps=fp8_bytes / us / 1e3,
                sdpa_bf16_us=base_us, sdpa_bf16_gbps=bf16_bytes / base_us / 1e3, speedup=base_us / us,
                rel_err_vs_sdpa_dequantized=err)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/attention.json")
    ap.add_argument("--quick", action="store_true", help="Qwen3-8B and Qwen3-30B-A3B shapes only, 4k/32k/128k")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    bw = copy_bandwidth()
    print(f"{props.name}: {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB, copy bandwidth {bw / 1e9:.0f} GB/s")
    shapes = {k: SHAPES[k] for k in ("qwen3-8b", "qwen3-30b-a3b")} if args.quick else SHAPES
    contexts = (4096, 32768, 131072) if args.quick else CONTEXTS
    rows = []
    hdr = (f"{'B':>2} {'ctx':>7} {'shape (Hq,Hkv,D)':>22} {'fp8 us':>9} {'GB/s':>7} {'% copy':>7} "
           f"{'sdpa bf16 us':>12} {'speedup':>8} {'err':>7}")
    print(hdr)
    for name, (hq, hkv, d) in shapes.items():
        for b in BATCHES:
            for ctx in contexts:
                r = bench_case(b, ctx, hq, hkv, d, l2)
                r.update(shape=name, pct_copy_bw=100 * r["fp8_gbps"] * 1e9 / bw)
                rows.append(r)
                print(f"{b:>2} {ctx:>7} {name + f' ({hq},{hkv},{d})':>22} {r['fp8_us']:>9.1f} {r['fp8_gbps']:>7.0f} "
                      f"{r['pct_copy_bw']:>6.1f}% {r['sdpa_bf16_us']:>12.1f} {r['speedup']:>7.2f}x "
                      f"{r['rel_err_vs_sdpa_dequantized']:>7.1e}", flush=True)
    meta = dict(gpu=props.name, sms=props.multi_processor_count, l2_bytes=l2, copy_bandwidth_gbps=bw / 1e9,
                torch=torch.__version__, cuda=torch.version.cuda, commit=git_commit(),
                timing="CUDA graph replays, CUDA events, median of %d trials; caches rotated when < 4x L2" % TRIALS,
                bytes="fp8 K + V + fp32 scales, read once")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
