#!/usr/bin/env bash
# ms2m benchmark, issue 8: live migration (`ms2m migrate`) of a tapped consumer
# from host A (ms2m's containerd) to host B (hack/host-b.sh: a second
# containerd in its own network namespace, its migration agent on
# 10.88.0.2:7100; host A's agent on 10.88.0.1:7101) and back, against the
# stop-and-copy baseline (`ms2m migrate --stop-and-copy`), on ms2m's RabbitMQ
# node, with the test image's consumers (lapin `amqp-consumer`, Python
# `pika_consumer.py`) on RabbitMQ streams. The measuring is done by
# runtime-tests/examples/bench_migration.rs (see its header for every figure).
#
#   sudo hack/bench-migration.sh                              full run
#   BENCH_RUNS=2 BENCH_MIGRATIONS=5 sudo hack/bench-migration.sh   quick run
#
# Figures (BENCH_MIGRATION_FIGURES, default "gap gap-classic total catchup pingpong classic"):
#   gap       BENCH_RUNS (5) live and BENCH_RUNS stop-and-copy migrations,
#             interleaved, at BENCH_GAP_RATE (100) msg/s: the largest gap between
#             consecutive results (processed_at_us) at the live cutover
#             (target <= 20 ms) and over the whole stop-and-copy move
#             (target: live >= 95 % less); also live's largest gap over the
#             whole migration (it includes the checkpoint's freeze)
#   gap-classic  the same as gap with a consumer of a classic queue (moved
#             through the classic-queue mirror)
#   total     the same at BENCH_TOTAL_RATE (10) msg/s: total_ms of the live
#             `ms2m migrate` (target <= 1500 ms)
#   catchup   the lapin consumer with BENCH_WORK_US (1000) us of work per
#             message: its throughput, then BENCH_RUNS live migrations at
#             BENCH_CATCHUP_RATE (1000) msg/s, or at 85 % of what it sustains
#             when it cannot keep up (said so): replay_rate / live_rate
#             (target >= 5) and the outcome
#   pingpong  for each client in BENCH_PINGPONG_CLIENTS ("lapin pika"): one
#             consumer moved A->B->A... BENCH_MIGRATIONS (50) times under one
#             producer at BENCH_PINGPONG_RATE (1000) msg/s; the checker over all
#             results (target 0 lost, 0 duplicated, 0 out of order, 0 failed
#             migrations) and the final state digest (= digest of 1..N)
#   classic   the same as pingpong on a classic queue (each move replays
#             the source's mirror stream, then takes the queue over)
# By default `gap`, `total` and `catchup` move a fresh consumer from A to B for
# each migration; BENCH_MIGRATION_BACK=1 moves one consumer back and forth
# instead (needs moves from B back to A to work).
# Other knobs: BENCH_OUT=target/bench, BENCH_STRICT=1 (exit 2 on a missed
# target), BENCH_TOKEN (prefix of everything it creates), BENCH_WAIT_QUIET.
#
# Output: JSON lines {"name","runtime","unit","median","p90","min","max","runs",
# "values",...} then `target ...` lines, on stdout and in
# BENCH_OUT/results-migration-<time>.jsonl (+ .targets.txt,
# logs-migration-<time>/ with every migration's --json report and gaps in
# migrations-<figure>.jsonl). Progress on stderr.
# Exit status: 0 all figures measured and exact, 1 a figure failed, 2 strict miss.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/lib.sh
source "$HERE/lib.sh"

: "${BENCH_RUNS:=5}"
: "${BENCH_MIGRATIONS:=50}"
: "${BENCH_GAP_RATE:=100}"
: "${BENCH_TOTAL_RATE:=10}"
: "${BENCH_CATCHUP_RATE:=1000}"
: "${BENCH_WORK_US:=1000}"
: "${BENCH_PINGPONG_RATE:=1000}"
: "${BENCH_PINGPONG_CLIENTS:=lapin pika}"
: "${BENCH_MIGRATION_FIGURES:=gap gap-classic total catchup pingpong classic}"
: "${BENCH_OUT:=$MS2M_ROOT/target/bench}"
: "${BENCH_TOKEN:=bm$$}"
export BENCH_TOKEN

[ "$(id -u)" = 0 ] || die "hack/bench-migration.sh must run as root (containerd, runc and CRIU need it)"

# --- prerequisites: fail loudly, saying what to run -------------------------
command -v python3 >/dev/null || die "python3 not found: install python3 (hack/setup.sh system)"
command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
command -v ctr >/dev/null || die "ctr not found: run hack/setup.sh"
command -v criu >/dev/null || die "criu not found: run hack/setup.sh (builds CRIU 4.2.1)"
command -v nsenter >/dev/null || die "nsenter not found: install util-linux (hack/setup.sh system)"
command -v containerd-shim-ms2m-v1 >/dev/null || die \
    "containerd-shim-ms2m-v1 not on PATH: cargo build --release -p ms2m-shim && install -m755 target/release/containerd-shim-ms2m-v1 /usr/local/bin/"
command -v ms2m >/dev/null || die \
    "ms2m CLI not on PATH: cargo build --release -p ms2m-cli && install -m755 target/release/ms2m /usr/local/bin/"
ms2m migrate --help >/dev/null 2>&1 || die \
    "the installed ms2m CLI has no 'migrate' command: cargo build --release -p ms2m-cli && install -m755 target/release/ms2m /usr/local/bin/"
command -v rabbitmqctl >/dev/null || die "rabbitmqctl not found: run hack/setup.sh (installs rabbitmq-server)"
rabbitmqctl -q -n ms2m@localhost status >/dev/null 2>&1 \
    || die "ms2m's RabbitMQ node (ms2m@localhost) is not running: run hack/start-rabbitmq.sh"
"$HERE/start-containerd.sh" || die "could not start ms2m's containerd: see /var/log/ms2m/containerd.log"
tcp_open() { timeout 3 bash -c "exec 3<>/dev/tcp/${1%:*}/${1##*:}" 2>/dev/null; }
ctr_b version >/dev/null 2>&1 || die \
    "host B's containerd does not answer at $MS2M_HOSTB_ADDRESS: run hack/host-b.sh start (hack/host-b.sh status shows what runs; log $MS2M_HOSTB_LOG)"
tcp_open "$MS2M_HOSTB_AGENT" || die \
    "host B's migration agent does not answer on $MS2M_HOSTB_AGENT: run hack/host-b.sh start (log $MS2M_HOSTB_AGENT_LOG)"
tcp_open "$MS2M_HOSTA_AGENT" || die \
    "host A's migration agent does not answer on $MS2M_HOSTA_AGENT (moves back from B need it): run hack/host-b.sh start (log $MS2M_HOSTA_AGENT_LOG)"
hostb_exec true 2>/dev/null || die "cannot enter host B's namespaces ($MS2M_HOSTB_MNTNS, netns $MS2M_HOSTB_NETNS): run hack/host-b.sh start"
# The consumers need WORK_US (the test image of this checkout), on A and B alike.
"$HERE/build-image.sh" >&2 || die "hack/build-image.sh failed (the test image with the consumers)"
img_a="$(ctr_ms2m images ls 2>/dev/null | awk -v n="$MS2M_TEST_IMAGE" '$1 == n {print $3}')"
img_b="$(ctr_b images ls 2>/dev/null | awk -v n="$MS2M_TEST_IMAGE" '$1 == n {print $3}')"
[ -n "$img_a" ] && [ "$img_a" = "$img_b" ] || die \
    "host B's test image (${img_b:-none}) is not host A's ($img_a): run hack/host-b.sh start (it re-imports A's image into B)"

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$BENCH_OUT"
logdir="$BENCH_OUT/logs-migration-$stamp"
mkdir -p "$logdir"
export BENCH_LOGDIR="$logdir"   # the example writes every migration's record there
results="$BENCH_OUT/results-migration-$stamp.jsonl"
: > "$results"
binaries() { # which shim/CLI binaries the run used (a rebuild mid-run shows up)
    local b
    for b in containerd-shim-ms2m-v1 ms2m; do
        printf '%s %s %s\n' "$b" "$(sha256sum "$(command -v "$b")" | cut -c1-16)" \
            "$(date -u -r "$(command -v "$b")" +%Y-%m-%dT%H:%M:%SZ)"
    done
}
{
    echo "started $stamp; kernel $(uname -r); nproc $(nproc); load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "git $(git -C "$MS2M_ROOT" rev-parse --short HEAD 2>/dev/null || echo ?)"
    echo "criu $(criu --version | awk '/^Version:/{print $2}'); rabbitmq $(rabbitmqctl -q -n ms2m@localhost version 2>/dev/null || echo ?)"
    echo "image $img_a"
    echo "knobs: runs=$BENCH_RUNS migrations=$BENCH_MIGRATIONS gap_rate=$BENCH_GAP_RATE total_rate=$BENCH_TOTAL_RATE catchup_rate=$BENCH_CATCHUP_RATE work_us=$BENCH_WORK_US pingpong_rate=$BENCH_PINGPONG_RATE clients='$BENCH_PINGPONG_CLIENTS' figures='$BENCH_MIGRATION_FIGURES' back=${BENCH_MIGRATION_BACK:-0}"
    binaries
} > "$logdir/meta.txt"

# --- cleanup on any exit: the example removes its own things unless killed
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "${child:-}" ] && kill "$child" 2>/dev/null && wait "$child" 2>/dev/null || true
    local c
    for c in $(ctr_ms2m containers ls -q 2>/dev/null | grep "^$BENCH_TOKEN-" || true); do
        ctr_ms2m task kill -s SIGKILL "$c" >/dev/null 2>&1 || true
        ctr_ms2m task kill -a -s SIGKILL "$c" >/dev/null 2>&1 || true
        sleep 0.2
        ctr_ms2m task rm -f "$c" >/dev/null 2>&1 || true
        ctr_ms2m containers rm "$c" >/dev/null 2>&1 || true
    done
    for c in $(ctr_b containers ls -q 2>/dev/null | grep "^$BENCH_TOKEN-" || true); do
        # Init first: `kill --all` goes by the container's cgroup, which a
        # restored process may not be in.
        ctr_b task kill -s SIGKILL "$c" >/dev/null 2>&1 || true
        ctr_b task kill -a -s SIGKILL "$c" >/dev/null 2>&1 || true
        sleep 0.2
        timeout 20 ctr --address "$MS2M_HOSTB_ADDRESS" --namespace "$MS2M_NAMESPACE" task rm "$c" >/dev/null 2>&1 || true
        ctr_b containers rm "$c" >/dev/null 2>&1 || true
    done
    rm -rf /dev/shm/ms2m-tests/"$BENCH_TOKEN"-* /run/ms2m/migrations/"$BENCH_TOKEN"-* 2>/dev/null || true
    local q
    for q in $(rabbitmqctl -q -n ms2m@localhost list_queues name 2>/dev/null | grep "^ms2m-t-$BENCH_TOKEN-" || true); do
        rabbitmqctl -q -n ms2m@localhost delete_queue "$q" >/dev/null 2>&1 || true
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "building the bench example (cargo build --release -p ms2m-runtime-tests --example bench_migration)"
(cd "$MS2M_ROOT" && cargo build --release -q -p ms2m-runtime-tests --example bench_migration) 2>&1 | tail -20 >&2
BM="$CARGO_TARGET_DIR/release/examples/bench_migration"
[ -x "$BM" ] || die "build of the bench_migration example failed: cargo build --release -p ms2m-runtime-tests --example bench_migration"

# Other broker or migration tests on this machine restart RabbitMQ, kill host
# B's containerd or load the agents: wait for them instead of measuring noise.
: "${BENCH_WAIT_QUIET:=900}"
wait_quiet() {
    local t=0 others
    while :; do
        others="$(pgrep -a -f '(^|/)(broker_cut|amqp_workloads|migration)-[0-9a-f]+( |$)' || true)"
        [ -z "$others" ] && return 0
        if [ "$t" -ge "$BENCH_WAIT_QUIET" ]; then
            die "other broker/migration tests are still running after ${BENCH_WAIT_QUIET}s: $others"
        fi
        [ "$t" = 0 ] && log "waiting for other broker/migration tests to finish: $(echo "$others" | head -1)"
        sleep 5
        t=$((t + 5))
    done
}

failed=()
child=
run_bm() { # name, args...: runs the example, its JSON lines go to $results
    local name=$1; shift
    wait_quiet
    log "$name: $BM $*"
    set +e
    # The example's own progress lines (and panics) go to the terminal and the
    # log; the shim's and containerd's chatter (printed on a failure) only to the log.
    "$BM" "$@" > "$logdir/$name.jsonl" 2> >(tee "$logdir/$name.log" | grep --line-buffered -v '^20[0-9][0-9]-\|^time=' >&2) &
    child=$!
    wait "$child"
    local rc=$?
    child=
    set -e
    cat "$logdir/$name.jsonl" >> "$results"
    if [ "$rc" != 0 ]; then
        failed+=("$name (exit $rc: see $logdir/$name.log)")
    fi
}

for fig in $BENCH_MIGRATION_FIGURES; do
    case "$fig" in
        gap) run_bm gap gap "$BENCH_RUNS" "$BENCH_GAP_RATE" lapin stream ;;
        gap-classic) run_bm gap-classic gap "$BENCH_RUNS" "$BENCH_GAP_RATE" lapin classic ;;
        total) run_bm total gap "$BENCH_RUNS" "$BENCH_TOTAL_RATE" lapin ;;
        catchup) run_bm catchup catchup "$BENCH_RUNS" "$BENCH_CATCHUP_RATE" "$BENCH_WORK_US" lapin ;;
        pingpong)
            for cl in $BENCH_PINGPONG_CLIENTS; do
                run_bm "pingpong-$cl" pingpong "$BENCH_MIGRATIONS" "$BENCH_PINGPONG_RATE" "$cl" stream
            done
            ;;
        classic)
            for cl in $BENCH_PINGPONG_CLIENTS; do
                run_bm "classic-$cl" pingpong "$BENCH_MIGRATIONS" "$BENCH_PINGPONG_RATE" "$cl" classic
            done
            ;;
        *) die "unknown figure '$fig' in BENCH_MIGRATION_FIGURES (gap gap-classic total catchup pingpong classic)" ;;
    esac
done

{ echo "binaries at the end:"; binaries; echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"; } >> "$logdir/meta.txt"
if [ "$(sed -n '/^containerd-shim-ms2m-v1 /p;/^ms2m /p' "$logdir/meta.txt" | sort -u | wc -l)" -gt 2 ]; then
    log "WARNING: a shim or CLI binary changed during the run (see $logdir/meta.txt)"
fi

# --- targets -----------------------------------------------------------------
targets="$BENCH_OUT/results-migration-$stamp.targets.txt"
set +e
python3 - "$results" "$BENCH_GAP_RATE" "$BENCH_TOTAL_RATE" "$BENCH_PINGPONG_RATE" > "$targets" <<'EOF'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("{"):
        o = json.loads(line)
        rows[(o["name"], o["runtime"])] = o
gap_rate, total_rate, pp_rate = sys.argv[2], sys.argv[3], sys.argv[4]
miss = False
def check(name, rt, op, x, unit, label=None):
    global miss
    o = rows.get((name, rt))
    label = label or "%s %s" % (name, rt)
    u = (" " + unit) if unit else ""
    if not o or o["median"] is None:
        print("target %s: n/a (target %s %s%s) MISS" % (label, op, x, u))
        miss = True
        return
    v = o["median"]
    ok = {"<=": v <= x, ">=": v >= x, "==": v == x}[op]
    miss |= not ok
    print("target %s: %s%s (target %s %s%s) %s" % (label, "%.4g" % v, u, op, x, u, "OK" if ok else "MISS"))
def info(name, rt, what):
    o = rows.get((name, rt))
    if o and o["median"] is not None:
        print("info %s %s: median %.4g %s (min %.4g, max %.4g, %d runs) %s"
              % (name, rt, o["median"], o["unit"], o["min"], o["max"], o["runs"], what))
g = "mig%s" % gap_rate
for k in ("stream", "classic"):
    v = "lapin-" + k
    if (g + "_lost", v) not in rows:
        continue
    check(g + "_gap_cutover_ms", v + "-live", "<=", 20, "ms", "%s live gap at cutover (%s msg/s)" % (k, gap_rate))
    check(g + "_gap_reduction", v, ">=", 0.95, "", "%s live cutover gap reduction vs stop-and-copy" % k)
    info(g + "_gap_ms", v + "-stop-and-copy", "stop-and-copy gap (whole downtime)")
    info(g + "_gap_whole_ms", v + "-live", "live gap over the whole migration (includes the checkpoint's freeze)")
    info(g + "_frozen_ms", v + "-live", "checkpoint freeze")
    for f in ("lost", "duplicated", "out_of_order", "failed_migrations"):
        check("%s_%s" % (g, f), v, "==", 0, "")
t = "mig%s" % total_rate
if any(n.startswith(t + "_") for n, _ in rows):
    check(t + "_total_ms", "lapin-stream-live", "<=", 1500, "ms", "live migration total (%s msg/s)" % total_rate)
    info(t + "_total_ms", "lapin-stream-stop-and-copy", "stop-and-copy total")
for (n, rt), o in sorted(rows.items()):
    if n.startswith("catchup") and n.endswith("_replay_live_ratio"):
        p = n[: -len("_replay_live_ratio")]
        if not o.get("consumer_sustains_requested_rate", True):
            print("info catch-up: the consumer with %s us of work drains %.0f msg/s: it cannot keep up with %s msg/s; measured at %s msg/s"
                  % (o.get("work_us"), o.get("consumer_throughput_msgs", 0), o.get("requested_rate"), o.get("rate")))
        check(n, rt, ">=", 5, "", "replay/live rate (%s msg/s)" % o.get("rate"))
        check(p + "_migrated", rt, "==", 1, "", "catch-up migrations that migrated (fraction)")
        info(p + "_replay_rate", rt, "")
        info(p + "_live_rate", rt, "")
pp = "pingpong%s" % pp_rate
for (n, rt), o in sorted(rows.items()):
    if n == pp + "_lost" and (rt.endswith("-stream") or rt.endswith("-classic")):
        for f in ("lost", "duplicated", "out_of_order", "failed_migrations"):
            check("%s_%s" % (pp, f), rt, "==", 0, "")
        check(pp + "_digest_matches", rt, "==", 1, "", "%s final state digest = digest_of(1..=N)" % rt)
        print("info %s: %s of %s migrations migrated, %s messages produced"
              % (rt, o.get("migrated"), o.get("migrations"), o.get("produced")))
        info(pp + "_total_ms", rt + "-live", "per migration")
        info(pp + "_gap_cutover_ms", rt + "-live", "per migration")
        for e in o.get("errors", [])[:3]:
            print("info %s error: %s" % (rt, e))
sys.exit(2 if miss else 0)
EOF
trc=$?
set -e
cat "$results"
cat "$targets"
echo "results: $results"
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
if [ "$trc" = 2 ] && [ "${BENCH_STRICT:-}" = 1 ]; then
    exit 2
fi
exit 0
