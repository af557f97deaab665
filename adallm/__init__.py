"""AdaLLM: NVFP4 weights and an FP8 KV cache for transformers models on GPUs without FP4 tensor cores."""
import adallm_ops  # noqa: F401  (defines torch.ops.adallm.* and loads the CUDA kernels on a GPU machine)

from . import nvfp4
from .linear import NVFP4Linear

__all__ = ["nvfp4", "NVFP4Linear"]
