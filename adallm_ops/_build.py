"""Builds and loads the CUDA kernels in csrc/ (just in time, cached).

On `import adallm_ops` with a CUDA GPU present, csrc/ is compiled with ninja through
torch.utils.cpp_extension.load the first time (a few minutes) and loaded from the cache afterwards
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions). The .so registers the ops' CUDA impls with
TORCH_LIBRARY_IMPL(adallm, CUDA, m). `python -m adallm_ops.build` does the same ahead of time.

Targets: sm_80, sm_89 and sm_90 plus the GPU present (override with ADALLM_CUDA_ARCHS="8.9;9.0").
ADALLM_BUILD_VERBOSE=1 prints the compiler output; ADALLM_EXTRA_CUDA_CFLAGS adds nvcc flags.
If the build fails or the GPU is older than sm_80, every op's CUDA impl raises one error naming the
cause: a CUDA tensor never silently runs the CPU reference.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .ops import OP_NAMES

CSRC = Path(__file__).resolve().parent.parent / "csrc"
DEFAULT_ARCHS = ("8.0", "8.9", "9.0")
MIN_CAPABILITY = (8, 0)

load_error: str | None = None  # why the CUDA kernels are unavailable, or None once loaded


def cuda_arch_flags() -> list[str]:
    archs = os.environ.get("ADALLM_CUDA_ARCHS", "").replace(",", ";")
    archs = [a.strip() for a in archs.split(";") if a.strip()] or list(DEFAULT_ARCHS)
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if f"{major}.{minor}" not in archs:
            archs.append(f"{major}.{minor}")
    flags = []
    for a in archs:
        num = a.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def sources() -> list[str]:
    if not CSRC.is_dir():
        raise FileNotFoundError(f"CUDA sources not found at {CSRC}; install adallm from a source checkout "
                                "(pip install -e .)")
    files = sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))
    # Development aid: ADALLM_SOURCES="a.cu,b.cu" builds only those files (the other ops then have no
    # CUDA impl and say so when called).
    only = [s.strip() for s in os.environ.get("ADALLM_SOURCES", "").split(",") if s.strip()]
    if only:
        files = [f for f in files if f.name in only]
    if not files:
        raise FileNotFoundError(f"no CUDA sources in {CSRC}")
    return [str(f) for f in files]


def build(verbose: bool = False) -> None:
    """Compiles (if stale) and loads csrc/ into this process; raises on any failure."""
    from torch.utils.cpp_extension import load

    load(
        name="adallm_cuda",
        sources=sources(),
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O3"],  # torch adds the C++ standard its headers need
        extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo", *cuda_arch_flags(),
                           *os.environ.get("ADALLM_EXTRA_CUDA_CFLAGS", "").split()],
        is_python_module=False,
        verbose=verbose,
    )


def _register_unavailable(reason: str) -> None:
    def raiser(*args, **kwargs):
        raise RuntimeError(f"adallm: the CUDA kernels are unavailable: {reason}")

    for name in OP_NAMES:
        torch.library.impl(f"adallm::{name}", "CUDA")(raiser)


def load_cuda_kernels() -> None:
    """Called once at import: loads the kernels when a GPU is present, else does nothing."""
    global load_error
    if not torch.cuda.is_available() or os.environ.get("ADALLM_NO_CUDA_BUILD") == "1":
        return
    cap = torch.cuda.get_device_capability()
    if cap < MIN_CAPABILITY:
        load_error = (f"{torch.cuda.get_device_name()} is sm_{cap[0]}{cap[1]}; adallm needs sm_80 or newer "
                      "(Ampere, Ada, Hopper)")
    else:
        try:
            build(verbose=os.environ.get("ADALLM_BUILD_VERBOSE") == "1")
        except Exception as e:  # the cause is re-raised at every CUDA op call
            load_error = f"building csrc/ failed ({type(e).__name__}: {e})"
    if load_error is not None:
        _register_unavailable(load_error)
