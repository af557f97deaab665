"""The NVFP4 quantizer against a plain, element-by-element re-derivation of the ModelOpt recipe."""
import math

import pytest
import torch

import adallm_ops
from adallm import nvfp4
from adallm_ops.reference import unpack_fp4

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def e4m3(x: float) -> float:
    return torch.tensor(min(x, 448.0), dtype=torch.float32).to(torch.float8_e4m3fn).item()


def nearest_code(y: float) -> int:
    """Nearest grid magnitude; on a tie the even code index (the one with mantissa bit 0)."""
    a = min(abs(y), 6.0)
    dists = [abs(a - v) for v in GRID]
    best = min(dists)
    cands = [i for i, d in enumerate(dists) if d == best]
    code = cands[0] if len(cands) == 1 else next(i for i in cands if i % 2 == 0)
    return code | 8 if (y < 0 and code) else code


def rederive(x: torch.Tensor):
    """Returns (codes [N][K], scales [N][K/16], global) from the recipe in DESIGN.md, in python floats."""
    x = x.float()
    amax = x.abs().max().item()
    g = torch.tensor(amax / (6 * 448) if amax > 0 else 1.0, dtype=torch.float32).item()
    codes, scales = [], []
    for row in x.tolist():
        rc, rs = [], []
        for b in range(0, len(row), 16):
            blk = row[b:b + 16]
            bamax = max(abs(v) for v in blk)
            s = e4m3(torch.tensor(bamax, dtype=torch.float32).item()
                     / torch.tensor(6 * g, dtype=torch.float32).item())
            s = s or 1.0
            denom = torch.tensor(s, dtype=torch.float32) * torch.tensor(g, dtype=torch.float32)
            rs.append(s)
            rc += [nearest_code((torch.tensor(v, dtype=torch.float32) / denom).item()) for v in blk]
        codes.append(rc)
        scales.append(rs)
    return codes, scales, g


def edge_cases():
    t = torch.randn(4, 64)
    t[0, :16] = 0  # all-zero block
    t[1, 16:32] = 0
    # exact E2M1 midpoints once scaled: block amax 6 and global chosen so that scale*global = 1
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 6.0, -6.0])
    t[2, :16] = mids
    t[3] = torch.linspace(-1, 1, 64) * 1e-3
    return t


@pytest.mark.parametrize("case", ["random", "edges", "huge", "tiny", "bf16", "midpoints"])
def test_quantizer_matches_rederivation(case):
    x = {
        "random": lambda: torch.randn(8, 64),
        "edges": edge_cases,
        "huge": lambda: torch.randn(4, 32) * 1e30,
        "tiny": lambda: torch.randn(4, 32) * 1e-30,
        "bf16": lambda: torch.randn(8, 48).bfloat16(),
        # global = 6/(6*448) -> scale of a block with amax 6 is e4m3(448)=448, denominator = 1: raw midpoints
        "midpoints": lambda: torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2]),
    }[case]()
    q = nvfp4.quantize(x, method="rtn")
    codes, scales, g = rederive(x)
    assert q.weight_global_scale.item() == g
    assert q.weight_scale.float().tolist() == scales
    assert unpack_fp4(q.weight).tolist() == codes


def test_midpoints_round_to_even():
    x = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2])
    q = nvfp4.quantize(x, method="rtn")
    assert q.weight_scale.float().unique().tolist() == [448.0]
    assert unpack_fp4(q.weight)[0, :8].tolist() == [0, 2, 2, 4, 4, 6, 6, 7]


def test_dequantize_error_is_small():
    x = torch.randn(64, 256)
    rel = (nvfp4.quantize(x).dequantize() - x).norm() / x.norm()
    assert rel < 0.12  # NVFP4 of a Gaussian: ~9% relative error


def test_group_shares_global_scale():
    a, b = torch.randn(8, 32), torch.randn(4, 32) * 10
    qa, qb = nvfp4.quantize_group([a, b])
    assert qa.weight_global_scale.item() == qb.weight_global_scale.item() == nvfp4.global_scale_for(b).item()


def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(nvfp4.unpack_fp4(nvfp4.pack_fp4(codes)), codes)
    assert nvfp4.pack_fp4(torch.tensor([[1, 2]], dtype=torch.uint8)).item() == 0x21  # element 0 in the low nibble


def test_compressed_tensors_convention():
    g = torch.tensor(0.0123)
    ct = nvfp4.global_to_compressed_tensors(g)
    assert math.isclose(ct.item(), 1 / 0.0123, rel_tol=1e-6)
    assert math.isclose(nvfp4.global_from_compressed_tensors(ct).item(), 0.0123, rel_tol=1e-6)


@pytest.mark.parametrize("bad,msg", [
    (lambda: torch.tensor([[float("nan")] * 16]), "NaN or Inf"),
    (lambda: torch.tensor([[float("inf")] * 16]), "NaN or Inf"),
    (lambda: torch.randn(4, 24), "multiple of 16"),
    (lambda: torch.randn(16), "2-D"),
])
def test_quantize_rejects_bad_weights(bad, msg):
    with pytest.raises(ValueError, match=msg):
        nvfp4.quantize(bad())


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown NVFP4 quantizer"):
        nvfp4.quantize(torch.randn(4, 16), method="nope")
