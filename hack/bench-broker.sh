#!/usr/bin/env bash
# ms2m benchmark, issue 4: the broker cut and the AMQP tap, on ms2m's
# containerd and RabbitMQ node, with the test image's lapin consumer
# (/usr/local/bin/amqp-consumer) behind the shim's tap (annotation
# io.ms2m.tap.upstream, no --net-host).
#
#   sudo hack/bench-broker.sh                       full run
#   BENCH_CYCLES=10 sudo hack/bench-broker.sh       quick run
#
# Figures (BENCH_BROKER_FIGURES, default "correctness overhead pause"):
#   correctness  BENCH_CYCLES (100) x `ms2m checkpoint --exit --image-path` +
#                `ms2m restore` of the consumer at BENCH_RATE (1000) msg/s, on a
#                stream and on a classic queue: lost / duplicated / out of order
#                (target 0/0/0) and the cycle time
#   overhead     `cargo run --release -p ms2m-tap --example overhead --
#                BENCH_OVERHEAD_ARGS` ("10000 3 8": rate, seconds, rounds): tap vs
#                direct throughput (target >= 0.95) and added p50 latency
#                (target <= 100 us)
#   pause        shim VmRSS with the tap under BENCH_RATE msg/s (target <= 16 MiB),
#                then BENCH_PAUSE_RUNS (5) leave-running `ms2m checkpoint`s and
#                BENCH_CTR_RUNS (3) `ctr task checkpoint`s: the consumer's
#                processing pause (target <= 30 ms for ms2m checkpoint)
# Other knobs: BENCH_RSS_SECONDS=5, BENCH_OUT=target/bench, BENCH_STRICT=1
# (exit 2 on a missed target), BENCH_TOKEN (prefix of everything it creates).
#
# Output: JSON lines {"name","runtime","unit","median","min","max","runs",...}
# then `target ...` lines, on stdout and in BENCH_OUT/results-broker-<time>.jsonl
# (+ .targets.txt, logs-broker-<time>/). Progress on stderr.
# Exit status: 0 all figures measured and exact, 1 a figure failed, 2 strict miss.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/lib.sh
source "$HERE/lib.sh"

: "${BENCH_CYCLES:=100}"
: "${BENCH_RATE:=1000}"
: "${BENCH_PAUSE_RUNS:=5}"
: "${BENCH_CTR_RUNS:=3}"
: "${BENCH_RSS_SECONDS:=5}"
: "${BENCH_OVERHEAD_ARGS:=10000 3 8}"
: "${BENCH_BROKER_FIGURES:=correctness overhead pause}"
: "${BENCH_OUT:=$MS2M_ROOT/target/bench}"
: "${BENCH_TOKEN:=bb$$}"
export BENCH_TOKEN

[ "$(id -u)" = 0 ] || die "hack/bench-broker.sh must run as root (containerd, runc and CRIU need it)"

# --- prerequisites: fail loudly, saying what to run -------------------------
command -v python3 >/dev/null || die "python3 not found: install python3 (hack/setup.sh system)"
command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
command -v ctr >/dev/null || die "ctr not found: run hack/setup.sh"
command -v criu >/dev/null || die "criu not found: run hack/setup.sh (builds CRIU 4.2.1)"
command -v containerd-shim-ms2m-v1 >/dev/null || die \
    "containerd-shim-ms2m-v1 not on PATH: cargo build --release -p ms2m-shim && install -m755 target/release/containerd-shim-ms2m-v1 /usr/local/bin/"
command -v ms2m >/dev/null || die \
    "ms2m CLI not on PATH: cargo build --release -p ms2m-cli && install -m755 target/release/ms2m /usr/local/bin/"
command -v rabbitmqctl >/dev/null || die "rabbitmqctl not found: run hack/setup.sh (installs rabbitmq-server)"
rabbitmqctl -q -n ms2m@localhost status >/dev/null 2>&1 \
    || die "ms2m's RabbitMQ node (ms2m@localhost) is not running: run hack/start-rabbitmq.sh"
"$HERE/start-containerd.sh" || die "could not start ms2m's containerd: see /var/log/ms2m/containerd.log"
ctr_ms2m images ls -q 2>/dev/null | grep -qx "$MS2M_TEST_IMAGE" \
    || die "test image $MS2M_TEST_IMAGE not in ms2m's containerd: run hack/build-image.sh"
# The shim must know the tap: a container with the annotation and a bad
# upstream is refused at create by a shim that has it.
if ! grep -aq "io.ms2m.tap.upstream" "$(command -v containerd-shim-ms2m-v1)"; then
    die "the installed containerd-shim-ms2m-v1 has no AMQP tap (no io.ms2m.tap.upstream in it): cargo build --release -p ms2m-shim && install -m755 target/release/containerd-shim-ms2m-v1 /usr/local/bin/"
fi

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$BENCH_OUT"
logdir="$BENCH_OUT/logs-broker-$stamp"
mkdir -p "$logdir"
export BENCH_LOGDIR="$logdir"   # the example keeps CRIU dump.logs there
results="$BENCH_OUT/results-broker-$stamp.jsonl"
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
    echo "knobs: cycles=$BENCH_CYCLES rate=$BENCH_RATE pause_runs=$BENCH_PAUSE_RUNS ctr_runs=$BENCH_CTR_RUNS rss_s=$BENCH_RSS_SECONDS overhead='$BENCH_OVERHEAD_ARGS' figures='$BENCH_BROKER_FIGURES'"
    binaries
} > "$logdir/meta.txt"

# --- cleanup on any exit: the example removes its own things unless killed
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "${child:-}" ] && kill "$child" 2>/dev/null && wait "$child" 2>/dev/null || true
    local c
    for c in $(ctr_ms2m containers ls -q 2>/dev/null | grep "^$BENCH_TOKEN-" || true); do
        ctr_ms2m task kill -a -s SIGKILL "$c" >/dev/null 2>&1 || true
        sleep 0.2
        ctr_ms2m task rm -f "$c" >/dev/null 2>&1 || true
        ctr_ms2m containers rm "$c" >/dev/null 2>&1 || true
        for i in $(ctr_ms2m images ls -q 2>/dev/null | grep "^containerd.io/checkpoint/$c:" || true); do
            ctr_ms2m images rm "$i" >/dev/null 2>&1 || true
        done
    done
    rm -rf /dev/shm/ms2m-tests/"$BENCH_TOKEN"-* 2>/dev/null || true
    local q
    for q in $(rabbitmqctl -q -n ms2m@localhost list_queues name 2>/dev/null | grep "^ms2m-t-$BENCH_TOKEN-" || true); do
        rabbitmqctl -q -n ms2m@localhost delete_queue "$q" >/dev/null 2>&1 || true
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "building the bench example (cargo build --release -p ms2m-runtime-tests --example bench_broker)"
cargo build --release -q -p ms2m-runtime-tests --example bench_broker 2>&1 | tail -20 >&2
BB="$CARGO_TARGET_DIR/release/examples/bench_broker"
[ -x "$BB" ] || die "build of the bench_broker example failed: cargo build --release -p ms2m-runtime-tests --example bench_broker"

# Other broker tests on this machine restart RabbitMQ (stop_app/start_app) and
# raise memory alarms: that kills the bench's producer and disturbs every
# figure. Wait for them (BENCH_WAIT_QUIET seconds) instead of measuring noise.
: "${BENCH_WAIT_QUIET:=900}"
wait_quiet() {
    local t=0 others
    while :; do
        others="$(pgrep -a -f '(^|/)(broker_cut|amqp_workloads)-[0-9a-f]+( |$)' || true)"
        [ -z "$others" ] && return 0
        if [ "$t" -ge "$BENCH_WAIT_QUIET" ]; then
            die "other broker tests are still running after ${BENCH_WAIT_QUIET}s (they restart RabbitMQ): $others"
        fi
        [ "$t" = 0 ] && log "waiting for other broker tests to finish (they restart RabbitMQ): $(echo "$others" | head -1)"
        sleep 5
        t=$((t + 5))
    done
}

failed=()
child=
run_bb() { # name, args...: runs the example, its JSON lines go to $results
    local name=$1; shift
    log "$name: $BB $*"
    set +e
    "$BB" "$@" > "$logdir/$name.jsonl" 2> >(tee "$logdir/$name.log" >&2) &
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

for fig in $BENCH_BROKER_FIGURES; do
    wait_quiet
    case "$fig" in
        correctness)
            run_bb correctness-stream correctness stream "$BENCH_CYCLES" "$BENCH_RATE"
            run_bb correctness-classic correctness classic "$BENCH_CYCLES" "$BENCH_RATE"
            ;;
        overhead)
            log "overhead: cargo run --release -p ms2m-tap --example overhead -- $BENCH_OVERHEAD_ARGS"
            set +e
            # shellcheck disable=SC2086
            (cd "$MS2M_ROOT" && cargo run --release -q -p ms2m-tap --example overhead -- $BENCH_OVERHEAD_ARGS) \
                > "$logdir/overhead.txt" 2> "$logdir/overhead.err"
            rc=$?
            set -e
            cat "$logdir/overhead.txt" >&2
            if [ "$rc" != 0 ]; then
                failed+=("overhead (exit $rc: $(tail -3 "$logdir/overhead.err" | tr '\n' ' '))")
            else
                python3 - "$logdir/overhead.txt" >> "$results" <<'EOF' || failed+=("overhead (output not understood: see the log)")
import json, re, statistics, sys
text = open(sys.argv[1]).read()
rounds = {"direct": [], "tap": []}
for m in re.finditer(r"round (\d+) (direct|tap)\s*: received\s+(\d+), throughput\s+([\d.]+) msg/s, "
                     r"latency p50\s+([\d.]+) us, p99\s+([\d.]+) us", text):
    rounds[m.group(2)].append((int(m.group(1)), float(m.group(4)), float(m.group(5)), float(m.group(6))))
if not rounds["direct"] or len(rounds["direct"]) != len(rounds["tap"]):
    sys.exit("no paired rounds in the overhead output")
offered = re.search(r"offered (\d+) msg/s", text)
def fig(name, rt, unit, vals, **extra):
    o = {"name": name, "runtime": rt, "unit": unit, "median": round(statistics.median(vals), 4),
         "min": min(vals), "max": max(vals), "runs": len(vals), "values": vals}
    o.update(extra)
    print(json.dumps(o))
rate = int(offered.group(1)) if offered else None
for rt in ("direct", "tap"):
    fig("consumer_throughput_msgs", rt, "msg/s", [r[1] for r in rounds[rt]], offered=rate)
    fig("consumer_latency_p50_us", rt, "us", [r[2] for r in rounds[rt]], offered=rate)
    fig("consumer_latency_p99_us", rt, "us", [r[3] for r in rounds[rt]], offered=rate)
d = {r[0]: r for r in rounds["direct"]}
pairs = [(t, d[t[0]]) for t in rounds["tap"] if t[0] in d]
fig("tap_throughput_ratio", "tap/direct", "ratio", [round(t[1] / x[1], 4) for t, x in pairs], offered=rate,
    what="per round: tap throughput / direct throughput of the same round")
fig("tap_added_latency_p50_us", "tap-direct", "us", [round(t[2] - x[2], 1) for t, x in pairs], offered=rate,
    what="per round: tap p50 - direct p50 of the same round")
fig("tap_added_latency_p99_us", "tap-direct", "us", [round(t[3] - x[3], 1) for t, x in pairs], offered=rate)
EOF
            fi
            ;;
        pause)
            run_bb pause pause "$BENCH_PAUSE_RUNS" "$BENCH_CTR_RUNS" "$BENCH_RATE" "$BENCH_RSS_SECONDS"
            ;;
        *) die "unknown figure '$fig' in BENCH_BROKER_FIGURES (correctness overhead pause)" ;;
    esac
done

{ echo "binaries at the end:"; binaries; echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"; } >> "$logdir/meta.txt"
if [ "$(grep -c '^containerd-shim-ms2m-v1 \|^ms2m ' "$logdir/meta.txt")" -gt 0 ] \
    && [ "$(sed -n '/^containerd-shim-ms2m-v1 /p;/^ms2m /p' "$logdir/meta.txt" | sort -u | wc -l)" -gt 2 ]; then
    log "WARNING: a shim or CLI binary changed during the run (see $logdir/meta.txt)"
fi

# --- targets -----------------------------------------------------------------
targets="$BENCH_OUT/results-broker-$stamp.targets.txt"
set +e
python3 - "$results" > "$targets" <<'EOF'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("{"):
        o = json.loads(line)
        rows[(o["name"], o["runtime"])] = o
miss = False
def check(name, rt, op, x, unit, label=None):
    global miss
    o = rows.get((name, rt))
    label = label or "%s %s" % (name, rt)
    if not o or o["median"] is None:
        print("target %s: n/a (target %s %s %s) MISS" % (label, op, x, unit))
        miss = True
        return
    v = o["median"]
    ok = v <= x if op == "<=" else v >= x
    miss |= not ok
    u = (" " + unit) if unit else ""
    print("target %s: %s%s (target %s %s%s) %s" % (label, ("%.4g" % v), u, op, x, u, "OK" if ok else "MISS"))
for k in ("stream", "classic"):
    if any(n == "broker_lost" and r == "lapin-" + k for n, r in rows):
        for f in ("broker_lost", "broker_duplicated", "broker_out_of_order"):
            check(f, "lapin-" + k, "<=", 0, "messages")
        o = rows.get(("broker_cycle_ms", "lapin-" + k))
        if o and o["median"] is not None:
            print("info broker_cycle_ms lapin-%s: median %.0f ms over %d cycles (min %.0f, max %.0f)"
                  % (k, o["median"], o["runs"], o["min"], o["max"]))
if ("tap_throughput_ratio", "tap/direct") in rows:
    check("tap_throughput_ratio", "tap/direct", ">=", 0.95, "")
    check("tap_added_latency_p50_us", "tap-direct", "<=", 100, "us")
if ("processing_pause_ms", "ms2m-checkpoint") in rows:
    check("processing_pause_ms", "ms2m-checkpoint", "<=", 30, "ms")
    o = rows.get(("processing_pause_ms", "ctr-task-checkpoint"))
    if o and o["median"] is not None:
        a = rows[("processing_pause_ms", "ms2m-checkpoint")]["median"]
        print("info processing_pause_ms ctr-task-checkpoint: %.1f ms (ms2m checkpoint %.1f ms)" % (o["median"], a or float("nan")))
if ("shim_rss_tap_mib", "ms2m") in rows:
    check("shim_rss_tap_mib", "ms2m", "<=", 16, "MiB")
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
