#!/usr/bin/env bash
# CRI benchmark (issue 10): ms2m through containerd's CRI plugin (what the
# kubelet calls) against the ms2m CLI, in one run on one containerd, and
# containerd's own runc shim under CRI for reference; then what one ms2m pod
# costs its node. Driven by runtime-tests/examples/bench_cri.rs.
#
#   hack/bench-cri.sh                     5 interleaved runs, 16 MiB container
#   BENCH_RUNS=3 BENCH_MIB=64 hack/bench-cri.sh
#
# Figures (median of BENCH_RUNS):
#   cri_checkpoint_wall_<N>mib         CheckpointContainer, archive on /dev/shm
#   cli_checkpoint_wall_<N>mib         ms2m checkpoint --image-path (leave-running)
#   cri_restore_to_running_<N>mib      CreateContainer from the archive + StartContainer
#   cli_restore_to_running_<N>mib      ms2m restore
#   cri_runc_v2_*                      the same CRI calls under the "runc" handler
#   shim_rss_*, shim_cpu_*, pause_rss  per-pod cost (BENCH_POD_COST=0 skips it;
#                                      it needs ms2m's RabbitMQ node)
# Target: CRI within 1.5x of the CLI for both operations.
#
# Needs hack/setup.sh (containerd with CRI on, the CRI images, the loopback
# registry, RabbitMQ). Output: JSON lines on stdout and in
# BENCH_OUT/cri-<UTC time>.jsonl; progress on stderr.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

: "${BENCH_RUNS:=5}"
: "${BENCH_MIB:=16}"
: "${BENCH_POD_COST:=1}"
: "${BENCH_COST_SECONDS:=8}"
: "${BENCH_COST_RATE:=300}"
: "${BENCH_OUT:=$MS2M_ROOT/target/bench}"

[ "$(id -u)" = 0 ] || die "hack/bench-cri.sh must run as root (containerd, runc and CRIU need it)"
command -v ctr >/dev/null || die "ctr not found: run hack/setup.sh"
ctr --address "$MS2M_CONTAINERD_ADDRESS" plugins ls 2>/dev/null \
    | awk '$1 == "io.containerd.grpc.v1" && $2 == "cri" {print $NF}' | grep -qx ok \
    || die "containerd at $MS2M_CONTAINERD_ADDRESS does not serve CRI: run hack/setup.sh"
command -v ms2m >/dev/null || die "the ms2m CLI is not installed: run hack/setup.sh"

log "building the CRI benchmark (release)"
(cd "$MS2M_ROOT" && cargo build --release --locked -q -p ms2m-runtime-tests --example bench_cri)
BIN="$CARGO_TARGET_DIR/release/examples/bench_cri"

mkdir -p "$BENCH_OUT"
out="$BENCH_OUT/cri-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
log "results: $out"
"$BIN" compare "$BENCH_RUNS" "$BENCH_MIB" | tee "$out"
if [ "$BENCH_POD_COST" = 1 ]; then
    "$BIN" pod-cost "$BENCH_COST_SECONDS" "$BENCH_COST_RATE" | tee -a "$out"
fi
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = {r["name"]: r for r in rows if "median" in r}
for r in rows:
    if r["name"] == "ratios":
        for k in ("checkpoint_cri_over_cli", "restore_cri_over_cli"):
            v = r[k]
            print(f"{k}: {v:.2f} (target <= {r['target']}: {'met' if v <= r['target'] else 'MISSED'})")
for name, r in med.items():
    print(f"{name}: median {r['median']:.1f} {r['unit']} (min {r['min']:.1f}, max {r['max']:.1f}, n={r['runs']})")
PY
