"""CUDA NVFP4 kernels (csrc/nvfp4_*) against independent references.

- nvfp4_quantize: bit-exact with the CPU reference (codes and scales), random and edge-case inputs.
- nvfp4_linear / nvfp4_moe_linear: float64 recomputation from the definition (dequantize -> matmul) on
  random packed weights (every code, all E4M3 scales incl. subnormals); tolerance by STYLE.md's rule:
  max error <= 2 x the max error of plain torch in x.dtype (F.linear on the weight rounded to x.dtype)
  vs the same float64 reference, plus a floor. Outputs come from poisoned memory (NaN-filled blocks of
  the caching allocator), so an unwritten element fails.
"""
import pytest
import torch
import torch.nn.functional as F

import adallm_ops  # noqa: F401  (registers the ops and loads the CUDA kernels)
from adallm_ops.reference import dequantize_nvfp4, rms_norm
from bad_input_child import expect_value_errors, run_as_child
from cuda_compare import check_close, poison

pytestmark = pytest.mark.cuda
DEV = "cuda"

# (N, K) of real layers: Qwen3-8B q/o, k/v, fused qkv, gate, fused gate_up, down; Gemma3-27B fused qkv,
# o, down; Qwen3-30B-A3B expert gate_up and down (dense here, routed below).
REAL_SHAPES = [(4096, 4096), (1024, 4096), (6144, 4096), (12288, 4096), (24576, 4096), (4096, 12288),
               (8192, 5376), (5376, 4096), (5376, 21504), (1536, 2048), (2048, 768)]
# Awkward: N not a multiple of 16, K not a multiple of 32 (the dequantize + cuBLAS path), tiny K.
AWKWARD_SHAPES = [(40, 48), (17, 96), (3, 32), (100, 160), (33, 4112), (24, 16)]
MS = [1, 2, 3, 7, 16, 17, 64, 512]


def random_nvfp4(n, k, experts=None):
    """Random packed NVFP4 weight: all 16 nibbles, every positive finite E4M3 scale (subnormals included)."""
    lead = () if experts is None else (experts,)
    weight = torch.randint(0, 256, (*lead, n, k // 2), dtype=torch.uint8, device=DEV)
    codes = torch.randint(1, 0x7F, (*lead, n, k // 16), dtype=torch.uint8, device=DEV)  # 0x7F is NaN
    # Mostly ordinary scales (codes 0x30..0x5F: 0.5 .. 24), some from the whole range.
    codes = torch.where(torch.rand(codes.shape, device=DEV) < 0.9, codes % 0x30 + 0x30, codes)
    scale = codes.view(torch.float8_e4m3fn)
    g = torch.rand(lead, device=DEV) * 0.02 + 0.001
    return weight, scale, g


def linear_case(n, k, m, dtype, with_bias):
    w, s, g = random_nvfp4(n, k)
    x = torch.randn(m, k, device=DEV).to(dtype)
    bias = torch.randn(n, device=DEV).to(dtype) if with_bias else None
    poison(m * n, dtype)
    out = torch.ops.adallm.nvfp4_linear(x, w, s, g, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    wd = dequantize_nvfp4(w, s, g).double()
    ref64 = x.double() @ wd.t() + (bias.double() if with_bias else 0)
    plain = F.linear(x, wd.to(dtype), bias)
    check_close(out, ref64, plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", REAL_SHAPES)
def test_linear_real_shapes(n, k, m, dtype):
    linear_case(n, k, m, dtype, with_bias=(m % 2 == 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", AWKWARD_SHAPES)
def test_linear_awkward_shapes(n, k, m, dtype):
    linear_case(n, k, m, dtype, with_bias=True)


def rows_kernel_n(extra_blocks=0, extra_rows=0):
    """An N that nvfp4_linear at M = 1 takes to csrc/nvfp4_gemv_rows.cuh: kRowsMinBlocksPerSm (4) 32-row blocks
    per SM, plus extra_blocks blocks and extra_rows rows."""
    return 32 * (4 * torch.cuda.get_device_properties(0).multi_processor_count + extra_blocks) + extra_rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("extra_blocks,extra_rows,k", [(0, 8, 1056), (1, 24, 4128), (0, 0, 8256)])
def test_linear_rows_kernel_tails(extra_blocks, extra_rows, k, dtype):
    """The M = 1 rows kernel: N not a multiple of 32 (a last block with rows past N), K ending inside a 256-k warp
    step (1056), several passes over K with an idle warp in the last (4128: 17 steps on 9 warps x 2 passes), CTAs
    with one block more than others (extra_blocks = 1), so one whose last block comes a pass early."""
    linear_case(rows_kernel_n(extra_blocks, extra_rows), k, 1, dtype, with_bias=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_rows_kernel_x_ranges(dtype):
    """The rows kernel scales bf16 x per warp and 256-k step: steps of zeros, of tiny and of large values (fp16 x
    is not scaled; its large values stay within what the fp16 output can hold)."""
    n, k = rows_kernel_n(extra_rows=8), 4096
    w, s, g = random_nvfp4(n, k)
    x = torch.randn(1, k, device=DEV)
    lo, hi = (-60, 40) if dtype == torch.bfloat16 else (-10, 0)
    x[:, :256] = 0
    x[:, 256:512] *= 2.0 ** lo
    x[:, 512:768] *= 2.0 ** hi
    x = x.to(dtype)
    out = torch.ops.adallm.nvfp4_linear(x, w, s, g, None)
    wd = dequantize_nvfp4(w, s, g).double()
    check_close(out, x.double() @ wd.t(), F.linear(x, wd.to(dtype)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows_kernel", [False, True])
def test_linear_m1_half_codes_and_wide_x(dtype, rows_kernel):
    """M = 1 GEMV: the E2M1 0.5 code, a 16-bit subnormal once decoded, must reach the tensor cores exactly, and x
    spanning 2^-20..2^12 must come through exactly (a kernel that rescales or converts x must not lose it). Both
    M = 1 kernels: csrc/nvfp4_gemv_rows.cuh (many rows) and nvfp4_gemv.cuh (64 rows)."""
    n, k = rows_kernel_n() if rows_kernel else 64, 4096
    w = torch.full((n, k // 2), 0x91, dtype=torch.uint8, device=DEV)  # elements +0.5 (even k), -0.5 (odd k)
    w[1::2] = 0x19  # odd rows: -0.5, +0.5
    s = torch.ones(n, k // 16, device=DEV).to(torch.float8_e4m3fn)
    g = torch.ones((), device=DEV)
    mag = torch.exp2(torch.randint(-20, 13, (1, k), device=DEV).float())
    x = (mag * torch.randn(1, k, device=DEV).sign()).to(dtype)
    out = torch.ops.adallm.nvfp4_linear(x, w, s, g, None)
    wd = dequantize_nvfp4(w, s, g).double()
    check_close(out, x.double() @ wd.t(), F.linear(x, wd.to(dtype)))


def rms_norm64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 12, 40])
@pytest.mark.parametrize("n,k,glu", [(6144, 4096, False), (24576, 4096, True), (24576, 4096, False),
                                     (4096, 12288, False), (40, 4128, False), (64, 1056, True), (24, 48, False)])
def test_linear_norm_and_residual(n, k, m, dtype, glu):
    """A decoder layer's RMSNorm (norm_weight) and residual add (residual) inside nvfp4_linear / nvfp4_linear_glu,
    against float64: at M = 1 the rows kernel's prologue and epilogue (any N: Qwen3-8B's qkv has too few rows for
    the rows kernel otherwise; K over several passes; the dequantize path at K = 48), other M the norm first; the
    residual inside the M <= 8 GEMV (M = 3) and added after the M <= 16 one (M = 12) and cuBLAS (M = 40).
    x is a residual stream's size (|x| ~ 2^6: fp16 x * norm_weight stays in range only because the prologue scales
    it). The residual is added after y is rounded: the result equals the op without it plus the residual, exactly."""
    w, s, g = random_nvfp4(n, k)
    x = (torch.randn(m, k, device=DEV) * 64).to(dtype)
    norm_w = (torch.rand(k, device=DEV) * 0.5 + 0.25).to(dtype)  # small enough that fp16's gate * up stays finite
    eps = 1e-6
    poison(m * n, dtype)
    wd = dequantize_nvfp4(w, s, g).double()
    xn = rms_norm64(x, norm_w, eps)
    x_plain = rms_norm(x, norm_w, eps)  # the separate norm, in x.dtype
    if glu:
        out = torch.ops.adallm.nvfp4_linear_glu(x, w, s, g, "silu", norm_w, eps)
        gate, up = (xn @ wd.t()).chunk(2, dim=-1)
        pg, pu = F.linear(x_plain, wd.to(dtype)).chunk(2, dim=-1)
        check_close(out, F.silu(gate) * up, F.silu(pg) * pu)
        return
    bias = torch.randn(n, device=DEV).to(dtype) if m == 3 else None
    out = torch.ops.adallm.nvfp4_linear(x, w, s, g, bias, None, norm_w, eps)
    check_close(out, xn @ wd.t() + (bias.double() if bias is not None else 0), F.linear(x_plain, wd.to(dtype), bias))
    residual = torch.randn(m, n, device=DEV).to(dtype)
    with_residual = torch.ops.adallm.nvfp4_linear(x, w, s, g, bias, residual, norm_w, eps)
    torch.testing.assert_close(with_residual, out + residual, rtol=0, atol=0)


def test_linear_norm_in_cuda_graph():
    """The fused RMSNorm at M = 1 replays in a CUDA graph with new x (the norm is recomputed, not captured)."""
    w, s, g = random_nvfp4(6144, 4096)
    norm_w = torch.rand(4096, device=DEV, dtype=torch.bfloat16) + 0.5
    x = torch.randn(1, 4096, device=DEV, dtype=torch.bfloat16)
    torch.ops.adallm.nvfp4_linear(x, w, s, g, None, None, norm_w, 1e-6)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.adallm.nvfp4_linear(x, w, s, g, None, None, norm_w, 1e-6)
    x.copy_(torch.randn_like(x) * 100)
    graph.replay()
    torch.testing.assert_close(out, torch.ops.adallm.nvfp4_linear(x, w, s, g, None, None, norm_w, 1e-6), rtol=0, atol=0)


def test_linear_leading_dims_and_noncontiguous_x():
    w, s, g = random_nvfp4(64, 256)
    x = torch.randn(2, 3, 512, device=DEV, dtype=torch.bfloat16)[..., ::2]  # [2, 3, 256], strided
    out = torch.ops.adallm.nvfp4_linear(x, w, s, g, None)
    assert out.shape == (2, 3, 64)
    ref = torch.ops.adallm.nvfp4_linear(x.cpu(), w.cpu(), s.cpu(), g.cpu(), None)
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("m", [1, 16, 64])
def test_linear_cuda_graph(m):
    """No host sync: the op captures into a CUDA graph and replays with new inputs and a new global scale."""
    w, s, g = random_nvfp4(256, 512)
    x = torch.randn(m, 512, device=DEV, dtype=torch.bfloat16)
    torch.ops.adallm.nvfp4_linear(x, w, s, g, None)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.adallm.nvfp4_linear(x, w, s, g, None)
    x.copy_(torch.randn_like(x))
    g.mul_(3)
    graph.replay()
    torch.testing.assert_close(out, torch.ops.adallm.nvfp4_linear(x, w, s, g, None), rtol=0, atol=0)


def test_linear_gemv_matches_gemm_path():
    """M = 16 (GEMV) and M = 17 (dequantize + cuBLAS) agree to bf16 rounding (relative Frobenius error)."""
    w, s, g = random_nvfp4(384, 1024)
    x = torch.randn(17, 1024, device=DEV, dtype=torch.bfloat16)
    a = torch.ops.adallm.nvfp4_linear(x[:16], w, s, g, None).double()
    b = torch.ops.adallm.nvfp4_linear(x, w, s, g, None)[:16].double()
    assert ((a - b).norm() / b.norm()).item() < 1e-2


# ---------------------------------------------------------------------------------------------------
# Routed experts.

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared_x", [True, False])
# t x topk >= 8 pairs per expert (64 here) takes the sorted grouped-GEMM path (prefill), fewer the GEMV; Qwen3-30B-A3B's
# expert shapes dequantize 5 / 10 experts per 32 MiB chunk, so 8 experts span two chunks.
@pytest.mark.parametrize("t,topk", [(1, 8), (3, 2), (16, 4), (200, 8)])
@pytest.mark.parametrize("n,k", [(1536, 2048), (2048, 768), (40, 48)])
def test_moe_linear(n, k, t, topk, shared_x, dtype):
    e = 8
    w, s, g = random_nvfp4(n, k, experts=e)
    ids = torch.randint(0, e, (t, topk), device=DEV, dtype=torch.int32 if t % 2 else torch.int64)
    x = torch.randn((t, k) if shared_x else (t, topk, k), device=DEV).to(dtype)
    poison(t * topk * n, dtype)
    out = torch.ops.adallm.nvfp4_moe_linear(x, w, s, g, ids)
    assert out.shape == (t, topk, n)
    check_moe_close(out, x, w, s, g, ids)


def check_moe_close(out, x, w, s, g, ids):
    """out [T, topk, N] against the float64 routed product and plain torch on x.dtype-rounded weights."""
    t, topk = ids.shape
    xs = x.unsqueeze(1).expand(t, topk, x.shape[-1]) if x.dim() == 2 else x
    wsel = dequantize_nvfp4(w, s, g)[ids.long()]  # [T, topk, N, K] fp32
    ref64 = torch.einsum("tjk,tjnk->tjn", xs.double(), wsel.double())
    plain = torch.einsum("tjk,tjnk->tjn", xs.float(), wsel.to(x.dtype).float()).to(x.dtype)
    check_close(out, ref64, plain)


def test_moe_grouped_path_unrouted_experts_and_bad_id():
    """The grouped path skips chunks no token is routed to, and raises (it syncs anyway) on an expert id out
    of range, where the GEMV can only write NaN."""
    e, t, topk, n, k = 16, 64, 2, 1536, 2048
    w, s, g = random_nvfp4(n, k, experts=e)
    ids = torch.randint(0, 3, (t, topk), device=DEV)  # experts 3..15 (the second and later chunks) unused
    x = torch.randn(t, k, device=DEV, dtype=torch.bfloat16)
    check_moe_close(torch.ops.adallm.nvfp4_moe_linear(x, w, s, g, ids), x, w, s, g, ids)
    ids[5, 1] = e
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, 16\)"):
        torch.ops.adallm.nvfp4_moe_linear(x, w, s, g, ids)


def test_moe_linear_cuda_graph_many_pairs():
    """Inside graph capture, even pairs enough for the grouped path take the GEMV (no host sync)."""
    e, t, topk, n, k = 4, 16, 4, 256, 512
    w, s, g = random_nvfp4(n, k, experts=e)
    ids = torch.randint(0, e, (t, topk), device=DEV)
    x = torch.randn(t, k, device=DEV, dtype=torch.bfloat16)
    torch.ops.adallm.nvfp4_moe_linear(x, w, s, g, ids)  # warm up (the grouped path: 64 pairs >= 8 per expert)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.adallm.nvfp4_moe_linear(x, w, s, g, ids)
    x.copy_(torch.randn_like(x))
    graph.replay()
    check_moe_close(out, x, w, s, g, ids)


def test_moe_bad_expert_id_gives_nan():
    w, s, g = random_nvfp4(64, 128, experts=4)
    ids = torch.tensor([[0, 7], [3, -1]], device=DEV)
    out = torch.ops.adallm.nvfp4_moe_linear(torch.randn(2, 128, device=DEV, dtype=torch.bfloat16), w, s, g, ids)
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(out[1, 0]).all()
    assert torch.isnan(out[0, 1]).all() and torch.isnan(out[1, 1]).all()


# ---------------------------------------------------------------------------------------------------
# Quantize: bit-exact with the CPU reference.

def quantize_both(x, g):
    qw, qs = torch.ops.adallm.nvfp4_quantize(x, g)
    rw, rs = torch.ops.adallm.nvfp4_quantize(x.cpu(), g.cpu())
    assert torch.equal(qw.cpu(), rw), "packed codes differ"
    assert torch.equal(qs.cpu().view(torch.uint8), rs.view(torch.uint8)), "scales differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(64, 4096), (7, 48), (1, 16), (300, 2064)])
def test_quantize_bit_exact_random(n, k, dtype):
    x = (torch.randn(n, k, device=DEV) * torch.rand(n, 1, device=DEV).pow(4) * 10).to(dtype)
    g = (x.float().abs().amax() / (6 * 448)).reshape(())
    quantize_both(x, g)
    quantize_both(x, g * 0.37)  # saturating scales and codes


def test_quantize_bit_exact_edge_cases():
    g = torch.tensor(1.0 / 448, device=DEV)
    grid = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6], device=DEV)
    mids = (grid[1:] + grid[:-1]) / 2  # exactly the rounding ties
    rows = [
        torch.zeros(32, device=DEV),                                   # all-zero blocks -> scale 1
        torch.cat([mids, -mids, torch.tensor([6.0], device=DEV).expand(2)]).repeat(2)[:32],  # ties
        torch.full((32,), 1e-30, device=DEV),                          # scale underflows E4M3 -> 1
        torch.linspace(-1e-3, 1e-3, 32, device=DEV),                   # subnormal E4M3 scales
        torch.linspace(-3000, 3000, 32, device=DEV),                   # saturating scale (448)
        torch.tensor([-0.0] * 16 + [0.1] * 16, device=DEV),            # negative zero
    ]
    quantize_both(torch.stack(rows), g)


# ---------------------------------------------------------------------------------------------------
# nvfp4_linear_glu: the gated epilogue of the rows kernel (M = 1, N % 64 == 0, enough rows) and the fallback.

def _glu64(x, w, s, g, activation):
    full = x.double() @ dequantize_nvfp4(w, s, g).double().t()
    gate, up = full.chunk(2, dim=-1)
    act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
    return act * up


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,m", [(24576, 4096, 1), (43008, 5376, 1),  # Qwen3-8B / Gemma3-27B gate_up: fused
                                   (24576 + 32, 4096, 1),  # N % 64 != 0: the fallback
                                   (512, 256, 1), (24576, 4096, 4)])  # too few rows, M > 1: the fallback
def test_linear_glu(n, k, m, dtype, activation):
    w, s, g = random_nvfp4(n, k)
    x = torch.randn(m, k, device=DEV).to(dtype)
    poison(m * n // 2, dtype)
    out = torch.ops.adallm.nvfp4_linear_glu(x, w, s, g, activation)
    assert out.shape == (m, n // 2) and out.dtype == dtype
    gate, up = F.linear(x, dequantize_nvfp4(w, s, g).to(dtype)).chunk(2, dim=-1)
    plain = (F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")) * up
    check_close(out, _glu64(x, w, s, g, activation), plain)


def test_linear_glu_cuda_graph():
    w, s, g = random_nvfp4(24576, 4096)
    x = torch.randn(1, 4096, device=DEV, dtype=torch.bfloat16)
    torch.ops.adallm.nvfp4_linear_glu(x, w, s, g, "silu")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.adallm.nvfp4_linear_glu(x, w, s, g, "silu")
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(y, torch.ops.adallm.nvfp4_linear_glu(x, w, s, g, "silu"))


# ---------------------------------------------------------------------------------------------------
# opcheck on both linear paths and the routed experts; argument errors.

def test_opcheck_cuda_paths():
    w, s, g = random_nvfp4(48, 64)
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for m in (3, 40):  # GEMV, dequantize + cuBLAS
        x = torch.randn(m, 64, device=DEV, dtype=torch.float16)
        torch.library.opcheck(torch.ops.adallm.nvfp4_linear.default, (x, w, s, g, None), test_utils=utils)
    ew, es, eg = random_nvfp4(48, 64, experts=3)
    ids = torch.tensor([[0, 2], [1, 1]], device=DEV)
    torch.library.opcheck(torch.ops.adallm.nvfp4_moe_linear.default,
                          (torch.randn(2, 64, device=DEV, dtype=torch.bfloat16), ew, es, eg, ids), test_utils=utils)


def _bad_input_cases():
    """Each bad argument and the text of the ValueError that must name it."""
    w, s, g = random_nvfp4(32, 64)
    x = torch.randn(2, 64, device=DEV, dtype=torch.bfloat16)
    lin = torch.ops.adallm.nvfp4_linear
    return [
        (lambda: lin(x.float(), w, s, g, None), "x must be bfloat16 or float16"),
        (lambda: lin(x, torch.randint(0, 255, (64, 32), dtype=torch.uint8, device=DEV).t(), s, g, None),
         "must be contiguous"),
        (lambda: lin(x[:, :48], w, s, g, None), "x has K = 48"),
        (lambda: lin(x.cpu(), w, s, g, None), "x is on cpu"),
        (lambda: lin(x, w, s.float(), g, None), "weight_scale must be float8_e4m3fn"),
        (lambda: lin(x, w, s, g, torch.zeros(31, device=DEV, dtype=torch.bfloat16)), "bias must be"),
        (lambda: lin(torch.randn(2, 40, device=DEV, dtype=torch.bfloat16),
                     torch.randint(0, 255, (32, 20), dtype=torch.uint8, device=DEV),
                     torch.ones(32, 2, device=DEV).to(torch.float8_e4m3fn), g, None), "must be a multiple of 16"),
        (lambda: torch.ops.adallm.nvfp4_quantize(torch.randn(4, 40, device=DEV), g), "K = 40 must be a multiple of 16"),
        (lambda: torch.ops.adallm.nvfp4_linear_glu(x, w, s, g, "relu"), "activation must be 'silu' or 'gelu_tanh'"),
        (lambda: torch.ops.adallm.nvfp4_moe_linear(x, *random_nvfp4(32, 64, experts=2), torch.zeros(2, 2, device=DEV)),
         "expert_ids must be int32/int64"),
    ]


def test_bad_inputs_raise_clear_errors():
    run_as_child(__file__)


if __name__ == "__main__":
    expect_value_errors(_bad_input_cases())
