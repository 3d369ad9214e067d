#!/usr/bin/env bash
# Benchmark: CPU training throughput of shardc against PyTorch, same machine, same threads,
# same models and batch shapes, in one run (f32, AdamW, gradient clipping):
#  - the bundled model (examples/shakespeare-char: V256, d128, 4 layers, 4 heads), 8 x 128;
#  - the small GPT of the issue (V256, d384, 6 layers, 6 heads), 8 x 256.
# shardc: the compiled step on the host engine (one rank, and dp=2 on the same cores) and the
# reference interpreter; PyTorch: eager and torch.compile (scripts/bench_train.py, plain
# PyTorch GPT-2). Needs the venv scripts/make_fixtures.sh makes (.venv-fixtures, torch);
# without it only shardc's figures are printed. Every figure is the median of STEPS=N (default
# 10) steps after 3 warm-up steps (the first includes torch.compile's compilation).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
VENV=${FIXTURE_VENV:-.venv-fixtures}
STEPS=${STEPS:-10}
cargo build --release --quiet
shardc=target/release/shardc
out=target/bench; mkdir -p "$out/small-gpt"
$shardc data prepare examples/data/shakespeare.txt -o "$out/shakespeare.bin" >/dev/null
cat > "$out/small-gpt/config.json" <<'JSON'
{"model_type": "gpt2", "vocab_size": 256, "n_positions": 256, "n_embd": 384, "n_layer": 6, "n_head": 6, "tie_word_embeddings": true}
JSON
threads=$(nproc)
# The machine's measured f32 GEMM peak: the best all-core figure of `cargo bench --bench gemm`
# (the `gemm` crate's own split or the engine's), measured in this run, beside PyTorch's MKL and
# NumPy's OpenBLAS on the same shapes (scripts/bench_gemm_peers.py, with the venv).
peak=$(cargo bench --quiet --bench gemm 2>/dev/null |
  awk '$2 == "x" && $4 == "x" && NF == 9 { if ($8 > m) m = $8; if ($9 > m) m = $9 } END { print m }')
echo "measured f32 GEMM peak (cargo bench --bench gemm, $threads threads): $peak GFLOP/s"
if [ -x "$VENV/bin/python" ]; then
  echo "the same library calls in PyTorch and NumPy:"
  "$VENV/bin/python" scripts/bench_gemm_peers.py
fi
# shardc: tokens per step over the median step time, the first 3 steps dropped (as the
# PyTorch peer measures); PyTorch: the peer's own figure.
tps_steps() {
  python3 -c '
import json, sys
steps = [json.loads(l) for l in sys.stdin if l.startswith("{")]
tokens = int(sys.argv[1])
times = sorted(s["step_s"] for s in steps[3:])
print(tokens / times[len(times) // 2])' "$1"
}
tps() { tail -1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_s"])'; }
bench() {  # name model batch seq
  local name=$1 model=$2 B=$3 T=$4
  local host interp dp2 eager compiled
  local run="$shardc train $model --data $out/shakespeare.bin --batch $B --seq $T --steps $((STEPS + 3)) --json"
  host=$($run | tps_steps $((B * T)))
  dp2=$($run --mesh dp=2 | tps_steps $((B * T)))
  interp=$($run --engine interp | tps_steps $((B * T)))
  eager=null; compiled=null
  if [ -x "$VENV/bin/python" ]; then
    eager=$("$VENV/bin/python" scripts/bench_train.py "$model/config.json" "$B" "$T" "$STEPS" eager | tps)
    compiled=$("$VENV/bin/python" scripts/bench_train.py "$model/config.json" "$B" "$T" "$STEPS" compile 2>/dev/null | tps)
  fi
  # Model FLOPs per step: the plan's 2 M N K over every matrix product of the one-rank f32 step
  # (attention's whole products, as PyTorch computes them).
  local flops
  flops=$($shardc plan "$model" --batch "$B" --seq "$T" --precision f32 --format json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["flops_per_step"])')
  python3 - "$name" "$B" "$T" "$threads" "$host" "$dp2" "$interp" "$eager" "$compiled" "$flops" "$peak" <<'PY'
import sys
name, b, t, threads = sys.argv[1:5]
host, dp2, interp, eager, comp = (None if v == "null" else float(v) for v in sys.argv[5:10])
flops, peak = float(sys.argv[10]), float(sys.argv[11])
print(f"{name}, {b} x {t} tokens per step, f32, {threads} threads:")
rows = [("shardc, host engine, 1 rank", host), ("shardc, host engine, dp=2", dp2),
        ("shardc, reference interpreter", interp), ("PyTorch eager", eager), ("PyTorch torch.compile", comp)]
for label, v in rows:
    print(f"  {label:<34} {'-' if v is None else f'{v:9.0f}'} tokens/s")
for label, peer in [("eager", eager), ("torch.compile", comp)]:
    if peer:
        print(f"  ratio shardc (1 rank) / PyTorch {label}: {host / peer:.2f}")
tokens = int(b) * int(t)
for label, v in [("shardc, 1 rank", host), ("shardc, dp=2", dp2), ("PyTorch eager", eager), ("PyTorch torch.compile", comp)]:
    if v:
        rate = flops * v / tokens / 1e9
        print(f"  {label:<22} {rate:6.1f} GFLOP/s of model FLOPs ({flops / 1e9:.1f} GFLOP per step), "
              f"{100 * rate / peak:3.0f}% of the measured GEMM peak ({peak:.0f} GFLOP/s)")
PY
}
bench "bundled model (examples/shakespeare-char)" examples/shakespeare-char 8 128
bench "small GPT (V256 d384 L6 H6)" "$out/small-gpt" 8 256
