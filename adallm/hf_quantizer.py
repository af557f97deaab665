"""quant_method "modelopt" for transformers: after `import adallm`,
`AutoModelForCausalLM.from_pretrained(modelopt_nvfp4_checkpoint)` returns the AdaLLM-patched model, packed.

transformers (5.17 - 5.24) has no ModelOpt quantizer; this one is added through its public hooks
(register_quantization_config / register_quantizer). Before weight loading, the meta model is patched with
empty NVFP4 modules (adallm.patch(quantize=False)); transformers then loads what it recognises (embeddings,
norms, routers, BF16 modules) and skips the per-projection NVFP4 tensors, which have no parameter of their
name; after loading, adallm.checkpoint fills every NVFP4 module from the same safetensors files, as
adallm.from_pretrained does. ModelOpt NVFP4 only: compressed-tensors checkpoints keep transformers' own
quantizer (which dequantizes to BF16); load them packed with adallm.from_pretrained.
"""
from __future__ import annotations

import os

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import checkpoint, modelopt
from .safetensors_io import SafetensorsReader

# Checkpoint tensors transformers finds no parameter for (read by adallm instead), and the patched modules'
# buffers it finds no tensor for (filled by adallm instead): not worth a warning.
_UNEXPECTED = [r"\.(weight_scale|weight_scale_2|input_scale|k_scale|v_scale)$", r"\.(q|k|v|gate|up)_proj\.weight$",
               r"experts\.\d+\.(gate|up|down)_proj\.", r"mlp\.experts\.(gate_up_proj|down_proj)$"]
_MISSING = [r"\.(qkv_proj|gate_up_proj)\.", r"\.weight_(scale|global_scale)$", r"experts\.(gate_up|down)_weight"]


@register_quantization_config(modelopt.NAME)
class ModelOptNVFP4Config(QuantizationConfigMixin):
    """A ModelOpt quantization_config as found in config.json (either shape documented in adallm/modelopt.py);
    every key is kept so the config serializes back unchanged."""

    def __init__(self, **kwargs) -> None:
        kwargs.pop("quant_method", None)
        self.quant_method = modelopt.NAME
        for k, v in kwargs.items():
            setattr(self, k, v)
        self.spec = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "spec"}


@register_quantizer(modelopt.NAME)
class ModelOptNVFP4Quantizer(HfQuantizer):
    """Loads ModelOpt NVFP4 checkpoints into AdaLLM's NVFP4 modules (pre-quantized checkpoints only)."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs) -> None:
        self.quantization_config.spec = modelopt.parse(self.quantization_config.to_dict(), "quantization_config")

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return torch.bfloat16 if dtype is None or dtype == torch.float32 else dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs) -> None:
        from .patching import patch
        if not checkpoint_files:
            raise ValueError("adallm: the modelopt quantizer loads safetensors checkpoints; none were found")
        self.reader = SafetensorsReader(os.path.dirname(checkpoint_files[0]))
        # lm_head as stored: packed NVFP4 or dense
        patch(model, quantize=False, lm_head="nvfp4" if "lm_head.weight_scale" in self.reader else "dense")
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | set(_UNEXPECTED)
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | set(_MISSING)

    def _process_model_after_weight_loading(self, model, **kwargs):
        device = model.get_input_embeddings().weight.device
        src = checkpoint.Source(self.reader, self.quantization_config.spec, device)
        checkpoint.fill_nvfp4_modules(model, src, progress=False)
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        # model.save_pretrained would write the fused in-memory layout; adallm.save_pretrained writes ModelOpt's.
        return False

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True
