"""Gemma3 text: Gemma3ForCausalLM and the text tower of Gemma3ForConditionalGeneration (vision tower and
projector untouched). Specifics (all read from the HF attention module / config, so they match it):
scaling = query_pre_attn_scalar**-0.5; sliding layers from config.layer_types, each a ring buffer of the
window in the FP8 cache; per-layer-type RoPE comes from the model as position_embeddings. transformers'
Gemma3 attention never applies attn_logit_softcapping (only final_logit_softcapping, in the LM head,
which is untouched)."""
from transformers.models.gemma3 import modeling_gemma3 as hf

from . import Family


def _text_model(model):
    return model.model.language_model if isinstance(model, hf.Gemma3ForConditionalGeneration) else model.model


def _check(config) -> None:
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("adallm: Gemma3 with use_bidirectional_attention (an encoder) is not supported; AdaLLM runs "
                         "causal decoders")


FAMILY = Family(
    name="gemma3",
    architectures=(hf.Gemma3ForCausalLM, hf.Gemma3ForConditionalGeneration),
    text_model=_text_model,
    apply_rotary=hf.apply_rotary_pos_emb,
    eager_attention=hf.eager_attention_forward,
    norm_weight_offset=1.0,  # Gemma3RMSNorm: x * (1 + weight)
    check=_check,
)
