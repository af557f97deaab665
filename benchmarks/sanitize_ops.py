"""Runs every CUDA op once on small, awkward shapes that reach each code path (GEMV and GEMM, split and
unsplit attention, ring buffers), checking against the CPU reference. Meant to run under
`compute-sanitizer --tool memcheck` (benchmarks/gpu_check.sh), which reports any out-of-bounds access."""
import torch

import adallm_ops  # noqa: F401
from adallm import nvfp4
from adallm_ops.reference import fp8_quantize_rows


def close(a, b, tol=2e-2):
    err = ((a.double().cpu() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()
    assert err < tol, err


def main():
    dev = "cuda"
    # M = 1 with 4 32-row blocks per SM and one more, plus 8 rows: csrc/nvfp4_gemv_rows.cuh, its tails and an
    # idle warp in its second pass over K = 4128.
    rows_n = 32 * (4 * torch.cuda.get_device_properties(0).multi_processor_count + 1) + 8
    for m, n, k in [(1, 40, 96), (1, rows_n, 4128), (3, 24, 4112), (16, 72, 272), (17, 40, 96), (130, 200, 336)]:
        w = torch.randn(n, k)
        # "rtn" is the adallm::nvfp4_quantize kernel, bit-exact to the CPU reference ("mse", the default, is
        # plain torch ops whose float sums may round differently on the two devices).
        q = nvfp4.quantize(w.to(dev), method="rtn")
        assert torch.equal(q.weight.cpu(), nvfp4.quantize(w, method="rtn").weight)
        x = torch.randn(m, k, dtype=torch.bfloat16)
        b = torch.randn(n, dtype=torch.bfloat16)
        y = torch.ops.adallm.nvfp4_linear(x.to(dev), q.weight, q.weight_scale, q.weight_global_scale, b.to(dev))
        close(y, torch.ops.adallm.nvfp4_linear(x, q.weight.cpu(), q.weight_scale.cpu(), q.weight_global_scale.cpu(), b))
    # nvfp4_linear_glu: the rows kernel's gated epilogue (a partial last round of output blocks, K = 4128's idle
    # warp) and the fallback (M = 2).
    glu_n = 64 * (2 * torch.cuda.get_device_properties(0).multi_processor_count + 1)
    for m, n, k, act in [(1, glu_n, 4128, "silu"), (1, glu_n, 4128, "gelu_tanh"), (2, 96, 64, "silu")]:
        q = nvfp4.quantize(torch.randn(n, k).to(dev), method="rtn")
        x = torch.randn(m, k, dtype=torch.bfloat16)
        w = (q.weight, q.weight_scale, q.weight_global_scale)
        close(torch.ops.adallm.nvfp4_linear_glu(x.to(dev), *w, act),
              torch.ops.adallm.nvfp4_linear_glu(x, *(t.cpu() for t in w), act))
    # The decoder layer's RMSNorm and residual inside the GEMVs: the rows kernel's prologue on a few rows (one CTA, a
    # second pass over K = 4128), gated and not; the residual in both GEMV kernels' epilogues.
    for m, n, k, act in [(1, 40, 4128, None), (1, 64, 96, "silu"), (1, rows_n, 256, None), (3, 24, 4112, None)]:
        q = nvfp4.quantize(torch.randn(n, k).to(dev), method="rtn")
        w = (q.weight, q.weight_scale, q.weight_global_scale)
        w_cpu = tuple(t.cpu() for t in w)
        x = torch.randn(m, k, dtype=torch.bfloat16) * 30
        nw, r = torch.rand(k, dtype=torch.bfloat16) + 0.5, torch.randn(m, n, dtype=torch.bfloat16)
        if act is None:
            close(torch.ops.adallm.nvfp4_linear(x.to(dev), *w, None, r.to(dev), nw.to(dev), 1e-6),
                  torch.ops.adallm.nvfp4_linear(x, *w_cpu, None, r, nw, 1e-6))
        else:
            close(torch.ops.adallm.nvfp4_linear_glu(x.to(dev), *w, act, nw.to(dev), 1e-6),
                  torch.ops.adallm.nvfp4_linear_glu(x, *w_cpu, act, nw, 1e-6))
    # fp8_linear: one m-tile and two, tails of N (not a multiple of 16) and of K (not a multiple of the 256-k item),
    # a row past the last whole tile of a warp, and the dequantize + cuBLAS path (M = 17).
    for m, n, k in [(1, 40, 96), (1, 4099, 640), (9, 2051, 5376), (16, 17, 80), (17, 40, 96)]:
        w, s = fp8_quantize_rows(torch.randn(n, k))
        x = torch.randn(m, k, dtype=torch.bfloat16)
        close(torch.ops.adallm.fp8_linear(x.to(dev), w.to(dev), s.to(dev)), torch.ops.adallm.fp8_linear(x, w, s))
    e = [nvfp4.quantize(torch.randn(48, 64)) for _ in range(5)]
    ew = [torch.stack([getattr(t, a) for t in e]) for a in ("weight", "weight_scale", "weight_global_scale")]
    ids = torch.randint(0, 5, (3, 2))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    close(torch.ops.adallm.nvfp4_moe_linear(x.to(dev), *[t.to(dev) for t in ew], ids.to(dev)),
          torch.ops.adallm.nvfp4_moe_linear(x, *ew, ids))
    for b, hkv, group, d, length, window, seqlens in [(1, 8, 4, 128, 4096, 0, [3001]), (3, 2, 2, 64, 40, 0, [7, 19, 40]),
                                                       (2, 4, 2, 256, 16, 16, [39, 16]), (2, 4, 8, 128, 2048, 0, [2048, 999]),
                                                       (1, 2, 12, 256, 700, 0, [700])]:
        kc = torch.zeros(b, hkv, length, d, dtype=torch.float8_e4m3fn, device=dev)
        vc, ks, vs = kc.clone(), torch.ones(b, hkv, length, device=dev), torch.ones(b, hkv, length, device=dev)
        new = torch.randn(b, hkv, length, d, dtype=torch.bfloat16, device=dev)
        torch.ops.adallm.fp8_kv_write(new, new * 2, kc, vc, ks, vs, torch.arange(length, device=dev) + 5)
        q = torch.randn(b, hkv * group, d, dtype=torch.bfloat16, device=dev)
        sl = torch.tensor(seqlens, dtype=torch.int32, device=dev)
        st = torch.zeros_like(sl)
        out = torch.ops.adallm.fp8_decode_attention(q, kc, vc, ks, vs, sl, st, d ** -0.5, window, 0.0)
        ref = torch.ops.adallm.fp8_decode_attention(q.cpu(), kc.cpu(), vc.cpu(), ks.cpu(), vs.cpu(), sl.cpu(),
                                                    st.cpu(), d ** -0.5, window, 0.0)
        close(out, ref)
    # The decode prologue: every head_dim, a broadcast and a per-row cos/sin, a position past a ring's length.
    for b, hq, hkv, d, length, rope_rows, position in [(1, 8, 1, 64, 16, 1, 3), (3, 32, 8, 128, 64, 3, 200),
                                                         (2, 4, 4, 256, 8, 1, 9)]:
        qkv = torch.randn(b, (hq + 2 * hkv) * d, dtype=torch.bfloat16)
        w, cos, sin = torch.randn(2, d, dtype=torch.bfloat16), *torch.randn(2, rope_rows, d, dtype=torch.bfloat16)
        caches = [torch.zeros(b, hkv, length, d, dtype=torch.float8_e4m3fn), torch.zeros(b, hkv, length, d,
                  dtype=torch.float8_e4m3fn), torch.ones(b, hkv, length), torch.ones(b, hkv, length)]
        args = [qkv, w[0], w[1], cos, sin]
        out = torch.ops.adallm.qk_norm_rope_kv_write(*(t.to(dev) for t in args + caches),
                                                      torch.tensor([position], device=dev), 1e-6, 1.0)
        close(out, torch.ops.adallm.qk_norm_rope_kv_write(*args, *caches, torch.tensor([position]), 1e-6, 1.0))
    # The MoE router: a partial last CTA (E = 60), the most experts, tokens and top_k the kernel takes.
    for t, e, h, k in [(1, 128, 2048, 8), (3, 60, 256, 4), (16, 512, 64, 32)]:
        x, w = torch.randn(t, h, dtype=torch.bfloat16), torch.randn(e, h, dtype=torch.bfloat16)
        out = torch.ops.adallm.moe_router_topk(x.to(dev), w.to(dev), k, True)
        close(out[0], torch.ops.adallm.moe_router_topk(x, w, k, True)[0])
    torch.cuda.synchronize()
    print("sanitize_ops: all CUDA ops ran and matched the CPU reference")


if __name__ == "__main__":
    main()
