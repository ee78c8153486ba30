#!/usr/bin/env bash
# Builds everything scripts/gpu-check.sh runs (x86-64 Linux): the GPU op suite, the GPU
# benchmark, the four trainers, compare_policies and the pilot's overhead probe, stripped and packed into .gpu/bin.tar.gz (about 20 MB, so
# it travels within a 64 MiB copy). The GPU machine has no Rust toolchain: build here, copy
# .gpu/ there; gpu-check.sh unpacks it.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu
mkdir -p .gpu/bin
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
        --example train_moe --example train_early_exit --example train_treelstm --example train_evoformer \
        --example compare_policies
    cargo build --release --message-format=json -p dynn-pilot --example overhead
} | artifacts | while read -r name exe; do
    objcopy --strip-all "$exe" ".gpu/bin/$name"
    echo "$name: $(du -h ".gpu/bin/$name" | cut -f1)"
done
tar -czf .gpu/bin.tar.gz -C .gpu/bin .
rm -rf .gpu/bin
echo ".gpu/bin.tar.gz: $(du -h .gpu/bin.tar.gz | cut -f1)"
