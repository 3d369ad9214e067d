#!/usr/bin/env bash
# Regenerates tests/fixtures/hf with CPU PyTorch + transformers in a local venv (.venv-fixtures).
# The fixtures are committed; CI does not run this.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FIXTURE_VENV:-.venv-fixtures}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet torch transformers safetensors numpy
fi
"$VENV/bin/python" scripts/make_fixtures.py
