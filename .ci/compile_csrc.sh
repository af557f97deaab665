#!/usr/bin/env bash
# Compiles csrc/ for sm_80, sm_89 and sm_90 with nvcc and a CUDA build of torch, on a machine without
# a GPU (nothing runs): a build break or a compiler warning fails CI. Skipped where nvcc is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "compile check skipped: no nvcc"; exit 0; }
VENV=${ADALLM_CUDA_VENV:-/tmp/adallm-cuda-venv}
[ -x "$VENV/bin/python" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q torch==2.14.1 ninja; }
# The CUDA runtime headers and library come with torch's nvidia wheels; link against them.
NV=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/nvidia/cu13
LIB=$(mktemp -d)
ln -s "$NV/lib/libcudart.so.13" "$LIB/libcudart.so"
export CPATH="$NV/include" LIBRARY_PATH="$LIB" TORCH_EXTENSIONS_DIR="$(mktemp -d)"
export ADALLM_CUDA_ARCHS="8.0;8.9;9.0" ADALLM_EXTRA_CUDA_CFLAGS="-Werror all-warnings -Xptxas -warn-spills"
"$VENV/bin/python" -c "from adallm_ops._build import build; build()"
echo "csrc/ compiled for sm_80, sm_89, sm_90 with no warnings"
