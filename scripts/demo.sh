#!/usr/bin/env bash
# The live demo: three zones, plant -> idmz -> enterprise, each with its own
# nats-server (own JetStream domain, sync_interval: always) and its own bsfg gateway,
# configured by examples/three-zones/*.toml. A producer appends plant facts in the
# plant zone; the idmz pulls them through its link `from-plant` (over QUIC), and the
# enterprise through its link `from-idmz` (over gRPC) (FetchFacts -> AppendFact -> ConfirmReceipt, hop by
# hop). Every call between zones is mutual TLS 1.3 with zone-issued certificates
# (examples/three-zones/make-certs.sh) and authorized per identity ([[peers]]).
# Midway the idmz gateway goes down while the plant keeps working. WASM policies: the
# plant checks local appends, the enterprise quarantines recipe changes at intake
# until an operator releases them.
# Ports: nats 4222/4232/4242, monitoring 8222/8232/8242, gRPC 7443/7453/7463,
# QUIC (UDP) 7443,
# admin (metrics, status) 9464/9465/9466.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "demo: building bsfg"
cargo build --quiet --locked -p bsfg-gateway
BSFG=$PWD/target/debug/bsfg
NATS=$PWD/.tools/bin/nats-server
examples/three-zones/make-certs.sh "$BSFG"
DATA=$(mktemp -d -t bsfg-demo-XXXXXX)
declare -A PID
cleanup() {
  for p in "${PID[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DATA"
}
trap cleanup EXIT

for port in 4222 4232 4242 7443 7453 7463 9464 9465 9466; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "demo: port $port is in use; stop whatever listens there and run again" >&2
    exit 1
  fi
done
wait_for() { # file, text
  for _ in $(seq 1 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "demo: gave up waiting for '$2' in $1:" >&2; cat "$1" >&2; exit 1
}

say() { printf '\n== %s\n' "$*"; }
run() { printf '$ bsfg %s\n' "$*"; "$BSFG" "$@"; }
EX=examples/three-zones
start_gateway() { # zone
  : > "$DATA/$1.gateway.out"
  "$BSFG" run --config "$EX/$1.toml" > "$DATA/$1.gateway.out" 2>> "$DATA/$1.gateway.log" & PID[$1.gw]=$!
  wait_for "$DATA/$1.gateway.out" "ready"
}
# The plant's producer and the enterprise's reader authenticate with their certificates.
C=$EX/certs
PRODUCER=(--tls-cert $C/plant/plant-producer.pem --tls-key $C/plant/plant-producer.key --tls-ca $C/plant/ca.pem)
READER=(--tls-cert $C/enterprise/enterprise-reader.pem --tls-key $C/enterprise/enterprise-reader.key --tls-ca $C/enterprise/ca.pem)
append_steps() { # batch, first, last
  for step in $(seq "$2" "$3"); do
    "$BSFG" --url $PLANT "${PRODUCER[@]}" append --message-id "plant:batch:$1:step:$step" --from plant --to enterprise \
      --subject "batch:Plant/$1" --predicate step_completed --object "{\"step\":$step,\"operator\":\"jdoe\"}" \
      --label site=Plant > /dev/null
  done
  echo "   appended steps $2..$3 of batch $1 in the plant zone"
}
wait_caught_up() { # zone, facts its link has taken in (stored + quarantined)
  local st stored quarantined
  for _ in $(seq 1 300); do
    st=$("$BSFG" --json status --config "$EX/$1.toml" 2>/dev/null || true)
    stored=$(grep -o '"facts_stored":[0-9]*' <<<"$st" | head -1 | cut -d: -f2)
    quarantined=$(grep -o '"quarantined":[0-9]*' <<<"$st" | head -1 | cut -d: -f2)
    if [ $(( ${stored:-0} + ${quarantined:-0} )) -ge "$2" ] && grep -q '"lag_facts":0' <<<"$st"; then
      return 0
    fi
    sleep 0.1
  done
  echo "demo: the $1 link did not take in $2 facts" >&2; "$BSFG" status --config "$EX/$1.toml"; exit 1
}
PLANT=grpcs://127.0.0.1:7443
ENTERPRISE=grpcs://127.0.0.1:7463

say "Starting zones plant, idmz and enterprise: nats-server + bsfg gateway each"
for z in plant idmz enterprise; do
  # The server's config includes certs/$z/nats-auth.conf, relative to itself.
  sed "s|/tmp/bsfg-examples/three-zones/$z|$DATA/$z|" "$EX/$z.nats.conf" > "$DATA/$z.nats.conf"
  mkdir -p "$DATA/certs/$z" && cp -p "$EX/certs/$z/nats-auth.conf" "$DATA/certs/$z/"
  "$NATS" -c "$DATA/$z.nats.conf" > "$DATA/$z.nats.log" 2>&1 & PID[$z.nats]=$!
  wait_for "$DATA/$z.nats.log" "Server is ready"
  start_gateway "$z"
  echo "   zone $z is up: $(cat "$DATA/$z.gateway.out")"
done

say "A local process without the gateway's NATS credentials tries to write a fact straight into the plant's nats-server"
exec 3<>/dev/tcp/127.0.0.1/4222
printf 'CONNECT {"verbose":false}\r\nPUB bsfg.log.facts.operational.batch.x 8\r\nintruder\r\nPING\r\n' >&3
answer=$(timeout 5 cat <&3 || true)
exec 3<&-
if ! grep -q "Authorization Violation" <<<"$answer"; then
  echo "demo: the plant's nats-server did not refuse a process without credentials:" >&2
  echo "$answer" >&2
  exit 1
fi
echo "   refused: $(grep -o "\-ERR 'Authorization Violation'" <<<"$answer")"

say "A producer in the plant stores a batch record, then appends facts about batch B1042"
printf '%%PDF-1.7 batch B1042 record (demo)\n' > "$DATA/record.pdf"
run --url $PLANT "${PRODUCER[@]}" put-object --bucket batch-files --key B1042/record.pdf "$DATA/record.pdf"
append_steps B1042 1 5
run --url $PLANT "${PRODUCER[@]}" append --message-id "plant:batch:B1042:record" --from plant --to enterprise \
  --subject batch:Plant/B1042 --predicate has_artifact --object '{"kind":"batch_record"}' --label site=Plant \
  --artifact batch-files/B1042/record.pdf --media-type application/pdf

say "The producer retries step 3 (same id, same payload: nothing new is stored)"
run --url $PLANT "${PRODUCER[@]}" append --message-id "plant:batch:B1042:step:3" --from plant --to enterprise \
  --subject batch:Plant/B1042 --predicate step_completed --object '{ "operator": "jdoe", "step": 3 }' --label site=Plant

say "A changed step 4 under the same id is refused, and so is a malformed predicate"
run --url $PLANT "${PRODUCER[@]}" append --message-id "plant:batch:B1042:step:4" --from plant --to enterprise \
  --subject batch:Plant/B1042 --predicate step_completed --object '{"step":4,"operator":"mallory"}' || true
run --url $PLANT "${PRODUCER[@]}" append --message-id "plant:batch:B1042:step:6" --from plant --to enterprise \
  --subject batch:Plant/B1042 --predicate StepCompleted --object '{}' || true

say "A WASM policy in the plant (json_fields.wasm) refuses a step that does not name its operator"
run --url $PLANT "${PRODUCER[@]}" append --message-id "plant:batch:B1042:step:7" --from plant --to enterprise \
  --subject batch:Plant/B1042 --predicate step_completed --object '{"step":7}' || true

say "The producer may speak for the plant only: claiming the enterprise zone is refused"
run --url $PLANT "${PRODUCER[@]}" append --message-id "forged:1" --from enterprise --to plant \
  --subject batch:Plant/B1042 --predicate step_completed --object '{"step":9}' || true
say "A client without a certificate from a trusted CA does not get past the TLS handshake"
run --url $PLANT --tls-cert $C/enterprise/enterprise-reader.pem --tls-key $C/enterprise/enterprise-reader.key --tls-ca $C/plant/ca.pem \
  append --message-id "stranger:1" --from plant --to plant --subject batch:Plant/B1042 --predicate step_completed --object '{}' 2>&1 | head -3 || true

say "The links carry the facts hop by hop, without anyone asking: idmz pulls from plant over QUIC, enterprise from idmz over gRPC"
wait_caught_up enterprise 6
run status --config $EX/idmz.toml
run status --config $EX/enterprise.toml

say "The idmz gateway goes down (SIGTERM); the plant keeps accepting facts"
kill -TERM "${PID[idmz.gw]}"; wait "${PID[idmz.gw]}" && echo "   idmz gateway stopped cleanly"
append_steps B1043 1 20
sleep 1
run status --config $EX/enterprise.toml
say "A monitoring check of the idmz zone (exit codes as Nagios: 0 ok, 1 warning, 2 critical; docs/operations.md)"
run status --check --config $EX/idmz.toml || echo "   exit code $?"

say "The idmz gateway comes back; both links resume by themselves and catch up"
start_gateway idmz
wait_caught_up enterprise 26
run status --config $EX/enterprise.toml

say "A recipe change crosses to the enterprise, whose intake policy (deny_predicates.wasm) quarantines it"
run --url $PLANT "${PRODUCER[@]}" append --message-id "plant:batch:B1043:recipe:1" --from plant --to enterprise \
  --subject batch:Plant/B1043 --predicate recipe_changed --object '{"recipe":"R7","by":"jdoe"}' --label site=Plant
wait_caught_up enterprise 27
say "The batch record crossed with its fact, hop by hop: the enterprise holds it with the plant's digest"
run --url $ENTERPRISE "${READER[@]}" get-object --bucket batch-files --key B1042/record.pdf "$DATA/record.enterprise.pdf"
cmp "$DATA/record.pdf" "$DATA/record.enterprise.pdf" && echo "   byte for byte the plant's record"
run quarantine list --config $EX/enterprise.toml
say "An operator reviews it and releases it: it is appended as it was, and the release is recorded as a fact"
run quarantine release --config $EX/enterprise.toml --id plant:batch:B1043:recipe:1 --by demo-operator
say "The same check of the enterprise zone: nothing held in quarantine, links within limits"
run status --check --config $EX/enterprise.toml || echo "   exit code $?"

say "A reader in the enterprise zone fetches and confirms what arrived (via = where the link got it)"
run --url $ENTERPRISE "${READER[@]}" fetch --consumer reporting --limit 40 --confirm

say "Security metrics of the plant zone: refused handshakes and denied requests, by identity"
curl -s http://127.0.0.1:9464/metrics 2>/dev/null | grep -E '^bsfg_(tls_handshake_failures|authz_denials)' || true

say "Metrics of the enterprise zone (Prometheus text on its admin endpoint): replication and certificates"
curl -s http://127.0.0.1:9466/metrics 2>/dev/null | grep -E '^bsfg_(replication_lag|frontier_offset|link_state.*} 1|replicated_facts|replayed_facts|quarantined_facts|artifact_transfers.*copied|artifact_bytes|policy_decisions|certificate_expiry)' || \
  echo "   (curl not installed: see http://127.0.0.1:9466/metrics)"

say "Stopping the gateways with SIGTERM: they finish what is in flight and exit"
for z in enterprise idmz plant; do kill -TERM "${PID[$z.gw]}"; wait "${PID[$z.gw]}" && echo "   $z gateway exited cleanly"; unset "PID[$z.gw]"; done
say "Done: 27 facts and the batch record they reference crossed two hops once each, under their original message_ids (one after an operator's review)."
