#!/usr/bin/env bash
# The live demo: two zones (plant-a and enterprise), each with its own nats-server
# (own JetStream domain, sync_interval: always) and its own bsfg gateway, configured
# by examples/two-zones/*.toml. A producer appends plant facts in plant-a; the
# enterprise zone pulls them over gRPC (FetchFacts -> AppendFact -> ConfirmReceipt).
# Uses ports 4222/4232 (nats), 8222/8232 (monitoring), 7443/7453 (gateways).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "demo: building bsfg"
cargo build --quiet --locked -p bsfg-gateway
BSFG=$PWD/target/debug/bsfg
NATS=$PWD/.tools/bin/nats-server
DATA=$(mktemp -d -t bsfg-demo-XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DATA"
}
trap cleanup EXIT

for port in 4222 4232 7443 7453; do
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

say "Starting zones plant-a and enterprise: nats-server + bsfg gateway each"
for z in plant-a enterprise; do
  sed "s|/tmp/bsfg-examples/$z|$DATA/$z|" "examples/two-zones/$z.nats.conf" > "$DATA/$z.nats.conf"
  "$NATS" -c "$DATA/$z.nats.conf" > "$DATA/$z.nats.log" 2>&1 & PIDS+=($!)
  wait_for "$DATA/$z.nats.log" "Server is ready"
  "$BSFG" run --config "examples/two-zones/$z.toml" > "$DATA/$z.gateway.out" 2> "$DATA/$z.gateway.log" & PIDS+=($!)
  wait_for "$DATA/$z.gateway.out" "ready"
  echo "   zone $z is up ($(grep -o 'nats-server syncs every JetStream write' "$DATA/$z.gateway.log" || echo 'durability unknown'))"
done
PLANT=grpc://127.0.0.1:7443
ENTERPRISE=grpc://127.0.0.1:7453

say "A producer in plant-a stores a batch record, then appends facts about batch B1042"
printf '%%PDF-1.7 batch B1042 record (demo)\n' > "$DATA/record.pdf"
run --url $PLANT put-object --bucket batch-files --key B1042/record.pdf "$DATA/record.pdf"
for step in 1 2 3 4 5; do
  run --url $PLANT append --message-id "plant-a:batch:B1042:step:$step" --from plant-a --to enterprise \
    --subject batch:PlantA/B1042 --predicate step_completed --object "{\"step\":$step,\"operator\":\"jdoe\"}" \
    --label site=PlantA
done

say "The producer retries step 3 (same id, same payload: nothing new is stored)"
run --url $PLANT append --message-id "plant-a:batch:B1042:step:3" --from plant-a --to enterprise \
  --subject batch:PlantA/B1042 --predicate step_completed --object '{ "operator": "jdoe", "step": 3 }' --label site=PlantA

say "A changed step 4 under the same id is refused, and so is a malformed predicate"
run --url $PLANT append --message-id "plant-a:batch:B1042:step:4" --from plant-a --to enterprise \
  --subject batch:PlantA/B1042 --predicate step_completed --object '{"step":4,"operator":"mallory"}' || true
run --url $PLANT append --message-id "plant-a:batch:B1042:step:6" --from plant-a --to enterprise \
  --subject batch:PlantA/B1042 --predicate StepCompleted --object '{}' || true

say "The enterprise zone pulls from plant-a: FetchFacts -> AppendFact -> ConfirmReceipt"
run --url $ENTERPRISE pull --source $PLANT --consumer to-enterprise --limit 2

say "A reader in the enterprise zone fetches and confirms what arrived"
run --url $ENTERPRISE fetch --consumer reporting --limit 20 --confirm

say "Pulling again finds nothing new; the plant-a frontier covers everything"
run --url $ENTERPRISE pull --source $PLANT --consumer to-enterprise

say "Stopping the gateways with SIGTERM: they finish what is in flight and exit"
for i in 1 3; do kill -TERM "${PIDS[$i]}"; done
for i in 1 3; do wait "${PIDS[$i]}" && echo "   gateway exited cleanly"; done
say "Done: every fact crossed once, under its original message_id."
