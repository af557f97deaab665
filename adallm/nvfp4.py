"""The NVFP4 weight format: quantize, dequantize, pack/unpack and the checkpoint scale conventions.

An NVFP4 weight [N, K] is three tensors (layout documented once, in adallm_ops/ops.py):
  weight uint8 [N, K/2], weight_scale float8_e4m3fn [N, K/16], weight_global_scale float32 [].

Quantization recipe (NVIDIA ModelOpt's):
  global = amax(|W|) / (6 * 448)                      (1 for an all-zero tensor)
  scale  = e4m3(block_amax / (6 * global))            (1 where that is 0: all-zero or underflowing block)
  code   = round-to-nearest-even of W / (float(scale) * global) onto the E2M1 grid, saturating at ±6.
Fused groups (q/k/v, gate/up) share one global scale: the max amax of the group, so the parts can be
concatenated along N and run as one GEMV.
That recipe is method "rtn". The default, "mse" (DEFAULT_METHOD), keeps its global scale and its code
rounding but picks each block's E4M3 scale among a few neighbours of the recipe's by least squared error,
each input column's error weighted by a data-free estimate of that input's mean square (1 / the column's
squared norm in W): still a standard NVFP4 weight (same checkpoint format and kernels), measured better
on a real model.

Checkpoint conventions: ModelOpt stores `weight_scale_2` = global; compressed-tensors stores
`weight_global_scale` = 1 / global. Convert with `global_from_compressed_tensors` / `global_to_compressed_tensors`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import adallm_ops  # noqa: F401  (defines torch.ops.adallm)
from adallm_ops.ops import E2M1_MAX, E4M3_MAX, NVFP4_BLOCK
from adallm_ops.reference import dequantize_nvfp4, e2m1_round, pack_fp4, unpack_fp4

__all__ = [
    "NVFP4Weight", "global_scale_for", "quantize", "quantize_group", "dequantize", "pack_fp4", "unpack_fp4",
    "global_from_compressed_tensors", "global_to_compressed_tensors",
]


@dataclass
class NVFP4Weight:
    """A packed NVFP4 weight: uint8 [N, K/2], float8_e4m3fn [N, K/16], float32 []."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_global_scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1] * 2

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


def _check_weight(w: torch.Tensor, name: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"adallm: {name} must be 2-D [N, K] to quantize, got shape {tuple(w.shape)}")
    if w.shape[1] % NVFP4_BLOCK:
        raise ValueError(f"adallm: {name} has K = {w.shape[1]}, not a multiple of {NVFP4_BLOCK}; NVFP4 needs "
                         f"whole blocks of {NVFP4_BLOCK}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"adallm: {name} contains NaN or Inf; refusing to quantize it")


def global_scale_for(*weights: torch.Tensor) -> torch.Tensor:
    """The per-tensor scale shared by `weights` (one fused group): max amax / (6 * 448), fp32 []."""
    amax = torch.stack([w.detach().abs().amax().float() for w in weights]).amax()
    # A tensor divisor: CUDA would divide by a Python number as a multiply by its rounded reciprocal, and the CPU
    # divides, so the two devices would disagree in the last bit now and then (and so in some codes).
    return torch.where(amax > 0, amax / torch.full_like(amax, E2M1_MAX * E4M3_MAX), torch.ones_like(amax))


METHODS = ("rtn", "mse", "gptq")
# The default must work on a weight alone (no calibration data), so it is "mse". On Gemma3-270M / GPL-3
# (benchmarks/accuracy.py, CPU fp32, weights only) its KL is 0.60x of "rtn"'s, top-1 +4.8 points (the
# unweighted search: 0.73x, +2.8). "gptq", given calibration statistics, goes further (see
# benchmarks/results/accuracy_cpu_fp32.json).
DEFAULT_METHOD = "mse"

# Block-scale candidates of the "mse" search: offsets, in E4M3 code steps, from the scale the recipe
# picks. E4M3 codes 1..126 are the positive finite values in increasing order, one step being 1/8 to
# 1/16 of the value (3 mantissa bits), so -3..+6 spans about 0.7x..1.8x of amax / (6 * global).
# Upwards: the block's largest element lands below 6, near 4, where E2M1 steps are finer relative to the
# block (1 instead of 2), which often lowers the error of the others more than it costs the largest one;
# downwards: the largest element saturates at 6 in exchange for a finer grid for the rest. Measured
# (unweighted) relative squared error vs "rtn": 0.73x on Gaussian weights, 0.85x on Student-t(3), 0.74x
# on Gemma3-270M's decoder linears (-3..+1 alone: 0.82x, 0.89x, 0.82x; -8..+8: no better than -3..+6).
# The global scale stays the recipe's: also searching it (x 1, 1.125, .., 1.875, the fused group's least
# total error) shifts the lattice of block scales but left Gemma3-270M's KL where it was (0.73x of "rtn").
_MSE_STEPS = (0, -1, -2, -3, 1, 2, 3, 4, 5, 6)
_E4M3_MAX_CODE = 126  # 0x7E = 448; 0x7F is NaN

# Input weights of the "mse" search. What matters is the layer's output error, sum_k E[x_k^2] (w_k - q_k)^2
# per output for uncorrelated inputs, and a weight alone does not tell E[x_k^2]; but training tends to pair
# large inputs with small weight columns, so 1 / ||W[:, k]||^2 stands in for it. Measured on Gemma3-270M:
# its rank correlation with E[x_k^2] on self-generated text is positive but loose (Spearman, mean over
# layers, 0.07 for k_proj to 0.46 for up_proj), and it works as a weight (KL vs "rtn", weights only, GPL-3):
# 0.60x; unweighted 0.73x; 1/||W[:, k]|| 0.67x; 1/||W[:, k]||^3 0.60x with a lower top-1; columns summed over
# a fused group instead of per weight 0.62x; the preceding RMSNorm's gain^2 as the proxy 1.15x (worse than
# unweighted); the true E[x_k^2] from self-generated calibration text, for comparison, 0.47x.
# _COLUMN_DAMP, relative to the mean squared column norm, caps the weight of near-zero columns.
_COLUMN_DAMP = 1e-3


def _e2m1_magnitude(a: torch.Tensor) -> torch.Tensor:
    """fp32 a >= 0 -> the E2M1 magnitude e2m1_round picks for it (nearest, ties to the even code, saturating at 6).

    The grid's step is 0.5 below 2, 1 in [2, 4) and 2 from 4 on, and every multiple of the step there is a
    grid point with an even code exactly when it is an even multiple, so round-half-even of a / step is the
    same rounding (cheaper than codes + table lookup, which matters in the scale search's inner loop).
    """
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return (torch.round(a / step) * step).clamp(max=E2M1_MAX)


def _mse_scales(blocks: torch.Tensor, g: torch.Tensor, col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-block E4M3 scale minimizing the block's (column-weighted) squared reconstruction error.

    blocks fp32 [N, K/16, 16], g fp32 [], col_weight fp32 [K/16, 16] (> 0; None: all 1) ->
    float8_e4m3fn [N, K/16]. Tries the scales of _MSE_STEPS around the recipe's; a tie keeps the earlier
    candidate, so the recipe's scale wins unless another is strictly better. Codes for a scale are always
    the recipe's round-to-nearest-even (also the weighted error's minimizer, element by element), so the
    result is a standard NVFP4 weight.
    """
    mag = blocks.abs()  # the error does not depend on the signs
    amax = mag.amax(dim=-1)
    rtn = (amax / (E2M1_MAX * g)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    base = rtn.view(torch.uint8).to(torch.int16)
    best_err = torch.full_like(amax, float("inf"))
    best = base
    for step in _MSE_STEPS:
        code = (base + step).clamp(1, _E4M3_MAX_CODE)
        s = (code.to(torch.uint8).view(torch.float8_e4m3fn).float() * g).unsqueeze(-1)
        sq = (_e2m1_magnitude(mag / s) * s - mag).square()
        err = (sq if col_weight is None else sq * col_weight).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, code, best)
    scale = best.to(torch.uint8).view(torch.float8_e4m3fn)
    # All-zero blocks: any scale is exact; keep the recipe's 1 so they match "rtn" bit for bit.
    return torch.where(amax == 0, torch.ones_like(amax), scale.float()).to(torch.float8_e4m3fn)


# Rows quantized at a time: bounds the search's fp32 temporaries to ~16 MB each, so quantizing a layer
# (patch, quantize-on-load) peaks at a small fraction of that layer on top of it.
_MSE_ROWS_ELEMENTS = 1 << 22


def _input_weights(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] -> fp32 [K]: the "mse" search's weight of each input column, 1 / (c_k + damp) with c_k the
    squared norm of w[:, k] / amax(|w|) and damp = _COLUMN_DAMP * mean(c) (all 1 for an all-zero w).
    Dividing by amax keeps the squares finite in fp32 for any finite w and does not change the search's
    choice (it scales every weight alike)."""
    amax = w.abs().amax().float()
    if amax == 0:
        return torch.ones(w.shape[1], device=w.device)
    rows = max(1, _MSE_ROWS_ELEMENTS // w.shape[1])
    c = sum((r.float() / amax).square().sum(dim=0) for r in torch.split(w, rows))  # fp32 copies, `rows` at a time
    return 1.0 / (c + _COLUMN_DAMP * c.mean())


def _quantize_mse(w: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (uint8 [N, K/2], float8_e4m3fn [N, K/16]) with searched block scales."""
    k = w.shape[1]
    col_weight = _input_weights(w).reshape(k // NVFP4_BLOCK, NVFP4_BLOCK)
    packed, scales = [], []
    for rows in torch.split(w, max(1, _MSE_ROWS_ELEMENTS // k)):
        blocks = rows.float().reshape(rows.shape[0], k // NVFP4_BLOCK, NVFP4_BLOCK)
        scale = _mse_scales(blocks, g, col_weight)
        codes = e2m1_round(blocks / (scale.float() * g).unsqueeze(-1)).reshape(rows.shape[0], k)
        packed.append(pack_fp4(codes))
        scales.append(scale)
    return torch.cat(packed), torch.cat(scales)


_GPTQ_DAMP = 0.01  # added to H's diagonal, relative to its mean: keeps the Cholesky factorization stable
_GPTQ_BLOCK = 128  # columns updated together (a multiple of 16): GPTQ's lazy batch


def _quantize_gptq(w: torch.Tensor, g: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al., 2022) onto the NVFP4 grid: w [N, K], hessian [K, K] = sum of x x^T over inputs.

    Columns are quantized left to right; each column's rounding error, weighted by the inverse Hessian,
    is pushed onto the columns not yet quantized, so the layer's output error on the calibration inputs,
    not the weight error, is what gets minimized. Each block's E4M3 scale is chosen ("mse" search) when
    the walk reaches the block, from the already-compensated weights (unweighted: the compensation already
    accounts for the inputs). Codes are the recipe's rounding of
    the compensated weights: a standard NVFP4 weight.
    """
    n, k = w.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"adallm: the hessian for a weight with K = {k} must be [{k}, {k}], got {tuple(hessian.shape)}")
    if not bool(hessian.any()):  # no calibration input reached it (an unrouted expert): the data-free method
        return _quantize_mse(w, g)
    work = w.float().clone()
    h = hessian.to(work.device, torch.float32).clone()
    dead = h.diagonal() == 0  # inputs never seen in calibration: their weights do not matter to it
    h[dead, dead] = 1.0
    h.diagonal().add_(_GPTQ_DAMP * h.diagonal().mean())
    # Upper Cholesky factor of H^-1: row j holds the update weights for columns after j.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty_like(work)
    scale = torch.empty(n, k // NVFP4_BLOCK, dtype=torch.float8_e4m3fn, device=work.device)
    for b0 in range(0, k, _GPTQ_BLOCK):
        b1 = min(b0 + _GPTQ_BLOCK, k)
        blk, err, hb = work[:, b0:b1], torch.empty(n, b1 - b0, device=work.device), hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            if j % NVFP4_BLOCK == 0:
                sc = _mse_scales(blk[:, j: j + NVFP4_BLOCK].unsqueeze(1), g)[:, 0]
                scale[:, (b0 + j) // NVFP4_BLOCK] = sc
                s = sc.float() * g
            col = blk[:, j]
            qc = torch.copysign(_e2m1_magnitude(col.abs() / s), col) * s
            q[:, b0 + j] = qc
            err[:, j] = (col - qc) / hb[j, j]
            blk[:, j + 1:] -= err[:, j: j + 1] * hb[j: j + 1, j + 1:]
        work[:, b1:] -= err @ hinv[b0:b1, b1:]
    s_full = (scale.float() * g).repeat_interleave(NVFP4_BLOCK, dim=1)
    return pack_fp4(e2m1_round(q / s_full)), scale


def quantize(w: torch.Tensor, global_scale: torch.Tensor | None = None, name: str = "weight",
             method: str = DEFAULT_METHOD, *, hessian: torch.Tensor | None = None) -> NVFP4Weight:
    """Quantizes w [N, K] (finite, K % 16 == 0) to NVFP4; runs on w's device (plain torch ops beyond "rtn").

    method: "rtn"  round-to-nearest, the ModelOpt recipe above (the adallm::nvfp4_quantize op);
            "mse"  the same global scale and codes rule, but each block's E4M3 scale is the one among a
                   few candidates around the recipe's that minimizes the block's squared error, each
                   column's weighted by _input_weights(w) (data-free: from w alone);
            "gptq" error compensation on calibration inputs (needs `hessian`: [K, K] fp32, the sum of
                   x x^T over the layer's inputs x [K]), with "mse" block scales.
    All give a standard NVFP4 weight (same layout, same dequantization, same kernels).
    """
    if method not in METHODS:
        raise ValueError(f"adallm: unknown NVFP4 quantizer {method!r}; choose one of {METHODS}")
    if (method == "gptq") != (hessian is not None):
        raise ValueError(f"adallm: method 'gptq' needs a hessian (calibration statistics) and the others take "
                         f"none; got method={method!r}, hessian {'given' if hessian is not None else 'missing'}")
    _check_weight(w, name)
    g = global_scale_for(w) if global_scale is None else global_scale.to(w.device, torch.float32)
    if method == "rtn":
        packed, scale = torch.ops.adallm.nvfp4_quantize(w.detach().contiguous(), g)
    elif method == "mse":
        packed, scale = _quantize_mse(w.detach(), g)
    else:
        packed, scale = _quantize_gptq(w.detach(), g, hessian)
    return NVFP4Weight(packed, scale, g)


def quantize_group(weights: list[torch.Tensor], names: list[str] | None = None,
                   method: str = DEFAULT_METHOD, *, hessian: torch.Tensor | None = None) -> list[NVFP4Weight]:
    """Quantizes a fused group (e.g. q/k/v) with one shared global scale (and one hessian: the parts share
    their input)."""
    names = names or [f"weight[{i}]" for i in range(len(weights))]
    for w, n in zip(weights, names):
        _check_weight(w, n)
    g = global_scale_for(*weights)
    return [quantize(w, g, n, method, hessian=hessian) for w, n in zip(weights, names)]


def dequantize(q: NVFP4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NVFP4Weight -> dense [N, K] of `dtype`."""
    return dequantize_nvfp4(q.weight, q.weight_scale, q.weight_global_scale).to(dtype)


def global_from_compressed_tensors(weight_global_scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors stores 1/global; returns the global scale (ModelOpt's weight_scale_2)."""
    return (1.0 / weight_global_scale.float()).reshape(())


def global_to_compressed_tensors(global_scale: torch.Tensor) -> torch.Tensor:
    """global scale -> the value compressed-tensors stores as weight_global_scale."""
    return (1.0 / global_scale.float()).reshape(1)
