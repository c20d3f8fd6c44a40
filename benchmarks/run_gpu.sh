#!/usr/bin/env bash
# The one GPU script: every GPU check of the project in <= 8 minutes of wall time on one H100/H200 with
# torch / triton preinstalled and no internet.
#
#   Single command (the device tool sets OUT):   bash benchmarks/run_gpu.sh
#   Anywhere else:                               OUT=/tmp/gpu bash benchmarks/run_gpu.sh
#   Only print the steps (runs without a GPU):   bash benchmarks/run_gpu.sh --dry-run
#
# Steps, in priority order, each under its own `timeout` and all under one deadline (TOTAL_S, default 460 s):
#   [dali]     optional: join the NVIDIA DALI wheel parts (benchmarks/join_wheels.sh) and pip install them
#              (parts carried under .whl/parts by earlier device calls; see benchmarks/split_wheel.sh)
#   install    pip install --no-deps -e . (imta_fast.kernels is the kernels/ folder; falls back to a symlink)
#   env        nvidia-smi, python / torch / triton / CUDA versions, commit -> $OUT/env.txt
#   tests_gpu  pytest -m gpu tests
#   bench_train          python -m benchmarks.bench_train (interleaved ladder; pytest-benchmark-shaped JSON)
#   bench_multi_exit_kd, bench_gradient_equilibrium, bench_evaluator, bench_loaders, bench_methods
#              pytest <file> --benchmark-only --benchmark-json=$OUT/<name>.json   (each only if the file exists)
#   kernel_registers  python -m benchmarks.kernel_registers > $OUT/kernel_registers.md (ptxas registers/spills)
#   summary    python -m benchmarks.summary $OUT/*.json > $OUT/summary.md  (every target: measured vs goal)
# Output in $OUT (default benchmarks/results/<UTC time>_<commit>/): the JSON files, one <step>.log each,
# steps.tsv (step, exit code, seconds) and summary.md.  Exits 0 even when a target is missed or a step fails
# or times out (steps.tsv and summary.md say which); exits 1 only when no GPU is visible (without --dry-run).
#
# Env: PYTHON (default python3, else python), TOTAL_S (overall deadline, s), CAP_<step> (a step's own
# limit, s, e.g. CAP_tests_gpu=120), DALI_WHEEL_PARTS (folder of wheel parts + manifests, or of wheels;
# default: the first of .whl/parts, shared/wheels/dali, shared/wheels, benchmarks/wheels holding any),
# BENCH_TRAIN_ARGS (extra arguments for bench_train).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run|-n) DRY=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "run_gpu.sh: unknown argument $arg (only --dry-run)" >&2; exit 2 ;;
    esac
done

PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
TOTAL_S=${TOTAL_S:-460}
START=$(date +%s)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo nogit)
OUT=${OUT:-benchmarks/results/$(date -u +%Y%m%dT%H%M%SZ)_${commit}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
STEPS_TSV="$OUT/steps.tsv"
[ "$DRY" = 1 ] || printf 'step\trc\tseconds\tnote\n' > "$STEPS_TSV"

if [ "$DRY" = 0 ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "run_gpu.sh: no CUDA device visible to $PYTHON (use --dry-run to see the steps)" >&2
    exit 1
fi

cap() {  # cap <step> <default seconds>: the step's own limit (CAP_<step> overrides)
    local var="CAP_$1"
    echo "${!var:-$2}"
}

# step <name> <cap seconds> <command...>: run under `timeout`, never longer than the time left.
step() {
    local name=$1 limit=$2 want=$2; shift 2
    local left=$(( TOTAL_S - ($(date +%s) - START) - 15 ))  # keep 15 s for the summary
    [ "$name" = summary ] && left=$(( left + 15 ))
    (( limit > left )) && limit=$left
    if [ "$DRY" = 1 ]; then
        printf '[dry-run] %-26s timeout %4ss: %s\n' "$name" "$want" "$*"
        return 0
    fi
    if (( limit < 10 )); then
        printf '%s\t-\t0\tskipped: deadline (TOTAL_S=%s) reached\n' "$name" "$TOTAL_S" >> "$STEPS_TSV"
        echo "== $name: skipped, the ${TOTAL_S} s deadline is reached"
        return 0
    fi
    echo "== $name (timeout ${limit} s): $*"
    local t0=$(date +%s) rc=0
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    local dt=$(( $(date +%s) - t0 )) note=ok
    if (( rc == 124 || rc == 137 )); then note="timed out after ${limit} s"; elif (( rc != 0 )); then note=failed; fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$note" >> "$STEPS_TSV"
    echo "   $note (rc $rc, ${dt} s); last lines of $OUT/$name.log:"
    tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
    return 0
}

# ---- optional: NVIDIA DALI from wheel parts (no internet on the GPU machine; split_wheel.sh / join_wheels.sh)
parts=${DALI_WHEEL_PARTS:-}
if [ -z "$parts" ]; then
    for d in .whl/parts shared/wheels/dali shared/wheels benchmarks/wheels; do
        if compgen -G "$d/*.manifest" > /dev/null || compgen -G "$d/*.whl" > /dev/null; then parts=$d; break; fi
    done
fi
if [ -n "$parts" ] && [ -d "$parts" ]; then
    wheeldir="$OUT/.wheels"
    if compgen -G "$parts/*.manifest" > /dev/null; then
        join="bash benchmarks/join_wheels.sh '$parts' '$wheeldir'"
    else
        join="mkdir -p '$wheeldir' && cp '$parts'/*.whl '$wheeldir'/"
    fi
    step dali "$(cap dali 120)" bash -c "$join && $PYTHON -m pip install --no-deps --no-index '$wheeldir'/*.whl; \
        rc=\$?; rm -rf '$wheeldir'; exit \$rc"
fi

# ---- the package (kernels/ is imported as imta_fast.kernels)
step install "$(cap install 60)" bash -c "$PYTHON -m pip install --no-deps --no-build-isolation -e . \
    || { echo 'pip -e failed: linking kernels/ as imta_fast/kernels instead'; \
         [ -e imta_fast/kernels ] || ln -s ../kernels imta_fast/kernels; }; \
    $PYTHON -c 'import imta_fast.kernels, imta_fast; print(imta_fast.__file__)'"
step env "$(cap env 20)" bash -c "{ nvidia-smi || true; $PYTHON -c 'import sys, torch, platform; \
print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0)); \
import triton; print(\"triton\", triton.__version__)'; $PYTHON -m pip list 2>/dev/null | grep -i -E 'pytest|dali|torch|triton'; \
echo commit $commit; } | tee '$OUT/env.txt'"

# pytest-benchmark is needed for --benchmark-json; without it the pytest benchmarks are skipped (logged).
HAVE_PB=1
if [ "$DRY" = 0 ] && ! "$PYTHON" -c 'import pytest_benchmark' 2>/dev/null; then
    HAVE_PB=0
    echo "run_gpu.sh: pytest-benchmark is not installed for $PYTHON: pytest benchmarks skipped, bench_train still runs"
fi

# ---- GPU-marked tests
step tests_gpu "$(cap tests_gpu 120)" "$PYTHON" -m pytest -q -m gpu tests

# ---- training benchmark: script mode (interleaved cases, warm-up budget), pytest-benchmark-shaped JSON
train_cap=$(cap bench_train 190)
# shellcheck disable=SC2086  # BENCH_TRAIN_ARGS is a list of words
step bench_train "$train_cap" "$PYTHON" -m benchmarks.bench_train --steps 10 --rounds 3 \
    --max-warmup-s $(( train_cap * 55 / 100 )) --json "$OUT/bench_train.json" ${BENCH_TRAIN_ARGS:-}

# ---- the other benchmark files, whichever exist
for spec in bench_multi_exit_kd:60 bench_gradient_equilibrium:30 bench_evaluator:50 bench_loaders:30 \
            bench_methods:40; do
    name=${spec%%:*}
    file="benchmarks/$name.py"
    [ -f "$file" ] || { [ "$DRY" = 1 ] && echo "[dry-run] $name: $file absent, skipped"; continue; }
    if [ "$HAVE_PB" = 0 ]; then
        printf '%s\t-\t0\tskipped: no pytest-benchmark\n' "$name" >> "$STEPS_TSV"
        continue
    fi
    step "$name" "$(cap "$name" "${spec##*:}")" "$PYTHON" -m pytest -q -p no:cacheprovider "$file" --benchmark-only \
        --benchmark-json="$OUT/$name.json" --benchmark-columns=min,median,mean,stddev,rounds \
        --benchmark-sort=name --benchmark-group-by=group
done

# ---- registers / spills / blocks per SM of the fused loss kernel's launch candidates with this machine's
# Triton and its bundled ptxas (an AOT compile; needs no GPU, runs last, only if time is left)
if [ -f benchmarks/kernel_registers.py ]; then
    step kernel_registers "$(cap kernel_registers 60)" bash -c "$PYTHON -m benchmarks.kernel_registers -q \
        > '$OUT/kernel_registers.md'; rc=\$?; cat '$OUT/kernel_registers.md'; exit \$rc"
fi

# ---- one table of every target (a missed target does not fail the script)
if [ -f benchmarks/summary.py ]; then
    step summary "$(cap summary 30)" bash -c "shopt -s nullglob; files=('$OUT'/*.json); \
        $PYTHON -m benchmarks.summary \"\${files[@]}\" > '$OUT/summary.md'; rc=\$?; cat '$OUT/summary.md'; \
        (( rc <= 1 )) || exit \$rc"
elif [ "$DRY" = 1 ]; then
    echo "[dry-run] summary: benchmarks/summary.py absent, skipped"
fi

if [ "$DRY" = 0 ]; then
    echo "== steps ($(( $(date +%s) - START )) s in all):"
    column -t -s $'\t' "$STEPS_TSV" 2>/dev/null || cat "$STEPS_TSV"
    [ -f "$OUT/summary.md" ] && { echo "== summary.md"; cat "$OUT/summary.md"; }
    echo "results: $OUT"
fi
exit 0
