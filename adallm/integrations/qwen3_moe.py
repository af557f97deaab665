"""Qwen3-MoE: Qwen3MoeForCausalLM. Attention as Qwen3. Sparse layers keep transformers' MoE block and router
(`mlp.gate`, BF16: softmax in fp32 -> top-k -> renormalized when norm_topk_prob, the same in 5.17 and 5.24)
and get NVFP4 experts (`mlp.experts`); layers in config.mlp_only_layers keep a dense MLP, made NVFP4."""
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

from . import Family

FAMILY = Family(
    name="qwen3_moe",
    architectures=(hf.Qwen3MoeForCausalLM,),
    text_model=lambda model: model.model,
    apply_rotary=hf.apply_rotary_pos_emb,
    eager_attention=hf.eager_attention_forward,
)
