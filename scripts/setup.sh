#!/usr/bin/env bash
# Installs what building and testing shardc needs, when it is missing. Safe to run repeatedly.
#
# - a Rust toolchain (cargo) and a C compiler (build scripts; `cc -shared` links host kernels);
# - LLVM/MLIR 22 from Debian's packages, for the codegen crate (melior 0.27.8 / mlir-sys 220);
#   `.cargo/config.toml` points mlir-sys at /usr/lib/llvm-22;
# - ptxas and libdevice, from NVIDIA's PyPI wheels, into target/toolchain/py (libdevice is
#   linked into every PTX kernel; ptxas assembles the PTX to check it without a GPU).
set -euo pipefail
_setup_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
command -v c++ >/dev/null 2>&1 || need_apt+=(g++)
command -v curl >/dev/null 2>&1 || need_apt+=(curl ca-certificates)
[ -f /usr/lib/llvm-22/lib/libMLIR.a ] || [ -f /usr/lib/llvm-22/lib/libMLIRIR.a ] || need_apt+=(llvm-22-dev libmlir-22-dev)
[ -f /usr/lib/llvm-22/lib/libPolly.a ] || need_apt+=(libpolly-22-dev)
[ -f /usr/lib/llvm-22/lib/libclang.so ] || [ -f /usr/lib/llvm-22/lib/libclang.so.1 ] || need_apt+=(libclang-22-dev)
[ -f /usr/include/zstd.h ] || need_apt+=(libzstd-dev)
[ -f /usr/include/zlib.h ] || need_apt+=(zlib1g-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
  else
    echo "setup: please install ${need_apt[*]} (needs root and apt-get)" >&2
    exit 1
  fi
fi

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: no Rust toolchain found; install one with rustup (Rust 1.87 or newer), then rerun" >&2
  exit 1
fi

# ptxas and libdevice (CUDA 13.0, matching the GPU machines' driver), as wheels: no CUDA install.
_toolchain="$_setup_root/target/toolchain/py"
if [ ! -x "$_toolchain/nvidia/cu13/bin/ptxas" ] || [ ! -f "$_toolchain/nvidia/cu13/nvvm/libdevice/libdevice.10.bc" ]; then
  _py="$(command -v python3 || true)"
  if [ -z "$_py" ]; then
    echo "setup: python3 with pip is needed to fetch ptxas and libdevice (apt-get install python3-pip)" >&2
    exit 1
  fi
  echo "setup: installing ptxas and libdevice (nvidia-cuda-nvcc, nvidia-nvvm 13.0.88) into target/toolchain/py"
  "$_py" -m pip install --quiet --disable-pip-version-check --no-deps --target "$_toolchain" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88
fi
export SHARDC_TOOLCHAIN="$_setup_root/target/toolchain"
