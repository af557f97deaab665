"""Qwen3 (dense): Qwen3ForCausalLM. q/k RMSNorm over head_dim before RoPE, scaling head_dim**-0.5; sliding
layers only where config.layer_types says so (off by default). Its decoder layer (and Qwen3-MoE's, which has the
same forward) hands its RMSNorms and residual adds to the NVFP4 modules (`decoder_layer_forward`)."""
import torch
from transformers.models.qwen3 import modeling_qwen3 as hf

from ..mlp import NVFP4MLP
from . import Family


def decoder_layer_forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """transformers' Qwen3 decoder layer, h + attn(norm1(h)) then h' + mlp(norm2(h')), with each norm passed into the
    projection after it and each residual add into the projection before it (NVFP4Linear.forward). At one row (batch-1
    decode) both run inside the GEMVs, which saves the two norm kernels of every layer (Qwen3-8B, H200: ~2 us each).
    Same math; the fused norm rounds differently (see adallm_ops.ops.nvfp4_linear). A Qwen3-MoE block (not an
    NVFP4MLP) gets its norm and residual add as in transformers."""
    h, _ = self.self_attn(hidden_states, norm=self.input_layernorm, residual=hidden_states, **kwargs)
    if isinstance(self.mlp, NVFP4MLP):
        return self.mlp(h, norm=self.post_attention_layernorm, residual=h)
    return h + self.mlp(self.post_attention_layernorm(h))


class DecoderLayer(hf.Qwen3DecoderLayer):
    forward = decoder_layer_forward


FAMILY = Family(
    name="qwen3",
    architectures=(hf.Qwen3ForCausalLM,),
    text_model=lambda model: model.model,
    apply_rotary=hf.apply_rotary_pos_emb,
    eager_attention=hf.eager_attention_forward,
    decoder_layer=DecoderLayer,
)
