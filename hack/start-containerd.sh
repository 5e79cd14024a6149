#!/usr/bin/env bash
# Starts ms2m's own containerd (own root, state, socket and config) if it is
# not already answering. The ms2m runtime needs no registration for ctr: a
# runtime type io.containerd.ms2m.v1 makes containerd look for the binary
# containerd-shim-ms2m-v1 on its PATH. The config below also serves CRI with
# ms2m as runtime handler "ms2m", as a platform team would (hack/cri-setup.sh).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

if ctr --address "$MS2M_CONTAINERD_ADDRESS" version >/dev/null 2>&1; then
    log "containerd already running at $MS2M_CONTAINERD_ADDRESS"
    exit 0
fi
command -v containerd >/dev/null || die "containerd not installed: run hack/setup.sh"

# Where containerd logs (another instance started with this script's
# variables, e.g. for development, can log elsewhere).
: "${MS2M_CONTAINERD_LOG:=/var/log/ms2m/containerd.log}"
mkdir -p "$(dirname "$MS2M_CONTAINERD_CONFIG")" "$MS2M_CONTAINERD_ROOT" "$MS2M_CONTAINERD_STATE" \
    "$(dirname "$MS2M_CONTAINERD_LOG")"
write_containerd_config "$MS2M_CONTAINERD_CONFIG" "$MS2M_CONTAINERD_ROOT" "$MS2M_CONTAINERD_STATE" \
    "$MS2M_CONTAINERD_ADDRESS" "" cri

log "starting containerd (log: $MS2M_CONTAINERD_LOG)"
# Descriptors 3-9 closed: a daemon must not keep a caller's lock (a test run
# under `flock` that restarts containerd) or pipe open for its whole life.
nohup containerd --config "$MS2M_CONTAINERD_CONFIG" >>"$MS2M_CONTAINERD_LOG" 2>&1 </dev/null \
    3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&- &
echo $! > "$MS2M_CONTAINERD_STATE/containerd.pid"
for _ in $(seq 1 100); do
    if ctr --address "$MS2M_CONTAINERD_ADDRESS" version >/dev/null 2>&1; then
        log "containerd ready at $MS2M_CONTAINERD_ADDRESS"
        exit 0
    fi
    sleep 0.1
done
tail -20 "$MS2M_CONTAINERD_LOG" >&2
die "containerd did not come up within 10 s"
