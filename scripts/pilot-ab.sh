#!/usr/bin/env bash
# Compares the pilot's time on the critical path between two builds of the `overhead` example,
# in interleaved runs (this host's speed drifts within the hour, so only interleaved runs
# compare), and prints each run and the means of share, observe and rank.
#   bash scripts/pilot-ab.sh BEFORE AFTER [pairs] [workload steps budget]
#   bash scripts/pilot-ab.sh /tmp/overhead_old target/release/examples/overhead 6 moe_full 20 25%
# Build each side with `cargo build --release -p dynn-pilot --example overhead` and copy the
# binary aside (target/release/examples/overhead) before switching commits.
set -euo pipefail
before=$1
after=$2
pairs=${3:-6}
workload=(${4:-moe_full} ${5:-20} ${6:-25%})
for _ in $(seq "$pairs"); do
    for side in before after; do
        bin=${!side}
        line=$("$bin" "${workload[@]}" 2>&1 | grep "pilot:.*critical path" | tail -1)
        echo "$side $line"
    done
done | tee /dev/stderr | awk '
    {
        side = $1
        share = $3; sub("%", "", share)
        match($0, /observe [0-9.]+/); observe = substr($0, RSTART + 8, RLENGTH - 8)
        match($0, /rank [0-9.]+/); rank = substr($0, RSTART + 5, RLENGTH - 5)
        n[side]++; s[side] += share; o[side] += observe; r[side] += rank
    }
    END {
        for (side in n)
            printf "%-6s %d runs: share %.2f%%, observe %.1f ms, rank %.1f ms (means)\n",
                side, n[side], s[side] / n[side], o[side] / n[side], r[side] / n[side]
    }'
