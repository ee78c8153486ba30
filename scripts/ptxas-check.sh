#!/usr/bin/env bash
# Assembles every CUDA kernel's PTX to SASS with ptxas (no GPU needed) and prints each
# kernel's registers, spills and shared memory; fails on an assembler error or on a spill of
# more than 64 bytes (the register saves around an out-of-line call, e.g. the row kernels'
# `at_strided`, are 4 to 32 bytes and expected).
#   bash scripts/ptxas-check.sh            # every family
#   DYNN_KERNEL_FAMILIES=softmax,norm bash scripts/ptxas-check.sh
# ptxas comes from PyPI's nvidia-cuda-nvcc-cu12 (fetched into .nvcc/ once), the PTX from the
# kernel-compile test (NVRTC, see scripts/nvrtc-env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/nvrtc-env.sh
if [ ! -x .nvcc/ptxas ]; then
    rm -rf .nvcc && mkdir -p .nvcc/wheel
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --dest .nvcc/wheel "nvidia-cuda-nvcc-cu12==12.9.86"
    python3 - <<'PY'
import glob, zipfile
wheel = glob.glob(".nvcc/wheel/*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    open(".nvcc/ptxas", "wb").write(z.read("nvidia/cuda_nvcc/bin/ptxas"))
PY
    chmod +x .nvcc/ptxas
    rm -rf .nvcc/wheel
fi
ptx_dir="$(mktemp -d)"
trap 'rm -rf "$ptx_dir"' EXIT
if ! DYNN_REQUIRE_NVRTC=1 DYNN_PTX_DIR="$ptx_dir" cargo test --quiet -p dynn-ops \
    --test cuda_compile every_kernel_compiles >"$ptx_dir/compile.log" 2>&1; then
    cat "$ptx_dir/compile.log"
    exit 1
fi
shopt -s nullglob
files=("$ptx_dir"/*.ptx)
if [ ${#files[@]} -eq 0 ]; then
    echo "no PTX written (no family named by DYNN_KERNEL_FAMILIES=${DYNN_KERNEL_FAMILIES:-}?)"
    exit 1
fi
status=0
report="$ptx_dir/report.txt"
for ptx in "${files[@]}"; do
    arch="${ptx%.ptx}"
    arch="${arch##*-}"
    if ! log="$(.nvcc/ptxas -arch="$arch" -v -o /dev/null "$ptx" 2>&1)"; then
        echo "FAILED: $(basename "$ptx")"
        echo "$log"
        status=1
        continue
    fi
    # One line per kernel: module, kernel, registers, spills, shared memory.
    echo "$log" | awk -v m="$(basename "$ptx" .ptx)" '
        /Compiling entry function/ { k = $7; gsub(/\047/, "", k); spill = "0 spill stores, 0 spill loads" }
        /bytes spill stores/ { spill = $5 " spill stores, " $9 " spill loads" }
        /Used [0-9]+ registers/ {
            regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
            smem = "0"; if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11)
            printf "%-28s %-40s %4s regs  %s  smem %s\n", m, k, regs, spill, smem
        }' | tee -a "$report"
done
heavy="$(awk '{ for (i = 1; i < NF; i++) if ($(i + 1) == "spill" && $(i + 2) == "stores," && $i > 64) print }' \
    "$report")"
if [ -n "$heavy" ]; then
    echo "spills of more than 64 bytes:"
    echo "$heavy"
    status=1
fi
echo "$(wc -l <"$report") kernels assembled from ${#files[@]} modules"
exit $status
