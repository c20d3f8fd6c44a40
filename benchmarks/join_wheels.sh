#!/usr/bin/env bash
# Join the wheels split by split_wheel.sh (GPU box side); optionally pip-install them without dependencies.
#
# Usage: benchmarks/join_wheels.sh [PARTS_DIR [OUT_DIR]]   (defaults: .whl/parts, and PARTS_DIR/..)
# Env:   INSTALL=1 to also run `$PYTHON -m pip install --no-deps --no-index` on each joined wheel
#        (run_gpu.sh installs OUT_DIR/*.whl itself); PYTHON (default: python3, else python).
# For each PARTS_DIR/<wheel>.manifest: checks that every part is there, joins them into
# OUT_DIR/<wheel>, checks size and sha256. Exits 1, naming what is missing or wrong, if a part is
# absent or the checksum differs (a wrong wheel is never left in OUT_DIR).
set -euo pipefail
dir=${1:-.whl/parts}
outdir=${2:-$dir/..}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$outdir"
shopt -s nullglob
manifests=("$dir"/*.manifest)
if [ ${#manifests[@]} -eq 0 ]; then
    echo "join_wheels.sh: no *.manifest under $dir (run split_wheel.sh here and carry the parts)" >&2
    exit 1
fi
status=0
for m in "${manifests[@]}"; do
    name=$(awk '$1 == "wheel" {print $2}' "$m")
    parts=$(awk '$1 == "parts" {print $2}' "$m")
    bytes=$(awk '$1 == "bytes" {print $2}' "$m")
    sha=$(awk '$1 == "sha256" {print $2}' "$m")
    missing=()
    for ((i = 0; i < parts; i++)); do
        p=$(printf "%s/%s.part-%02d" "$dir" "$name" "$i")
        [ -f "$p" ] || missing+=("$(basename "$p")")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "join_wheels.sh: $name: missing ${#missing[@]} of $parts parts: ${missing[*]}" >&2
        status=1
        continue
    fi
    wheel="$outdir/$name"
    cat $(for ((i = 0; i < parts; i++)); do printf "%s/%s.part-%02d " "$dir" "$name" "$i"; done) > "$wheel.tmp"
    got_bytes=$(stat -c %s "$wheel.tmp")
    got_sha=$(sha256sum "$wheel.tmp" | cut -d' ' -f1)
    if [ "$got_bytes" != "$bytes" ] || [ "$got_sha" != "$sha" ]; then
        echo "join_wheels.sh: $name: joined $got_bytes bytes sha256 $got_sha, expected $bytes bytes sha256 $sha" >&2
        rm -f "$wheel.tmp"
        status=1
        continue
    fi
    mv "$wheel.tmp" "$wheel"
    echo "joined $wheel ($bytes bytes, sha256 ok)"
    if [ "${INSTALL:-0}" = "1" ]; then
        "$PYTHON" -m pip install --no-deps --no-index "$wheel"
    fi
done
exit $status
