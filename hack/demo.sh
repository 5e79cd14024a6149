#!/usr/bin/env bash
# The main job, end to end:
#  part 1: a stateful container runs under the ms2m runtime, is checkpointed
#          with exit (stop-and-copy), stays down a moment, is restored from the
#          checkpoint, and its in-memory state continues;
#  part 2: an unmodified AMQP consumer (lapin) reads a RabbitMQ stream through
#          the shim's tap under load; it is checkpointed with exit while
#          messages keep arriving, restored, resumes exactly at the broker cut,
#          and the checker shows 0 lost, 0 duplicated, 0 out of order.
#
#   hack/demo.sh           set up everything first (idempotent), then run the demo
#   MS2M_SKIP_SETUP=1 hack/demo.sh    skip the set-up step
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ "${MS2M_SKIP_SETUP:-0}" = 1 ] || "$MS2M_ROOT/hack/setup.sh"

ID=ms2m-demo
CONSUMER=ms2m-demo-consumer
CK=/dev/shm/ms2m-demo/checkpoint
CK2=/dev/shm/ms2m-demo/consumer-checkpoint
QUEUE="ms2m-demo-stream-$$"
ms2m_cli() { ms2m --address "$MS2M_CONTAINERD_ADDRESS" --namespace "$MS2M_NAMESPACE" "$@"; }
counter() { ctr_ms2m task exec --exec-id "demo-read-$RANDOM" "$ID" cat /tmp/counter; }
remove() {
    ctr_ms2m task kill -s KILL "$1" >/dev/null 2>&1 || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do ctr_ms2m task delete "$1" >/dev/null 2>&1 && break; sleep 0.2; done
    ctr_ms2m container rm "$1" >/dev/null 2>&1 || true
}
cleanup() {
    remove "$ID"
    remove "$CONSUMER"
    for q in "$QUEUE" "$QUEUE.results"; do
        rabbitmqctl -q -n ms2m@localhost delete_queue "$q" >/dev/null 2>&1 || true
    done
    rm -rf /dev/shm/ms2m-demo
}
step() { printf '\n\033[1m## %s\033[0m\n' "$*"; }
trap cleanup EXIT
cleanup

step "1. Run a stateful container under the ms2m runtime"
echo "memcounter keeps a counter in memory and bumps it every 100 ms (16 MiB resident)."
ctr_ms2m run -d --runtime io.containerd.ms2m.v1 "$MS2M_TEST_IMAGE" "$ID" \
    /usr/local/bin/memcounter --mib 16 --interval-ms 100
ctr_ms2m task ls | grep -E "^TASK|^$ID"
sleep 2
before=$(counter)
echo "counter now: $before"

step "2. Checkpoint with exit (stop-and-copy) into $CK"
ms2m_cli checkpoint --exit --image-path "$CK" "$ID"
ctr_ms2m task ls | grep -E "^TASK|^$ID"

step "3. The container is down; wait 2 s (a counter restarted from scratch would show it)"
sleep 2

step "4. Restore from the checkpoint"
ms2m_cli restore "$ID" "$CK"
ctr_ms2m task ls | grep -E "^TASK|^$ID"
sleep 1
after=$(counter)
echo "counter before checkpoint: $before, after restore: $after"
if [ "$after" -ge "$before" ] && [ "$after" -lt "$((before + 50))" ]; then
    echo "state continued across checkpoint, kill and restore"
else
    die "state did not continue: counter $before before the checkpoint, $after after the restore"
fi

step "5. The checkpoint's manifest"
ms2m_cli inspect "$CK"
remove "$ID"

# ---------------------------------------------------------------- part 2
DEMO_BIN="$CARGO_TARGET_DIR/release/ms2m-amqp-demo"
(cd "$MS2M_ROOT" && cargo build --release --locked -q -p ms2m-runtime-tests --bin ms2m-amqp-demo)
consumer_state() { ctr_ms2m task exec --exec-id "demo-st-$RANDOM" "$CONSUMER" cat /tmp/consumer-state 2>/dev/null || true; }

step "6. An unmodified AMQP consumer behind the ms2m tap"
echo "The container has only loopback; the shim serves amqp://localhost:5672 inside it"
echo "(annotation io.ms2m.tap.upstream) and forwards to RabbitMQ on the host."
ctr_ms2m run -d --runtime io.containerd.ms2m.v1 \
    --annotation "io.ms2m.tap.upstream=amqp://guest:guest@127.0.0.1:5672/%2f" \
    --env QUEUE="$QUEUE" --env QUEUE_TYPE=stream --env CONSUMER_NAME=demo \
    --env AMQP_URL="amqp://guest:guest@localhost:5672/%2f" \
    "$MS2M_TEST_IMAGE" "$CONSUMER" /usr/local/bin/amqp-consumer
for _ in $(seq 1 100); do consumer_state | grep -Eq '"connects": *[1-9]' && break; sleep 0.1; done
consumer_state | grep -Eq '"connects": *[1-9]' || die "the consumer did not connect through the tap"
echo "consumer connected: $(consumer_state)"

step "7. Produce 4000 messages at 500 msg/s; checkpoint with exit mid-stream"
mkdir -p /dev/shm/ms2m-demo
"$DEMO_BIN" produce "$QUEUE" 4000 500 /dev/shm/ms2m-demo/confirmed &
PRODUCER=$!
sleep 3
echo "consumer before the checkpoint: $(consumer_state)"
ms2m_cli checkpoint --exit --image-path "$CK2" "$CONSUMER"
echo "broker cut recorded in the manifest while the consumer was frozen:"
python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["broker"], indent=2))' "$CK2/ms2m-manifest.json"

step "8. Down for 2 s while messages keep arriving, then restore"
sleep 2
ms2m_cli restore "$CONSUMER" "$CK2"
wait "$PRODUCER"
sleep 1
echo "consumer after the restore: $(consumer_state)"

step "9. The checker: what was produced against what the consumer processed and published"
"$DEMO_BIN" check "$QUEUE.results" /dev/shm/ms2m-demo/confirmed \
    || die "the checker found lost, duplicated or out-of-order messages"
echo
echo "demo finished"
