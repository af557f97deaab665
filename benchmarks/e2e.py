"""End-to-end benchmark (same as `adallm bench`), recording the git commit in the JSON.

    python benchmarks/e2e.py qwen3-8b --out benchmarks/results/e2e_qwen3-8b.json
"""
import json
import os
import subprocess
import sys

from adallm import bench

if __name__ == "__main__":
    bench.main(sys.argv[1:])
    if "--out" in sys.argv:
        path = sys.argv[sys.argv.index("--out") + 1]
        with open(path) as f:
            res = json.load(f)
        # GIT_COMMIT: set by whoever copies the tree to a GPU machine without its .git
        res["commit"] = os.environ.get("GIT_COMMIT") or subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
