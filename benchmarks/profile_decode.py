"""Where a decode step's time goes: wall time per generate step against the GPU's kernel time per step,
and the kernels by total time. A step whose wall time is well above its kernel time is host-bound.

    python benchmarks/profile_decode.py qwen3-8b [--batch 1] [--new-tokens 32] [--bf16 | --lm-head fp8]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import adallm
from adallm import bench


def kernel_seconds(fn) -> tuple[float, "profile"]:
    """Runs fn under the profiler: (sum of GPU kernel time in s, the profile)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    return total / 1e6, prof


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=f"a shape set ({', '.join(bench.SHAPES)}) or a model id/path")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--bf16", action="store_true", help="profile the unpatched BF16 model (static cache)")
    p.add_argument("--lm-head", choices=adallm.LM_HEADS, default="dense", help="adallm.patch(lm_head=...)")
    a = p.parse_args()
    model = bench.build_model(a.model)
    kw = dict(cache_implementation="static") if a.bf16 else {}
    if not a.bf16:
        adallm.patch(model, lm_head=a.lm_head, progress=False)
    gen = bench._generate(model, a.batch, a.prompt_len, **kw)
    n = a.new_tokens
    gen(n + 1)  # compiles
    gen(n + 1)
    wall = (bench._timed(lambda: gen(n + 1), 3) - bench._timed(lambda: gen(1), 3)) / n
    k_all, prof = kernel_seconds(lambda: gen(n + 1))
    k_prefill, _ = kernel_seconds(lambda: gen(1))
    gpu = (k_all - k_prefill) / n
    print(f"{a.model} {'bf16' if a.bf16 else bench.adallm_label(a.lm_head)} batch {a.batch}: wall {wall * 1e3:.3f} ms/step, "
          f"GPU kernels {gpu * 1e3:.3f} ms/step, GPU busy {100 * gpu / wall:.0f}%")
    print(f"(kernel table: generate of 1 + {n} tokens, prefill included)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90))


if __name__ == "__main__":
    main()
