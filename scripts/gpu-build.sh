#!/usr/bin/env bash
# Builds everything scripts/gpu-check.sh runs into .gpu/ (stripped, x86-64 Linux): the GPU op
# suite, the GPU benchmark and the four trainers. The GPU machine has no Rust toolchain, so
# build here and copy .gpu/ there (the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
artifacts() {
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])
'
}
{
    cargo test -p dynn-ops --test cuda_ops --no-run --message-format=json
    cargo bench -p dynn --bench gpu --no-run --message-format=json
    cargo build --release --message-format=json \
        --example train_moe --example train_early_exit --example train_treelstm --example train_evoformer
} | artifacts | while read -r name exe; do
    objcopy --strip-debug "$exe" ".gpu/$name"
    echo "$name: $(du -h ".gpu/$name" | cut -f1)"
done
