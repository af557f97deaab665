"""compressed-tensors (llm-compressor) NVFP4 checkpoints, format "nvfp4-pack-quantized": config and naming.

On disk, per quantized projection `P`:
  P.weight_packed        uint8          [N, K/2]   packed E2M1, element 2i in the low nibble
  P.weight_scale         float8_e4m3fn  [N, K/16]
  P.weight_global_scale  float32        [1]        = 1 / global  (the reciprocal of ModelOpt's weight_scale_2)
  P.input_global_scale   float32        [1]        = 1 / activation global (W4A4 schemes only)
config.json quantization_config: {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
  "quantization_status": "compressed", "config_groups": {"group_0": {"targets": ["Linear"], "weights":
  {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, ...},
  "input_activations": {...} | null}}, "ignore": ["lm_head", "re:.*mlp.gate$"], "kv_cache_scheme": ...}
A module is quantized when some group's `targets` matches it and no `ignore` entry does. Entries are a
class name ("Linear"), an exact module name, or "re:<regex>" (re.match on the module name).
"""
from __future__ import annotations

import re

import torch

from .formats import QuantSpec, unsupported

NAME = "compressed-tensors"
FORMAT = "nvfp4-pack-quantized"
WEIGHT, SCALE, GLOBAL, INPUT = "weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"


def _matches(name: str, entry: str) -> bool:
    if entry.startswith("re:"):
        return re.match(entry[3:], name) is not None
    return entry == "Linear" or name == entry or name.endswith("." + entry)


def parse(qc: dict, source: str) -> QuantSpec:
    """config.json quantization_config -> QuantSpec; raises unless every group is NVFP4 packed."""
    groups = qc.get("config_groups") or {}
    if not groups:
        raise unsupported(source, "compressed-tensors config without config_groups", f"format {FORMAT!r}")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise unsupported(source, f"compressed-tensors quantization_status {status!r} (weights not packed)",
                          f"format {FORMAT!r}, status 'compressed'")
    targets = []
    for gname, g in groups.items():
        fmt = g.get("format") or qc.get("format")
        w = g.get("weights") or {}
        nvfp4 = (w.get("num_bits") == 4 and w.get("type") == "float" and w.get("strategy") == "tensor_group"
                 and w.get("group_size") == 16)
        if fmt != FORMAT or not nvfp4:
            desc = f"format {fmt!r}, weights {{num_bits: {w.get('num_bits')}, type: {w.get('type')!r}, " \
                   f"strategy: {w.get('strategy')!r}, group_size: {w.get('group_size')}}}"
            raise unsupported(source, f"compressed-tensors group {gname!r} with {desc}",
                              f"format {FORMAT!r}: 4-bit float weights, tensor_group strategy, group_size 16")
        targets += list(g.get("targets") or [])
    ignore = list(qc.get("ignore") or [])
    kv = qc.get("kv_cache_scheme")
    kv_algo = "FP8" if isinstance(kv, dict) and kv.get("type") == "float" and kv.get("num_bits") == 8 else None

    def excluded(name: str) -> bool:
        return any(_matches(name, e) for e in ignore) or not any(_matches(name, t) for t in targets)

    return QuantSpec(NAME, "NVFP4", 16, ignore, kv_algo, excluded=excluded)


def tensor_names(prefix: str) -> dict[str, str]:
    return {"weight": f"{prefix}.{WEIGHT}", "scale": f"{prefix}.{SCALE}", "global": f"{prefix}.{GLOBAL}",
            "input": f"{prefix}.{INPUT}"}


def global_from_disk(t: torch.Tensor) -> torch.Tensor:
    """weight_global_scale as stored (1 / global) -> the global scale, fp32 []."""
    return (1.0 / t.float()).reshape(())


def input_from_disk(t: torch.Tensor) -> torch.Tensor:
    """input_global_scale as stored (1 / activation global) -> the activation global scale, fp32 []."""
    return (1.0 / t.float()).reshape(())
