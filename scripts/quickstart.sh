#!/usr/bin/env bash
# The main job on the bundled defaults: build shardc, tokenize the bundled Shakespeare, import the
# bundled char-level GPT config to IR and verify it, plan its training step on a dp=2 x tp=2 mesh
# (ZeRO-1, sequence parallelism), explain one sharding, compile the per-rank program and its
# bundle, run it for a few hundred steps on 4 ranks on the CPU (STEPS=N to change), evaluate the
# gathered checkpoint on one device, and reproduce Hugging Face's loss on the tiny GPT-2 and
# Llama fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"

cargo build --release --quiet
shardc=target/release/shardc
out=target/quickstart
mkdir -p "$out"

if [ -t 1 ]; then
  step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
else
  step() { printf '\n==> %s\n' "$*"; }
fi

step "Tokenize the bundled Shakespeare (byte-level) into an llm.c token file"
$shardc data prepare examples/data/shakespeare.txt -o "$out/shakespeare.bin"

step "Import the bundled char-level GPT (examples/shakespeare-char/config.json) into shardc's IR"
$shardc import examples/shakespeare-char --batch 8 --seq 128 -o "$out/shakespeare-char.tir"
echo "first lines of $out/shakespeare-char.tir:"
grep -m 12 -E '^(graph|param|input|%)' "$out/shakespeare-char.tir" | sed 's/^/    /'
grep -m 6 -E '^%h0\.(q|scores|probs)' "$out/shakespeare-char.tir" | sed 's/^/    /'

step "Verify the IR"
$shardc check "$out/shakespeare-char.tir"

MESH=(--mesh dp=2,tp=2 --zero 1 --sequence-parallel)
step "Plan its training step on dp=2 x tp=2 (ZeRO-1, sequence parallelism; H100 device model)"
$shardc plan examples/shakespeare-char --batch 8 --seq 128 "${MESH[@]}"

step "Why is h0.mlp_up split, and which rule put the collectives around h0.attn_out_nobias there?"
$shardc explain examples/shakespeare-char h0.mlp_up --batch 8 --seq 128 "${MESH[@]}"
$shardc explain examples/shakespeare-char h0.attn_out_nobias --batch 8 --seq 128 "${MESH[@]}" | tail -8

step "Compile the per-rank training step to $out/step.tir, checked against the unsharded step first"
$shardc compile examples/shakespeare-char --batch 8 --seq 128 --precision f32 "${MESH[@]}" --check -o "$out/step.tir"

step "Compile it into a bundle: fused kernels (host code, PTX for sm_80/sm_90), memory plan, plan"
$shardc compile examples/shakespeare-char --batch 8 --seq 128 --precision f32 "${MESH[@]}" -o "$out/step.shardc"
$shardc inspect "$out/step.shardc" | sed -n 1,7p

step "Run the bundle on 4 ranks (threads) on the CPU: ${STEPS:=300} AdamW steps of 8 x 128 tokens (the loss starts near ln 256 = 5.55)"
rm -rf "$out/checkpoint"
$shardc run "$out/step.shardc" --data "$out/shakespeare.bin" \
  --steps "$STEPS" --lr 2e-3 --warmup 30 --checkpoint "$out/checkpoint" --report

step "Evaluate the trained (gathered) weights on one device, 4 batches"
$shardc eval examples/shakespeare-char --weights "$out/checkpoint" \
  --data "$out/shakespeare.bin" --batch 8 --seq 128 --batches 4

for model in gpt2-tiny llama-tiny; do
  step "Reproduce Hugging Face on tests/fixtures/hf/$model"
  $shardc eval tests/fixtures/hf/$model --data tests/fixtures/hf/$model/tokens.bin --batch 2 --seq 16
  printf 'Hugging Face (transformers, float32) computed: %s\n' \
    "$(grep '"loss"' tests/fixtures/hf/$model/expected.json | tr -d ' ,' | cut -d: -f2)"
done
