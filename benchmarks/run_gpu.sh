#!/usr/bin/env bash
# Run every GPU benchmark and write one pytest-benchmark JSON into benchmarks/results/.
# The JSON holds machine_info (CPU, GPU, torch/triton/CUDA versions), commit_info (git id, branch,
# dirty flag, added by pytest-benchmark) and "command" (this exact invocation).
#
# Usage: benchmarks/run_gpu.sh [extra pytest args, e.g. -k "B8192 and bf16"]
# Env:   PYTHON (default: python), BENCH_NAME (default: <UTC time>_<short commit>)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "run_gpu.sh: no CUDA device visible to $PYTHON; the benchmarks would all skip" >&2
    exit 1
fi

commit=$(git rev-parse --short HEAD 2>/dev/null || echo nogit)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then commit="${commit}-dirty"; fi
name=${BENCH_NAME:-$(date -u +%Y%m%dT%H%M%SZ)_${commit}}
mkdir -p benchmarks/results
out="benchmarks/results/${name}.json"

cmd=("$PYTHON" -m pytest benchmarks -q -p no:cacheprovider --benchmark-only
     --benchmark-json="$out" --benchmark-columns=min,median,mean,stddev,rounds
     --benchmark-sort=name --benchmark-group-by=group "$@")
export IMTA_BENCH_COMMAND="$(printf '%q ' "${cmd[@]}")"
echo "+ ${IMTA_BENCH_COMMAND}"
"${cmd[@]}"
echo "results: $out"
