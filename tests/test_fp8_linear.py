"""fp8_linear (the FP8 lm_head's op) and FP8Linear.

CPU: the reference against float64 from the definition, the per-row quantizer, the module, argument errors.
CUDA (marked): the GEMV (M <= 16) and the dequantize + cuBLAS path against float64, with the tolerance rule of
test_cuda_linear.py (max error <= 2 x plain torch's in x.dtype + a floor), from NaN-poisoned output memory; x with
values outside fp16's range or tiny ones (the kernel's per-row power of two), inf/NaN propagation, CUDA graphs.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adallm_ops  # noqa: F401  (registers the ops and loads the CUDA kernels)
from adallm.linear import FP8Linear
from adallm_ops.reference import fp8_quantize_rows
from bad_input_child import expect_value_errors, run_as_child
from cuda_compare import check_close, poison


def random_fp8(n, k, device):
    """Every finite e4m3 code (subnormals included) and per-row scales over a few decades."""
    codes = torch.randint(0, 256, (n, k), dtype=torch.uint8, device=device)
    codes = torch.where((codes & 0x7F) == 0x7F, codes ^ 0x01, codes)  # 0x7F / 0xFF are NaN
    scale = torch.rand(n, device=device) * 1e-2 * 10 ** torch.randint(-2, 3, (n,), device=device).float()
    return codes.view(torch.float8_e4m3fn), scale


def ref64(x, w, s):
    return x.double() @ (w.double() * s.double()[:, None]).t()


def test_reference_matches_float64():
    w, s = random_fp8(40, 96, "cpu")
    x = torch.randn(3, 5, 96, dtype=torch.bfloat16)
    y = adallm_ops.fp8_linear(x, w, s)
    assert y.shape == (3, 5, 40) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref64(x, w, s), rtol=1e-2, atol=1e-2 * ref64(x, w, s).abs().max().item())


def test_quantize_rows_recipe():
    w = torch.randn(64, 128) * torch.logspace(-3, 3, 64)[:, None]
    w[5] = 0  # an all-zero row: scale 1, codes 0
    q, s = fp8_quantize_rows(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64,)
    assert s[5] == 1 and (q[5].float() == 0).all()
    # The row's largest |w| maps to 448 exactly; every element is within half an e4m3 step (2^-4 relative).
    assert torch.equal(q.float().abs().amax(1)[torch.arange(64) != 5], torch.full((63,), 448.0))
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= w.abs() * 2 ** -4 + s[:, None] * 2 ** -10).all()


def test_module_from_dense_and_errors():
    lin = nn.Linear(64, 48, bias=False)
    mod = FP8Linear.from_dense(lin)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(mod(x).float(), F.linear(x.float(), lin.weight.detach()), rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(mod.dequantize(), lin.weight.detach(), rtol=7e-2, atol=1e-3)
    with pytest.raises(ValueError, match="has no bias"):
        FP8Linear.from_dense(nn.Linear(64, 8))
    with pytest.raises(ValueError, match="K % 16"):
        FP8Linear.from_dense(nn.Linear(40, 8, bias=False))
    bad = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        bad.weight[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        FP8Linear.from_dense(bad)


def _bad_input_cases(device):
    w, s = random_fp8(32, 64, device)
    x = torch.randn(2, 64, device=device, dtype=torch.bfloat16)
    lin = torch.ops.adallm.fp8_linear
    other = "cpu" if device == "cuda" else "meta"
    return [
        (lambda: lin(x.float(), w, s), "x must be bfloat16 or float16"),
        (lambda: lin(x[:, :48], w, s), "x has K = 48"),
        (lambda: lin(x.to(other), w, s), f"x is on {other}"),
        (lambda: lin(x, w.view(torch.uint8), s), "weight must be float8_e4m3fn"),
        (lambda: lin(x, w, s.double()), "weight_scale must be float32"),
        (lambda: lin(x, w, s[:31]), "weight_scale must have shape (32,)"),
        (lambda: lin(x, w.t().contiguous().t(), s), "must be contiguous"),
        (lambda: lin(torch.randn(2, 40, device=device, dtype=torch.bfloat16), random_fp8(32, 40, device)[0], s),
         "K = 40 must be a multiple of 16"),
    ]


def test_bad_inputs_cpu():
    expect_value_errors(_bad_input_cases("cpu"))


# ---------------------------------------------------------------------------------------------------
# CUDA

DEV = "cuda"
# (N, K): Qwen3 lm_head (K = 4096, cut to 9000 rows to keep the test short; N not a multiple of 16),
# Gemma3-27B's K (5376: not a multiple of the kernel's 256-k item), Gemma3-270M's (640), tiny ones.
SHAPES = [(9000, 4096), (2051, 5376), (4099, 640), (40, 16), (17, 80), (1, 272)]


def run_case(n, k, m, dtype, x_scale=1.0):
    w, s = random_fp8(n, k, DEV)
    x = (torch.randn(m, k, device=DEV) * x_scale).to(dtype)
    poison(m * n, dtype)
    y = adallm_ops.fp8_linear(x, w, s)
    plain = F.linear(x, (w.float() * s[:, None]).to(dtype))
    check_close(y, ref64(x, w, s), plain, abs_floor=1e-30)  # x down to 1e-30: no absolute floor to hide behind


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 17, 64])
@pytest.mark.parametrize("n,k", SHAPES)
def test_cuda_shapes(n, k, m, dtype):
    run_case(n, k, m, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("x_scale", [1e30, 3e5, 1e-30])
def test_cuda_x_outside_fp16_range(m, x_scale):
    """bf16 x far above fp16's largest value (65504) or below its smallest: the kernel's power of two per row."""
    run_case(1000, 4096, m, torch.bfloat16, x_scale)


@pytest.mark.cuda
def test_cuda_rows_with_different_ranges_and_zero_row():
    w, s = random_fp8(500, 1024, DEV)
    x = torch.randn(5, 1024, device=DEV) * torch.tensor([1e-20, 1.0, 1e20, 0.0, 70000.0], device=DEV)[:, None]
    x = x.to(torch.bfloat16)
    y = adallm_ops.fp8_linear(x, w, s)
    ref = ref64(x, w, s)
    for i in range(5):  # each row against its own magnitude
        plain = F.linear(x[i:i + 1].double(), (w.double() * s.double()[:, None])).to(torch.bfloat16)
        check_close(y[i:i + 1], ref[i:i + 1], plain, abs_floor=1e-30)
    assert (y[3] == 0).all()


@pytest.mark.cuda
def test_cuda_inf_nan_propagate():
    w, s = random_fp8(64, 256, DEV)
    x = torch.randn(2, 256, device=DEV, dtype=torch.bfloat16)
    x[0, 10] = float("nan")
    x[1, 3] = float("inf")
    y = adallm_ops.fp8_linear(x, w, s)
    assert torch.isnan(y[0]).all()
    assert (~torch.isfinite(y[1])).all()  # inf times codes of both signs (and 0 * inf): inf or NaN, as in torch


@pytest.mark.cuda
def test_cuda_graph_and_leading_dims():
    w, s = random_fp8(3000, 512, DEV)
    x = torch.randn(2, 1, 512, device=DEV, dtype=torch.bfloat16)
    eager = adallm_ops.fp8_linear(x, w, s)
    assert eager.shape == (2, 1, 3000)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = adallm_ops.fp8_linear(x, w, s)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.testing.assert_close(y, adallm_ops.fp8_linear(x, w, s), rtol=0, atol=0)
    assert not torch.equal(y, eager)


@pytest.mark.cuda
def test_cuda_module_matches_cpu():
    lin = nn.Linear(4096, 1000, bias=False)
    mod = FP8Linear.from_dense(lin)
    x = torch.randn(1, 4096, dtype=torch.bfloat16)
    cpu = mod(x)
    gpu_mod = FP8Linear.from_dense(lin.to(DEV))
    assert torch.equal(gpu_mod.weight.view(torch.uint8).cpu(), mod.weight.view(torch.uint8))
    assert torch.equal(gpu_mod.weight_scale.cpu(), mod.weight_scale)
    torch.testing.assert_close(gpu_mod(x.to(DEV)).cpu().float(), cpu.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
def test_cuda_opcheck_both_paths():
    w, s = random_fp8(48, 64, DEV)
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for m in (3, 40):  # GEMV, dequantize + cuBLAS
        x = torch.randn(m, 64, device=DEV, dtype=torch.float16)
        torch.library.opcheck(torch.ops.adallm.fp8_linear.default, (x, w, s), test_utils=utils)


@pytest.mark.cuda
def test_cuda_bad_inputs_raise_clear_errors():
    run_as_child(__file__)


if __name__ == "__main__":
    expect_value_errors(_bad_input_cases("cuda"))
