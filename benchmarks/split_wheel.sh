#!/usr/bin/env bash
# Split a wheel (e.g. NVIDIA DALI's ~199 MB one) into parts small enough for the device tool,
# which carries at most 64 MiB (working tree included) per call. Counterpart: join_wheels.sh.
#
# Usage: benchmarks/split_wheel.sh WHEEL [OUT_DIR]        (OUT_DIR default: .whl/parts, git-ignored)
# Env:   PART_MIB (default 56; at most 60): part size in MiB, leaving room for the working tree.
# Writes OUT_DIR/<wheel>.part-00, -01, ... and OUT_DIR/<wheel>.manifest (part count, bytes, sha256).
#
# Get the wheel first, e.g.: python -m pip download --no-deps -d .whl nvidia-dali-cuda130==2.4.0
set -euo pipefail
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
    echo "usage: $0 WHEEL [OUT_DIR]  (WHEEL must be an existing file)" >&2
    exit 2
fi
wheel=$1
out=${2:-.whl/parts}
mib=${PART_MIB:-56}
if [ "$mib" -lt 1 ] || [ "$mib" -gt 60 ]; then
    echo "$0: PART_MIB must be in 1..60, got $mib" >&2
    exit 2
fi
name=$(basename "$wheel")
mkdir -p "$out"
rm -f "$out/$name".part-* "$out/$name.manifest"
split -b "${mib}M" -d -a 2 "$wheel" "$out/$name.part-"
parts=$(ls "$out/$name".part-* | wc -l)
{
    echo "wheel $name"
    echo "parts $parts"
    echo "bytes $(stat -c %s "$wheel")"
    echo "sha256 $(sha256sum "$wheel" | cut -d' ' -f1)"
} > "$out/$name.manifest"
echo "wrote $parts parts of at most ${mib} MiB and $name.manifest under $out:"
ls -l "$out/$name".part-* "$out/$name.manifest"
