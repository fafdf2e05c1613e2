#!/usr/bin/env bash
# The live demo: two zones (plant-a, enterprise), each with its own nats-server and
# JetStream domain, exchanging facts through the four boundary operations.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export BSFG_NATS_SERVER="$PWD/.tools/bin/nats-server"
exec cargo run --quiet --locked -p bsfg-e2e --example demo
