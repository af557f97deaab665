"""Load time and peak memory of a Qwen3-8B-shaped ModelOpt NVFP4 checkpoint (random weights).

    python benchmarks/load_memory.py                      # GPU: writes /tmp/adallm-qwen3-8b-nvfp4, measures
    python benchmarks/load_memory.py --layers 2 --device cpu   # quick smoke run anywhere

1. The checkpoint is made with adallm.save_pretrained from a patched Qwen3-8B-shaped model whose NVFP4
   buffers hold random codes and scales (never a BF16 copy), so it is exactly what AdaLLM writes.
2. Each measured load runs in a fresh process: adallm.from_pretrained (and, for comparison,
   AutoModelForCausalLM.from_pretrained through AdaLLM's "modelopt" quantizer). Reported: wall time,
   peak device memory (torch.cuda.max_memory_allocated / reserved), peak host RSS (VmHWM; it counts
   the checkpoint pages touched through the file mapping, so it is an upper bound of private memory),
   and the packed size = bytes of every parameter and buffer of the loaded model. The checkpoint is
   written in its own process too, so no measurement inherits its memory.
With --bf16 it also writes a BF16 checkpoint of the same shape and measures quantize-on-load from it
(expected peak: the NVFP4 model plus one layer's largest BF16 group, gate/up = 201 MB at Qwen3-8B).
Pass criterion (issue 4): peak device allocated <= 1.1 x packed size (for the packed loads). The file is usually still in the page
cache from step 1 (warm load); the JSON says so.
Results: benchmarks/results/load_memory.json (GPU name, versions, git commit).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from adallm.bench import SHAPES  # noqa: E402

QWEN3_8B = {k: v for k, v in SHAPES["qwen3-8b"].items() if k != "model_type"}


def write_checkpoint(path: str, layers: int, device: str) -> None:
    """Random Qwen3-8B-shaped NVFP4 model -> adallm.save_pretrained(path)."""
    from transformers import Qwen3Config

    import adallm
    from adallm.checkpoint import _is_experts, _set, _skeleton
    from adallm.linear import NVFP4Linear

    cfg = Qwen3Config(**dict(QWEN3_8B, num_hidden_layers=layers))
    model = _skeleton(cfg, torch.bfloat16)
    adallm.patch(model, quantize=False, progress=False)
    g = torch.Generator(device).manual_seed(0)
    # e4m3 block scales in [1, 448): random exponent/mantissa bytes 0x38..0x7e (finite, positive)
    for mod in model.modules():
        if isinstance(mod, NVFP4Linear) or _is_experts(mod):
            for name, b in list(mod._buffers.items()):
                if b is None:
                    continue
                if b.dtype == torch.uint8:
                    t = torch.randint(0, 256, b.shape, dtype=torch.uint8, device=device, generator=g)
                elif b.dtype == torch.float8_e4m3fn:
                    t = torch.randint(0x38, 0x7f, b.shape, dtype=torch.uint8, device=device, generator=g).view(
                        torch.float8_e4m3fn)
                else:
                    t = torch.full(b.shape, 1e-4, dtype=b.dtype, device=device)
                _set(mod, name, t)
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device.type == "meta":
                _set(mod, name, torch.randn(p.shape, dtype=p.dtype, device=device, generator=g) * 0.02)
    model.to(device)
    adallm.save_pretrained(model, path)


def write_bf16_checkpoint(path: str, layers: int, device: str) -> None:
    """Random Qwen3-8B-shaped BF16 model -> transformers save_pretrained (the quantize-on-load source)."""
    from transformers import AutoModelForCausalLM, Qwen3Config
    cfg = Qwen3Config(**dict(QWEN3_8B, num_hidden_layers=layers))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def peak_rss() -> int:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it does not inherit the parent's peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure(path: str, device: str, how: str) -> dict:
    """One load in this (fresh) process."""
    import adallm
    rss0 = peak_rss()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    if how in ("adallm", "quantize-on-load"):
        model = adallm.from_pretrained(path, device=device, progress=False)
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, device_map=device)
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    packed = model_bytes(model)
    out = {"how": how, "load_s": round(secs, 2), "packed_bytes": packed,
           "peak_host_rss_bytes": peak_rss(),
           "host_rss_before_load_bytes": rss0}
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
        out.update(peak_device_allocated_bytes=peak, peak_device_reserved_bytes=torch.cuda.max_memory_reserved(),
                   peak_over_packed=round(peak / packed, 4), passes_1_1x=peak <= 1.1 * packed)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", default="/tmp/adallm-qwen3-8b-nvfp4")
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--device", default="cuda")
    p.add_argument("--skip-write", action="store_true", help="reuse the checkpoint at --path")
    p.add_argument("--no-automodel", action="store_true", help="skip the AutoModelForCausalLM load")
    p.add_argument("--bf16", action="store_true", help="also write a BF16 checkpoint (16 GB at 36 layers) and "
                   "measure quantize-on-load from it")
    p.add_argument("--measure", choices=["write", "write-bf16", "adallm", "automodel", "quantize-on-load"],
                   help=argparse.SUPPRESS)  # child process
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "load_memory.json"))
    a = p.parse_args()
    if a.measure == "write":
        write_checkpoint(a.path, a.layers, a.device)
        return
    if a.measure == "write-bf16":
        write_bf16_checkpoint(a.path, a.layers, a.device)
        return
    if a.measure:
        print(json.dumps(measure(a.path, a.device, a.measure)))
        return
    if not a.skip_write:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--path", a.path, "--device", a.device, "--layers", str(a.layers),
                        "--measure", "write"], check=True)
        print(f"wrote {a.path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    files = [f for f in os.listdir(a.path) if f.endswith(".safetensors")]
    ckpt_bytes = sum(os.path.getsize(os.path.join(a.path, f)) for f in files)
    runs = []
    jobs = [("adallm", a.path)] + ([] if a.no_automodel else [("automodel", a.path)])
    if a.bf16:
        bf16 = a.path + "-bf16"
        subprocess.run([sys.executable, __file__, "--path", bf16, "--device", a.device, "--layers", str(a.layers),
                        "--measure", "write-bf16"], check=True)
        jobs.append(("quantize-on-load", bf16))
    for how, path in jobs:
        r = subprocess.run([sys.executable, __file__, "--path", path, "--device", a.device, "--measure", how],
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{how} load failed:\n{r.stderr[-4000:]}")
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), file=sys.stderr)
    import transformers

    from adallm.bench import git_commit
    res = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "git_commit": git_commit(),
           "model": f"Qwen3-8B-shaped ({a.layers} layers), ModelOpt NVFP4, lm_head BF16, random weights",
           "checkpoint_bytes": ckpt_bytes, "page_cache": "warm (written just before)" if not a.skip_write else "unknown",
           "runs": runs}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
