"""`python -m adallm_ops.build [-v]`: compile the CUDA kernels ahead of time (fills the JIT cache)."""
import sys

from ._build import build

if __name__ == "__main__":
    build(verbose="-v" in sys.argv)
    print("adallm CUDA kernels built and loaded")
