#!/usr/bin/env bash
# ms2m benchmark: containerd-shim-ms2m-v1 against containerd's own
# containerd-shim-runc-v2, side by side in one run, on ms2m's containerd,
# with the same image and workload, interleaving the two runtimes run by run.
#
#   hack/bench.sh                      full run (5 runs per figure and runtime)
#   BENCH_RUNS=3 hack/bench.sh         quicker run
#
# It runs these suites (BENCH_SUITES, default "shims lazy broker"):
#   shims      bench.py: ms2m against containerd-shim-runc-v2 (issues 2 and 3)
#   lazy       bench-lazy.py: restore to running, lazy against eager, 256 MiB to 1 GiB (issue 3)
#   broker     bench-broker.sh: the AMQP tap and the broker cut (issue 4; needs RabbitMQ)
#   migration  bench-migration.sh: live migration to host B against stop-and-copy
#              (issue 8; needs RabbitMQ and host B: hack/host-b.sh start; not in
#              the default set: BENCH_SUITES=migration hack/bench.sh). Its knobs:
#              BENCH_RUNS, BENCH_MIGRATIONS=50 (ping-pong moves per client),
#              BENCH_MIGRATION_FIGURES, see hack/bench-migration.sh
#   cri        bench-cri.sh: CRI checkpoint/restore against the ms2m CLI, CRI under
#              runc-v2, per-pod cost (issue 10; needs CRI on, hack/cri-setup.sh, and
#              RabbitMQ; not in the default set: BENCH_SUITES=cri hack/bench.sh)
#   soak       bench-soak.sh: 30 minutes of load behind the tap with a leave-running
#              checkpoint every 10 s and an exit checkpoint + restore every minute,
#              shim/consumer RSS and the checker, then runc-v2's shim RSS as the
#              reference (issue 9; needs RabbitMQ; not in the default set:
#              hack/bench.sh soak). Knobs: SOAK_MINUTES (30), SOAK_RATE (400 msg/s:
#              the test consumer's ceiling here is ~500, not the issue's 5,000),
#              SOAK_BASELINE_MINUTES, SOAK_CAPACITY_SECONDS, see hack/bench-soak.sh
#
# Suites named as arguments replace BENCH_SUITES: `hack/bench.sh soak` is
# `BENCH_SUITES=soak hack/bench.sh`.
#
# Knobs (environment):
#   BENCH_RUNS=5              runs per (figure, size, runtime)
#   BENCH_SIZES="16 256"      memcounter --mib sizes
#   BENCH_RUNTIMES="ms2m runc-v2"   runtimes to compare (runc-v2 alone = baseline only;
#                             "ms2m-before" = an earlier ms2m build installed as
#                             containerd-shim-ms2mbefore-v1, for before/after ratios)
#   BENCH_FIGURES="leave ctr cli rss"  which measurements to take:
#                             leave = leave-running checkpoint (frozen_ms, checkpoint_wall_s, CRIU stats),
#                             ctr   = stop-and-copy with ctr (stop_and_copy_ctr_s),
#                             cli   = stop-and-copy with the ms2m CLI (stop_and_copy_cli_s),
#                             rss   = shim resident memory (shim_rss_mib)
#   BENCH_SHM=/dev/shm/ms2m-bench   where checkpoint images go (tmpfs)
#   BENCH_OUT=target/bench    results directory (results-<UTC time>.jsonl, .meta.json, logs)
#   BENCH_STRICT=1            exit 2 when a figure misses its target (default: report only)
#
# Output: one JSON object per (figure, runtime) on stdout (also written to
# BENCH_OUT/results-<time>.jsonl), then ratio lines. Progress goes to stderr.
# Exit status: 0 all runs valid, 1 some run failed or was invalid, 2 strict miss.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/lib.sh
source "$HERE/lib.sh"

: "${BENCH_RUNS:=5}"
: "${BENCH_SIZES:=16 256}"
: "${BENCH_RUNTIMES:=ms2m runc-v2}"
: "${BENCH_FIGURES:=leave ctr cli rss}"
: "${BENCH_SHM:=/dev/shm/ms2m-bench}"
: "${BENCH_OUT:=$MS2M_ROOT/target/bench}"
: "${BENCH_TOKEN:=msb$$}"
export BENCH_RUNS BENCH_SIZES BENCH_RUNTIMES BENCH_FIGURES BENCH_SHM BENCH_OUT BENCH_TOKEN

[ "$(id -u)" = 0 ] || die "hack/bench.sh must run as root (containerd, runc and CRIU need it)"
command -v python3 >/dev/null || die "python3 not found: install python3 (hack/setup.sh system)"

# --- prerequisites: fail loudly, saying what to run -------------------------
command -v ctr >/dev/null || die "ctr not found: run hack/setup.sh"
command -v containerd-shim-runc-v2 >/dev/null \
    || die "containerd-shim-runc-v2 not on PATH: run hack/setup.sh"
command -v runc >/dev/null || die "runc not found: run hack/setup.sh"
command -v criu >/dev/null || die "criu not found: run hack/setup.sh (builds CRIU 4.2.1)"
criu_ver="$(criu --version 2>/dev/null | awk '/^Version:/{print $2}')"
case "$criu_ver" in
    4.[2-9]*|4.[1-9][0-9]*|[5-9].*) ;;
    *) die "criu ${criu_ver:-?} found, >= 4.2 needed on this kernel: run hack/setup.sh" ;;
esac
case " $BENCH_RUNTIMES " in
    *" ms2m "*)
        command -v containerd-shim-ms2m-v1 >/dev/null || die \
            "containerd-shim-ms2m-v1 not on PATH: cargo build --release -p ms2m-shim && install -m755 target/release/containerd-shim-ms2m-v1 /usr/local/bin/ (or BENCH_RUNTIMES=runc-v2 for the baseline alone)"
        ;;
esac
case " $BENCH_FIGURES " in
    *" cli "*)
        command -v ms2m >/dev/null || die \
            "ms2m CLI not on PATH: cargo build --release -p ms2m-cli && install -m755 target/release/ms2m /usr/local/bin/ (or BENCH_FIGURES='leave ctr rss' to skip the CLI figure)"
        ;;
esac
[ -d "$(dirname "$BENCH_SHM")" ] || die "$(dirname "$BENCH_SHM") does not exist (images go to tmpfs)"

# CRIU caches its kernel probe in /run/criu.kdat; a stale /run/criu.kdat.tmp (left
# by a CRIU that was killed) stops it from writing the cache, so every CRIU run
# re-probes the kernel. It costs both runtimes alike, but say so.
if [ -e /run/criu.kdat.tmp ] && [ ! -e /run/criu.kdat ] && [ ! -e /run/criu/criu.kdat ]; then
    log "warning: stale /run/criu.kdat.tmp and no /run/criu.kdat: every CRIU run re-probes the kernel (hack/setup.sh clears it)"
fi

# ms2m's own containerd (idempotent).
"$HERE/start-containerd.sh" || die "could not start ms2m's containerd: see /var/log/ms2m/containerd.log"
ctr_ms2m images ls -q 2>/dev/null | grep -qx "$MS2M_TEST_IMAGE" \
    || die "test image $MS2M_TEST_IMAGE not in ms2m's containerd: run hack/build-image.sh"

# --- cleanup on any exit (the Python side cleans up too; this catches a kill -9 of it)
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    python3 "$HERE/bench.py" --cleanup || true
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$BENCH_OUT"
[ "$#" -gt 0 ] && BENCH_SUITES="$*"
: "${BENCH_SUITES:=shims lazy broker}"
for s in $BENCH_SUITES; do
    case "$s" in shims|lazy|broker|migration|cri|soak) ;; *) die "unknown suite '$s' (shims lazy broker migration cri soak)" ;; esac
done
rc=0
case " $BENCH_SUITES " in *" shims "*) python3 "$HERE/bench.py" || rc=$? ;; esac
case " $BENCH_SUITES " in *" lazy "*) python3 "$HERE/bench-lazy.py" || rc=$? ;; esac
case " $BENCH_SUITES " in *" broker "*) "$HERE/bench-broker.sh" || rc=$? ;; esac
case " $BENCH_SUITES " in *" migration "*) "$HERE/bench-migration.sh" || rc=$? ;; esac
case " $BENCH_SUITES " in *" cri "*) "$HERE/bench-cri.sh" || rc=$? ;; esac
case " $BENCH_SUITES " in *" soak "*) "$HERE/bench-soak.sh" || rc=$? ;; esac
exit "$rc"
