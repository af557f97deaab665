"""Qwen3 (dense): Qwen3ForCausalLM. q/k RMSNorm over head_dim before RoPE, scaling head_dim**-0.5; sliding
layers only where config.layer_types says so (off by default)."""
from transformers.models.qwen3 import modeling_qwen3 as hf

from . import Family

FAMILY = Family(
    name="qwen3",
    architectures=(hf.Qwen3ForCausalLM,),
    text_model=lambda model: model.model,
    apply_rotary=hf.apply_rotary_pos_emb,
    eager_attention=hf.eager_attention_forward,
)
