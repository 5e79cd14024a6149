#!/usr/bin/env bash
# The main job, end to end: a stateful container runs under the ms2m
# runtime, is checkpointed with exit (stop-and-copy), stays down a moment,
# is restored from the checkpoint, and its in-memory state continues.
#
#   hack/demo.sh           set up everything first (idempotent), then run the demo
#   MS2M_SKIP_SETUP=1 hack/demo.sh    skip the set-up step
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ "${MS2M_SKIP_SETUP:-0}" = 1 ] || "$MS2M_ROOT/hack/setup.sh"

ID=ms2m-demo
CK=/dev/shm/ms2m-demo/checkpoint
ms2m_cli() { ms2m --address "$MS2M_CONTAINERD_ADDRESS" --namespace "$MS2M_NAMESPACE" "$@"; }
counter() { ctr_ms2m task exec --exec-id "demo-read-$RANDOM" "$ID" cat /tmp/counter; }
cleanup() {
    ctr_ms2m task kill -s KILL "$ID" >/dev/null 2>&1 || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do ctr_ms2m task delete "$ID" >/dev/null 2>&1 && break; sleep 0.2; done
    ctr_ms2m container rm "$ID" >/dev/null 2>&1 || true
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
echo
echo "demo finished"
