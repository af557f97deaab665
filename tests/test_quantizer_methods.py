"""The NVFP4 quantizer methods beyond round-to-nearest ("mse" block-scale search, "gptq"), against brute force
in float64."""
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


def block_errors(w: torch.Tensor, g: float, scales: torch.Tensor, col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error of each block [N, K/16] quantized with the given scales, each column's error times
    col_weight [K] (default 1) (float64, codes by definition)."""
    b = w.double().reshape(w.shape[0], -1, 16)
    s = (scales.double() * g).unsqueeze(-1)
    c = torch.ones(w.shape[1]) if col_weight is None else col_weight
    return ((grid_value(b / s) * s - b).square() * c.double().reshape(1, -1, 16)).sum(-1)


def mse_col_weight(w: torch.Tensor) -> torch.Tensor:
    """The documented "mse" input weights [K]: 1 / (||w[:, k]||^2 + 1e-3 * mean_k ||w[:, k]||^2) (float64)."""
    c = w.double().square().sum(0)
    return 1.0 / (c + 1e-3 * c.mean())


def candidate_scales(rtn_scales: torch.Tensor) -> torch.Tensor:
    """[N, K/16] recipe scales -> [10, N, K/16] float64: each block's candidates, the E4M3 values 3 steps below
    to 6 steps above the recipe's (the documented search window; clamped, so repeated, at the ends of E4M3)."""
    i = torch.searchsorted(E4M3_POSITIVE, rtn_scales.double())
    return E4M3_POSITIVE[(i + torch.arange(-3, 7).reshape(-1, 1, 1)).clamp(0, 125)]


def best_candidate(w: torch.Tensor, g: float, rtn_scales: torch.Tensor,
                   col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, K/16] least (weighted) error of each block over its candidate scales, [N, K/16] that scale)."""
    cands = candidate_scales(rtn_scales)
    errs = torch.stack([block_errors(w, g, c, col_weight) for c in cands])
    best = errs.min(dim=0)
    return best.values, cands.gather(0, best.indices[None])[0]


def outlier_inputs(w: torch.Tensor, n: int, k_out: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(w with k_out columns shrunk 20x, x [n, K] whose channels scale opposite to the columns): the trained
    layer's pattern behind the "mse" input weights (large inputs meet small columns)."""
    col = torch.ones(w.shape[1])
    col[torch.randperm(w.shape[1])[:k_out]] = 0.05
    return w * col, torch.randn(n, w.shape[1]) / col


def test_value_rounding_matches_codes():
    """The search's fast rounding picks the same E2M1 value as the format's code rounding, ties included."""
    y = torch.cat([torch.arange(-7, 7, 0.125), torch.randn(10_000) * 3, torch.tensor([5.0, -5.0, 3.5, 2.5, 0.25])])
    lut = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))
    assert torch.equal(nvfp4._e2m1_magnitude(y.abs()), lut[e2m1_round(y).long()].abs())


@pytest.mark.parametrize("shape", [(8, 64), (5, 48)])
def test_mse_picks_the_best_candidate(shape):
    w = torch.randn(shape) * torch.rand(shape[0], 1) * (torch.rand(shape[1]) + 0.1)  # uneven columns too
    q = nvfp4.quantize(w, method="mse")
    rtn = nvfp4.quantize(w, method="rtn")
    g = q.weight_global_scale.item()
    assert g == rtn.weight_global_scale.item()
    cw = mse_col_weight(w)
    got = block_errors(w, g, q.weight_scale.float(), cw)
    assert bool((candidate_scales(rtn.weight_scale) == q.weight_scale.double()).any(dim=0).all())
    assert bool((got <= best_candidate(w, g, rtn.weight_scale, cw)[0] * (1 + 1e-6)).all())


def test_mse_codes_are_the_recipe_rounding_of_its_scales():
    """A standard NVFP4 weight: given its scales, the codes are round-to-nearest-even of w / (scale * global)."""
    w, _ = outlier_inputs(torch.randn(16, 128), 1)
    q = nvfp4.quantize(w, method="mse")
    s = (q.weight_scale.double() * q.weight_global_scale.item()).repeat_interleave(16, dim=1)
    want = grid_value(w.double() / s) * s
    torch.testing.assert_close(q.dequantize(torch.float64), want, rtol=1e-6, atol=0)  # fp32 vs fp64 product
    assert unpack_fp4(q.weight).max() < 16


def test_mse_never_worse_than_rtn_and_better_on_average():
    """In its own (weighted) error: never worse than the recipe's scale, which is one of its candidates."""
    w = torch.randn(64, 512) * torch.rand(64, 1)
    q, rtn = nvfp4.quantize(w, method="mse"), nvfp4.quantize(w, method="rtn")
    g, cw = q.weight_global_scale.item(), mse_col_weight(w)
    e_mse, e_rtn = block_errors(w, g, q.weight_scale.float(), cw), block_errors(w, g, rtn.weight_scale.float(), cw)
    assert bool((e_mse <= e_rtn * (1 + 1e-6)).all())
    assert e_mse.sum() < 0.8 * e_rtn.sum()  # ~27% lower on Gaussian weights


def test_mse_input_weights_lower_output_error_with_outlier_inputs():
    """Where large inputs meet small weight columns, the input-weighted search lowers the layer's output error
    ||X (W - Q)^T|| below both rtn's and the unweighted search's (the best candidate per block by plain
    squared error, brute force): the reason for the weights."""
    torch.manual_seed(0)
    w, x = outlier_inputs(torch.randn(32, 256), 512)
    q, rtn = nvfp4.quantize(w, method="mse"), nvfp4.quantize(w, method="rtn")
    g = q.weight_global_scale.item()
    plain = best_candidate(w, g, rtn.weight_scale)[1]  # the unweighted search's scales
    s = (plain * g).repeat_interleave(16, dim=1)
    out_err = {m: (x.double() @ (d - w.double()).T).square().sum().item() for m, d in (
        ("mse", q.dequantize(torch.float64)), ("rtn", rtn.dequantize(torch.float64)),
        ("plain", grid_value(w.double() / s) * s))}
    assert out_err["mse"] < 0.9 * out_err["plain"] < 0.9 * out_err["rtn"], out_err


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


def test_gptq_with_identity_hessian_is_the_unweighted_search():
    """No correlation between inputs and equal scales: nothing to compensate and no column to favour, so GPTQ
    must pick each block's scale of least plain squared error among the candidates and round to nearest."""
    w = torch.randn(32, 256)
    q, rtn = nvfp4.quantize(w, method="gptq", hessian=torch.eye(256)), nvfp4.quantize(w, method="rtn")
    g = q.weight_global_scale.item()
    got = block_errors(w, g, q.weight_scale.float())
    assert bool((got <= best_candidate(w, g, rtn.weight_scale)[0] * (1 + 1e-6)).all())
    s = (q.weight_scale.double() * g).repeat_interleave(16, dim=1)
    torch.testing.assert_close(q.dequantize(torch.float64), grid_value(w.double() / s) * s, rtol=1e-6, atol=0)


def test_gptq_without_calibration_inputs_is_mse():
    """A zero hessian (an MoE expert no calibration token reached) falls back to the data-free "mse"."""
    w, _ = outlier_inputs(torch.randn(16, 128), 1)
    qg, qm = nvfp4.quantize(w, method="gptq", hessian=torch.zeros(128, 128)), nvfp4.quantize(w, method="mse")
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
