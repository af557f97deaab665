"""CPU reference impls of the adallm ops, in plain torch.

They are the oracle for the CUDA kernels and what runs on machines without a GPU, so they copy the
kernels' arithmetic where it decides bits (the quantizers: fp32 division, round-to-nearest-even,
saturation) and otherwise compute in fp32 from the dequantized values.
"""
from __future__ import annotations

import torch

from .ops import (E2M1_MAX, E4M3_MAX, NVFP4_BLOCK, _require, check_activation, check_decode_attention_args,
                  check_fp8_weight, check_glu_args, check_kv_write_args, check_layer_extras, check_nvfp4_weight,
                  check_qk_norm_rope_args, check_quantize_args, check_router_args)

# E2M1 magnitudes by code 0..7; code | 8 is the negative.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_LUT = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> uint8 codes [..., K]; element 2i is the low nibble of byte i."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] (each < 16) -> uint8 [..., K/2]; the inverse of unpack_fp4."""
    pairs = codes.unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def e2m1_round(y: torch.Tensor) -> torch.Tensor:
    """fp32 -> E2M1 codes (uint8), round-to-nearest-even on the grid, saturating at ±6.

    Ties go to the even code (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4). A value that
    rounds to zero gets code 0 whatever its sign.
    """
    a = y.abs()
    mag = ((a > 0.25).to(torch.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75)
           + (a > 2.5) + (a >= 3.5) + (a > 5.0))
    sign = ((y < 0) & (mag > 0)).to(torch.uint8) << 3
    return mag | sign


def dequantize_nvfp4(weight: torch.Tensor, weight_scale: torch.Tensor,
                     weight_global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 triple -> fp32 [..., N, K] (leading expert dims allowed)."""
    codes = unpack_fp4(weight).long()
    vals = _E2M1_LUT.to(weight.device)[codes]
    scale = weight_scale.float().repeat_interleave(NVFP4_BLOCK, dim=-1)
    g = weight_global_scale.reshape(*weight_global_scale.shape, 1, 1)
    return vals * scale * g


@torch.library.impl("adallm::nvfp4_quantize", "CPU")
def nvfp4_quantize(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_quantize_args(x, global_scale)
    n, k = x.shape
    blocks = x.float().reshape(n, k // NVFP4_BLOCK, NVFP4_BLOCK)
    g = global_scale.float()
    amax = blocks.abs().amax(dim=-1)
    scale = (amax / (E2M1_MAX * g)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    # An all-zero block (or one whose scale underflows E4M3) gets scale 1: its codes then round to 0.
    scale = torch.where(scale.float() == 0, torch.ones_like(amax), scale.float()).to(torch.float8_e4m3fn)
    y = blocks / (scale.float() * g).unsqueeze(-1)
    codes = e2m1_round(y).reshape(n, k)
    return pack_fp4(codes), scale


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's RMSNorm (transformers' Qwen3RMSNorm, bit for bit): weight * T(x / sqrt(mean(x^2) + eps)), T = x.dtype."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@torch.library.impl("adallm::nvfp4_linear", "CPU")
def nvfp4_linear(x, weight, weight_scale, weight_global_scale, bias, residual=None, norm_weight=None, norm_eps=0.0):
    n, k = check_nvfp4_weight(weight, weight_scale, weight_global_scale)
    check_activation(x, k, weight)
    check_layer_extras(x, n, k, residual, norm_weight, norm_eps)
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, norm_eps)
    w = dequantize_nvfp4(weight, weight_scale, weight_global_scale)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    return y if residual is None else y + residual


@torch.library.impl("adallm::nvfp4_linear_glu", "CPU")
def nvfp4_linear_glu(x, weight, weight_scale, weight_global_scale, activation, norm_weight=None, norm_eps=0.0):
    n = check_glu_args(x, weight, weight_scale, weight_global_scale, activation, norm_weight, norm_eps)
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, norm_eps)
    y = x.float() @ dequantize_nvfp4(weight, weight_scale, weight_global_scale).t()
    gate, up = y[..., :n // 2], y[..., n // 2:]
    act = torch.nn.functional.silu(gate) if activation == "silu" else torch.nn.functional.gelu(gate, approximate="tanh")
    return (act * up).to(x.dtype)


@torch.library.impl("adallm::fp8_linear", "CPU")
def fp8_linear(x, weight, weight_scale):
    _, k = check_fp8_weight(weight, weight_scale)
    check_activation(x, k, weight)
    return ((x.float() @ weight.float().t()) * weight_scale).to(x.dtype)


@torch.library.impl("adallm::nvfp4_moe_linear", "CPU")
def nvfp4_moe_linear(x, weight, weight_scale, weight_global_scale, expert_ids):
    _, k = check_nvfp4_weight(weight, weight_scale, weight_global_scale, experts=True)
    check_activation(x, k, weight)
    t, topk = expert_ids.shape
    _require(bool(((expert_ids >= 0) & (expert_ids < weight.shape[0])).all()),
             f"expert_ids must lie in [0, {weight.shape[0]})")
    xs = (x.unsqueeze(1).expand(t, topk, k) if x.dim() == 2 else x).float()
    out = torch.empty((t, topk, weight.shape[1]), dtype=torch.float32)
    for e in expert_ids.unique().tolist():
        sel = expert_ids == e
        w = dequantize_nvfp4(weight[e], weight_scale[e], weight_global_scale[e])
        out[sel] = xs[sel] @ w.t()
    return out.to(x.dtype)


@torch.library.impl("adallm::moe_router_topk", "CPU")
def moe_router_topk(x, weight, top_k, renormalize):
    check_router_args(x, weight, top_k)
    logits = (x.float() @ weight.float().t()).to(x.dtype)
    # A stable descending sort: equal logits keep the lower expert first.
    ids = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[:, :top_k].contiguous()
    w = logits.float().softmax(-1).gather(-1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return logits, w.to(x.dtype), ids


def fp8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] -> (e4m3 [..., D], fp32 scale [...]): scale = amax/448 (1 if the row is all zero)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    # A tensor divisor, not the Python 448: CUDA divides by a CPU scalar as a multiply by its rounded reciprocal,
    # which differs from the division in the last bit now and then (the CPU divides).
    scale = torch.where(amax > 0, amax / torch.full_like(amax, E4M3_MAX), torch.ones_like(amax))
    q = (xf / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


@torch.library.impl("adallm::fp8_kv_write", "CPU")
def fp8_kv_write(k, v, k_cache, v_cache, k_scale, v_scale, positions):
    check_kv_write_args(k, v, k_cache, v_cache, k_scale, v_scale, positions)
    _write_kv_rows(k, v, k_cache, v_cache, k_scale, v_scale, positions)


def _write_kv_rows(k, v, k_cache, v_cache, k_scale, v_scale, positions) -> None:
    """k, v [B, Hkv, S, D] (any float dtype) -> e4m3 rows at slots positions % L."""
    slots = positions % k_cache.shape[2]
    _require(slots.unique().numel() == slots.numel(), "positions must map to distinct cache slots")
    for new, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        q, s = fp8_quantize_rows(new)
        # index_copy_ has no float8 kernel: copy the bytes.
        cache.view(torch.uint8).index_copy_(2, slots, q.view(torch.uint8))
        scale.index_copy_(2, slots, s)


@torch.library.impl("adallm::qk_norm_rope_kv_write", "CPU")
def qk_norm_rope_kv_write(qkv, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, k_scale, v_scale, position,
                          eps, weight_offset):
    hq = check_qk_norm_rope_args(qkv, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, k_scale, v_scale,
                                 position, eps)
    b, hkv, _, d = k_cache.shape
    heads = qkv.float().view(b, hq + 2 * hkv, d)
    c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)  # [B or 1, 1, D]

    def norm_rope(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # fp32 [B, H, D]
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (weight.float() + weight_offset)
        rotated = torch.cat((-x[..., d // 2:], x[..., :d // 2]), dim=-1)
        return x * c + rotated * s

    k = norm_rope(heads[:, hq:hq + hkv], k_norm_weight)
    _write_kv_rows(k.unsqueeze(2), heads[:, hq + hkv:].unsqueeze(2), k_cache, v_cache, k_scale, v_scale, position)
    return norm_rope(heads[:, :hq], q_norm_weight).to(qkv.dtype)


def decode_valid_slots(cache_seqlens: torch.Tensor, cache_start: torch.Tensor, length: int,
                       sliding_window: int) -> torch.Tensor:
    """bool [B, L]: which cache slots hold a position the new token attends to.

    Slot s holds the latest position p < seqlen with p % L == s, i.e. p = seqlen-1 - ((seqlen-1-s) mod L).
    """
    seqlen = cache_seqlens.long().unsqueeze(1)
    lo = cache_start.long().unsqueeze(1)
    if sliding_window > 0:
        lo = torch.maximum(lo, seqlen - sliding_window)
    s = torch.arange(length).unsqueeze(0)
    p = seqlen - 1 - torch.remainder(seqlen - 1 - s, length)
    return (p >= lo) & (p >= 0)


@torch.library.impl("adallm::fp8_decode_attention", "CPU")
def fp8_decode_attention(q, k_cache, v_cache, k_scale, v_scale, cache_seqlens, cache_start, sm_scale,
                         sliding_window, softcap):
    check_decode_attention_args(q, k_cache, v_cache, k_scale, v_scale, cache_seqlens, cache_start,
                                sliding_window, softcap)
    b, hkv, length, d = k_cache.shape
    lo = cache_start.long()
    if sliding_window > 0:
        lo = torch.maximum(lo, cache_seqlens.long() - sliding_window)
    _require(bool((cache_seqlens.long() > lo).all()), "every row needs at least one token (cache_seqlens > cache_start)")
    _require(bool((cache_seqlens.long() - lo <= length).all()),
             f"the attended range exceeds the cache length {length}")
    group = q.shape[1] // hkv
    k = k_cache.float() * k_scale.unsqueeze(-1)
    v = v_cache.float() * v_scale.unsqueeze(-1)
    qf = q.float().reshape(b, hkv, group, d)
    logits = torch.einsum("bhgd,bhld->bhgl", qf, k) * sm_scale
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    valid = decode_valid_slots(cache_seqlens, cache_start, length, sliding_window)
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgl,bhld->bhgd", logits.softmax(dim=-1), v)
    return out.reshape(q.shape).to(q.dtype)
