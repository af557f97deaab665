"""`python -m adallm_ops.build`: compile the CUDA kernels ahead of time (fills the JIT cache).

With a GPU present, importing adallm_ops already builds and loads them; this reports the outcome. Without
one, it compiles for ADALLM_CUDA_ARCHS (default sm_80, sm_89, sm_90). ADALLM_BUILD_VERBOSE=1 shows the
compiler's output (with ADALLM_EXTRA_CUDA_CFLAGS="-Xptxas -v": registers and spills per kernel).
"""
import os

import torch

from . import _build

if __name__ == "__main__":
    if not torch.cuda.is_available():
        _build.build(verbose=os.environ.get("ADALLM_BUILD_VERBOSE") == "1")
    elif _build.load_error is not None:
        raise SystemExit(f"adallm: {_build.load_error}")
    print("adallm CUDA kernels built and loaded")
