"""AdaLLM: NVFP4 weights and an FP8 KV cache for transformers models on GPUs without FP4 tensor cores."""
import adallm_ops  # noqa: F401  (defines torch.ops.adallm.* and loads the CUDA kernels on a GPU machine)

from . import nvfp4
from .kv_cache import Fp8KVCache
from .linear import FP8Linear, NVFP4Linear
from .patching import LM_HEADS, patch
from .checkpoint import from_pretrained, save_pretrained
from . import hf_quantizer  # noqa: F401,E402  (registers quant_method "modelopt" with transformers)

__all__ = ["nvfp4", "NVFP4Linear", "FP8Linear", "Fp8KVCache", "LM_HEADS", "patch", "from_pretrained", "save_pretrained"]
