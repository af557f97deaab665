"""Qwen3-MoE: Qwen3MoeForCausalLM. Attention as Qwen3. Sparse layers keep transformers' MoE block; their router
(`mlp.gate`, BF16: softmax in fp32 -> top-k -> renormalized when norm_topk_prob, the same in 5.17 and 5.24) becomes
`Router`, the same math in one op, and their experts (`mlp.experts`) NVFP4; layers in config.mlp_only_layers keep a
dense MLP, made NVFP4. Decoder layers run Qwen3's forward (qwen3.decoder_layer_forward)."""
import torch
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

from . import Family
from .qwen3 import decoder_layer_forward


class Router(hf.Qwen3MoeTopKRouter):
    """transformers' router with its forward in one op, adallm::moe_router_topk (a single kernel at decode, where
    transformers launches four). Same outputs: (logits [T, E], top-k weights [T, k], expert ids int64 [T, k]). A
    subclass, so that transformers' output capture (`output_router_logits`) still finds it."""

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim).contiguous()
        return torch.ops.adallm.moe_router_topk(x, self.weight, self.top_k, self.norm_topk_prob)


class DecoderLayer(hf.Qwen3MoeDecoderLayer):
    forward = decoder_layer_forward  # the same forward as Qwen3's


FAMILY = Family(
    name="qwen3_moe",
    architectures=(hf.Qwen3MoeForCausalLM,),
    text_model=lambda model: model.model,
    apply_rotary=hf.apply_rotary_pos_emb,
    eager_attention=hf.eager_attention_forward,
    moe_router=Router,
    decoder_layer=DecoderLayer,
)
