#!/usr/bin/env bash
# One run on the GPU machine: build (sm_80/89/90, ptxas report), GPU tests, compute-sanitizer,
# kernel benchmarks, end-to-end benchmark. Everything lands in $OUT/gpu_check.tar.gz plus a summary.
#   bash benchmarks/gpu_check.sh [stages...]   stages: build tests sanitize linear attention e2e load (default: all)
set -uo pipefail
OUT=${OUT:-/tmp/adallm-out}
LOG=$OUT/logs
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 ADALLM_CUDA_ARCHS=${ADALLM_CUDA_ARCHS:-"8.0;8.9;9.0"}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
stages=${*:-"build tests sanitize linear attention e2e load"}
has() { [[ " $stages " == *" $1 "* ]]; }
commit=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}  # the device copy may have no .git
summary=$OUT/summary.txt
echo "commit $commit  $(date -u)" | tee "$summary"

{ nvidia-smi; python3 -c "import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)"; } \
  > "$LOG/env.txt" 2>&1
# The image has no network and no build backend to spare: import the checkout directly.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if has build; then
  # Ahead-of-time build with the ptxas resource report: registers, spills, stack per kernel and arch.
  ADALLM_EXTRA_CUDA_CFLAGS="-Xptxas -v" python3 -m adallm_ops.build -v > "$LOG/build.txt" 2>&1
  echo "build rc=$? warnings=$(grep -c -i 'warning' "$LOG/build.txt") spill-lines=$(grep -E 'bytes spill' "$LOG/build.txt" | grep -v ' 0 bytes spill stores, 0 bytes spill loads' | wc -l)" | tee -a "$summary"
fi
if has tests; then
  # CPU-only tests run in CI; here the GPU ones (the CUDA impls against the CPU reference).
  python3 -m pytest -q -m "cuda and not slow" -p no:cacheprovider > "$LOG/tests.txt" 2>&1
  echo "tests: $(tail -1 "$LOG/tests.txt")" | tee -a "$summary"
fi
if has sanitize; then
  compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/sanitize_ops.py \
    > "$LOG/sanitizer.txt" 2>&1
  echo "sanitizer rc=$? $(grep -E 'ERROR SUMMARY' "$LOG/sanitizer.txt" | tail -1)" | tee -a "$summary"
fi
if has linear; then
  python3 benchmarks/bench_linear.py --out "$LOG/linear.json" > "$LOG/bench_linear.txt" 2>&1
  echo "bench_linear rc=$?" | tee -a "$summary"
fi
if has attention; then
  python3 benchmarks/bench_attention.py --out "$LOG/attention.json" > "$LOG/bench_attention.txt" 2>&1
  echo "bench_attention rc=$?" | tee -a "$summary"
fi
if has e2e; then
  for m in ${E2E_MODELS:-qwen3-8b}; do
    python3 benchmarks/e2e.py "$m" ${E2E_ARGS:-} --out "$LOG/e2e_$m.json" > "$LOG/e2e_$m.txt" 2>&1
    echo "e2e $m rc=$?" | tee -a "$summary"
  done
fi
if has load; then
  python3 benchmarks/load_memory.py --out "$LOG/load_memory.json" > "$LOG/load_memory.txt" 2>&1
  echo "load_memory rc=$?" | tee -a "$summary"
fi
tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" logs
cat "$summary"
