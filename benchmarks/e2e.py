"""End-to-end benchmark (the same as `adallm bench`; see adallm/bench.py).

    python benchmarks/e2e.py qwen3-8b --out benchmarks/results/e2e_qwen3-8b.json
"""
import sys

from adallm import bench

if __name__ == "__main__":
    bench.main(sys.argv[1:])
