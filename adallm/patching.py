"""`adallm.patch`: turn a transformers Qwen3 / Qwen3-MoE / Gemma3 model into an NVFP4 + FP8-KV-cache model in place.

Every decoder layer keeps its norms and rotary embedding, and its transformers class or the family's `decoder_layer`
subclass of it (Qwen3, Qwen3-MoE: the norms and residual adds fused into the GEMVs); its `self_attn` becomes an
NVFP4Attention and its MLP an NVFP4MLP (MoE layers: `mlp.experts` becomes NVFP4Experts; the router keeps its BF16
weight and runs as the family's `moe_router` class).
Module names after patching (what checkpoint code reads and writes), per decoder layer:
    self_attn.qkv_proj   NVFP4Linear(parts=("q_proj", "k_proj", "v_proj"))
    self_attn.o_proj     NVFP4Linear
    self_attn.q_norm / k_norm            unchanged (BF16)
    mlp.gate_up_proj     NVFP4Linear(parts=("gate_proj", "up_proj")),  mlp.down_proj  NVFP4Linear
    MoE: mlp.gate (router, BF16 weight unchanged), mlp.experts  NVFP4Experts (buffers in adallm/mlp.py)
and `lm_head` as `patch(lm_head=...)` picks (LM_HEADS): "dense" keeps the model's nn.Linear, "fp8" makes it an
FP8Linear (e4m3, one fp32 scale per row), "nvfp4" an NVFP4Linear. Embeddings and norms stay as they are: where the
config ties lm_head to the input embedding (Gemma3), a quantized lm_head is a new module quantized from the shared
matrix, the embedding keeps its exact weights, and lm_head is taken out of transformers' tie map.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import NVFP4Attention
from .calibration import check_calibration, quantize_layers
from .integrations import Family, families
from .generation import use_graph_decode_in_generate
from .kv_cache import use_fp8_cache_in_generate
from . import nvfp4
from .linear import FP8Linear, NVFP4Linear
from .mlp import NVFP4Experts, NVFP4MLP

__all__ = ["patch", "supported_architectures", "LM_HEADS"]

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  # the 4-D masks AdaLLM's attention reads
# What lm_head can be: the model's own nn.Linear (its dtype), FP8Linear, NVFP4Linear (set_lm_head).
LM_HEADS = ("dense", "fp8", "nvfp4")


def supported_architectures() -> list[str]:
    return [cls.__name__ for f in families() for cls in f.architectures]


def patch(model: nn.Module, *, lm_head: str = "dense", method: str = nvfp4.DEFAULT_METHOD,
          calibration: torch.Tensor | None = None, quantize: bool = True, progress: bool = True) -> nn.Module:
    """Swaps the decoder's linears for NVFP4 modules (in place, layer by layer) and returns the model.

    quantize=True: each BF16 weight is quantized with `method` (adallm.nvfp4.METHODS) on its device and
    freed when its layer is done, so peak memory is the model plus about one layer.
    quantize=False: the same module tree with empty packed buffers on the model's device (may be "meta"),
    for a checkpoint loader to fill by name (see this module's docstring).
    method="gptq" needs `calibration`: token ids LongTensor [n, L] (e.g.
    adallm.calibration.self_generated_calibration(model), made before patching). The layers are then
    quantized in order, each from hessians of its inputs on that text with the earlier layers already
    quantized (adallm/calibration.py); the model must be bfloat16/float16 (the quantized layers run through
    the adallm ops). Extra peak memory: the calibration activations and one layer's hessians.
    lm_head (one of LM_HEADS): "dense" (default) keeps lm_head in the model's dtype; "fp8" makes it an FP8Linear
    (e4m3 [V, H], fp32 scale [V]: half a BF16 head's bytes, little accuracy lost), always quantized with
    round-to-nearest per row whatever `method` is (gptq's lm_head hessian serves "nvfp4" only); "nvfp4" makes
    it an NVFP4Linear quantized with `method` (0.28x a BF16 head's bytes; costs more accuracy: README, Quantizers).
    A tied input embedding stays exact (see this module's docstring).
    After patching, `model.generate` uses an Fp8KVCache unless the call passes a cache or a cache_implementation,
    and on CUDA decodes with CUDA-graph steps and no host sync per token (adallm/generation.py).
    """
    check_lm_head(lm_head)
    family = _family_of(model)
    text = family.text_model(model)
    config = text.config
    family.check(config)
    if config._attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"adallm: the model runs attn_implementation={config._attn_implementation!r}; AdaLLM's "
                         f"attention needs one of {ATTN_IMPLEMENTATIONS} (load the model with "
                         "attn_implementation='sdpa')")
    if quantize and any(p.device.type == "meta" for p in text.layers.parameters()):
        raise ValueError("adallm: cannot quantize weights on the meta device; pass quantize=False to build empty "
                         "modules for a checkpoint loader")
    if any(isinstance(layer.self_attn, NVFP4Attention) for layer in text.layers):
        raise ValueError("adallm: this model is already patched")
    if calibration is not None:
        if method != "gptq" or not quantize:
            raise ValueError(f"adallm: calibration data is used only by method='gptq' with quantize=True, got "
                             f"method={method!r}, quantize={quantize}")
        dtype = next(text.layers.parameters()).dtype
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"adallm: gptq calibration runs the quantized layers through the adallm ops, which take "
                             f"bfloat16/float16 activations; the model is {dtype} (load it with dtype=torch.bfloat16)")
        calibration = check_calibration(calibration, config.vocab_size)
    elif method == "gptq" and quantize:
        raise ValueError("adallm: method='gptq' needs calibration token ids [n, L] (calibration=...; "
                         "adallm.calibration.self_generated_calibration(model) makes them from the model itself)")
    from tqdm.auto import tqdm

    def patch_layer(layer: nn.Module, hessians: dict[str, torch.Tensor] | None = None) -> None:
        layer.self_attn = _attention(layer.self_attn, family, quantize, method, hessians)
        _patch_mlp(layer, family, quantize, method, hessians)
        if family.decoder_layer is not None:
            layer.__class__ = family.decoder_layer  # a subclass adding no state: the forward with fused norms

    with torch.no_grad():
        if calibration is None:
            for layer in tqdm(text.layers, desc="adallm: NVFP4", unit="layer", disable=not (progress and quantize)):
                patch_layer(layer)
            lm_head_hessian = None
        else:
            lm_head_hessian = quantize_layers(text, calibration, patch_layer, progress)
        set_lm_head(model, lm_head, quantize, method, lm_head_hessian)
    use_fp8_cache_in_generate(model)
    use_graph_decode_in_generate(model)
    return model


def check_lm_head(lm_head: str) -> None:
    """Raises ValueError naming LM_HEADS unless lm_head is one of them."""
    if lm_head not in LM_HEADS:
        raise ValueError(f"adallm: lm_head={lm_head!r}; choose one of {LM_HEADS}")


def lm_head_module(head: nn.Linear, lm_head: str, quantize: bool = True, method: str = nvfp4.DEFAULT_METHOD,
                   hessian: torch.Tensor | None = None) -> nn.Module:
    """`head` (an nn.Linear [V, H] without bias; its weight may be the tied input embedding) as `lm_head` names
    (LM_HEADS): "dense" -> head itself; "fp8" -> a new FP8Linear (round-to-nearest per row, whatever `method`);
    "nvfp4" -> a new NVFP4Linear quantized with `method` (hessian fp32 [H, H]: gptq's, of the final norm's
    output). Quantized on head's device; quantize=False: empty, on head's device (may be "meta"), for a loader
    to fill. `head` itself is not changed."""
    check_lm_head(lm_head)
    if lm_head == "dense":
        return head
    if lm_head == "fp8":
        return FP8Linear.from_dense(head) if quantize else \
            FP8Linear(head.in_features, head.out_features, device=head.weight.device)
    return _linear([head], (), quantize, method, hessian)


def set_lm_head(model: nn.Module, lm_head: str, quantize: bool = True, method: str = nvfp4.DEFAULT_METHOD,
                hessian: torch.Tensor | None = None) -> None:
    """model.lm_head = lm_head_module(model.lm_head, ...). A quantized head replaces the dense one (which is
    freed, unless it is the tied embedding: that stays exact) and leaves transformers' tie map."""
    head = lm_head_module(model.lm_head, lm_head, quantize, method, hessian)
    if head is not model.lm_head:
        model.lm_head = head
        _untie_lm_head(model)


def _untie_lm_head(model: nn.Module) -> None:
    """lm_head is a quantized module now (its `weight` buffer holds codes), no longer the input embedding's
    Parameter: drops it from the model's tie maps, so that transformers' tie_weights() (called by
    from_pretrained after loading, by resize_token_embeddings, or by the user) neither puts the BF16 embedding
    into lm_head.weight nor fails on it. The embedding itself is not touched."""
    def untied(keys):
        return {k: v for k, v in keys.items() if not k.startswith("lm_head.")}
    for attr in ("_tied_weights_keys", "all_tied_weights_keys"):  # transformers 5.x: {target: source} dicts
        keys = getattr(model, attr, None)
        if isinstance(keys, dict):
            setattr(model, attr, untied(keys))  # an instance attribute: the class keeps its own


def _family_of(model: nn.Module) -> Family:
    for f in families():
        if isinstance(model, f.architectures):
            return f
    raise ValueError(f"adallm: {type(model).__name__} is not supported; adallm.patch supports "
                     f"{', '.join(supported_architectures())}")


def _linear(linears: list[nn.Linear], parts: tuple[str, ...], quantize: bool, method: str,
            hessian: torch.Tensor | None = None) -> NVFP4Linear:
    """One (fused) NVFP4Linear from nn.Linears: quantized, or empty with the same shape/device/dtype."""
    if quantize:
        return NVFP4Linear.from_dense(linears, parts, method=method, hessian=hessian)
    sizes = tuple(lin.out_features for lin in linears)
    w = linears[0].weight
    return NVFP4Linear(linears[0].in_features, sum(sizes), linears[0].bias is not None, parts,
                       sizes if parts else (), device=w.device, dtype=w.dtype)


def _attention(hf_attn: nn.Module, family: Family, quantize: bool, method: str,
               hessians: dict[str, torch.Tensor] | None) -> NVFP4Attention:
    h = hessians or {}  # keys: adallm/calibration.py
    qkv = _linear([hf_attn.q_proj, hf_attn.k_proj, hf_attn.v_proj], ("q_proj", "k_proj", "v_proj"), quantize, method,
                  h.get("self_attn.q_proj"))
    o = _linear([hf_attn.o_proj], (), quantize, method, h.get("self_attn.o_proj"))
    # scaling and sliding_window are read from the HF module, so they follow its family's rules exactly.
    return NVFP4Attention(hf_attn.config, hf_attn.layer_idx, qkv, o, hf_attn.q_norm, hf_attn.k_norm,
                          head_dim=hf_attn.head_dim, scaling=hf_attn.scaling, sliding_window=hf_attn.sliding_window,
                          apply_rotary=family.apply_rotary, eager_attention=family.eager_attention,
                          norm_weight_offset=family.norm_weight_offset)


def _patch_mlp(layer: nn.Module, family: Family, quantize: bool, method: str,
               hessians: dict[str, torch.Tensor] | None) -> None:
    mlp, h = layer.mlp, hessians or {}
    if hasattr(mlp, "experts") and hasattr(mlp, "gate"):  # MoE block: swap the experts, keep block and router
        ex = mlp.experts
        if quantize:
            eh = (h["mlp.experts.gate_up_proj"], h["mlp.experts.down_proj"]) if hessians is not None else None
            mlp.experts = NVFP4Experts.from_dense(ex.gate_up_proj, ex.down_proj, ex.act_fn, method, eh)
        else:
            e, two_i, h = ex.gate_up_proj.shape
            mlp.experts = NVFP4Experts(e, h, two_i // 2, ex.act_fn, device=ex.gate_up_proj.device)
        if family.moe_router is not None:
            mlp.gate.__class__ = family.moe_router  # a subclass adding no state: the router keeps its weight
    elif all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        layer.mlp = NVFP4MLP(_linear([mlp.gate_proj, mlp.up_proj], ("gate_proj", "up_proj"), quantize, method,
                                     h.get("mlp.gate_proj")),
                             _linear([mlp.down_proj], (), quantize, method, h.get("mlp.down_proj")), mlp.act_fn)
    else:
        raise ValueError(f"adallm: unexpected MLP module {type(mlp).__name__}")
