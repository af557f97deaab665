"""adallm_ops: the `torch.ops.adallm` op library (schemas, fake impls, CPU reference, CUDA kernels).

Depends on torch only. Importing it defines the ops; on a machine with a CUDA GPU it also builds (once,
cached) and loads the CUDA kernels from csrc/.
"""
from . import ops, reference  # noqa: F401  (defining the schemas and the CPU impls is the import's effect)
from ._build import load_cuda_kernels
from .ops import (fp8_decode_attention, fp8_kv_write, fp8_linear, moe_router_topk, nvfp4_linear, nvfp4_linear_glu,
                  nvfp4_moe_linear, nvfp4_quantize, qk_norm_rope_kv_write)

load_cuda_kernels()

__all__ = ["nvfp4_linear", "nvfp4_linear_glu", "fp8_linear", "nvfp4_quantize", "nvfp4_moe_linear", "moe_router_topk",
           "fp8_kv_write", "qk_norm_rope_kv_write", "fp8_decode_attention"]
