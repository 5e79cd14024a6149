#!/usr/bin/env bash
# ms2m soak, issue 9: the lapin consumer (/usr/local/bin/amqp-consumer)
# behind ms2m's AMQP tap on a RabbitMQ stream for SOAK_MINUTES at SOAK_RATE
# msg/s, a leave-running `ms2m checkpoint` every 10 s and an exit checkpoint
# + `ms2m restore` every 60 s; the shim's and the consumer's VmRSS every 5 s;
# the checker over every result. Then, as the reference, the same consumer
# under containerd-shim-runc-v2 on the host network straight to the broker
# (no tap, no checkpoints: runc-v2 has no replay) for SOAK_BASELINE_MINUTES.
#
#   sudo hack/bench.sh soak                       the recorded run (30 minutes + 5)
#   SOAK_MINUTES=3 SOAK_BASELINE_MINUTES=1 sudo hack/bench.sh soak
#
# Knobs: SOAK_MINUTES (30); SOAK_RATE (5000, the issue's); SOAK_BATCH (200:
# the consumer's BATCH and prefetch, deliveries per confirm round trip; with
# 1, one at a time, it keeps up with ~400 msg/s here, see docs/benchmarks.md
# "Soak");
# SOAK_BASELINE_MINUTES (5; 0: none); SOAK_CAPACITY_SECONDS (20; 0: none):
# first measure the consumer's ceiling (producer unthrottled) behind the tap
# and direct; BENCH_OUT (target/bench); BENCH_TOKEN (prefix of what it makes).
#
# Output: JSON lines on stdout and in BENCH_OUT/results-soak-<time>.jsonl
# (one per soak, see runtime-tests/src/soak.rs), logs in logs-soak-<time>/.
# Exit status: 0 when every soak was exact (0 lost, 0 duplicated, 0 out of
# order, every checkpoint and restore succeeded), 1 otherwise.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/lib.sh
source "$HERE/lib.sh"

: "${SOAK_MINUTES:=30}"
: "${SOAK_RATE:=5000}"
: "${SOAK_BATCH:=200}"
export SOAK_BATCH
: "${SOAK_BASELINE_MINUTES:=5}"
: "${SOAK_CAPACITY_SECONDS:=20}"
: "${BENCH_OUT:=$MS2M_ROOT/target/bench}"
: "${BENCH_TOKEN:=bs$$}"
export BENCH_TOKEN

[ "$(id -u)" = 0 ] || die "hack/bench-soak.sh must run as root (containerd, runc and CRIU need it)"
for b in cargo ctr criu containerd-shim-ms2m-v1 containerd-shim-runc-v2 ms2m rabbitmqctl; do
    command -v "$b" >/dev/null || die "$b not found on PATH: run hack/setup.sh"
done
rabbitmqctl -q -n ms2m@localhost status >/dev/null 2>&1 \
    || die "ms2m's RabbitMQ node (ms2m@localhost) is not running: run hack/start-rabbitmq.sh"
"$HERE/start-containerd.sh" || die "could not start ms2m's containerd: see /var/log/ms2m/containerd.log"
ctr_ms2m images ls -q 2>/dev/null | grep -qx "$MS2M_TEST_IMAGE" \
    || die "test image $MS2M_TEST_IMAGE not in ms2m's containerd: run hack/build-image.sh"

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
logdir="$BENCH_OUT/logs-soak-$stamp"
mkdir -p "$logdir"
export BENCH_LOGDIR="$logdir"
results="$BENCH_OUT/results-soak-$stamp.jsonl"
: > "$results"
printf 'started %s, kernel %s, %s CPUs, load %s, git %s\nknobs: minutes=%s rate=%s batch=%s baseline_minutes=%s capacity_s=%s\n' \
    "$stamp" "$(uname -r)" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)" \
    "$(git -C "$MS2M_ROOT" rev-parse --short HEAD 2>/dev/null || echo ?)" \
    "$SOAK_MINUTES" "$SOAK_RATE" "$SOAK_BATCH" "$SOAK_BASELINE_MINUTES" "$SOAK_CAPACITY_SECONDS" > "$logdir/meta.txt"
sha256sum "$(command -v containerd-shim-ms2m-v1)" "$(command -v ms2m)" >> "$logdir/meta.txt"

log "building the soak driver (cargo build --release -p ms2m-runtime-tests --example bench_soak)"
cargo build --release -q -p ms2m-runtime-tests --example bench_soak 2>&1 | tail -20 >&2
BS="$CARGO_TARGET_DIR/release/examples/bench_soak"
[ -x "$BS" ] || die "build of the bench_soak example failed"

# --- cleanup on any exit: the driver removes its own things unless killed;
# `bench_soak cleanup` removes whatever carries the token.
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "${child:-}" ] && kill "$child" 2>/dev/null && wait "$child" 2>/dev/null || true
    "$BS" cleanup >&2 || true
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

rc=0
child=
step() { # name, args...: runs the driver, its JSON lines go to $results
    local name=$1; shift
    log "soak $name: $BS $*"
    set +e
    "$BS" "$@" > "$logdir/$name.jsonl" 2> >(tee "$logdir/$name.log" >&2) &
    child=$!
    wait "$child"
    local r=$?
    child=
    set -e
    cat "$logdir/$name.jsonl" >> "$results"
    [ "$r" = 0 ] || { log "soak $name: exit $r (see $logdir/$name.log)"; rc=1; }
}
[ "$SOAK_CAPACITY_SECONDS" -gt 0 ] && step capacity capacity "$SOAK_CAPACITY_SECONDS"
step ms2m soak "$SOAK_MINUTES" "$SOAK_RATE"
[ "$SOAK_BASELINE_MINUTES" -gt 0 ] && step runc-v2 baseline "$SOAK_BASELINE_MINUTES" "$SOAK_RATE"

cat "$results"
python3 - "$results" <<'EOF' || rc=1
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
soaks = {r["runtime"]: r for r in rows if r.get("name") == "soak"}
for r in rows:
    if r.get("name") == "soak_capacity_msgs":
        print("capacity %s: producer %.0f msg/s, consumer %.0f msg/s" % (r["runtime"], r["producer"], r["consumer"]))
for rt, r in soaks.items():
    s, c = r["shim_rss_mib"], r["consumer_rss_mib"]
    print("soak %s: %.0f s at %d msg/s (%d achieved), %d messages: lost %d, duplicated %d, out of order %d%s; "
          "%d leave-running + %d exit/restore; shim RSS %.2f -> %.2f MiB (max %.2f); consumer RSS %.2f -> %.2f MiB (max %.2f); %s"
          % (rt, r["seconds"], r["rate"], r["producer_rate"], r["produced"], r["lost"], r["duplicated"], r["out_of_order"],
             "" if r["state_digest_exact"] else ", consumer state WRONG", r["leave_running"]["count"],
             r["exit_restore"]["count"], s["start"], s["end"], s["max"], c["start"], c["end"], c["max"],
             "EXACT" if r["exact"] else "NOT EXACT " + "; ".join(r["failures"])))
if "ms2m" in soaks and "runc-v2" in soaks:
    a, b = soaks["ms2m"]["shim_rss_mib"], soaks["runc-v2"]["shim_rss_mib"]
    print("ratio soak shim RSS end: ms2m/runc-v2 = %.2f (%.2f / %.2f MiB; ms2m with the tap and restores, runc-v2 without)"
          % (a["end"] / b["end"], a["end"], b["end"]))
sys.exit(0 if soaks and all(r["exact"] for r in soaks.values()) else 1)
EOF
echo "results: $results"
exit "$rc"
