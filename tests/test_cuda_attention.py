"""CUDA FP8 KV-cache kernels (csrc/fp8_*.cu) against the CPU reference and a float64 recomputation.

fp8_kv_write must match the reference bit for bit (cache bytes and scales); so must qk_norm_rope_kv_write's V,
while its q and K may differ by a rounding step (its sum of squares and rsqrt are not the reference's, by a
few fp32 ulps, which can move a value across a rounding midpoint). fp8_decode_attention is held
to the STYLE.md rule: its error against float64 may be at most twice the CPU reference's (fp32 math,
output rounded to q.dtype) plus a small floor.
"""
import pytest
import torch

import adallm_ops  # noqa: F401  (registers the ops and loads the CUDA kernels)
from adallm_ops.reference import decode_valid_slots, fp8_quantize_rows
from bad_input_child import expect_value_errors, run_as_child

pytestmark = pytest.mark.cuda
DEV = "cuda"


def attention64(q, kc, vc, ks, vs, seqlens, starts, sm_scale, window, softcap):
    """Float64 decode attention from the definition: dequantize, mask the invalid slots, softmax."""
    b, hkv, length, d = kc.shape
    k = kc.double() * ks.double().unsqueeze(-1)
    v = vc.double() * vs.double().unsqueeze(-1)
    qf = q.double().reshape(b, hkv, -1, d)
    logits = torch.einsum("bhgd,bhld->bhgl", qf, k) * sm_scale
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    valid = decode_valid_slots(seqlens, starts, length, window)
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.einsum("bhgl,bhld->bhgd", logits.softmax(-1), v).reshape(q.shape)


def rel_err(a, ref):
    return ((a.double().cpu() - ref).norm() / ref.norm()).item()


def capture(fn):
    """(CUDA graph of fn(), its output buffer), after one warm-up call on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def random_cache(b, hkv, length, d):
    """Every slot filled (so a wrong mask reads real values), with a spread of per-row magnitudes."""
    rows = torch.randn(b, hkv, length, d) * torch.exp(torch.randn(b, hkv, length, 1))
    return fp8_quantize_rows(rows)


def run_decode(b, hkv, group, d, length, seqlens, starts, window, softcap, dtype):
    kc, ks = random_cache(b, hkv, length, d)
    vc, vs = random_cache(b, hkv, length, d)
    q = (torch.randn(b, hkv * group, d) * 2).to(dtype)
    sl = torch.tensor(seqlens, dtype=torch.int32)
    st = torch.tensor(starts, dtype=torch.int32)
    sm_scale = d ** -0.5
    args = (q, kc, vc, ks, vs, sl, st)
    out = torch.ops.adallm.fp8_decode_attention(*[t.to(DEV) for t in args], sm_scale, window, softcap)
    cpu = torch.ops.adallm.fp8_decode_attention(*args, sm_scale, window, softcap)
    ref = attention64(*args, sm_scale, window, softcap)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    err, err_cpu = rel_err(out, ref), rel_err(cpu, ref)
    assert err <= 2 * err_cpu + 1e-5, (err, err_cpu)
    return out


@pytest.mark.parametrize("length", [7, 19, 39, 1170, 39275])
@pytest.mark.parametrize("group", [1, 4])
def test_decode_awkward_lengths(length, group):
    # Full caches of awkward lengths; row 1 shorter (part of the cache never attended to).
    run_decode(2, 2, group, 128, length, [length, max(1, length // 3)], [0, 0], 0, 0.0, torch.bfloat16)


@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 8, 12, 16])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_decode_gqa_and_head_dims(group, d):
    run_decode(3, 2, group, d, 700, [700, 333, 1], [0, 0, 0], 0, 0.0, torch.float16)


@pytest.mark.parametrize("b", [1, 3, 8])
def test_decode_sliding_window_ring_buffer(b):
    # L = window: positions wrap around the ring several times; seqlens below, at and above the window.
    window = 512
    seqlens = [window * 7 + 37, window, 100, 5000, 513, 1, 1024, 777][:b]
    run_decode(b, 4, 2, 128, window, seqlens, [0] * b, window, 0.0, torch.bfloat16)


def test_decode_window_smaller_than_global_cache():
    # A window applied on a cache longer than it (slot = position) and on a ring of a larger length.
    run_decode(2, 2, 4, 64, 4096, [4000, 300], [0, 0], 1000, 0.0, torch.bfloat16)
    run_decode(2, 2, 4, 64, 1536, [9000, 1400], [0, 0], 1000, 0.0, torch.bfloat16)


def test_decode_left_padding():
    run_decode(3, 2, 4, 128, 3000, [3000, 2500, 40], [17, 1200, 39], 0, 0.0, torch.bfloat16)
    # Left padding together with a sliding window on a ring buffer.
    run_decode(3, 2, 2, 128, 256, [300, 2000, 200], [90, 10, 150], 256, 0.0, torch.float16)


@pytest.mark.parametrize("d", [64, 256])
def test_decode_softcap(d):
    run_decode(3, 4, 2, d, 1500, [1500, 900, 60], [0, 5, 0], 0, 30.0, torch.bfloat16)
    run_decode(1, 2, 8, d, 64, [500], [0], 64, 50.0, torch.float16)


@pytest.mark.parametrize("group,hkv,dtype", [(4, 8, torch.float16), (8, 4, torch.float16), (8, 4, torch.bfloat16)])
def test_decode_long_context_gqa(group, hkv, dtype):
    # Qwen3-8B (G = 4, Hkv = 8) and Qwen3-30B-A3B (G = 8, Hkv = 4) groupings at long context: dozens of
    # splits and their merge, a row with left padding, fp16 output (the tightest tolerance).
    run_decode(2, hkv, group, 128, 24000, [24000, 15011], [0, 300], 0, 0.0, dtype)


def test_decode_batch8_long():
    run_decode(8, 8, 4, 128, 8192, [8192, 1, 4097, 3333, 8000, 17, 6000, 129], [0] * 8, 0, 0.0, torch.bfloat16)


def test_decode_repeatable_and_graph_safe():
    # The split merge uses arrival counters left at zero by each launch: repeated calls and CUDA-graph
    # replays with new lengths must give the eager results exactly.
    b, hkv, group, d, length = 2, 8, 4, 128, 6000
    kc, ks = random_cache(b, hkv, length, d)
    vc, vs = random_cache(b, hkv, length, d)
    q = torch.randn(b, hkv * group, d, dtype=torch.bfloat16)
    args = [t.to(DEV) for t in (q, kc, vc, ks, vs)]
    sl = torch.tensor([6000, 2500], dtype=torch.int32, device=DEV)
    st = torch.tensor([0, 100], dtype=torch.int32, device=DEV)
    call = lambda: torch.ops.adallm.fp8_decode_attention(*args, sl, st, 0.1, 0, 0.0)  # noqa: E731
    first = call()
    assert torch.equal(first, call())
    graph, out = capture(call)
    for lens in ([6000, 2500], [77, 5999], [3000, 1000]):
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        assert torch.equal(out, call()), lens
    torch.cuda.synchronize()
    ref = attention64(q, kc, vc, ks, vs, sl.cpu(), st.cpu(), 0.1, 0, 0.0)
    assert rel_err(out, ref) < 1e-2


def test_decode_empty_row_is_zero():
    # The CPU reference raises on a row with nothing to attend to; the kernel cannot (no host sync) and
    # writes zeros for it, leaving the other rows intact.
    b, hkv, d, length = 2, 2, 64, 64
    kc, ks = random_cache(b, hkv, length, d)
    vc, vs = random_cache(b, hkv, length, d)
    q = torch.randn(b, hkv * 2, d, dtype=torch.bfloat16)
    sl, st = torch.tensor([40, 10], dtype=torch.int32), torch.tensor([0, 10], dtype=torch.int32)
    out = torch.ops.adallm.fp8_decode_attention(*[t.to(DEV) for t in (q, kc, vc, ks, vs, sl, st)], 0.125, 0, 0.0)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))
    ref = attention64(q[:1], kc[:1], vc[:1], ks[:1], vs[:1], sl[:1], st[:1], 0.125, 0, 0.0)
    assert rel_err(out[:1], ref) < 1e-2


def kv_write_both(k, v, length, positions):
    """Runs fp8_kv_write on CUDA and CPU into caches holding the same random bytes; returns both sets."""
    b, h, _, d = k.shape
    base = [torch.randint(0, 0x7E, (b, h, length, d), dtype=torch.uint8).view(torch.float8_e4m3fn),
            torch.randint(0, 0x7E, (b, h, length, d), dtype=torch.uint8).view(torch.float8_e4m3fn),
            torch.rand(b, h, length), torch.rand(b, h, length)]
    gpu = [t.to(DEV) for t in base]
    cpu = [t.clone() for t in base]
    torch.ops.adallm.fp8_kv_write(k.to(DEV), v.to(DEV), *gpu, positions.to(DEV))
    torch.ops.adallm.fp8_kv_write(k.contiguous(), v.contiguous(), *cpu, positions)
    return [t.cpu() for t in gpu], cpu


def assert_same_bytes(gpu, cpu):
    for g, c in zip(gpu, cpu):
        assert torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g.view(torch.int32),
                           c.view(torch.uint8) if c.dtype == torch.float8_e4m3fn else c.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("b,h,s,length,first", [(1, 1, 1, 16, 0), (3, 4, 7, 64, 60), (2, 8, 37, 37, 1000)])
def test_kv_write_bit_exact(dtype, d, b, h, s, length, first):
    k = torch.randn(b, h, s, d) * torch.exp(3 * torch.randn(b, h, s, 1))
    v = torch.randn(b, h, s, d)
    k[0, 0, 0] = 0  # an all-zero row gets scale 1
    k.view(-1, d)[-1, 3] = 1e4 if dtype == torch.float16 else 1e30  # one huge element
    v.view(-1, d)[-1] *= 1e-4 if dtype == torch.float16 else 1e-30  # a tiny row
    positions = torch.arange(first, first + s)  # wraps around the ring when first + s > length
    gpu, cpu = kv_write_both(k.to(dtype), v.to(dtype), length, positions)
    assert_same_bytes(gpu, cpu)


def test_kv_write_strided_input_and_midpoints():
    # k/v as the attention layer has them, a transposed view [B, S, H, D] -> [B, H, S, D]; and values at
    # exactly the midpoints between e4m3 codes after division by the scale (round-to-nearest-even).
    b, s, h, d = 2, 5, 4, 128
    kv = torch.randn(b, s, h, 2 * d, dtype=torch.bfloat16)
    k, v = kv[..., :d].transpose(1, 2), kv[..., d:].transpose(1, 2)
    row = torch.tensor([448.0, 1.0625, 1.1875, -3.25, 0.0, 2 ** -10, 3 * 2 ** -10, 240.0]).repeat(d // 8)
    k[0, 0, 0] = row.to(torch.bfloat16)
    gpu, cpu = kv_write_both(k, v, 8, torch.tensor([3, 9, 4, 5, 6]))
    assert_same_bytes(gpu, cpu)


def test_kv_write_then_decode_graph():
    # Write + attend in one captured graph, positions and lengths changed between replays.
    b, hkv, group, d, length = 2, 2, 4, 128, 64
    kc = torch.zeros(b, hkv, length, d, dtype=torch.float8_e4m3fn, device=DEV)
    vc, ks, vs = kc.clone(), torch.ones(b, hkv, length, device=DEV), torch.ones(b, hkv, length, device=DEV)
    k_all = torch.randn(b, hkv, 200, d, dtype=torch.bfloat16, device=DEV)
    v_all = torch.randn(b, hkv, 200, d, dtype=torch.bfloat16, device=DEV)
    new_k, new_v = k_all[:, :, :1].clone(), v_all[:, :, :1].clone()
    pos = torch.zeros(1, dtype=torch.int64, device=DEV)
    sl = torch.ones(b, dtype=torch.int32, device=DEV)
    st = torch.zeros(b, dtype=torch.int32, device=DEV)
    q = torch.randn(b, hkv * group, d, dtype=torch.bfloat16, device=DEV)

    def step():
        torch.ops.adallm.fp8_kv_write(new_k, new_v, kc, vc, ks, vs, pos)
        return torch.ops.adallm.fp8_decode_attention(q, kc, vc, ks, vs, sl, st, d ** -0.5, length, 0.0)

    graph, out = capture(step)
    for p in range(150):
        new_k.copy_(k_all[:, :, p:p + 1])
        new_v.copy_(v_all[:, :, p:p + 1])
        pos.fill_(p)
        sl.fill_(p + 1)
        graph.replay()
    torch.cuda.synchronize()
    # Reference: the last `length` tokens, quantized as the writer does.
    kq, ksr = fp8_quantize_rows(k_all[:, :, 150 - length:150].cpu())
    vq, vsr = fp8_quantize_rows(v_all[:, :, 150 - length:150].cpu())
    ref = attention64(q.cpu(), kq, vq, ksr, vsr, torch.full((b,), length, dtype=torch.int32),
                      torch.zeros(b, dtype=torch.int32), d ** -0.5, 0, 0.0)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
@pytest.mark.parametrize("b,hq,hkv,rope_rows,position,length", [(1, 8, 1, 1, 0, 16), (3, 32, 8, 3, 70, 64),
                                                                   (2, 4, 4, 1, 5, 8)])
def test_qk_norm_rope_kv_write_vs_reference(dtype, d, weight_offset, b, hq, hkv, rope_rows, position, length):
    heads = hq + 2 * hkv
    qkv = (torch.randn(b, heads, d) * torch.exp(2 * torch.randn(b, heads, 1))).reshape(b, heads * d)
    qkv[0, :d] = 0  # an all-zero q head stays zero
    qkv[-1, hq * d:(hq + 1) * d] = 0  # an all-zero k head gets scale 1
    qkv = qkv.to(dtype)
    qw, kw = (torch.randn(2, d) * 0.5).to(dtype)
    angle = torch.rand(rope_rows, d // 2) * 100
    cos, sin = (f(torch.cat((angle, angle), -1)).to(dtype) for f in (torch.cos, torch.sin))
    base = [torch.randint(0, 0x7E, (b, hkv, length, d), dtype=torch.uint8).view(torch.float8_e4m3fn),
            torch.randint(0, 0x7E, (b, hkv, length, d), dtype=torch.uint8).view(torch.float8_e4m3fn),
            torch.rand(b, hkv, length), torch.rand(b, hkv, length)]
    gpu, cpu = [t.to(DEV) for t in base], [t.clone() for t in base]
    pos = torch.tensor([position])
    q_gpu = torch.ops.adallm.qk_norm_rope_kv_write(*(t.to(DEV) for t in (qkv, qw, kw, cos, sin)), *gpu, pos.to(DEV),
                                                   1e-6, weight_offset)
    q_cpu = torch.ops.adallm.qk_norm_rope_kv_write(qkv, qw, kw, cos, sin, *cpu, pos, 1e-6, weight_offset)
    gpu = [t.cpu() for t in gpu]
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    torch.testing.assert_close(q_gpu.cpu().float(), q_cpu.float(), rtol=ulp, atol=1e-5)
    assert_same_bytes(gpu[1::2], cpu[1::2])  # V: the same recipe on the same bf16/fp16 values
    torch.testing.assert_close(gpu[2], cpu[2], rtol=1e-5, atol=0)  # K scales
    k_gpu, k_cpu = gpu[0].float(), cpu[0].float()  # K codes: at most one e4m3 step apart
    assert ((k_gpu - k_cpu).abs() <= k_cpu.abs() * 2.0 ** -3 + 2.0 ** -9).all()
    assert (k_gpu != k_cpu).float().mean() < 0.01


def _decode_args(**over):
    b, hkv, length, d = 2, 2, 32, 64
    a = dict(q=torch.randn(b, hkv * 2, d, dtype=torch.bfloat16),
             k_cache=torch.zeros(b, hkv, length, d, dtype=torch.float8_e4m3fn),
             v_cache=torch.zeros(b, hkv, length, d, dtype=torch.float8_e4m3fn),
             k_scale=torch.ones(b, hkv, length), v_scale=torch.ones(b, hkv, length),
             cache_seqlens=torch.full((b,), 5, dtype=torch.int32), cache_start=torch.zeros(b, dtype=torch.int32))
    a.update(over)
    return [t.to(DEV) for t in a.values()]


def _decode_call(**over):
    return lambda: torch.ops.adallm.fp8_decode_attention(*_decode_args(**over), 0.125, 0, 0.0)


def _kv_write_call(k_dtype=torch.bfloat16, s=3, pos_dtype=torch.int64, pos_device=None):
    kc = torch.zeros(1, 2, 8, 64, dtype=torch.float8_e4m3fn, device=DEV)
    ks = torch.ones(1, 2, 8, device=DEV)
    k = torch.randn(1, 2, s, 64, device=DEV).to(k_dtype)
    pos = torch.arange(s, dtype=pos_dtype, device=pos_device or DEV)
    return lambda: torch.ops.adallm.fp8_kv_write(k, k, kc, kc.clone(), ks, ks.clone(), pos)


def _qk_norm_rope_call(qkv_heads=12, cos_dtype=torch.bfloat16, pos_dtype=torch.int64):
    kc = torch.zeros(2, 2, 8, 64, dtype=torch.float8_e4m3fn, device=DEV)
    ks = torch.ones(2, 2, 8, device=DEV)
    qkv = torch.randn(2, qkv_heads * 64, dtype=torch.bfloat16, device=DEV)
    w = torch.ones(64, dtype=torch.bfloat16, device=DEV)
    cos = torch.ones(1, 64, dtype=cos_dtype, device=DEV)
    pos = torch.zeros(1, dtype=pos_dtype, device=DEV)
    return lambda: torch.ops.adallm.qk_norm_rope_kv_write(qkv, w, w, cos, cos, kc, kc.clone(), ks, ks.clone(), pos,
                                                          1e-6, 0.0)


def _bad_input_cases():
    d96 = dict(q=torch.randn(1, 1, 96, dtype=torch.bfloat16),
               k_cache=torch.zeros(1, 1, 8, 96, dtype=torch.float8_e4m3fn),
               v_cache=torch.zeros(1, 1, 8, 96, dtype=torch.float8_e4m3fn), k_scale=torch.ones(1, 1, 8),
               v_scale=torch.ones(1, 1, 8), cache_seqlens=torch.ones(1, dtype=torch.int32),
               cache_start=torch.zeros(1, dtype=torch.int32))
    return [
        (_decode_call(k_cache=torch.zeros(2, 2, 32, 64, dtype=torch.bfloat16)), "k_cache must be float8_e4m3fn"),
        (_decode_call(q=torch.randn(2, 4, 64)), "q must be bfloat16 or float16"),
        (_decode_call(q=torch.randn(2, 3, 64, dtype=torch.bfloat16)), "must be a multiple of Hkv"),
        (_decode_call(q=torch.randn(2, 2 * 17, 64, dtype=torch.bfloat16)), "at most 16 query heads per KV head"),
        (_decode_call(cache_seqlens=torch.full((2,), 5, dtype=torch.int64)), "cache_seqlens must be int32"),
        (_decode_call(v_scale=torch.ones(2, 2, 31)), "v_scale must be float32"),
        (_decode_call(**d96), "head_dim must be 64, 128 or 256"),
        (_kv_write_call(pos_dtype=torch.int32), "positions must be int64"),
        (_kv_write_call(s=9), "cannot write 9 tokens"),
        (_kv_write_call(k_dtype=torch.float32), "k and v must both be bfloat16 or float16"),
        (_kv_write_call(pos_device="cpu"), "must be on one device"),
        (_qk_norm_rope_call(qkv_heads=5), "Hq a positive multiple of Hkv"),
        (_qk_norm_rope_call(cos_dtype=torch.float32), "cos must be a contiguous"),
        (_qk_norm_rope_call(pos_dtype=torch.int32), "position must be int64 [1]"),
    ]


def test_bad_inputs_raise_clear_errors():
    run_as_child(__file__)


# opcheck's test_schema compares tensors with torch.allclose, which has no float8 kernel (see test_opcheck.py).
OPCHECK_UTILS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck_cuda():
    b, hkv, length, d = 2, 2, 48, 64
    kc, ks = (t.to(DEV) for t in random_cache(b, hkv, length, d))
    vc, vs = (t.to(DEV) for t in random_cache(b, hkv, length, d))
    k = torch.randn(b, hkv, 3, d, dtype=torch.bfloat16, device=DEV)
    torch.library.opcheck(torch.ops.adallm.fp8_kv_write,
                          (k, k * 2, kc, vc, ks, vs, torch.tensor([47, 48, 49], device=DEV)), test_utils=OPCHECK_UTILS)
    q = torch.randn(b, hkv * 4, d, dtype=torch.float16, device=DEV)
    sl = torch.tensor([48, 20], dtype=torch.int32, device=DEV)
    st = torch.tensor([0, 3], dtype=torch.int32, device=DEV)
    torch.library.opcheck(torch.ops.adallm.fp8_decode_attention, (q, kc, vc, ks, vs, sl, st, 0.125, 0, 0.0),
                          test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.adallm.fp8_decode_attention, (q, kc, vc, ks, vs, sl, st, 0.125, 16, 20.0),
                          test_utils=OPCHECK_UTILS)


if __name__ == "__main__":
    expect_value_errors(_bad_input_cases())
