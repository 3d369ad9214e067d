#!/usr/bin/env bash
# Installs what building and testing shardc needs, when it is missing. Safe to run repeatedly.
#
# Today: a Rust toolchain (cargo) and a C compiler for build scripts. The codegen crate will add
# LLVM/MLIR 22 (Debian packages) and the ptxas/libdevice wheels here when it starts using them.
set -euo pipefail

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
command -v curl >/dev/null 2>&1 || need_apt+=(curl ca-certificates)
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
  echo "setup: no Rust toolchain found; install one with rustup (Rust 1.85 or newer), then rerun" >&2
  exit 1
fi
