#!/usr/bin/env bash
# The main job, end to end:
#  part 1: a stateful container runs under the ms2m runtime, is checkpointed
#          with exit (stop-and-copy), stays down a moment, is restored from the
#          checkpoint, and its in-memory state continues;
#  part 2: an unmodified AMQP consumer (lapin) reads a RabbitMQ stream through
#          the shim's tap under load; it is checkpointed with exit while
#          messages keep arriving, restored, resumes exactly at the broker cut,
#          and the checker shows 0 lost, 0 duplicated, 0 out of order.
#  part 3: moving a consumer while it keeps serving: a leave-running
#          checkpoint, the source goes on processing and publishing, then
#          `ms2m fence --kill` and a restore: the replay's publishes the
#          source had already made are suppressed, the checker shows zeros.
#  part 4: live migration to another containerd host in one command
#          (`ms2m migrate`: host B is a second containerd in its own network
#          namespace, hack/host-b.sh): the consumer serves on while its
#          checkpoint crosses over TCP and the target catches up; next to a
#          stop-and-copy move of another loaded consumer, with the checker's
#          counts and the longest processing gap of each; then a consumer of
#          a classic queue moves live too, through the classic-queue mirror.
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
CK3=/dev/shm/ms2m-demo/moved-checkpoint
QUEUE="ms2m-demo-stream-$$"
MOVED=ms2m-demo-moved
QUEUE3="ms2m-demo-moved-$$"
LIVE=ms2m-demo-live
SAC=ms2m-demo-sac
QUEUE4="ms2m-demo-live-$$"
QUEUE5="ms2m-demo-sac-$$"
CLASSIC=ms2m-demo-classic
QUEUE6="ms2m-demo-classic-$$"
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
    remove "$MOVED"
    remove "$LIVE"
    remove "$SAC"
    remove "$CLASSIC"
    for c in "$LIVE" "$SAC" "$CLASSIC"; do
        ctr_b task kill -s KILL "$c" >/dev/null 2>&1 || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do ctr_b task delete "$c" >/dev/null 2>&1 && break; sleep 0.2; done
        ctr_b container rm "$c" >/dev/null 2>&1 || true
    done
    for q in "$QUEUE" "$QUEUE.results" "$QUEUE3" "$QUEUE3.results" "$QUEUE4" "$QUEUE4.results" \
        "$QUEUE5" "$QUEUE5.results" "$QUEUE6" "$QUEUE6.results"; do
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
state_of() { ctr_ms2m task exec --exec-id "demo-st-$RANDOM" "$1" cat /tmp/consumer-state 2>/dev/null || true; }
consumer_state() { state_of "$CONSUMER"; }
# run_consumer NAME QUEUE [stream|classic]: the lapin consumer behind the
# tap, connected.
run_consumer() {
    ctr_ms2m run -d --runtime io.containerd.ms2m.v1 \
        --annotation "io.ms2m.tap.upstream=amqp://guest:guest@127.0.0.1:5672/%2f" \
        --env QUEUE="$2" --env QUEUE_TYPE="${3:-stream}" --env CONSUMER_NAME=demo \
        --env AMQP_URL="amqp://guest:guest@localhost:5672/%2f" \
        "$MS2M_TEST_IMAGE" "$1" /usr/local/bin/amqp-consumer
    for _ in $(seq 1 100); do state_of "$1" | grep -Eq '"connects": *[1-9]' && break; sleep 0.1; done
    state_of "$1" | grep -Eq '"connects": *[1-9]' || die "the consumer $1 did not connect through the tap"
}

step "6. An unmodified AMQP consumer behind the ms2m tap"
echo "The container has only loopback; the shim serves amqp://localhost:5672 inside it"
echo "(annotation io.ms2m.tap.upstream) and forwards to RabbitMQ on the host."
run_consumer "$CONSUMER" "$QUEUE"
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
remove "$CONSUMER"

# ---------------------------------------------------------------- part 3
step "10. Move a consumer while it keeps serving: leave-running checkpoint"
run_consumer "$MOVED" "$QUEUE3"
"$DEMO_BIN" produce "$QUEUE3" 4000 500 /dev/shm/ms2m-demo/confirmed3 &
PRODUCER=$!
sleep 2
ms2m_cli checkpoint --image-path "$CK3" "$MOVED"
echo "the source keeps processing and publishing results past the cut (1 s)..."
sleep 1
echo "source now: $(state_of "$MOVED")"

step "11. Cutover: fence the source (hold its deliveries, count its publishes since the cut), kill it"
ms2m_cli fence --kill --image-path "$CK3" "$MOVED"

step "12. Restore: replay from the cut, the publishes the source already made are suppressed"
ms2m_cli restore "$MOVED" "$CK3"
wait "$PRODUCER"
sleep 1
echo "restored consumer: $(state_of "$MOVED")"

step "13. The checker: no result is missing or published twice downstream"
"$DEMO_BIN" check "$QUEUE3.results" /dev/shm/ms2m-demo/confirmed3 \
    || die "the checker found lost, duplicated or out-of-order messages after the move"
remove "$MOVED"

# ---------------------------------------------------------------- part 4
step "14. Live migration to host B: one command, while the consumer serves (500 msg/s)"
hack_status="$("$MS2M_ROOT/hack/host-b.sh" status 2>&1)" || die "host B is not up: $hack_status"
echo "host B: containerd $MS2M_HOSTB_ADDRESS in netns $MS2M_HOSTB_NETNS, agent $MS2M_HOSTB_AGENT"
run_consumer "$LIVE" "$QUEUE4"
"$DEMO_BIN" produce "$QUEUE4" 3000 500 /dev/shm/ms2m-demo/confirmed4 &
PRODUCER=$!
sleep 2
ms2m_cli migrate --to "$MS2M_HOSTB_AGENT" "$LIVE"
echo "on host A: $(ctr_ms2m task ls | grep -c "^$LIVE " || true) task(s) named $LIVE; on host B:"
ctr_b task ls | grep -E "^TASK|^$LIVE"
wait "$PRODUCER"
sleep 1

step "15. The checker for the live migration"
"$DEMO_BIN" check "$QUEUE4.results" /dev/shm/ms2m-demo/confirmed4 \
    || die "the checker found lost, duplicated or out-of-order messages after the live migration"

step "16. For comparison: a stop-and-copy move of another consumer under the same load"
run_consumer "$SAC" "$QUEUE5"
"$DEMO_BIN" produce "$QUEUE5" 3000 500 /dev/shm/ms2m-demo/confirmed5 &
PRODUCER=$!
sleep 2
ms2m_cli migrate --stop-and-copy --to "$MS2M_HOSTB_AGENT" "$SAC"
wait "$PRODUCER"
sleep 1
"$DEMO_BIN" check "$QUEUE5.results" /dev/shm/ms2m-demo/confirmed5 \
    || die "the checker found lost, duplicated or out-of-order messages after the stop-and-copy move"
echo "(the live migration's largest gap is the source's checkpoint freeze, not the cutover;"
echo " the stop-and-copy gap is the whole checkpoint + transfer + restore + reconnect)"

step "17. A consumer of a classic queue moves live too: the source's tap mirrors what it acks after the cut"
run_consumer "$CLASSIC" "$QUEUE6" classic
"$DEMO_BIN" produce "$QUEUE6" 3000 500 /dev/shm/ms2m-demo/confirmed6 &
PRODUCER=$!
sleep 2
ms2m_cli migrate --to "$MS2M_HOSTB_AGENT" "$CLASSIC"
wait "$PRODUCER"
sleep 1
"$DEMO_BIN" check "$QUEUE6.results" /dev/shm/ms2m-demo/confirmed6 \
    || die "the checker found lost, duplicated or out-of-order messages after the classic-queue migration"
echo
echo "demo finished"
