#!/usr/bin/env bash
# Benchmark: the generated host kernels per family (GB/s) against a plain Rust loop and the
# machine's copy bandwidth, in one run (benches/kernels.rs says what each column means).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
cargo bench --quiet --bench kernels
