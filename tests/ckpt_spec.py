"""Tiny checkpoints written straight from the format specs, independently of adallm.checkpoint.

ModelOpt (docs of the unified HF export / vLLM's ModelOpt loader): per projection `P`: P.weight uint8
[N, K/2], P.weight_scale float8_e4m3fn [N, K/16], P.weight_scale_2 float32 [] (= global), P.input_scale
float32 []; KV scales P(k_proj).k_scale / P(v_proj).v_scale; hf_quant_config.json {"producer",
"quantization": {"quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo", "exclude_modules"}}.
compressed-tensors ("nvfp4-pack-quantized"): P.weight_packed, P.weight_scale, P.weight_global_scale float32
[1] (= 1/global), P.input_global_scale [1]; config.json quantization_config with config_groups / ignore.
MoE experts are stored per expert (mlp.experts.{e}.{gate,up,down}_proj), Gemma3ForConditionalGeneration
with its transformers-4 names (language_model.model.*, vision_tower.*, multi_modal_projector.*).
Codes and block scales come from torch.ops.adallm.nvfp4_quantize (the ModelOpt recipe, checked bit for bit
against a plain re-derivation in test_quantizer.py); the reference weights are dequantized here in float64.
"""
from __future__ import annotations

import copy
import json
import os
import re

import torch
from safetensors.torch import save_file

import adallm_ops  # noqa: F401

E2M1 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64)
# projections AdaLLM runs in NVFP4 (module names in the transformers 5 namespace)
QUANTIZED = re.compile(r"^(?!.*vision_tower)(.*\.)?layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)$")
TEXT = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64)  # the decode op's smallest head_dim


def tiny_config(family: str):
    from transformers import Gemma3Config, Gemma3TextConfig, Qwen3Config, Qwen3MoeConfig
    if family == "qwen3":
        return Qwen3Config(**TEXT, intermediate_size=96, tie_word_embeddings=False)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**TEXT, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                              num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False)
    text = dict(TEXT, intermediate_size=96, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    if family == "gemma3_text":
        return Gemma3TextConfig(**text)
    return Gemma3Config(text_config=text, vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, image_size=32, patch_size=8), mm_tokens_per_image=4,
                        image_token_index=127, boi_token_index=125, eoi_token_index=126)


def hf_model(family: str, seed: int = 0):
    """A random float32 transformers model of the family (weights ~ N(0, 0.05), norms perturbed)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.05 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 and
                                                                           "norm" in n and "gemma" not in family else 0))
    return model


def hub_tensors(model, family: str) -> dict[str, torch.Tensor]:
    """The model's weights under hub checkpoint names (float32)."""
    out = {}
    for k, v in model.state_dict().items():
        m = re.match(r"(.*mlp\.experts)\.(gate_up_proj|down_proj)$", k)
        if m:
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                if m.group(2) == "down_proj":
                    out[f"{m.group(1)}.{e}.down_proj.weight"] = v[e]
                else:
                    out[f"{m.group(1)}.{e}.gate_proj.weight"] = v[e, :inter]
                    out[f"{m.group(1)}.{e}.up_proj.weight"] = v[e, inter:]
            continue
        out[k] = v
    if family == "gemma3":
        out.pop("lm_head.weight")  # tied to the embeddings
        out = {re.sub(r"^model\.language_model\.", "language_model.model.",
                      re.sub(r"^model\.(vision_tower|multi_modal_projector)\.", r"\1.", k)): v for k, v in out.items()}
    elif model.config.get_text_config().tie_word_embeddings:
        out.pop("lm_head.weight")
    return {k: v.clone().contiguous() for k, v in out.items()}


def _groups(names: list[str]) -> list[list[str]]:
    """Fused groups (q/k/v of one attention, gate/up of one MLP or expert), single projections alone."""
    groups: dict[str, list[str]] = {}
    for n in names:
        key = re.sub(r"\.([qkv]_proj|gate_proj|up_proj)\.weight$", r".\1-group", n)
        key = re.sub(r"\.[qkv]_proj-group$", ".qkv", re.sub(r"\.(gate|up)_proj-group$", ".gu", key))
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def dequant64(packed: torch.Tensor, scale: torch.Tensor, global_scale: float) -> torch.Tensor:
    codes = torch.stack((packed & 15, packed >> 4), -1).flatten(-2).long()
    return E2M1[codes] * scale.double().repeat_interleave(16, -1) * global_scale


def _shard_write(tensors: dict[str, torch.Tensor], d: str, shards: int) -> None:
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::shards]}
        save_file(part, os.path.join(d, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def _write_config(model, d: str, quantization_config: dict | None) -> None:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def write_bf16(model, family: str, d: str, shards: int = 1) -> None:
    os.makedirs(d, exist_ok=True)
    _shard_write({k: v.to(torch.bfloat16) for k, v in hub_tensors(model, family).items()}, d, shards)
    _write_config(model, d, None)


def write_nvfp4(model, family: str, d: str, fmt: str, shards: int = 2, global_ratio: dict[str, float] | None = None,
                kv_scales: bool = False, keep_bf16: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Writes an NVFP4 checkpoint of `model`; returns {hub weight name: float64 dequantized weight}.

    Fused groups share one global (max amax / 2688) unless global_ratio maps a projection-name regex to
    a factor multiplying that projection's own global (to write groups with different globals).
    keep_bf16: module names stored unquantized and listed in exclude_modules / ignore.
    """
    os.makedirs(d, exist_ok=True)
    tensors = hub_tensors(model, family)
    qnames = [k for k in tensors if k.endswith(".weight") and QUANTIZED.search(_model_name(k[:-7]))
              and k[:-7] not in keep_bf16]
    ref = {}
    for group in _groups(qnames):
        shared = max(tensors[n].abs().amax().item() for n in group) / 2688.0
        for n in group:
            g = shared
            for pat, r in (global_ratio or {}).items():
                if re.search(pat, n):
                    g = shared * r
            w = tensors.pop(n)
            gt = torch.tensor(g, dtype=torch.float32)
            packed, scale = torch.ops.adallm.nvfp4_quantize(w.float(), gt)
            ref[n] = dequant64(packed, scale, gt.item() if fmt == "modelopt" else 1.0 / (1.0 / gt).item())
            p = n[:-7]
            if fmt == "modelopt":
                tensors.update({f"{p}.weight": packed, f"{p}.weight_scale": scale, f"{p}.weight_scale_2": gt,
                                f"{p}.input_scale": torch.tensor(0.01)})
            else:
                tensors.update({f"{p}.weight_packed": packed, f"{p}.weight_scale": scale,
                                f"{p}.weight_global_scale": (1.0 / gt).reshape(1),
                                f"{p}.input_global_scale": torch.tensor([100.0])})
    if kv_scales:
        for k in [k for k in tensors if k.endswith("self_attn.k_proj.weight_scale")]:
            a = k[: -len(".k_proj.weight_scale")]
            tensors[f"{a}.k_proj.k_scale"], tensors[f"{a}.v_proj.v_scale"] = torch.tensor(0.5), torch.tensor(0.25)
    tensors = {k: v.to(torch.bfloat16) if v.dtype == torch.float32 and v.dim() > 0 and v.numel() > 1 else v
               for k, v in tensors.items()}
    if fmt == "modelopt":
        excl = ["lm_head", "*.mlp.gate", "vision_tower*", "multi_modal_projector*", *keep_bf16]
        quant = {"quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": "FP8" if kv_scales else None,
                 "exclude_modules": excl}
        with open(os.path.join(d, "hf_quant_config.json"), "w") as f:
            json.dump({"producer": {"name": "modelopt", "version": "0.29.0"}, "quantization": quant}, f)
        qc = {"quant_method": "modelopt", "producer": {"name": "modelopt"}, "quantization": quant}
    else:
        scheme = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
                  "dynamic": False, "observer": "minmax"}
        qc = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status":
              "compressed", "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme,
                                                          "input_activations": dict(scheme, dynamic="local"),
                                                          "format": "nvfp4-pack-quantized"}},
              "ignore": ["lm_head", "re:.*mlp.gate$", "re:vision_tower.*", "re:multi_modal_projector.*", *keep_bf16],
              "kv_cache_scheme": None}
    _shard_write(tensors, d, shards)
    _write_config(model, d, qc)
    return ref


def _model_name(hub_name: str) -> str:
    return re.sub(r"^language_model\.model\.", "model.language_model.", hub_name)


def reference_model(model, ref: dict[str, torch.Tensor]):
    """A float32 copy of `model` with each quantized weight replaced by its dequantized value."""
    out = copy.deepcopy(model)
    sd = out.state_dict()
    for n, w in ref.items():
        name = _model_name(n)
        m = re.match(r"(.*mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", name)
        if m:
            e, which = int(m.group(2)), m.group(3)
            if which == "down":
                sd[f"{m.group(1)}.down_proj"][e] = w.float()
            else:
                inter = sd[f"{m.group(1)}.gate_up_proj"].shape[1] // 2
                rows = slice(0, inter) if which == "gate" else slice(inter, 2 * inter)
                sd[f"{m.group(1)}.gate_up_proj"][e, rows] = w.float()
        else:
            sd[name].copy_(w.float())
    return out
