#!/usr/bin/env bash
# Same-machine A/B of a candidate patch: a = this tree, b = a copy of it with PATCH applied. Builds the CUDA ops of
# both (in parallel, one extension directory each), then runs COMMAND in a and in b alternately, ROUNDS times, each
# run its own process, its output in $OUT/ab_<a|b><round>.txt, and prints each run's last line. Alternating rounds
# show the spread between processes of the same code, which a difference between a and b must beat (the kernel A/Bs
# of benchmarks/results/*_experiment.txt were run this way).
#   bash benchmarks/ab.sh PATCH ROUNDS COMMAND...
#   bash benchmarks/ab.sh benchmarks/results/pdl_candidate.diff 2 \
#       python3 benchmarks/e2e.py qwen3-8b --no-baseline --batches 1 --lm-head nvfp4
# COMMAND sees VARIANT=a or b. The candidate's tree stays in $AB_DIR/b (default /tmp/adallm_ab) for its tests:
#   (cd /tmp/adallm_ab/b && TORCH_EXTENSIONS_DIR=/tmp/adallm_ab/ext_b bash benchmarks/gpu_check.sh tests sanitize)
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash benchmarks/ab.sh PATCH ROUNDS COMMAND..." >&2
  exit 2
fi
patch=$(realpath "$1")
rounds=$2
shift 2
OUT=${OUT:-/tmp/adallm-out}
ab=${AB_DIR:-/tmp/adallm_ab}
mkdir -p "$OUT"
rm -rf "$ab" && mkdir -p "$ab/b"
# The tree as it is (tracked and untracked files, not ignored ones; files of a stale index that are gone are
# skipped), then the patch.
git ls-files -z --cached --others --exclude-standard \
  | tar -cf - --null --ignore-failed-read -T - 2>/dev/null | tar -xf - -C "$ab/b"
(cd "$ab/b" && git apply "$patch")

build() {  # dir variant
  if (cd "$1" && TORCH_EXTENSIONS_DIR="$ab/ext_$2" PYTHONPATH="$1" python3 -m adallm_ops.build) \
      > "$OUT/ab_build_$2.txt" 2>&1; then
    echo "build $2: ok"
  else
    echo "build $2: FAILED (see $OUT/ab_build_$2.txt)"
  fi
}
build "$PWD" a &
build "$ab/b" b &
wait

for r in $(seq "$rounds"); do
  for v in a b; do
    dir=$PWD
    if [ "$v" = b ]; then dir=$ab/b; fi
    rc=0
    (cd "$dir" && TORCH_EXTENSIONS_DIR="$ab/ext_$v" PYTHONPATH="$dir" VARIANT=$v "$@") > "$OUT/ab_$v$r.txt" 2>&1 \
      || rc=$?
    echo "$v$r (rc $rc): $(tail -n 1 "$OUT/ab_$v$r.txt")"
  done
done
