#!/usr/bin/env bash
# ms2m's whole test suite, from a fresh machine:
#   1. hack/setup.sh: installs and builds everything (CRIU, containerd, runc,
#      ms2m's shim and CLI in release mode), starts ms2m's containerd and
#      imports the test image;
#   2. unit tests of every crate (cargo test --workspace, integration tests
#      of runtime-tests excluded);
#   3. the integration tests in runtime-tests/ against the real containerd,
#      with cargo-nextest when it is installed, else cargo test.
# Prints a summary; exits non-zero if anything failed.
#
# Environment:
#   MS2M_TEST_RUNTIMES   runtimes to run the integration tests with
#                        (default "io.containerd.ms2m.v1"; add
#                        "io.containerd.runc.v2" for the baseline)
#   MS2M_SKIP_SETUP=1    do not run hack/setup.sh (it is idempotent, but this
#                        saves its checks when iterating)
#   MS2M_FUZZ_ITERATIONS inputs per fuzz target in the fuzz step (default
#                        5000; 0 skips the step). The unit step runs them
#                        too, for bolero's default of 1 s each. The longer
#                        run: docs/operations.md, "Faults and bad input".
set -uo pipefail
source "$(dirname "$0")/lib.sh"

[ "$(id -u)" = 0 ] || die "the tests need root (containerd, runc, CRIU): run as root"
cd "$MS2M_ROOT"

: "${MS2M_TEST_RUNTIMES:=io.containerd.ms2m.v1}"
SUITE_START=$(date +%s)
SUMMARY=()
FAILED=0

# step NAME CMD...: runs CMD, records PASS/FAIL with its duration.
step() {
    local name="$1"; shift
    local t0 rc
    t0=$(date +%s)
    log "$name"
    "$@"
    rc=$?
    local dt=$(( $(date +%s) - t0 ))
    if [ "$rc" = 0 ]; then
        SUMMARY+=("PASS  ${name} (${dt}s)")
    else
        SUMMARY+=("FAIL  ${name} (${dt}s, exit $rc)")
        FAILED=1
    fi
    return "$rc"
}

summary() {
    local total=$(( $(date +%s) - SUITE_START ))
    printf '\n==================== ms2m test summary ====================\n'
    printf '%s\n' "${SUMMARY[@]}"
    printf 'total: %ss\n' "$total"
    if [ "$FAILED" = 0 ]; then
        printf 'RESULT: PASS\n'
    else
        printf 'RESULT: FAIL\n'
    fi
}

if [ "${MS2M_SKIP_SETUP:-0}" != 1 ]; then
    if ! step "setup (hack/setup.sh)" "$MS2M_ROOT/hack/setup.sh"; then
        summary
        die "setup failed: nothing was tested"
    fi
fi

# Leftovers of an interrupted earlier run (older than an hour, so a suite
# running in parallel keeps its dirs) would only take space.
if [ -d /dev/shm/ms2m-tests ]; then
    find /dev/shm/ms2m-tests -mindepth 1 -maxdepth 1 -mmin +60 -exec rm -rf {} + 2>/dev/null || true
fi

if cargo nextest --version >/dev/null 2>&1; then
    RUNNER=(cargo nextest run --locked -p ms2m-runtime-tests --no-fail-fast --failure-output final)
    RUNNER_NAME="cargo nextest"
else
    RUNNER=(cargo test --locked -p ms2m-runtime-tests --no-fail-fast --tests)
    RUNNER_NAME="cargo test"
fi

: "${MS2M_TEST_LOG_DIR:=${TMPDIR:-/tmp}}"

# logged LOG CMD...: runs CMD with its output to the terminal and to LOG.
logged() {
    local out="$1"; shift
    "$@" 2>&1 | tee "$out"
}

# list_failures LOG: adds the failed tests named in LOG to the summary
# (nextest: "FAIL [ 0.5s] (3/9) crate::binary name"; cargo test:
# "test name ... FAILED").
list_failures() {
    local name
    while read -r name; do
        [ -n "$name" ] && SUMMARY+=("        failed: $name")
    done < <( { grep -E '^\s+FAIL \[' "$1" | sed -E 's/.*\) //'; \
                grep -E '^test .* \.\.\. FAILED$' "$1" | sed -E 's/^test (.*) \.\.\. FAILED$/\1/'; } | sort -u)
}

# Unit tests: every crate, but only the pure part of runtime-tests (its
# integration tests follow below, once per runtime).
out="$MS2M_TEST_LOG_DIR/ms2m-unit.log"
step "unit tests (cargo test --workspace; log $out)" \
    logged "$out" cargo test --workspace --locked --exclude ms2m-runtime-tests \
    || list_failures "$out"
out="$MS2M_TEST_LOG_DIR/ms2m-unit-runtime-tests.log"
step "unit tests (runtime-tests helpers)" \
    logged "$out" cargo test --locked -p ms2m-runtime-tests --lib \
    || list_failures "$out"

# Fuzz targets (bolero, random inputs with shrinking, as plain cargo
# tests): the tap's frame reader and ledger, the cut, fence and ticket JSON,
# the manifest parser. A failure prints the shrunk input and its
# BOLERO_RANDOM_SEED.
: "${MS2M_FUZZ_ITERATIONS:=5000}"
if [ "$MS2M_FUZZ_ITERATIONS" != 0 ]; then
    out="$MS2M_TEST_LOG_DIR/ms2m-fuzz.log"
    step "fuzz targets ($MS2M_FUZZ_ITERATIONS inputs each; log $out)" \
        logged "$out" env BOLERO_RANDOM_ITERATIONS="$MS2M_FUZZ_ITERATIONS" \
        sh -c 'cargo test --locked -p ms2m-tap --test fuzz_frames --test fuzz_cut &&
               cargo test --locked -p ms2m-criu-bridge --test fuzz_manifest' \
        || list_failures "$out"
fi

for runtime in $MS2M_TEST_RUNTIMES; do
    out="$MS2M_TEST_LOG_DIR/ms2m-integration-${runtime//[^A-Za-z0-9.-]/_}.log"
    if ! MS2M_TEST_RUNTIME="$runtime" step "integration tests, runtime $runtime ($RUNNER_NAME; log $out)" \
        logged "$out" "${RUNNER[@]}"; then
        list_failures "$out"
        log "last lines of /var/log/ms2m/containerd.log:"
        tail -n 60 /var/log/ms2m/containerd.log >&2 || true
    fi
done

summary
exit "$FAILED"
