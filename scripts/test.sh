#!/usr/bin/env bash
# The whole test suite: installs what it needs, checks format and lints, runs every test.
# Tests that touch JetStream start real nats-servers on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export BSFG_NATS_SERVER="$PWD/.tools/bin/nats-server"
export BSFG_PROMTOOL="$PWD/.tools/bin/promtool"
# A one-off build gains nothing from incremental state, which would double target/.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo fmt --all -- --check
cargo fmt --manifest-path plugins/Cargo.toml --all -- --check
# The benchmarks are a feature of the gateway (not in the shipping binary): built,
# linted and smoke-tested here.
cargo clippy --workspace --all-targets --locked --features bsfg-gateway/bench -- -D warnings
cargo test --workspace --locked --features bsfg-gateway/bench
