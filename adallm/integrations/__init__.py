"""transformers glue: one module per model family saying what `adallm.patch` swaps and what is special.

Each family module defines FAMILY, a `Family`. adallm/patching.py does the (shared) swapping.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn


def _no_check(config) -> None:
    return None


@dataclass(frozen=True)
class Family:
    """What patch needs to know about one model family.

    architectures: the model classes patched; text_model(model): the module holding `.layers` (the decoder
    layers) and `.config` (the text config); apply_rotary / eager_attention: the family's own
    apply_rotary_pos_emb and eager attention function (same math as its HF attention module);
    norm_weight_offset: the q/k RMSNorms multiply by weight + offset (Gemma3: 1); decode steps run those norms
    and rotate-half RoPE (what apply_rotary does in all three families) fused, in qk_norm_rope_kv_write;
    moe_router: for MoE families, a subclass of the family's router class that patch gives each MoE block's `gate`
    (its class is swapped, its weight kept);
    decoder_layer: a subclass of the family's decoder layer class that patch gives each layer (no new state), whose
    forward passes the layer's RMSNorms and residual adds to the NVFP4 modules (fused into their GEMVs), or None (the
    layer stays transformers');
    check(config): raises ValueError on a configuration AdaLLM does not run.
    """

    name: str
    architectures: tuple[type, ...]
    text_model: Callable[[nn.Module], nn.Module]
    apply_rotary: Callable
    eager_attention: Callable
    norm_weight_offset: float = 0.0
    moe_router: type | None = None
    decoder_layer: type | None = None
    check: Callable = field(default=_no_check)


def families() -> list[Family]:
    from . import gemma3, qwen3, qwen3_moe
    return [qwen3.FAMILY, qwen3_moe.FAMILY, gemma3.FAMILY]
