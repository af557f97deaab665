"""Instruction mix of a kernel's main loop, from the SASS of a build (no GPU needed): the figures "SASS per 4 KB
item" in benchmarks/results/linear_notes.md come from here.

The loop is the tightest backward branch whose range holds every tensor-core MMA (HMMA, or QMMA for FP8 on
sm_89) of the kernel (the GEMV's item or block loop); kernels without one report the whole function. Needs
cuobjdump (CUDA toolkit, or the copy that triton ships in a CUDA build of torch) and an object file compiled for
the arch, e.g. after
`ADALLM_CUDA_ARCHS=9.0 ADALLM_SOURCES=nvfp4_ops.cu TORCH_EXTENSIONS_DIR=/tmp/ext python -m adallm_ops.build`
(on a machine without a GPU the link fails after the object is written, which is enough):

    python benchmarks/sass_mix.py /tmp/ext/adallm_cuda/nvfp4_ops.cuda.o --kernel 'gemv_kernel.*bfloat16.*Li1ELi4E'
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
from pathlib import Path

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
MMA_OPS = ("HMMA", "QMMA")  # fp16/bf16 and (sm_89) FP8 tensor-core MMAs


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        triton = None
    if triton is not None:
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    raise SystemExit("cuobjdump not found: install the CUDA toolkit or a CUDA build of torch (triton ships one)")


def functions(sass: str) -> dict[str, list[tuple[int, str, str]]]:
    """Mangled name -> [(address, opcode, operands)] for every function in cuobjdump's output."""
    out = {}
    parts = re.split(r"\n\s*Function : (\S+)", sass)
    for name, body in zip(parts[1::2], parts[2::2]):
        out[name] = [(int(a, 16), op, rest) for a, op, rest in INSTRUCTION.findall(body)]
    return out


def main_loop(ins: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    mma = [a for a, op, _ in ins if op.startswith(MMA_OPS)]
    if not mma:
        return ins
    loops = []
    for a, op, rest in ins:
        target = re.fullmatch(r"\s*(0x[0-9a-f]+)\s*", rest)
        if op == "BRA" and target and int(target.group(1), 16) <= min(mma) and a >= max(mma):
            loops.append((int(target.group(1), 16), a))
    if not loops:
        return ins
    lo, hi = min(loops, key=lambda r: r[1] - r[0])
    return [i for i in ins if lo <= i[0] <= hi]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("obj", help="object file (.o / .so / cubin) holding the kernel")
    p.add_argument("--kernel", default="gemv", help="regex on the mangled kernel name (default: gemv)")
    p.add_argument("--arch", default="sm_90")
    a = p.parse_args()
    sass = subprocess.run([cuobjdump(), "-sass", "-arch", a.arch, a.obj], check=True, capture_output=True,
                          text=True).stdout
    found = {n: ins for n, ins in functions(sass).items() if re.search(a.kernel, n)}
    if not found:
        raise SystemExit(f"no kernel matching {a.kernel!r} for {a.arch} in {a.obj}")
    for name, ins in found.items():
        loop = main_loop(ins)
        mix = collections.Counter(op.split(".")[0] for _, op, _ in loop)
        print(f"{name}\n  {len(ins)} instructions, main loop {len(loop)} "
              f"({sum(op.startswith(MMA_OPS) for _, op, _ in loop)} MMA)")
        print("  " + ", ".join(f"{op} {n}" for op, n in mix.most_common()))


if __name__ == "__main__":
    main()
