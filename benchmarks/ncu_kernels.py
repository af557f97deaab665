"""The kernels whose targets are missed, run a few times each for Nsight Compute (benchmarks/gpu_check.sh, stage
`ncu`): the M = 1 NVFP4 GEMV on Qwen3-8B's gate_up (24576 x 4096) and down (4096 x 12288), the M = 16 one (batch
16) on gate_up, and FP8 decode attention at batch 1 with 4k and 32k tokens (Qwen3-8B: 32 query heads, 8 KV heads,
D = 128). Inputs are random. ncu flushes the caches before each profiled launch (its default --cache-control all), so
the profile sees DRAM, as a decode step does.

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats ... python3 benchmarks/ncu_kernels.py
"""
import torch

import adallm_ops  # noqa: F401  (registers the ops, builds/loads the CUDA kernels)


def gemv(n: int, k: int, m: int = 1, copies: int = 4) -> None:
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    ws = [(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda"),
           torch.rand(n, k // 16, device="cuda").to(torch.float8_e4m3fn), torch.ones((), device="cuda"))
          for _ in range(copies)]
    for w, s, g in ws:
        torch.ops.adallm.nvfp4_linear(x, w, s, g, None)


def attention(ctx: int, copies: int = 2) -> None:
    b, hq, hkv, d = 1, 32, 8, 128
    seqlens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    starts = torch.zeros(b, dtype=torch.int32, device="cuda")
    q = torch.randn(b, hq, d, dtype=torch.bfloat16, device="cuda")
    for _ in range(copies):
        kc = torch.randn(b, hkv, ctx, d, device="cuda").to(torch.float8_e4m3fn)
        vc = torch.randn(b, hkv, ctx, d, device="cuda").to(torch.float8_e4m3fn)
        ks, vs = (torch.rand(b, hkv, ctx, device="cuda") for _ in range(2))
        torch.ops.adallm.fp8_decode_attention(q, kc, vc, ks, vs, seqlens, starts, d ** -0.5, 0, 0.0)


if __name__ == "__main__":
    gemv(24576, 4096)
    gemv(4096, 12288)
    gemv(24576, 4096, m=16)
    attention(4096)
    attention(32768)
    torch.cuda.synchronize()
    print("ncu_kernels: done")
