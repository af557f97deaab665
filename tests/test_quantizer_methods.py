"""The NVFP4 quantizer methods beyond round-to-nearest ("mse" block-scale search), against brute force in float64."""
import pytest
import torch

from adallm import NVFP4Linear, nvfp4
from adallm_ops.reference import E2M1_VALUES, e2m1_round, unpack_fp4

# Every positive finite E4M3 value, in increasing order (codes 1..126).
E4M3_POSITIVE = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
GRID = torch.tensor(E2M1_VALUES, dtype=torch.float64)


def grid_value(y: torch.Tensor) -> torch.Tensor:
    """float64 y -> nearest E2M1 value (ties to the even code index), saturating: from the definition."""
    a = y.abs().clamp(max=6.0).unsqueeze(-1)
    d = (a - GRID).abs()
    best = d.min(dim=-1, keepdim=True).values
    tied = d == best
    # among the nearest grid points prefer the even index
    idx = torch.where(tied & (torch.arange(8) % 2 == 0), torch.arange(8), 99).min(dim=-1).values
    idx = torch.where(idx == 99, tied.long().argmax(dim=-1), idx)
    return GRID[idx] * torch.where(y < 0, -1.0, 1.0).double()


def block_errors(w: torch.Tensor, g: float, scales: torch.Tensor) -> torch.Tensor:
    """Squared error of each block [N, K/16] quantized with the given scales (float64, codes by definition)."""
    b = w.double().reshape(w.shape[0], -1, 16)
    s = (scales.double() * g).unsqueeze(-1)
    return (grid_value(b / s) * s - b).square().sum(-1)


def candidates(rtn_scale: float) -> list[float]:
    """The E4M3 values 3 steps below to 6 steps above the recipe's scale (the documented search window)."""
    i = int((E4M3_POSITIVE == rtn_scale).nonzero())
    return E4M3_POSITIVE[max(i - 3, 0): i + 7].tolist()


def test_value_rounding_matches_codes():
    """The search's fast rounding picks the same E2M1 value as the format's code rounding, ties included."""
    y = torch.cat([torch.arange(-7, 7, 0.125), torch.randn(10_000) * 3, torch.tensor([5.0, -5.0, 3.5, 2.5, 0.25])])
    lut = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))
    assert torch.equal(nvfp4._e2m1_magnitude(y.abs()), lut[e2m1_round(y).long()].abs())


@pytest.mark.parametrize("shape", [(8, 64), (5, 48)])
def test_mse_picks_the_best_candidate(shape):
    w = torch.randn(shape) * torch.rand(shape[0], 1)
    q = nvfp4.quantize(w, method="mse")
    rtn = nvfp4.quantize(w, method="rtn")
    g = q.weight_global_scale.item()
    assert g == rtn.weight_global_scale.item()
    got = block_errors(w, g, q.weight_scale.float())
    for n in range(shape[0]):
        for b in range(shape[1] // 16):
            cands = torch.tensor(candidates(rtn.weight_scale[n, b].float().item()))
            errs = torch.stack([block_errors(w[n:n + 1, b * 16:(b + 1) * 16], g, c.reshape(1, 1))[0, 0]
                                for c in cands])
            assert q.weight_scale[n, b].float().item() in cands.tolist()
            assert got[n, b] <= errs.min() * (1 + 1e-9)


def test_mse_codes_are_the_recipe_rounding_of_its_scales():
    """A standard NVFP4 weight: given its scales, the codes are round-to-nearest-even of w / (scale * global)."""
    w = torch.randn(16, 128)
    q = nvfp4.quantize(w, method="mse")
    s = (q.weight_scale.double() * q.weight_global_scale.item()).repeat_interleave(16, dim=1)
    want = grid_value(w.double() / s) * s
    torch.testing.assert_close(q.dequantize(torch.float64), want, rtol=1e-6, atol=0)  # fp32 vs fp64 product
    assert unpack_fp4(q.weight).max() < 16


def test_mse_never_worse_than_rtn_and_better_on_average():
    w = torch.randn(64, 512) * torch.rand(64, 1)
    q, rtn = nvfp4.quantize(w, method="mse"), nvfp4.quantize(w, method="rtn")
    g = q.weight_global_scale.item()
    e_mse, e_rtn = block_errors(w, g, q.weight_scale.float()), block_errors(w, g, rtn.weight_scale.float())
    assert bool((e_mse <= e_rtn).all())
    assert e_mse.sum() < 0.8 * e_rtn.sum()  # ~27% lower on Gaussian weights


def test_mse_edge_cases():
    w = torch.randn(4, 64)
    w[0, :16] = 0  # all-zero block: scale 1, codes 0, as the recipe
    w[1] = torch.linspace(-1, 1, 64) * 1e-30
    w[2, :16] = 1e30
    q = nvfp4.quantize(w, method="mse")
    assert q.weight_scale[0, 0].float().item() == 1.0
    assert unpack_fp4(q.weight)[0, :16].eq(0).all()
    d = q.dequantize()
    assert torch.isfinite(d).all() and torch.isfinite(q.weight_scale.float()).all()
    assert (d[2, :16] - 1e30).abs().max() <= 0.1 * 1e30


def test_mse_group_shares_global_scale_and_bf16():
    a, b = torch.randn(8, 32).bfloat16(), torch.randn(4, 32).bfloat16() * 10
    qa, qb = nvfp4.quantize_group([a, b], method="mse")
    assert qa.weight_global_scale.item() == qb.weight_global_scale.item() == nvfp4.global_scale_for(b).item()


def test_rtn_is_the_op():
    w = torch.randn(16, 64)
    q = nvfp4.quantize(w, method="rtn")
    packed, scale = torch.ops.adallm.nvfp4_quantize(w, nvfp4.global_scale_for(w))
    assert torch.equal(q.weight, packed) and torch.equal(q.weight_scale.view(torch.uint8), scale.view(torch.uint8))


def test_defaults_use_default_method():
    lin = torch.nn.Linear(64, 32, bias=False)
    mod = NVFP4Linear.from_dense([lin])
    q = nvfp4.quantize(lin.weight.detach(), method=nvfp4.DEFAULT_METHOD)
    assert nvfp4.DEFAULT_METHOD in nvfp4.METHODS
    assert torch.equal(mod.weight, q.weight) and torch.equal(nvfp4.quantize(lin.weight.detach()).weight, q.weight)


def correlated_inputs(n: int, k: int) -> torch.Tensor:
    """x [n, K] with uneven channel scales and a shared component: a Hessian far from diagonal."""
    return torch.randn(n, k) * torch.rand(k) * 3 + torch.randn(n, 1)


def test_gptq_with_identity_hessian_is_mse():
    """No correlation between inputs: nothing to compensate, so GPTQ must round exactly like "mse"."""
    w = torch.randn(32, 256)
    qg, qm = nvfp4.quantize(w, method="gptq", hessian=torch.eye(256)), nvfp4.quantize(w, method="mse")
    assert torch.equal(qg.weight, qm.weight)
    assert torch.equal(qg.weight_scale.view(torch.uint8), qm.weight_scale.view(torch.uint8))


def test_gptq_lowers_output_error():
    """GPTQ minimizes ||X (W - Q)^T||, the layer's output error on the calibration inputs (float64 check)."""
    w, x = torch.randn(64, 384), correlated_inputs(2048, 384)
    err = {}
    for m in ("rtn", "mse", "gptq"):
        q = nvfp4.quantize(w, method=m, hessian=x.T @ x if m == "gptq" else None)
        assert unpack_fp4(q.weight).max() < 16 and torch.isfinite(q.weight_scale.float()).all()
        err[m] = (x.double() @ (q.dequantize(torch.float64) - w.double()).T).square().sum().item()
    assert err["gptq"] < 0.85 * err["mse"] < 0.85 * err["rtn"]


def test_gptq_dead_inputs_and_group():
    w, x = torch.randn(16, 64), correlated_inputs(256, 64)
    x[:, :16] = 0  # inputs calibration never saw
    qs = nvfp4.quantize_group([w, 2 * w], method="gptq", hessian=x.T @ x)
    assert qs[0].weight_global_scale.item() == qs[1].weight_global_scale.item()
    assert all(torch.isfinite(q.dequantize()).all() for q in qs)


@pytest.mark.parametrize("method, hessian, match", [
    ("gptq", None, "needs a hessian"),
    ("mse", torch.eye(64), "needs a hessian"),
    ("gptq", torch.eye(32), r"must be \[64, 64\]"),
])
def test_hessian_errors(method, hessian, match):
    with pytest.raises(ValueError, match=match):
        nvfp4.quantize(torch.randn(8, 64), method=method, hessian=hessian)
