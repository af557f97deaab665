"""AdaLLM's decoder self-attention: NVFP4 projections, FP8 KV cache, fp8_decode_attention for decode.

Drop-in for the `self_attn` of Qwen3, Qwen3-MoE and Gemma3 decoder layers (the HF decoder layer, norms,
rotary embedding and masks are kept). Submodules / buffers (names are the checkpoint contract):
    qkv_proj   NVFP4Linear, parts ("q_proj", "k_proj", "v_proj"): one fused GEMV, one shared global scale
    o_proj     NVFP4Linear
    q_norm, k_norm   the model's own RMSNorms over head_dim (moved from the HF module)

Paths, by the cache the decoder layer hands in:
  - Fp8KVCache, one new token per row (decode): q/k norms, RoPE and the K/V write in one op
    (qk_norm_rope_kv_write, straight from the fused projection's output), then fp8_decode_attention (valid
    range per row from cache_seqlens / cache_start: no mask, no host sync).
  - Fp8KVCache, S > 1 new tokens (prefill, or a chat continuation over a cached prefix): PyTorch SDPA over
    [dequantized cached prefix ; the new K/V in their own precision], with the mask transformers built
    (causal, sliding window, left padding); then the new K/V are written to the cache.
  - any other cache (a DynamicCache / StaticCache the user chose) or none: exactly transformers' own
    attention (cache.update + the model's attention function), in the activation dtype.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .kv_cache import Fp8CacheLayer, Fp8KVCache


class NVFP4Attention(nn.Module):
    """Self-attention of one decoder layer. Hidden [B, S, H] -> ([B, S, H], None), as the HF module returns.

    scaling: the softmax scale (Qwen3: head_dim**-0.5, Gemma3: query_pre_attn_scalar**-0.5);
    sliding_window: the window of a sliding layer, None for a full-attention one; apply_rotary: the
    family's apply_rotary_pos_emb(q, k, cos, sin); eager_attention: the family's eager attention function
    (used only on the transformers path when the model runs attn_implementation="eager");
    norm_weight_offset: the q/k norms multiply by weight + offset (Gemma3: 1), for the fused decode op.
    forward's norm (the layer's input Qwen3RMSNorm) and residual (added to the output) go into the projections'
    ops (NVFP4Linear.forward): a decoder layer that passes them skips its own norm and residual add.
    """

    def __init__(self, config, layer_idx: int, qkv_proj: nn.Module, o_proj: nn.Module, q_norm: nn.Module,
                 k_norm: nn.Module, *, head_dim: int, scaling: float, sliding_window: int | None,
                 apply_rotary: Callable, eager_attention: Callable, norm_weight_offset: float = 0.0) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.qkv_proj, self.o_proj, self.q_norm, self.k_norm = qkv_proj, o_proj, q_norm, k_norm
        self.head_dim = head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads  # read by HF attention functions
        self.scaling, self.sliding_window = scaling, sliding_window
        self.is_causal = True
        self.apply_rotary, self.eager_attention = apply_rotary, eager_attention
        self.norm_weight_offset = norm_weight_offset
        eps = {getattr(n, "variance_epsilon", getattr(n, "eps", None)) for n in (q_norm, k_norm)}
        if len(eps) != 1 or None in eps:
            raise ValueError(f"adallm: q_norm/k_norm must be RMSNorms with one epsilon (variance_epsilon or eps), "
                             f"got {type(q_norm).__name__}, {type(k_norm).__name__}")
        self.norm_eps = float(eps.pop())

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, past_key_values=None, cache=None,
                norm: nn.Module | None = None, residual: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else past_key_values  # renamed `cache` in transformers 5.2x
        b, s, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states, norm)
        if isinstance(cache, Fp8KVCache) and s == 1:
            out = self._decode(qkv.view(b, -1), position_embeddings, cache.layers[self.layer_idx])
            return self.o_proj(out.view(b, 1, -1), residual=residual), None
        q, k, v = self.qkv_proj.split_outputs(qkv)
        q = self.q_norm(q.view(b, s, -1, self.head_dim)).transpose(1, 2)  # [B, Hq, S, D]
        k = self.k_norm(k.view(b, s, -1, self.head_dim)).transpose(1, 2)  # [B, Hkv, S, D]
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, S, D]
        cos, sin = position_embeddings
        q, k = self.apply_rotary(q, k, cos, sin)

        if isinstance(cache, Fp8KVCache):
            out = self._prefill(q, k, v, attention_mask, cache.layers[self.layer_idx])
        else:
            out = self._transformers_attention(q, k, v, attention_mask, cache, kwargs)
        return self.o_proj(out.reshape(b, s, -1), residual=residual), None

    def _decode(self, qkv: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                layer: Fp8CacheLayer) -> torch.Tensor:
        """qkv [B, (Hq+2Hkv)*D] (the projection of one new token per row) -> [B,Hq,D]. Device tensors only
        (CUDA-graph safe)."""
        b, d = qkv.shape[0], self.head_dim
        if not layer.is_initialized:
            kv = qkv.view(b, -1, 1, d)[:, self.num_heads:]  # [B, 2 Hkv, 1, D]: the cache takes shapes from it
            layer.lazy_initialization(kv[:, :self.num_key_value_heads], kv[:, self.num_key_value_heads:])
        cos, sin = (t.reshape(t.shape[0], d) for t in position_embeddings)  # [B or 1, 1, D] -> [B or 1, D]
        q = torch.ops.adallm.qk_norm_rope_kv_write(
            qkv, self.q_norm.weight, self.k_norm.weight, cos, sin, layer.keys, layer.values, layer.key_scale,
            layer.value_scale, layer.next_position(), self.norm_eps, self.norm_weight_offset)
        return torch.ops.adallm.fp8_decode_attention(
            q, layer.keys, layer.values, layer.key_scale, layer.value_scale, layer.advance(), layer.start,
            self.scaling, self.sliding_window or 0,
            0.0)  # softcap: transformers' Gemma3 never applies attn_logit_softcapping, so neither do we

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 layer: Fp8CacheLayer) -> torch.Tensor:
        """q [B,Hq,S,D], k/v [B,Hkv,S,D], mask over absolute positions [0, seen+S) -> [B,S,Hq,D]."""
        seen, s = layer.host_length(), q.shape[2]
        valid = _as_bool_mask(mask, seen + s)  # [B,1,S,seen+S] or None (plain causal, empty cache)
        if seen == 0:
            keys, values = k, v
            # A new token is padding iff it may not attend to itself (the diagonal is never causal- or
            # window-masked); the cache takes each row's first valid position from it.
            new_valid = None if valid is None else valid[:, 0].diagonal(dim1=-2, dim2=-1)
        else:
            if valid is None:
                raise RuntimeError("adallm: a prefill over a cached prefix needs the attention mask transformers "
                                   "builds; got None")
            # Read the prefix before writing: a ring buffer's new tokens overwrite its oldest slots.
            k_prev, v_prev, lo = layer.read_prefix(k.dtype)
            keys, values, valid = torch.cat((k_prev, k), dim=2), torch.cat((v_prev, v), dim=2), valid[..., lo:]
            new_valid = None  # later chunks are not padded (see kv_cache.py)
        layer.write_chunk(k, v, new_valid)
        groups = self.num_key_value_groups
        if valid is None:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.scaling,
                                                 enable_gqa=groups > 1)
        else:
            # SDPA's kernels that take a mask do not take GQA: repeat the K/V heads.
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=valid, scale=self.scaling)
        return out.transpose(1, 2)

    def _transformers_attention(self, q, k, v, mask, cache, kwargs) -> torch.Tensor:
        """The un-patched model's attention, on a cache the user chose (or none). Returns [B,S,Hq,D]."""
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.eager_attention)
        out, _ = attend(self, q, k, v, mask, dropout=0.0, scaling=self.scaling, sliding_window=self.sliding_window,
                        **kwargs)
        return out

    def extra_repr(self) -> str:
        window = f", sliding_window={self.sliding_window}" if self.sliding_window else ""
        return (f"layer_idx={self.layer_idx}, heads={self.num_heads}, kv_heads={self.num_key_value_heads}, "
                f"head_dim={self.head_dim}, scaling={self.scaling:.4g}{window}")


def _as_bool_mask(mask: torch.Tensor | None, kv_length: int) -> torch.Tensor | None:
    """transformers' 4-D mask (sdpa: bool, True = attend; eager: additive float, 0 = attend) -> bool."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[-1] != kv_length:
        raise ValueError(f"adallm: expected a 4-D attention mask over {kv_length} positions (attn_implementation "
                         f"'sdpa' or 'eager'), got shape {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask == 0
