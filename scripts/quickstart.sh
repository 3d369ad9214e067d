#!/usr/bin/env bash
# The main job on the bundled defaults: build shardc, tokenize the bundled Shakespeare, import the
# bundled char-level GPT config to IR and verify it, show the plan of its training step on a
# data-parallel mesh, train it for a few hundred steps on the CPU
# (STEPS=N to change), evaluate the result, and reproduce Hugging Face's loss on the tiny GPT-2
# and Llama fixtures.
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

step "Show the plan of its training step on 4 data-parallel ranks with ZeRO stage 1 (H100 device model)"
$shardc plan examples/shakespeare-char --batch 8 --seq 128 --mesh dp=4 --zero 1

step "Train it on the CPU: ${STEPS:=300} AdamW steps of 8 x 128 tokens (the loss starts near ln 256 = 5.55)"
rm -rf "$out/checkpoint"
$shardc train examples/shakespeare-char --data "$out/shakespeare.bin" --batch 8 --seq 128 \
  --steps "$STEPS" --lr 2e-3 --warmup 30 --checkpoint "$out/checkpoint"

step "Evaluate the trained weights on 4 batches"
$shardc eval examples/shakespeare-char --weights "$out/checkpoint/checkpoint.safetensors" \
  --data "$out/shakespeare.bin" --batch 8 --seq 128 --batches 4

for model in gpt2-tiny llama-tiny; do
  step "Reproduce Hugging Face on tests/fixtures/hf/$model"
  $shardc eval tests/fixtures/hf/$model --data tests/fixtures/hf/$model/tokens.bin --batch 2 --seq 16
  printf 'Hugging Face (transformers, float32) computed: %s\n' \
    "$(grep '"loss"' tests/fixtures/hf/$model/expected.json | tr -d ' ,' | cut -d: -f2)"
done
