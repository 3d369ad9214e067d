#!/usr/bin/env bash
# Benchmark: planning GPT-3 175B (96 layers, hidden 12288, 96 heads, seq 2048, vocab 51200;
# examples/gpt3-175b) on this machine: the dp=64 x tp=8 ZeRO-1 plan, the same with sequence
# parallelism, and --auto over 512 devices. Also plans the same model cut to 24 and 48 layers,
# to show that the e-graph search does not grow with depth (one layer is searched and stamped).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
shardc=target/release/shardc
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# `shardc plan` exits with status 3 for a plan over its memory budget (printed all the same).
seconds() { local s e; s=$(date +%s%N); "$@" > "$tmp/out" 2>/dev/null || [ $? -eq 3 ]; e=$(date +%s%N); printf "%.2f" "$(( (e - s) / 1000000 ))e-3"; }
summary() { python3 scripts/plan_summary.py "$tmp/out"; }
M=examples/gpt3-175b
echo "plan GPT-3 175B, batch 512 x 2048, on $(nproc) cores:"
t=$(seconds $shardc plan $M --batch 512 --seq 2048 --mesh dp=64,tp=8 --zero 1 --format json)
echo "  --mesh dp=64,tp=8 --zero 1:                      ${t} s"; summary
t=$(seconds $shardc plan $M --batch 512 --seq 2048 --mesh dp=64,tp=8 --zero 1 --sequence-parallel --format json)
echo "  --mesh dp=64,tp=8 --zero 1 --sequence-parallel:  ${t} s"; summary
t=$(seconds $shardc plan $M --batch 512 --seq 2048 --auto --world 512 --format json)
echo "  --auto --world 512:                              ${t} s"; summary
echo "  --auto --world 512 --batch 64 (fits 80 GB):"
t=$(seconds $shardc plan $M --batch 64 --seq 2048 --auto --world 512 --format json)
echo "                                                   ${t} s"; summary
for L in 24 48 96; do
  mkdir -p "$tmp/l$L"
  sed "s/\"n_layer\": 96/\"n_layer\": $L/" $M/config.json > "$tmp/l$L/config.json"
  t=$(seconds $shardc plan "$tmp/l$L" --batch 512 --seq 2048 --mesh dp=64,tp=8 --zero 1 --format json)
  echo "  $L layers, dp=64,tp=8 ZeRO-1:                      ${t} s"; summary
done
