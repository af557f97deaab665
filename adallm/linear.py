"""NVFP4Linear (a packed NVFP4 weight, optionally a fused group of projections) and FP8Linear (an e4m3 weight with
one scale per row: the lm_head's middle option between the model's dtype and NVFP4)."""
from __future__ import annotations

import torch
from torch import nn

from adallm_ops.reference import fp8_quantize_rows

from . import nvfp4


class NVFP4Linear(nn.Module):
    """y = x @ W.T (+ bias) with W stored as NVFP4 and run by torch.ops.adallm.nvfp4_linear.

    Buffers (canonical layout, adallm_ops/ops.py): weight uint8 [N, K/2], weight_scale float8_e4m3fn
    [N, K/16], weight_global_scale float32 [], bias (optional) [N].
    A fused group (e.g. q/k/v) is one NVFP4Linear whose rows are the parts concatenated along N, all
    sharing one global scale; `parts` names them and `part_sizes` gives their N, so checkpoint code can
    split and join them (`split_outputs` splits an output the same way).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 parts: tuple[str, ...] = (), part_sizes: tuple[int, ...] = (),
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if parts and sum(part_sizes) != out_features:
            raise ValueError(f"part_sizes {part_sizes} do not add up to out_features {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.parts, self.part_sizes = tuple(parts), tuple(part_sizes)
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, in_features // 16, dtype=torch.float8_e4m3fn,
                                                         device=device))
        self.register_buffer("weight_global_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_dense(cls, linears: list[nn.Linear], parts: tuple[str, ...] = (),
                   global_scale: torch.Tensor | None = None,
                   method: str = nvfp4.DEFAULT_METHOD, hessian: torch.Tensor | None = None) -> "NVFP4Linear":
        """Quantizes one nn.Linear, or a fused group of them (one shared global scale), into a new module.
        hessian fp32 [K, K]: method "gptq"'s calibration statistics (the parts share their input)."""
        weights = [lin.weight.detach() for lin in linears]
        g = nvfp4.global_scale_for(*weights) if global_scale is None else global_scale
        qs = [nvfp4.quantize(w, g, name=p or "weight", method=method, hessian=hessian)
              for w, p in zip(weights, parts or ("",) * len(weights))]
        has_bias = linears[0].bias is not None
        sizes = tuple(w.shape[0] for w in weights)
        mod = cls(weights[0].shape[1], sum(sizes), has_bias, parts, sizes if parts else (),
                  device=weights[0].device, dtype=weights[0].dtype)
        mod.weight = torch.cat([q.weight for q in qs])
        mod.weight_scale = torch.cat([q.weight_scale for q in qs])
        mod.weight_global_scale = g.to(mod.weight.device, torch.float32).reshape(())
        if has_bias:
            mod.bias = torch.cat([lin.bias.detach() for lin in linears])
        return mod

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] -> [..., N]. norm: a Qwen3RMSNorm over K applied to x first; residual [..., N]: added to the
        output (a decoder layer's residual add). On one row both run inside the GEMV (no extra launch); on more rows
        both stay separate ops, which inductor fuses into one add + norm kernel (as in transformers' layer)."""
        x, norm_weight, eps = norm_for_gemv(x, norm)
        one_row = x.numel() == x.shape[-1]
        y = torch.ops.adallm.nvfp4_linear(x, self.weight, self.weight_scale, self.weight_global_scale, self.bias,
                                          residual if one_row else None, norm_weight, eps)
        return y if residual is None or one_row else y + residual

    def split_outputs(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(y, self.part_sizes, dim=-1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return nvfp4.dequantize(nvfp4.NVFP4Weight(self.weight, self.weight_scale, self.weight_global_scale), dtype)

    def extra_repr(self) -> str:
        fused = f", parts={self.parts}" if self.parts else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, nvfp4{fused}"


def norm_for_gemv(x: torch.Tensor, norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(x, norm_weight, eps) for the nvfp4 ops' RMSNorm arguments. One row (batch-1 decode): the op applies the norm
    (the rows GEMV's prologue on CUDA); more rows: the norm module runs first (compiled, inductor fuses it with its
    neighbours) and the op gets none. norm: a Qwen3RMSNorm (`weight`, `variance_epsilon`) or None."""
    if norm is None:
        return x, None, 0.0
    if x.numel() != x.shape[-1]:
        return norm(x), None, 0.0
    return x, norm.weight, float(norm.variance_epsilon)


_QUANTIZE_CHUNK_ELEMENTS = 1 << 25  # 128 MiB of fp32 per chunk


class FP8Linear(nn.Module):
    """y = x @ W.T with W stored as e4m3 with one fp32 scale per output row, run by torch.ops.adallm.fp8_linear.

    Buffers (layout in adallm_ops/ops.py): weight float8_e4m3fn [N, K], weight_scale float32 [N]. The recipe is
    the FP8 KV cache's (adallm_ops.reference.fp8_quantize_rows): scale = row amax / 448, codes rounded to nearest.
    Half the bytes of a BF16 weight at a fraction of NVFP4's error: on Gemma3-270M an FP8 lm_head adds 0.008 to
    the NVFP4 (mse) decoder's KL of 0.134 where an NVFP4 one adds 0.125 (benchmarks/accuracy.py, CPU fp32,
    benchmarks/results/accuracy_cpu_fp32_fp8_head.json).
    """

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> "FP8Linear":
        """Quantizes an nn.Linear without bias (row by row, on its device) into a new module."""
        w = linear.weight.detach()
        if linear.bias is not None:
            raise ValueError("adallm: FP8Linear has no bias; the linear to quantize has one")
        if w.shape[1] % 16:
            raise ValueError(f"adallm: an FP8 weight needs K % 16 == 0, got K = {w.shape[1]}")
        if not bool(torch.isfinite(w).all()):
            raise ValueError("adallm: the weight contains NaN or Inf; refusing to quantize it")
        mod = cls(w.shape[1], w.shape[0], device=w.device)
        rows = max(1, _QUANTIZE_CHUNK_ELEMENTS // w.shape[1])
        for r in range(0, w.shape[0], rows):  # in row chunks: the fp32 temporaries of a whole lm_head are GBs
            mod.weight[r:r + rows], mod.weight_scale[r:r + rows] = fp8_quantize_rows(w[r:r + rows])
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.adallm.fp8_linear(x, self.weight, self.weight_scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per-row"
