#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (binaries from scripts/gpu-build.sh in .gpu/, no Rust
# needed): the op suite on the GPU with the CPU as oracle; each DyNN trainer under a 25%
# budget with every policy against its unlimited run (parameters must be bit-identical); and
# the benchmarks against PyTorch. Logs and JSON go to $OUT (default gpu-out/).
# The pilot stage measures the pilot's own host time per step on the GPU (issue 6's 2% bar).
# The writeback stage times each trainer at 25% (lru, pilot) evicting ahead of need (the
# default) and not (--no-evict-ahead); parameters must match.
# The arena stage runs the op suite with buffers carved from a reserved arena
# (DYNN_CUDA_ARENA=2048), times the host-bound training-step benchmarks with and without one,
# and runs each trainer at 25% (lru, pilot) in its budget's arena (DYNN_CUDA_ARENA=budget):
# parameters bit-identical to the unlimited run, step time against the driver's pool.
# The sim stage (also part of train) predicts each trainer's step at 25% with the simulator and
# measures it: REPEATS interleaved runs (default 3) of SIM_STEPS steps (default 8), compared by
# their best and by their median, and round by round with the unlimited and 50% runs' inputs
# scaled to the 25% run's host speed (each trainer's `host_ref_us`); it reads the bench stage's bench.json, or BENCH_JSON when run
# without the bench stage; PIN_CPUS (a taskset list) pins its runs to those cores.
# FILTER=name runs only the op tests and bench cases whose names contain it (ops, bench).
#   scripts/gpu-check.sh [ops|bench|train|sim|pilot|writeback|arena|all]...
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.gpu/bin}
if [ ! -d "$BIN" ] && [ -f .gpu/bin.tar.gz ]; then
    mkdir -p "$BIN" && tar -xzf .gpu/bin.tar.gz -C "$BIN"
fi
OUT=${OUT:-gpu-out}
REPEATS=${REPEATS:-3}
SIM_STEPS=${SIM_STEPS:-8}
mkdir -p "$OUT"
stages=${*:-all}
has() { [[ " $stages " == *" $1 "* || " $stages " == *" all "* ]]; }
# A trainer's flags beyond the common ones: the Tree-LSTM's default level chunk makes ops
# too large for a 25% budget.
extra_flags() { if [ "$1" = treelstm ]; then echo "--level-chunk 32"; fi; }

# The CUDA libraries dynn loads at run time: the driver (libcuda, /usr/local/nvidia/lib64 on
# the lent machines) and the toolkit's NVRTC and cuBLAS. Never CUDA's `stubs` folder (its
# libnvrtc/libcuda are link-time stand-ins that fail at run time) nor `compat`.
LD_LIBRARY_PATH="/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for d in /usr/local/cuda*/targets/x86_64-linux/lib /usr/local/cuda/lib64; do
    [ -d "$d" ] && LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"
done
export LD_LIBRARY_PATH
export DYNN_KERNEL_CACHE="$PWD/.gpu-kernel-cache"
nvidia-smi -L || true
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
status=0

if has ops; then
    echo "== op suite on the GPU (CPU as oracle)"
    timeout 300 "$BIN/cuda_ops" ${FILTER:+"$FILTER"} --test-threads 4 --nocapture 2>&1 | tee "$OUT/ops.log" | tail -40
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    if grep -q "skipped: no CUDA" "$OUT/ops.log"; then
        echo "FAILED: the op suite found no GPU (check the driver path above)"
        status=1
    fi
fi

if has bench; then
    echo "== benchmarks: dynn vs PyTorch"
    timeout 200 "$BIN/gpu" --json ${FILTER:+--filter "$FILTER"} > "$OUT/dynn_gpu.txt" 2>&1 || status=1
    tail -20 "$OUT/dynn_gpu.txt"
    timeout 200 python3 benches/gpu_torch.py --dynn "$OUT/dynn_gpu.txt" --out "$OUT/bench.json" \
        > "$OUT/torch.txt" 2>&1 || status=1
    grep -v '^{' "$OUT/torch.txt" | head -60
fi

if has train; then
    echo "== trainers: 25% budget, every policy, against the unlimited run (bit-identical params)"
    : > "$OUT/train.jsonl"
    for model in moe early_exit treelstm evoformer; do
        exe="$BIN/train_$model"
        extra=$(extra_flags "$model")
        base=$(timeout 120 "$exe" --device cuda --steps 2 --json --quiet $extra 2>"$OUT/train_err.log" | tail -1)
        echo "$base" >> "$OUT/train.jsonl"
        want=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["params_fnv"])' "$base" 2>/dev/null)
        if [ -z "$want" ]; then echo "$model unlimited: FAILED"; tail -5 "$OUT/train_err.log"; status=1; continue; fi
        # pilot-recompute: the pilot given a device's costs (it also drops activations).
        for policy in lru belady recompute static pilot pilot-recompute; do
            profile=""; run_policy="$policy"
            [ "$policy" = pilot-recompute ] && profile=h100-pcie5 && run_policy=pilot
            row=$(DYNN_PILOT_PROFILE="$profile" timeout 120 "$exe" --device cuda --steps 2 --json \
                --quiet --device-budget 25% --policy "$run_policy" $extra \
                2>>"$OUT/train_err.log" | tail -1)
            # Tag the row with the variant (pilot-recompute reports its policy as "pilot").
            python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["variant"]=sys.argv[2]; print(json.dumps(r))' \
                "$row" "$policy" >> "$OUT/train.jsonl" 2>/dev/null || echo "$row" >> "$OUT/train.jsonl"
            got=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["params_fnv"])' "$row" 2>/dev/null)
            if [ "$got" = "$want" ]; then verdict=identical
            elif [ -z "$got" ]; then verdict="no result (out of memory or error: see train_err.log)"; status=1
            else verdict="DIFFERENT ($got vs $want)"; status=1; fi
            echo "$model $policy 25%: $verdict"
        done
    done
fi

if has train || has sim; then
    echo "== simulator against the measured step (lru, 25%): each trainer's steady-state step,"
    echo "   the median of $REPEATS interleaved runs of $SIM_STEPS steps each"
    # The profile from this GPU's own figures (bench stage, or BENCH_JSON from an earlier run):
    # f32 GEMM rate, device memory bandwidth (the 16M add), pinned host-link bandwidth, and the
    # fixed cost of one copy (a 64 KiB move through the memory manager less its bytes' time and
    # the host's part of it). The per-op host cost comes from each trainer's unlimited runs
    # (--unlimited-ms), the host cost per move and per block of a pool repack from its runs at
    # 50% (--move-host-us, --repack-host-us).
    bench_json=$OUT/bench.json
    [ -f "$bench_json" ] || bench_json=${BENCH_JSON:-}
    profile=$(python3 - "$bench_json" <<'PY' 2>/dev/null
import json, sys
c = {r["name"]: r for r in json.load(open(sys.argv[1]))["cases"]}
rate = lambda k, w: c[k][w] / (c[k]["dynn_ms"] / 1e3)
flops, mem = rate("matmul_f32_4096", "flops"), rate("add_16M", "bytes")
link = rate("h2d_pinned_256MiB", "bytes")
small = c.get("manager_move_64KiB") or c["h2d_offload_path_64KiB"]
host = c.get("manager_move_host_64KiB", {"dynn_ms": 0.0})["dynn_ms"] / 1e3
latency = max(0.0, small["dynn_ms"] / 1e3 - small["bytes"] / link - host)
print(f"calibrated:{flops:.4g},{mem:.4g},{link:.4g},{latency:.4g} {host * 1e6:.4g}")
PY
)
    # The bench's host time per move: the fallback where a trainer's 50% runs give none.
    bench_host=${profile#* }; [ "$bench_host" = "$profile" ] && bench_host=""
    profile=${profile%% *}
    if [ -z "$profile" ]; then
        echo "warning: no bench.json with the calibration cases (a FILTERed bench? set BENCH_JSON): predicting with h100-pcie5"
        profile=h100-pcie5
    fi
    echo "profile $profile (bench: ${bench_host:-no} µs of host time per move)"
    field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2" 2>/dev/null; }
    # The median of FIELD over the JSON lines of FILE (empty when none has it).
    # The ESTIMATOR (min or median) of FIELD over the JSON lines of FILE (empty when none has
    # it). The best of several runs is the one the host disturbed least: on the lent machines
    # the same binary and configuration ran up to 1.7x slower from one process to the next.
    agg() { python3 -c '
import json, statistics, sys
v = []
for line in open(sys.argv[2]):
    try:
        v.append(float(json.loads(line)[sys.argv[3]]))
    except (ValueError, KeyError, TypeError):
        pass
print({"min": min, "median": statistics.median}[sys.argv[1]](v) if v else "")' "$1" "$2" "$3" 2>/dev/null; }
    # PIN_CPUS=0-7 runs them on those cores only (taskset), to try whether the hosts' speed
    # changes from process to process come from where the scheduler puts them.
    pin=""; [ -n "${PIN_CPUS:-}" ] && pin="taskset -c $PIN_CPUS" && echo "   pinned to CPUs $PIN_CPUS"
    for model in moe early_exit treelstm evoformer; do
        exe="$BIN/train_$model"
        extra=$(extra_flags "$model")
        flags="--device cuda --steps $SIM_STEPS --json --quiet $extra"
        : > "$OUT/${model}_sim.jsonl"; : > "$OUT/${model}_lru25.jsonl"; : > "$OUT/${model}_lru50.jsonl"
        # Interleaved, so that a drift of the host's speed reaches the three alike.
        for round in $(seq "$REPEATS"); do
            trace=""; [ "$round" = 1 ] && trace="--trace-out $OUT/${model}_trace.txt"
            $pin timeout 120 "$exe" $flags 2>>"$OUT/train_err.log" | tail -1 >> "$OUT/${model}_sim.jsonl"
            $pin timeout 120 "$exe" $flags --device-budget 25% --policy lru $trace 2>>"$OUT/train_err.log" \
                | tee "$OUT/${model}_lru25.txt" | tail -1 >> "$OUT/${model}_lru25.jsonl"
            $pin timeout 120 "$exe" $flags --device-budget 50% --policy lru 2>>"$OUT/train_err.log" \
                | tail -1 >> "$OUT/${model}_lru50.jsonl"
        done
        cat "$OUT/${model}_sim.jsonl" "$OUT/${model}_lru50.jsonl" "$OUT/${model}_lru25.jsonl" >> "$OUT/train.jsonl"
        spread() { python3 -c 'import json,sys; print(" / ".join("%.2f" % json.loads(l)["step_ms_median"] for l in open(sys.argv[1]) if l.strip()))' "$1" 2>/dev/null; }
        echo "$model runs (ms): unlimited $(spread "$OUT/${model}_sim.jsonl"); 25% $(spread "$OUT/${model}_lru25.jsonl")"
        # Inputs and measurement taken with the same estimator: the best runs, then the medians.
        for est in min median; do
            unlimited=$(agg $est "$OUT/${model}_sim.jsonl" step_ms_median)
            measured=$(agg $est "$OUT/${model}_lru25.jsonl" step_ms_median)
            budget=$(agg min "$OUT/${model}_lru25.jsonl" budget_bytes); budget=${budget%.*}
            move_host=$(agg $est "$OUT/${model}_lru50.jsonl" move_host_us)
            repack=$(agg $est "$OUT/${model}_lru50.jsonl" repack_block_us)
            [ -n "$move_host" ] && [ "$(agg min "$OUT/${model}_lru50.jsonl" moves)" != 0.0 ] || move_host=$bench_host
            if [ -z "$unlimited" ] || [ -z "$measured" ] || [ -z "$budget" ]; then
                echo "$model: no result (see train_err.log)"; status=1; break
            fi
            pred=$("$BIN/compare_policies" --trace "$OUT/${model}_trace.txt" --policy lru \
                --budget "$budget" --profile "$profile" --unlimited-ms "$unlimited" \
                ${move_host:+--move-host-us "$move_host"} ${repack:+--repack-host-us "$repack"} --json \
                2>>"$OUT/train_err.log" | tail -1)
            echo "$pred" >> "$OUT/predicted.txt"
            predicted=$(field "$pred" step_ms)
            python3 -c 'import sys; u,m,p,h,b=map(float,sys.argv[3:8]); print(f"{sys.argv[1]:<11} {sys.argv[2]:<6} unlimited {u:8.2f} ms  measured 25% {m:8.2f} ms  predicted {p:8.2f} ms  predicted/measured {p/m:5.2f}  (host {h:.1f} µs per move, {b:.2f} µs per repacked block, from the 50% runs)")' \
                "$model" "$est" "$unlimited" "$measured" "${predicted:-nan}" "${move_host:-nan}" "${repack:-nan}"
        done
        # Round by round, at the 25% run's host speed: the unlimited and 50% runs' host-bound
        # inputs scaled by the ratio of host_ref_us (a fixed host workload each trainer times
        # after every step), so that the prediction and the measurement share one host speed.
        ratios=""
        for round in $(seq "$REPEATS"); do
            scaled=$(python3 - "$round" "$OUT/${model}_sim.jsonl" "$OUT/${model}_lru50.jsonl" "$OUT/${model}_lru25.jsonl" <<'PY' 2>/dev/null
import json, sys
r = int(sys.argv[1]) - 1
unl, half, quarter = ([json.loads(l) for l in open(f) if l.strip()][r] for f in sys.argv[2:5])
at = lambda run: quarter["host_ref_us"] / run["host_ref_us"]
print(unl["step_ms_median"] * at(unl), half["move_host_us"] * at(half), half["repack_block_us"] * at(half),
      quarter["step_ms_median"], quarter["budget_bytes"], quarter["host_ref_us"], unl["host_ref_us"], half["host_ref_us"])
PY
)
            read -r unlimited move_host repack measured budget ref25 refu ref50 <<< "$scaled"
            if [ -z "$measured" ]; then echo "$model round $round: no host_ref_us (see train_err.log)"; continue; fi
            [ "$move_host" != 0.0 ] || move_host=$bench_host
            pred=$("$BIN/compare_policies" --trace "$OUT/${model}_trace.txt" --policy lru \
                --budget "$budget" --profile "$profile" --unlimited-ms "$unlimited" \
                ${move_host:+--move-host-us "$move_host"} --repack-host-us "$repack" --json \
                2>>"$OUT/train_err.log" | tail -1)
            ratio=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["step_ms"] / float(sys.argv[2]))' "$pred" "$measured" 2>/dev/null)
            ratios="$ratios ${ratio:-nan}"
            printf '%-11s round %s  host ref %.1f / %.1f / %.1f µs (25%% / unlimited / 50%%)  unlimited at its speed %.2f ms  measured %.2f ms  predicted/measured %.2f\n' \
                "$model" "$round" "$ref25" "$refu" "$ref50" "$unlimited" "$measured" "${ratio:-nan}"
        done
        python3 -c 'import statistics,sys; v=[float(x) for x in sys.argv[2:] if x!="nan"]; print(f"{sys.argv[1]:<11} host-speed scaled: predicted/measured, median of rounds {statistics.median(v):.2f}" if v else f"{sys.argv[1]}: no scaled rounds")' "$model" $ratios
    done
fi
if has arena; then
    echo "== device arena: the op suite in a 2 GiB arena"
    DYNN_CUDA_ARENA=2048 timeout 300 "$BIN/cuda_ops" ${FILTER:+"$FILTER"} --test-threads 4 2>&1 \
        | tee "$OUT/ops_arena.log" | tail -15
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    echo "== device arena: host-bound training steps, driver's pool then a 4 GiB arena"
    for case in transformer_block_fwd_bwd moe_train_step; do
        timeout 120 "$BIN/gpu" --filter "$case" 2>&1 | grep "$case" | head -1 | sed 's/^/pool:  /'
        DYNN_CUDA_ARENA=4096 timeout 120 "$BIN/gpu" --filter "$case" 2>&1 | grep "$case" | head -1 | sed 's/^/arena: /'
    done
    echo "== device arena: trainers at 25% in their budget's arena (bit-identical params; step ms, pool -> arena)"
    : > "$OUT/arena.jsonl"
    fnv() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])["params_fnv"])' "$1" 2>/dev/null; }
    ms() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])["step_ms_median"])' "$1" 2>/dev/null; }
    for model in moe early_exit treelstm evoformer; do
        exe="$BIN/train_$model"
        extra=$(extra_flags "$model")
        base=$(timeout 120 "$exe" --device cuda --steps 6 --json --quiet $extra 2>>"$OUT/arena_err.log" | tail -1)
        want=$(fnv "$base")
        for policy in lru pilot; do
            flags="--device cuda --steps 6 --json --quiet --device-budget 25% --policy $policy $extra"
            pool=$(timeout 120 "$exe" $flags 2>>"$OUT/arena_err.log" | tail -1)
            row=$(DYNN_CUDA_ARENA=budget timeout 120 "$exe" $flags 2>"$OUT/arena_${model}_$policy.log" | tail -1)
            echo "$row" >> "$OUT/arena.jsonl"
            got=$(fnv "$row")
            if [ -n "$got" ] && [ "$got" = "$want" ]; then verdict=identical
            else verdict="DIFFERENT or failed ($got vs $want: see arena_${model}_$policy.log)"; status=1; fi
            echo "$model $policy 25%: $verdict; step $(ms "$pool") -> $(ms "$row") ms; $(grep -o 'CUDA arena.*' "$OUT/arena_${model}_$policy.log" | tail -1)"
        done
    done
fi

if has pilot; then
    echo "== the pilot's host time on the critical path (lru, then pilot, at 25%;"
    echo "   replays on the executor's thread, then on the pilot's own: PILOT_THREAD=1)"
    for model in moe_full early_exit_full; do
        for thread in 0 1; do
            PILOT_THREAD=$thread timeout 120 "$BIN/overhead" "$model" 30 25% cuda \
                2>>"$OUT/pilot_err.log" | sed "s/pilot-probe/pilot-thread$thread/" \
                | tee -a "$OUT/pilot.txt" | grep -E "ms/step|pilot:" | sed 's/; [0-9]* predictions.*//'
            [ "${PIPESTATUS[0]}" = 0 ] || { echo "$model: failed (see pilot_err.log)"; status=1; }
        done
    done
fi
if has writeback; then
    echo "== evicting ahead on and off: lru and pilot at 25%, steady-state median of 6 steps, twice"
    : > "$OUT/writeback.jsonl"
    for model in moe early_exit treelstm evoformer; do
        exe="$BIN/train_$model"
        extra=$(extra_flags "$model")
        for policy in lru pilot; do
            for round in 1 2; do
                for mode in ahead lazy; do
                    flag=""; [ "$mode" = lazy ] && flag="--no-evict-ahead"
                    row=$(timeout 120 "$exe" --device cuda --steps 6 --json --quiet --device-budget 25% \
                        --policy $policy $extra $flag 2>>"$OUT/writeback_err.log" | tail -1)
                    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["evict"]=sys.argv[2]; print(json.dumps(r))' \
                        "$row" "$mode" >> "$OUT/writeback.jsonl" 2>/dev/null || { echo "$model $policy $mode: failed"; status=1; continue; }
                    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("%-11s %-6s evict %-6s %8.2f ms  %d moves  %.1f µs per move  params %s" % (sys.argv[2], sys.argv[3], sys.argv[4], r["step_ms_median"], r["moves"], r["move_host_us"], r["params_fnv"]))' \
                        "$row" "$model" "$policy" "$mode"
                done
            done
        done
    done
fi
exit $status
