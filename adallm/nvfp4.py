"""The NVFP4 weight format: quantize, dequantize, pack/unpack and the checkpoint scale conventions.

An NVFP4 weight [N, K] is three tensors (layout documented once, in adallm_ops/ops.py):
  weight uint8 [N, K/2], weight_scale float8_e4m3fn [N, K/16], weight_global_scale float32 [].

Quantization recipe (NVIDIA ModelOpt's):
  global = amax(|W|) / (6 * 448)                      (1 for an all-zero tensor)
  scale  = e4m3(block_amax / (6 * global))            (1 where that is 0: all-zero or underflowing block)
  code   = round-to-nearest-even of W / (float(scale) * global) onto the E2M1 grid, saturating at ±6.
Fused groups (q/k/v, gate/up) share one global scale: the max amax of the group, so the parts can be
concatenated along N and run as one GEMV.

Checkpoint conventions: ModelOpt stores `weight_scale_2` = global; compressed-tensors stores
`weight_global_scale` = 1 / global. Convert with `global_from_compressed_tensors` / `global_to_compressed_tensors`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import adallm_ops  # noqa: F401  (defines torch.ops.adallm)
from adallm_ops.ops import E2M1_MAX, E4M3_MAX, NVFP4_BLOCK
from adallm_ops.reference import dequantize_nvfp4, pack_fp4, unpack_fp4

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
    return torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones_like(amax))


METHODS = ("rtn",)


def quantize(w: torch.Tensor, global_scale: torch.Tensor | None = None, name: str = "weight",
             method: str = "rtn") -> NVFP4Weight:
    """Quantizes w [N, K] (finite, K % 16 == 0) with the recipe above; runs on w's device.

    method: "rtn" (round-to-nearest, the ModelOpt recipe).
    """
    if method not in METHODS:
        raise ValueError(f"adallm: unknown NVFP4 quantizer {method!r}; choose one of {METHODS}")
    _check_weight(w, name)
    g = global_scale_for(w) if global_scale is None else global_scale.to(w.device, torch.float32)
    packed, scale = torch.ops.adallm.nvfp4_quantize(w.detach().contiguous(), g)
    return NVFP4Weight(packed, scale, g)


def quantize_group(weights: list[torch.Tensor], names: list[str] | None = None,
                   method: str = "rtn") -> list[NVFP4Weight]:
    """Quantizes a fused group (e.g. q/k/v) with one shared global scale."""
    names = names or [f"weight[{i}]" for i in range(len(weights))]
    for w, n in zip(weights, names):
        _check_weight(w, n)
    g = global_scale_for(*weights)
    return [quantize(w, g, n, method) for w, n in zip(weights, names)]


def dequantize(q: NVFP4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NVFP4Weight -> dense [N, K] of `dtype`."""
    return dequantize_nvfp4(q.weight, q.weight_scale, q.weight_global_scale).to(dtype)


def global_from_compressed_tensors(weight_global_scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors stores 1/global; returns the global scale (ModelOpt's weight_scale_2)."""
    return (1.0 / weight_global_scale.float()).reshape(())


def global_to_compressed_tensors(global_scale: torch.Tensor) -> torch.Tensor:
    """global scale -> the value compressed-tensors stores as weight_global_scale."""
    return (1.0 / global_scale.float()).reshape(1)
