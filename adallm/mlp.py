"""NVFP4 MLPs: the dense gated MLP (Qwen3, Gemma3, Qwen3-MoE's dense layers) and the routed MoE experts.

Buffer names are the checkpoint contract (adallm/checkpoint.py fills them by name):
  NVFP4MLP:      gate_up_proj  NVFP4Linear, parts ("gate_proj", "up_proj"), one shared global scale
                 down_proj     NVFP4Linear
  NVFP4Experts:  gate_up_weight              uint8          [E, 2I, H/2]   rows: gate (I) then up (I)
                 gate_up_weight_scale        float8_e4m3fn  [E, 2I, H/16]
                 gate_up_weight_global_scale float32        [E]            gate and up of an expert share it
                 down_weight                 uint8          [E, H, I/2]
                 down_weight_scale           float8_e4m3fn  [E, H, I/16]
                 down_weight_global_scale    float32        [E]
                 (per expert: the NVFP4 layout of adallm_ops/ops.py)
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import nvfp4
from .linear import NVFP4Linear, norm_for_gemv


def glu_activation(act_fn: Callable) -> str | None:
    """The name nvfp4_linear_glu knows act_fn by (adallm_ops.ops.GLU_ACTIVATIONS), found by what it computes on
    probe values (transformers names its activation classes differently across versions), or None."""
    probe = torch.linspace(-8.0, 8.0, 257)
    with torch.no_grad():
        out = act_fn(probe)
    for name, ref in (("silu", F.silu(probe)), ("gelu_tanh", F.gelu(probe, approximate="tanh"))):
        if torch.allclose(out, ref, rtol=1e-6, atol=1e-6):
            return name
    return None


class NVFP4MLP(nn.Module):
    """down_proj(act(gate) * up) with gate/up as one fused NVFP4 GEMV. x [..., H] -> [..., H].

    One row (batch-1 decode) with a SiLU or tanh-GELU act runs the gate/up GEMV and the activation as one op
    (adallm::nvfp4_linear_glu: the activation in the GEMV's epilogue on CUDA); other inputs run the GEMV, then act * up.
    forward's norm (the layer's Qwen3RMSNorm before the MLP) and residual (added to the output) go into the ops as in
    NVFP4Linear.forward.
    """

    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, act_fn: Callable) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act_fn
        self.glu_activation = glu_activation(act_fn)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        g = self.gate_up_proj
        # (a gate_up loaded as separate parts, checkpoint.SeparateParts, runs the second way)
        one_op = isinstance(g, NVFP4Linear) and g.bias is None and self.glu_activation is not None
        if one_op and x.numel() == x.shape[-1]:
            x, norm_weight, eps = norm_for_gemv(x, norm)
            h = torch.ops.adallm.nvfp4_linear_glu(x, g.weight, g.weight_scale, g.weight_global_scale,
                                                  self.glu_activation, norm_weight, eps)
        else:
            gate, up = g.split_outputs(g(x, norm))
            h = self.act_fn(gate) * up
        return self.down_proj(h, residual=residual)


class NVFP4Experts(nn.Module):
    """Routed experts with NVFP4 weights, run by adallm::nvfp4_moe_linear (only routed experts are read).

    Drop-in for transformers' fused experts module (Qwen3MoeExperts): forward(hidden_states [T, H],
    top_k_index [T, k], top_k_weights [T, k]) -> [T, H] = sum_j w[t, j] * expert_{idx[t, j]}(x[t]).
    Built empty (for a checkpoint loader; `device` may be "meta"), or from dense weights by `from_dense`.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act_fn: Callable,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        for n, k in ((hidden_size, "hidden_size"), (intermediate_size, "intermediate_size")):
            if n % 16:
                raise ValueError(f"adallm: {k} = {n} must be a multiple of 16 for NVFP4 experts")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.act_fn = act_fn
        e, h, i = num_experts, hidden_size, intermediate_size
        for name, n, k in (("gate_up", 2 * i, h), ("down", h, i)):
            self.register_buffer(f"{name}_weight", torch.empty(e, n, k // 2, dtype=torch.uint8, device=device))
            self.register_buffer(f"{name}_weight_scale",
                                 torch.empty(e, n, k // 16, dtype=torch.float8_e4m3fn, device=device))
            self.register_buffer(f"{name}_weight_global_scale", torch.ones(e, dtype=torch.float32, device=device))

    @classmethod
    def from_dense(cls, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, act_fn: Callable,
                   method: str = nvfp4.DEFAULT_METHOD,
                   hessians: tuple[torch.Tensor, torch.Tensor] | None = None) -> "NVFP4Experts":
        """gate_up_proj [E, 2I, H] (gate rows then up rows), down_proj [E, H, I] -> quantized experts.
        hessians: method "gptq"'s per-expert calibration statistics, fp32 ([E, H, H], [E, I, I])."""
        e, two_i, h = gate_up_proj.shape
        mod = cls(e, h, two_i // 2, act_fn, device=gate_up_proj.device)
        for i, (name, w) in enumerate((("gate_up", gate_up_proj), ("down", down_proj))):
            packed, scale, glob = getattr(mod, f"{name}_weight"), getattr(mod, f"{name}_weight_scale"), \
                getattr(mod, f"{name}_weight_global_scale")
            for j in range(e):
                # gate and up as the two parts of a fused group, as a checkpoint stores them and quantize-on-load
                # quantizes them ("mse" weighs each part's columns by that part's norms)
                parts = w[j].detach().chunk(2) if name == "gate_up" else (w[j].detach(),)
                qs = nvfp4.quantize_group(list(parts), [f"experts.{name}_proj[{j}]"] * len(parts), method=method,
                                          hessian=None if hessians is None else hessians[i][j])
                packed[j], scale[j] = torch.cat([q.weight for q in qs]), torch.cat([q.weight_scale for q in qs])
                glob[j] = qs[0].weight_global_scale
        return mod

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        moe = torch.ops.adallm.nvfp4_moe_linear
        gate_up = moe(hidden_states, self.gate_up_weight, self.gate_up_weight_scale, self.gate_up_weight_global_scale,
                      top_k_index)  # [T, k, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        down = moe(self.act_fn(gate) * up, self.down_weight, self.down_weight_scale, self.down_weight_global_scale,
                   top_k_index)  # [T, k, H]
        return (down.float() * top_k_weights.float().unsqueeze(-1)).sum(dim=1).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, nvfp4")
