"""NVFP4Linear: an nn.Module holding a packed NVFP4 weight (optionally a fused group of projections)."""
from __future__ import annotations

import torch
from torch import nn

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.adallm.nvfp4_linear(x, self.weight, self.weight_scale, self.weight_global_scale, self.bias)

    def split_outputs(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(y, self.part_sizes, dim=-1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return nvfp4.dequantize(nvfp4.NVFP4Weight(self.weight, self.weight_scale, self.weight_global_scale), dtype)

    def extra_repr(self) -> str:
        fused = f", parts={self.parts}" if self.parts else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, nvfp4{fused}"
