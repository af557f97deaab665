"""NVIDIA ModelOpt NVFP4 checkpoints ("unified HF" export): config parsing and tensor naming.

On disk, per quantized projection `P` (e.g. model.layers.0.self_attn.q_proj):
  P.weight          uint8          [N, K/2]   packed E2M1, element 2i in the low nibble (our canonical layout)
  P.weight_scale    float8_e4m3fn  [N, K/16]
  P.weight_scale_2  float32        [] (or [1])  the global scale itself: w = e2m1 * scale * weight_scale_2
  P.input_scale     float32        []          activation global scale (W4A4 deployments; unused by AdaLLM,
                                               carried through so a re-saved checkpoint keeps it)
KV-cache scales, when `kv_cache_quant_algo` is FP8: `...k_proj.k_scale`, `...v_proj.v_scale` (float32 []).

The quantization config appears in two shapes; both are accepted:
  hf_quant_config.json (and older config.json):  {"producer": {...}, "quantization": {"quant_algo": "NVFP4",
      "group_size": 16, "kv_cache_quant_algo": null | "FP8", "exclude_modules": ["lm_head", ...]}}
  newer config.json quantization_config:         {"quant_method": "modelopt", "quant_algo": "NVFP4",
      "group_size": 16, "kv_cache_scheme": {...}, "ignore": [...], ...}
`exclude_modules` entries are fnmatch wildcards over module names ("lm_head", "model.layers.*.mlp.gate",
"vision_tower*"); those modules are stored in BF16.
"""
from __future__ import annotations

import fnmatch

import torch

from .formats import QuantSpec, unsupported

NAME = "modelopt"
# "W4A16_NVFP4" has the same weight tensors as "NVFP4" minus input_scale (weight-only deployments).
SUPPORTED_ALGOS = ("NVFP4", "W4A16_NVFP4")
WEIGHT, SCALE, GLOBAL, INPUT = "weight", "weight_scale", "weight_scale_2", "input_scale"


def parse(qc: dict, source: str) -> QuantSpec:
    """quantization config dict (either shape above) -> QuantSpec; raises on anything but NVFP4/16."""
    q = qc["quantization"] if isinstance(qc.get("quantization"), dict) else qc
    algo = str(q.get("quant_algo") or "").upper()
    if algo not in SUPPORTED_ALGOS:
        raise unsupported(source, f"ModelOpt quant_algo {q.get('quant_algo')!r}", f"quant_algo in {SUPPORTED_ALGOS}")
    group = int(q.get("group_size") or 16)
    if group != 16:
        raise unsupported(source, f"ModelOpt NVFP4 group_size {group}", "group_size 16")
    kv = q.get("kv_cache_quant_algo")
    scheme = q.get("kv_cache_scheme")
    if kv is None and isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8:
        kv = "FP8"
    exclude = list(q.get("exclude_modules", q.get("ignore", [])) or [])
    return QuantSpec(NAME, algo, group, exclude, str(kv).upper() if kv else None, 
                     excluded=lambda name: is_excluded(name, exclude))


def is_excluded(name: str, patterns: list[str]) -> bool:
    """ModelOpt's rule: each pattern is an fnmatch wildcard over module names ("vision_tower*", "lm_head")."""
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def tensor_names(prefix: str) -> dict[str, str]:
    return {"weight": f"{prefix}.{WEIGHT}", "scale": f"{prefix}.{SCALE}", "global": f"{prefix}.{GLOBAL}",
            "input": f"{prefix}.{INPUT}"}


def global_from_disk(t: torch.Tensor) -> torch.Tensor:
    """weight_scale_2 as stored -> the global scale, fp32 []."""
    return t.float().reshape(())


def input_from_disk(t: torch.Tensor) -> torch.Tensor:
    """input_scale as stored -> the activation global scale (amax / (6 * 448)), fp32 []."""
    return t.float().reshape(())


def hf_quant_config(algo: str, exclude: list[str], kv_cache_quant_algo: str | None, version: str) -> dict:
    """The hf_quant_config.json that save_pretrained writes (vLLM requires all four quantization keys)."""
    return {"producer": {"name": "adallm", "version": version},
            "quantization": {"quant_algo": algo, "group_size": 16, "kv_cache_quant_algo": kv_cache_quant_algo,
                             "exclude_modules": exclude}}
