#!/usr/bin/env bash
# Certificates for the three-zone example, made with `bsfg certs`: one CA per zone
# (each zone issues its own identities), a gateway certificate per zone for its
# mTLS listener and its links, and two client certificates: the plant's producer and
# the enterprise's reader; each zone's admin token and its nats-server's user. Existing files are kept; delete certs/ to start over.
# Usage: make-certs.sh BSFG_BINARY
set -euo pipefail
BSFG=${1:?usage: make-certs.sh path/to/bsfg}
cd "$(dirname "$0")"
for zone in plant idmz enterprise; do
  [ -f "certs/$zone/ca.pem" ] || "$BSFG" certs init --zone "$zone" --dir "certs/$zone" > /dev/null
  [ -f "certs/$zone/$zone-bsfg.pem" ] || "$BSFG" certs issue --dir "certs/$zone" \
    --name "$zone-bsfg" --server --client --dns localhost --ip 127.0.0.1 > /dev/null
  # The admin endpoint's credential ([admin] token_file).
  [ -f "certs/$zone/admin.token" ] || "$BSFG" certs admin-token --out "certs/$zone/admin.token" > /dev/null
  # The zone's nats-server admits only the gateway's user: its password, and the
  # server's authorization block that $zone.nats.conf includes (both mode 0600).
  if [ ! -f "certs/$zone/nats-auth.conf" ]; then
    "$BSFG" certs admin-token --force --out "certs/$zone/nats.password" > /dev/null
    (umask 077; printf 'authorization {\n  users = [\n    { user: "bsfg", password: "%s" }\n  ]\n}\n' \
      "$(cat "certs/$zone/nats.password")" > "certs/$zone/nats-auth.conf")
  fi
done
[ -f certs/plant/plant-producer.pem ] || "$BSFG" certs issue --dir certs/plant --name plant-producer --client > /dev/null
[ -f certs/enterprise/enterprise-reader.pem ] || "$BSFG" certs issue --dir certs/enterprise --name enterprise-reader --client > /dev/null
echo "certificates in $(pwd)/certs"
