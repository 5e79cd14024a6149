#!/usr/bin/env bash
# CRI on ms2m's containerd (host A), for Kubernetes-style use and the CRI
# tests (runtime-tests/tests/cri.rs; docs/kubernetes.md). Idempotent; run by
# hack/setup.sh after the test image is built:
#   1. the sandbox ("pause") image: runtime-tests/workloads/pause.c, static,
#      as an OCI image layout;
#   2. the test image's OCI layout (hack/build-image.sh's archive) beside it;
#   3. hack/cri-registry.py serving both read-only on $MS2M_CRI_REGISTRY
#      (loopback): containerd's CRI restore pulls the checkpoint's base image
#      by digest, and there is no other registry here;
#   4. containerd serving CRI (its config is written by start-containerd.sh
#      with the CRI plugins on; a containerd still running an older config
#      without them is restarted: containers and shims keep running);
#   5. both images pulled into the CRI namespace ($MS2M_CRI_NAMESPACE).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

PAUSE_SRC="$MS2M_ROOT/runtime-tests/workloads/pause.c"
TEST_ARCHIVE="${MS2M_IMAGE_DIR:-$MS2M_PREFIX/image}/ms2m-test.oci.tar"

case "$(uname -m)" in
    x86_64) ARCH=amd64 ;;
    aarch64) ARCH=arm64 ;;
    *) ARCH="$(uname -m)" ;;
esac

sha() { sha256sum "$1" | awk '{print $1}'; }

# put_blob FILE LAYOUT: moves FILE into LAYOUT's blobs; prints "sha256:HEX SIZE".
put_blob() {
    local hex size; hex="$(sha "$1")"; size="$(stat -c %s "$1")"
    mkdir -p "$2/blobs/sha256"
    mv "$1" "$2/blobs/sha256/$hex"
    echo "sha256:$hex $size"
}

# The pause image: one layer holding /pause, as an OCI layout in
# $MS2M_CRI_REGISTRY_DIR/ms2m/pause (tag 1). Rebuilt when pause.c changes.
build_pause_layout() {
    local out="$MS2M_CRI_REGISTRY_DIR/ms2m/pause" want
    want="$(sha "$PAUSE_SRC") $ARCH"
    if [ "$(cat "$out.inputs" 2>/dev/null)" = "$want" ] && [ -f "$out/index.json" ]; then
        log "pause image layout up to date"; return
    fi
    local work; work="$(mktemp -d "${TMPDIR:-/tmp}/ms2m-pause.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    mkdir -p "$work/rootfs" "$work/oci"
    gcc -O2 -static -Wall -Wextra -o "$work/rootfs/pause" "$PAUSE_SRC"
    strip "$work/rootfs/pause" 2>/dev/null || true
    tar --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$work/rootfs" -cf "$work/layer.tar" .
    local diff_id; diff_id="$(sha "$work/layer.tar")"
    gzip -n -9 -c "$work/layer.tar" > "$work/layer.gz"
    local layer config manifest
    read -r -a layer <<< "$(put_blob "$work/layer.gz" "$work/oci")"
    printf '%s' "{\"architecture\":\"$ARCH\",\"os\":\"linux\",\"config\":{\"Entrypoint\":[\"/pause\"],\"WorkingDir\":\"/\"},\
\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$diff_id\"]}}" > "$work/config.json"
    read -r -a config <<< "$(put_blob "$work/config.json" "$work/oci")"
    printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\
\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"${config[0]}\",\"size\":${config[1]}},\
\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"${layer[0]}\",\"size\":${layer[1]}}]}" \
        > "$work/manifest.json"
    read -r -a manifest <<< "$(put_blob "$work/manifest.json" "$work/oci")"
    printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\
\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"${manifest[0]}\",\"size\":${manifest[1]},\
\"platform\":{\"architecture\":\"$ARCH\",\"os\":\"linux\"},\"annotations\":{\"org.opencontainers.image.ref.name\":\"1\"}}]}" \
        > "$work/oci/index.json"
    printf '%s' '{"imageLayoutVersion":"1.0.0"}' > "$work/oci/oci-layout"
    rm -rf "$out"; mkdir -p "$(dirname "$out")"
    mv "$work/oci" "$out"
    echo "$want" > "$out.inputs"
    log "pause image layout built in $out (${manifest[0]})"
}

# The test image's layout, unpacked from hack/build-image.sh's archive.
unpack_test_layout() {
    [ -f "$TEST_ARCHIVE" ] || die "missing $TEST_ARCHIVE: run hack/build-image.sh"
    local out="$MS2M_CRI_REGISTRY_DIR/ms2m/ms2m-test" want
    want="$(sha "$TEST_ARCHIVE")"
    if [ "$(cat "$out.inputs" 2>/dev/null)" = "$want" ] && [ -f "$out/index.json" ]; then
        log "test image layout up to date"; return
    fi
    rm -rf "$out"; mkdir -p "$out"
    tar -xf "$TEST_ARCHIVE" -C "$out"
    echo "$want" > "$out.inputs"
    log "test image layout unpacked into $out"
}

registry_answers() {
    curl -fsS -o /dev/null --max-time 2 "http://$MS2M_CRI_REGISTRY/v2/" 2>/dev/null
}

start_registry() {
    if registry_answers; then log "CRI registry answering on $MS2M_CRI_REGISTRY"; return; fi
    mkdir -p "$(dirname "$MS2M_CRI_REGISTRY_PIDFILE")" "$(dirname "$MS2M_CRI_REGISTRY_LOG")"
    log "starting the CRI test registry on $MS2M_CRI_REGISTRY (log: $MS2M_CRI_REGISTRY_LOG)"
    nohup python3 "$MS2M_ROOT/hack/cri-registry.py" --listen "$MS2M_CRI_REGISTRY" \
        --root "$MS2M_CRI_REGISTRY_DIR" >>"$MS2M_CRI_REGISTRY_LOG" 2>&1 </dev/null \
        3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&- &
    echo $! > "$MS2M_CRI_REGISTRY_PIDFILE"
    for _ in $(seq 1 50); do registry_answers && return; sleep 0.1; done
    tail -5 "$MS2M_CRI_REGISTRY_LOG" >&2 || true
    die "the CRI test registry did not answer on $MS2M_CRI_REGISTRY"
}

cri_serving() {
    ctr --address "$MS2M_CONTAINERD_ADDRESS" plugins ls 2>/dev/null \
        | awk '$1 == "io.containerd.grpc.v1" && $2 == "cri" {print $NF}' | grep -qx ok
}

ensure_cri_plugin() {
    if cri_serving; then log "containerd serves CRI at $MS2M_CONTAINERD_ADDRESS"; return; fi
    local pidfile="$MS2M_CONTAINERD_STATE/containerd.pid" pid
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = containerd ] \
        && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "--config $MS2M_CONTAINERD_CONFIG"; then
        log "containerd (pid $pid) runs without CRI: restarting it with CRI on (containers keep running)"
        kill "$pid"
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && die "containerd (pid $pid) did not stop"
    elif ctr --address "$MS2M_CONTAINERD_ADDRESS" version >/dev/null 2>&1; then
        die "containerd at $MS2M_CONTAINERD_ADDRESS serves no CRI and was not started by hack/start-containerd.sh (no pid in $pidfile): restart it with $MS2M_CONTAINERD_CONFIG"
    fi
    "$MS2M_ROOT/hack/start-containerd.sh"
    cri_serving || die "containerd at $MS2M_CONTAINERD_ADDRESS does not serve CRI (see ${MS2M_CONTAINERD_LOG:-/var/log/ms2m/containerd.log})"
}

ctr_cri() { ctr --address "$MS2M_CONTAINERD_ADDRESS" -n "$MS2M_CRI_NAMESPACE" "$@"; }
image_digest() { ctr_cri images ls 2>/dev/null | awk -v n="$1" '$1 == n {print $3}'; }

# pull_cri_image REF LAYOUT: pulls REF from the registry into the CRI
# namespace unless it is there with the layout's manifest digest, and names
# it also by its repo digest (NAME@sha256:...), as CRI's own PullImage does:
# CRI records that name in a checkpoint as the base image to pull again.
pull_cri_image() {
    local ref="$1" layout="$2" want
    want="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$layout/index.json")"
    local by_digest="${ref%:*}@$want"
    if [ "$(image_digest "$ref")" = "$want" ] && [ "$(image_digest "$by_digest")" = "$want" ]; then
        log "$ref ($want) present in namespace $MS2M_CRI_NAMESPACE"; return
    fi
    log "pulling $ref into namespace $MS2M_CRI_NAMESPACE"
    ctr_cri images pull --plain-http --platform "linux/$ARCH" "$ref" >/dev/null
    [ "$(image_digest "$ref")" = "$want" ] || die "pulling $ref gave '$(image_digest "$ref")', expected $want"
    ctr_cri images rm "$by_digest" >/dev/null 2>&1 || true
    ctr_cri images tag "$ref" "$by_digest" >/dev/null
}

command -v gcc >/dev/null || die "gcc not found: run hack/setup.sh system"
command -v curl >/dev/null || die "curl not found: run hack/setup.sh system"
build_pause_layout
unpack_test_layout
start_registry
ensure_cri_plugin
pull_cri_image "$MS2M_CRI_SANDBOX_IMAGE" "$MS2M_CRI_REGISTRY_DIR/ms2m/pause"
pull_cri_image "$MS2M_CRI_TEST_IMAGE" "$MS2M_CRI_REGISTRY_DIR/ms2m/ms2m-test"
log "CRI ready: handler ms2m, sandbox image $MS2M_CRI_SANDBOX_IMAGE, test image $MS2M_CRI_TEST_IMAGE"
