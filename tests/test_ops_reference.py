"""CPU reference impls of the ops vs a float64 re-computation from their definitions."""
import pytest
import torch

import adallm_ops
from adallm import nvfp4
from ckpt_spec import dequant64  # float64 decode of the packed bytes, from the format spec


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("m,n,k", [(1, 8, 32), (3, 24, 64), (5, 16, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_nvfp4_linear_vs_float64(m, n, k, dtype, bias):
    q = nvfp4.quantize(torch.randn(n, k))
    x = torch.randn(2, m, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    y = adallm_ops.nvfp4_linear(x, q.weight, q.weight_scale, q.weight_global_scale, b)
    ref = x.double() @ dequant64(q.weight, q.weight_scale, q.weight_global_scale.item()).t()
    if bias:
        ref += b.double()
    assert y.shape == (2, m, n) and y.dtype == dtype
    assert rel_err(y, ref) < (4e-3 if dtype == torch.bfloat16 else 1e-3)


def test_nvfp4_moe_linear_vs_float64():
    e, n, k, t, topk = 4, 16, 32, 5, 2
    ws = [nvfp4.quantize(torch.randn(n, k)) for _ in range(e)]
    w = torch.stack([q.weight for q in ws])
    s = torch.stack([q.weight_scale for q in ws])
    g = torch.stack([q.weight_global_scale for q in ws])
    ids = torch.randint(0, e, (t, topk))
    for x in (torch.randn(t, k, dtype=torch.bfloat16), torch.randn(t, topk, k, dtype=torch.bfloat16)):
        y = adallm_ops.nvfp4_moe_linear(x, w, s, g, ids)
        for ti in range(t):
            for j in range(topk):
                xi = x[ti] if x.dim() == 2 else x[ti, j]
                q = ws[ids[ti, j]]
                ref = xi.double() @ dequant64(q.weight, q.weight_scale, q.weight_global_scale.item()).t()
                assert rel_err(y[ti, j], ref) < 4e-3


@pytest.mark.parametrize("renormalize", [False, True])
def test_moe_router_topk_vs_float64(renormalize):
    t, e, h, k = 5, 12, 64, 3
    x = torch.randn(t, h).to(torch.bfloat16)
    w = torch.randn(e, h).to(torch.bfloat16)
    w[7] = w[2]  # experts 2 and 7 always tie: the lower one is picked first
    logits, weights, ids = adallm_ops.moe_router_topk(x, w, k, renormalize)
    ref_logits = x.double() @ w.double().t()
    assert logits.dtype == weights.dtype == torch.bfloat16 and ids.dtype == torch.int64
    assert rel_err(logits, ref_logits) < 4e-3
    for r in range(t):
        order = sorted(range(e), key=lambda j: (-float(logits[r, j]), j))  # by the rounded logit, then index
        assert ids[r].tolist() == order[:k]
        p = logits[r].double().softmax(-1)[ids[r]]
        ref = p / p.sum() if renormalize else p
        assert rel_err(weights[r], ref) < 4e-3
        if 2 in order[:k] and 7 in order[:k]:
            assert order.index(2) < order.index(7)


def make_cache(b, hkv, length, d, scale=1.0):
    kc = torch.zeros(b, hkv, length, d, dtype=torch.float8_e4m3fn)
    vc = torch.zeros_like(kc)
    ks = torch.zeros(b, hkv, length)
    vs = torch.zeros_like(ks)
    return kc, vc, ks, vs


def test_kv_write_round_trip_and_extremes():
    kc, vc, ks, vs = make_cache(2, 2, 8, 64)
    k = torch.randn(2, 2, 3, 64, dtype=torch.bfloat16)
    k[0, 0, 0] *= 1e4
    k[0, 1, 1] *= 1e-6
    k[1, 0, 2] = 0
    v = torch.randn_like(k)
    pos = torch.tensor([9, 10, 11])  # ring-buffer slots 1, 2, 3
    adallm_ops.fp8_kv_write(k, v, kc, vc, ks, vs, pos)
    got = kc.float()[:, :, 1:4] * ks[:, :, 1:4, None]
    assert torch.isfinite(got).all()
    # e4m3 has 3 mantissa bits: per-element relative error <= 2^-4, relative to each row's amax
    err = (got - k.float()).abs().amax(-1) / k.float().abs().amax(-1).clamp_min(1e-30)
    assert err.max() <= 2 ** -4
    assert got[0, 1, 1].abs().max() > 0  # 1e-6 values did not vanish
    assert (got[1, 0, 2] == 0).all()
    assert (kc.view(torch.uint8)[:, :, [0, 4, 5, 6, 7]] == 0).all()  # other slots untouched


@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
@pytest.mark.parametrize("rope_rows", [1, 3])
def test_qk_norm_rope_kv_write_vs_float64(weight_offset, rope_rows):
    b, hq, hkv, d, length, eps = 3, 4, 2, 64, 8, 1e-6
    qkv = (torch.randn(b, (hq + 2 * hkv) * d) * 3).to(torch.bfloat16)
    qkv[1, hq * d:(hq + 1) * d] *= 1e-4  # a tiny k head: the norm brings it back to ~1
    qw, kw = (torch.randn(d) * 0.5).to(torch.bfloat16), (torch.randn(d) * 0.5).to(torch.bfloat16)
    angle = torch.rand(rope_rows, d // 2) * 6
    cos, sin = (f(torch.cat((angle, angle), -1)).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    kc, vc, ks, vs = make_cache(b, hkv, length, d)
    q = adallm_ops.qk_norm_rope_kv_write(qkv, qw, kw, cos, sin, kc, vc, ks, vs, torch.tensor([10]), eps,
                                         weight_offset)

    x = qkv.double().view(b, -1, d)
    c, s = cos.double().unsqueeze(1), sin.double().unsqueeze(1)

    def norm_rope(h, w):  # the definition, float64
        h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * (w.double() + weight_offset)
        return h * c + torch.cat((-h[..., d // 2:], h[..., :d // 2]), -1) * s

    assert q.shape == (b, hq, d) and q.dtype == torch.bfloat16 and q.is_contiguous()
    assert rel_err(q, norm_rope(x[:, :hq], qw)) < 4e-3
    slot = 10 % length
    for cache, scale, ref in ((kc, ks, norm_rope(x[:, hq:hq + hkv], kw)), (vc, vs, x[:, hq + hkv:])):
        back = cache[:, :, slot].double() * scale[:, :, slot, None]
        err = (back - ref).abs().amax(-1) / ref.abs().amax(-1)
        assert err.max() <= 2 ** -4 * 1.001  # e4m3: half an ulp of the row's amax at most
        others = [i for i in range(length) if i != slot]
        assert (cache.view(torch.uint8)[:, :, others] == 0).all() and (scale[:, :, others] == 0).all()


def attention64(q, kc, vc, ks, vs, seqlens, starts, sm_scale, window, softcap):
    """Loops over rows and heads; positions listed explicitly; softmax in float64."""
    b, hq, d = q.shape
    hkv, length = kc.shape[1], kc.shape[2]
    out = torch.empty(b, hq, d, dtype=torch.float64)
    for r in range(b):
        lo = int(starts[r]) if window == 0 else max(int(starts[r]), int(seqlens[r]) - window)
        pos = list(range(lo, int(seqlens[r])))
        slots = [p % length for p in pos]
        for h in range(hq):
            kv = h // (hq // hkv)
            kk = kc[r, kv, slots].double() * ks[r, kv, slots, None].double()
            vv = vc[r, kv, slots].double() * vs[r, kv, slots, None].double()
            logit = kk @ q[r, h].double() * sm_scale
            if softcap:
                logit = softcap * torch.tanh(logit / softcap)
            out[r, h] = torch.softmax(logit, 0) @ vv
    return out


@pytest.mark.parametrize("b,hkv,group,d", [(1, 2, 1, 64), (3, 2, 2, 128), (2, 1, 4, 256), (5, 2, 8, 64)])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (0, 30.0), (6, 50.0)])
def test_decode_attention_vs_float64(b, hkv, group, d, window, softcap):
    length = 16 if window == 0 else window  # sliding layers keep a ring buffer of the window
    kc, vc, ks, vs = make_cache(b, hkv, length, d)
    kc.copy_(torch.randn(kc.shape).to(torch.float8_e4m3fn))
    vc.copy_(torch.randn(vc.shape).to(torch.float8_e4m3fn))
    ks.uniform_(0.5, 2.0)
    vs.uniform_(0.5, 2.0)
    hi = length if window == 0 else 40  # ring buffers wrap around
    seqlens = torch.randint(2, hi + 1, (b,), dtype=torch.int32)
    starts = torch.minimum(torch.randint(0, 3, (b,), dtype=torch.int32), seqlens - 1)
    q = torch.randn(b, hkv * group, d, dtype=torch.bfloat16)
    sm = d ** -0.5
    out = adallm_ops.fp8_decode_attention(q, kc, vc, ks, vs, seqlens, starts, sm, window, softcap)
    ref = attention64(q, kc, vc, ks, vs, seqlens, starts, sm, window, softcap)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel_err(out, ref) < 4e-3


def test_decode_attention_rejects_overlong_range():
    kc, vc, ks, vs = make_cache(1, 1, 8, 64)
    q = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        adallm_ops.fp8_decode_attention(q, kc, vc, ks, vs, torch.tensor([12], dtype=torch.int32),
                                        torch.tensor([0], dtype=torch.int32), 0.1, 0, 0.0)


@pytest.mark.parametrize("call,msg", [
    (lambda w: adallm_ops.nvfp4_linear(torch.randn(2, 32), *w, None), "bfloat16 or float16"),
    (lambda w: adallm_ops.nvfp4_linear(torch.randn(2, 48, dtype=torch.bfloat16), *w, None), "K = 48"),
    (lambda w: adallm_ops.nvfp4_linear(torch.randn(2, 32, dtype=torch.bfloat16), w[0].float(), w[1], w[2], None),
     "uint8"),
    (lambda w: adallm_ops.nvfp4_linear(torch.randn(2, 32, dtype=torch.bfloat16), w[0].t(), w[1], w[2], None),
     "contiguous"),
    (lambda w: adallm_ops.nvfp4_linear(torch.randn(2, 32, dtype=torch.bfloat16), w[0], w[1][:, :1].contiguous(), w[2], None),
     "weight_scale shape"),
    (lambda w: adallm_ops.nvfp4_quantize(torch.randn(4, 20), torch.tensor(1.0)), "multiple of 16"),
    (lambda w: adallm_ops.nvfp4_linear(torch.randn(2, 32, dtype=torch.bfloat16), *w,
                                       residual=torch.randn(2, 4, dtype=torch.bfloat16)),
     r"residual must be .*\(2, 8\)"),
    (lambda w: adallm_ops.nvfp4_linear(torch.randn(2, 32, dtype=torch.bfloat16), *w,
                                       residual=torch.randn(2, 8)), "residual must be torch.bfloat16"),
    (lambda w: adallm_ops.nvfp4_linear(torch.randn(1, 32, dtype=torch.bfloat16), *w, norm_weight=torch.ones(32)),
     r"norm_weight must be torch.bfloat16 \[32\]"),
    (lambda w: adallm_ops.nvfp4_linear(torch.randn(1, 32, dtype=torch.bfloat16), *w,
                                       norm_weight=torch.ones(16, dtype=torch.bfloat16)), r"norm_weight must be"),
    (lambda w: adallm_ops.nvfp4_linear(torch.randn(1, 32, dtype=torch.bfloat16), *w,
                                       norm_weight=torch.ones(32, dtype=torch.bfloat16), norm_eps=float("nan")),
     "norm_eps must be finite"),
    (lambda w: adallm_ops.nvfp4_linear_glu(torch.randn(1, 32, dtype=torch.bfloat16), *w, "silu",
                                           norm_weight=torch.ones(32, dtype=torch.half)), "norm_weight must be"),
])
def test_bad_inputs_raise_clear_errors(call, msg):
    q = nvfp4.quantize(torch.randn(8, 32))
    with pytest.raises(ValueError, match=msg):
        call((q.weight, q.weight_scale, q.weight_global_scale))


def test_nvfp4_linear_norm_and_residual_match_the_unfused_ops():
    """On the CPU the fused RMSNorm is transformers' Qwen3RMSNorm bit for bit, and the residual is added after
    rounding: the op equals norm module -> linear -> add."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    q = nvfp4.quantize(torch.randn(24, 64))
    w = (q.weight, q.weight_scale, q.weight_global_scale)
    norm = Qwen3RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    norm.weight.data = torch.rand(64).to(torch.bfloat16) + 0.5
    x, r = torch.randn(2, 3, 64, dtype=torch.bfloat16) * 30, torch.randn(2, 3, 24, dtype=torch.bfloat16)
    fused = adallm_ops.nvfp4_linear(x, *w, None, r, norm.weight.data, 1e-6)
    with torch.no_grad():
        assert torch.equal(fused, adallm_ops.nvfp4_linear(norm(x), *w) + r)
        glu = adallm_ops.nvfp4_linear_glu(x, *w, "silu", norm.weight.data, 1e-6)
        assert torch.equal(glu, adallm_ops.nvfp4_linear_glu(norm(x), *w, "silu"))


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_nvfp4_linear_glu_vs_float64(activation):
    q = nvfp4.quantize(torch.randn(48, 64))
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = adallm_ops.nvfp4_linear_glu(x, q.weight, q.weight_scale, q.weight_global_scale, activation)
    full = x.double() @ q.dequantize(torch.float64).t()
    gate, up = full[..., :24], full[..., 24:]
    act = torch.nn.functional.silu(gate) if activation == "silu" else torch.nn.functional.gelu(gate, approximate="tanh")
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), act * up, rtol=1e-2, atol=1e-2 * (act * up).abs().max().item())


def test_nvfp4_linear_glu_bad_inputs():
    q = nvfp4.quantize(torch.randn(48, 64))
    w = (q.weight, q.weight_scale, q.weight_global_scale)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="activation must be 'silu' or 'gelu_tanh', got 'relu'"):
        adallm_ops.nvfp4_linear_glu(x, *w, "relu")
    odd = nvfp4.quantize(torch.randn(49, 64))
    with pytest.raises(ValueError, match="N = 49 must be even"):
        adallm_ops.nvfp4_linear_glu(x, odd.weight, odd.weight_scale, odd.weight_global_scale, "silu")
