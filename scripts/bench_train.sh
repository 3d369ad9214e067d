#!/usr/bin/env bash
# Benchmark: CPU training throughput of shardc (reference interpreter) against PyTorch eager on
# the same machine, same model (examples/shakespeare-char), same batch shape, in one run.
# Needs the fixture venv (scripts/make_fixtures.sh makes it). Prints tokens/s and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FIXTURE_VENV:-.venv-fixtures}
B=${B:-8} T=${T:-128} STEPS=${STEPS:-20}
cargo build --release --quiet
out=target/bench; mkdir -p "$out"
target/release/shardc data prepare examples/data/shakespeare.txt -o "$out/shakespeare.bin" >/dev/null
shardc_tps=$(target/release/shardc train examples/shakespeare-char --data "$out/shakespeare.bin" \
  --batch "$B" --seq "$T" --steps "$STEPS" --json | tail -1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_s"])')
if [ ! -x "$VENV/bin/python" ]; then
  echo "shardc: $shardc_tps tokens/s (no PyTorch peer: run scripts/make_fixtures.sh to make $VENV)"; exit 0
fi
torch_json=$("$VENV/bin/python" scripts/bench_train.py examples/shakespeare-char "$B" "$T" "$STEPS")
python3 - "$shardc_tps" "$torch_json" "$B" "$T" <<'PY'
import json, sys
s, t = float(sys.argv[1]), json.loads(sys.argv[2])
print(f"train, examples/shakespeare-char, {sys.argv[3]} x {sys.argv[4]} tokens/step, f32, CPU:")
print(f"  shardc (reference interpreter): {s:9.0f} tokens/s")
print(f"  PyTorch {t['torch']} eager ({t['threads']} threads): {t['tokens_per_s']:9.0f} tokens/s")
print(f"  ratio shardc / PyTorch: {s / t['tokens_per_s']:.2f}")
PY
