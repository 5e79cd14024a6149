#!/usr/bin/env bash
# Builds ms2m's test image by hand (no docker, no registry) and imports it into
# ms2m's containerd as docker.io/library/ms2m-test:latest.
#
# Rootfs: /bin/busybox (Debian's busybox-static) with its applet symlinks,
# /usr/local/bin/memcounter (runtime-tests/workloads/memcounter.c, static),
# /usr/local/bin/amqp-consumer (runtime-tests/workloads/amqp-consumer, Rust,
# statically linked: built here with cargo for x86_64-unknown-linux-gnu and
# +crt-static, into target/x86_64-unknown-linux-gnu so it never disturbs the
# host build), /opt/ms2m/pika_consumer.py (run with the host's /usr
# bind-mounted: python3 + python3-pika come from the host), /etc/hosts and
# /etc/nsswitch.conf so `amqp://localhost` resolves without the host's files,
# lib -> usr/lib and lib64 -> usr/lib64 (so the host's /usr can be bind-mounted
# to run host programs), /tmp, a minimal /etc/passwd and /etc/group.
# One gzip layer, an OCI config, manifest, index.json and oci-layout, packed as
# an OCI archive and imported with `ctr images import`.
#
# Idempotent: the archive is rebuilt only when its inputs change (memcounter.c,
# the consumer's sources and Cargo.lock, pika_consumer.py, this script,
# busybox's version) and re-imported only when containerd does not hold exactly
# this image.
#
#   hack/build-image.sh           build if needed, import if needed
#   hack/build-image.sh --force   rebuild and re-import
set -euo pipefail
source "$(dirname "$0")/lib.sh"

FORCE=0
[ "${1:-}" = --force ] && FORCE=1

: "${MS2M_IMAGE_DIR:=$MS2M_PREFIX/image}"
SRC="$MS2M_ROOT/runtime-tests/workloads/memcounter.c"
ARCHIVE="$MS2M_IMAGE_DIR/ms2m-test.oci.tar"
STAMP="$MS2M_IMAGE_DIR/ms2m-test.inputs"
DIGEST_FILE="$MS2M_IMAGE_DIR/ms2m-test.digest"
BUSYBOX=/bin/busybox
CONSUMER_DIR="$MS2M_ROOT/runtime-tests/workloads/amqp-consumer"
PIKA_SCRIPT="$MS2M_ROOT/runtime-tests/workloads/pika_consumer.py"
CONSUMER_TARGET="$(uname -m)-unknown-linux-gnu"

[ -f "$SRC" ] || die "missing $SRC"
[ -x "$BUSYBOX" ] && "$BUSYBOX" --list >/dev/null 2>&1 \
    || die "$BUSYBOX (static) not found: install busybox-static (hack/setup.sh system)"
command -v gcc >/dev/null || die "gcc not found: install build-essential (hack/setup.sh system)"
command -v ctr >/dev/null || die "ctr not found: run hack/setup.sh system"
[ -f "$CONSUMER_DIR/Cargo.toml" ] || die "missing $CONSUMER_DIR"
[ -f "$PIKA_SCRIPT" ] || die "missing $PIKA_SCRIPT"
command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (hack/setup.sh)"

case "$(uname -m)" in
    x86_64) ARCH=amd64 ;;
    aarch64) ARCH=arm64 ;;
    *) ARCH="$(uname -m)" ;;
esac

inputs_hash() {
    {
        sha256sum "$SRC" "$0" "$PIKA_SCRIPT" "$MS2M_ROOT/Cargo.lock" | awk '{print $1}'
        find "$CONSUMER_DIR" -type f \( -name '*.rs' -o -name Cargo.toml \) -print0 \
            | sort -z | xargs -0 sha256sum | awk '{print $1}'
        dpkg-query -W -f='${Version}\n' busybox-static 2>/dev/null || sha256sum "$BUSYBOX"
        echo "$ARCH $MS2M_TEST_IMAGE"
    } | sha256sum | awk '{print $1}'
}

sha() { sha256sum "$1" | awk '{print $1}'; }
size() { stat -c %s "$1"; }

build() {
    local work; work="$(mktemp -d "${TMPDIR:-/tmp}/ms2m-image.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    local root="$work/rootfs"
    mkdir -p "$root"/{bin,sbin,etc,tmp,root,proc,sys,dev,run,var/tmp,usr/bin,usr/sbin,usr/lib,usr/lib64,usr/local/bin}
    chmod 1777 "$root/tmp" "$root/var/tmp"
    chmod 0700 "$root/root"
    ln -s usr/lib "$root/lib"
    ln -s usr/lib64 "$root/lib64"

    install -m 0755 "$BUSYBOX" "$root/bin/busybox"
    local applet
    for applet in $("$BUSYBOX" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done

    log "compiling memcounter (static)"
    gcc -O2 -static -Wall -Wextra -o "$root/usr/local/bin/memcounter" "$SRC"
    strip "$root/usr/local/bin/memcounter" 2>/dev/null || true

    log "building amqp-consumer (static, $CONSUMER_TARGET)"
    local consumer="$CARGO_TARGET_DIR/$CONSUMER_TARGET/release/amqp-consumer"
    # CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS on x86_64: only this
    # target's build is static; the host build's artifacts stay untouched.
    local flagvar; flagvar="CARGO_TARGET_$(echo "$CONSUMER_TARGET" | tr 'a-z-' 'A-Z_')_RUSTFLAGS"
    (cd "$MS2M_ROOT" && env "$flagvar=-C target-feature=+crt-static" \
        cargo build --release --target "$CONSUMER_TARGET" -p ms2m-amqp-consumer) \
        || die "building amqp-consumer failed"
    # A dynamically linked binary would not start in the busybox rootfs.
    ldd "$consumer" 2>&1 | grep -qE 'statically linked|not a dynamic executable' \
        || die "$consumer is not statically linked: $(ldd "$consumer" 2>&1 | head -3)"
    install -m 0755 "$consumer" "$root/usr/local/bin/amqp-consumer"
    strip "$root/usr/local/bin/amqp-consumer" 2>/dev/null || true
    mkdir -p "$root/opt/ms2m"
    install -m 0755 "$PIKA_SCRIPT" "$root/opt/ms2m/pika_consumer.py"

    cat > "$root/etc/hosts" <<'EOF'
127.0.0.1 localhost
::1 localhost ip6-localhost ip6-loopback
EOF
    cat > "$root/etc/nsswitch.conf" <<'EOF'
hosts: files dns
EOF

    cat > "$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
    cat > "$root/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
    echo "ms2m-test" > "$root/etc/hostname"

    # The layer: reproducible tar (sorted, root-owned, fixed mtime), gzip -n.
    local blobs="$work/oci/blobs/sha256"
    mkdir -p "$blobs"
    tar --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 \
        -C "$root" -cf "$work/layer.tar" .
    local diff_id; diff_id="$(sha "$work/layer.tar")"
    gzip -n -9 -c "$work/layer.tar" > "$work/layer.tar.gz"
    local layer_digest; layer_digest="$(sha "$work/layer.tar.gz")"
    local layer_size; layer_size="$(size "$work/layer.tar.gz")"
    mv "$work/layer.tar.gz" "$blobs/$layer_digest"

    printf '%s' "{\"architecture\":\"$ARCH\",\"os\":\"linux\",\"created\":\"1970-01-01T00:00:00Z\",\
\"config\":{\"Env\":[\"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\"],\
\"Cmd\":[\"/usr/local/bin/memcounter\"],\"WorkingDir\":\"/\"},\
\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$diff_id\"]},\
\"history\":[{\"created\":\"1970-01-01T00:00:00Z\",\"created_by\":\"ms2m hack/build-image.sh\"}]}" \
        > "$work/config.json"
    local config_digest; config_digest="$(sha "$work/config.json")"
    local config_size; config_size="$(size "$work/config.json")"
    mv "$work/config.json" "$blobs/$config_digest"

    printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\
\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$config_digest\",\"size\":$config_size},\
\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$layer_digest\",\"size\":$layer_size}]}" \
        > "$work/manifest.json"
    local manifest_digest; manifest_digest="$(sha "$work/manifest.json")"
    local manifest_size; manifest_size="$(size "$work/manifest.json")"
    mv "$work/manifest.json" "$blobs/$manifest_digest"

    printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\
\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:$manifest_digest\",\"size\":$manifest_size,\
\"platform\":{\"architecture\":\"$ARCH\",\"os\":\"linux\"},\
\"annotations\":{\"io.containerd.image.name\":\"$MS2M_TEST_IMAGE\",\"org.opencontainers.image.ref.name\":\"latest\"}}]}" \
        > "$work/oci/index.json"
    printf '%s' '{"imageLayoutVersion":"1.0.0"}' > "$work/oci/oci-layout"

    mkdir -p "$MS2M_IMAGE_DIR"
    tar --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 \
        -C "$work/oci" -cf "$ARCHIVE.new" oci-layout index.json blobs
    mv "$ARCHIVE.new" "$ARCHIVE"
    echo "sha256:$manifest_digest" > "$DIGEST_FILE"
    log "built $ARCHIVE (manifest sha256:$manifest_digest, layer $layer_size bytes)"
}

want="$(inputs_hash)"
if [ "$FORCE" = 1 ] || [ ! -f "$ARCHIVE" ] || [ ! -f "$DIGEST_FILE" ] \
    || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    build
    echo "$want" > "$STAMP"
else
    log "image archive up to date: $ARCHIVE"
fi

ctr_ms2m version >/dev/null 2>&1 \
    || die "containerd not reachable at $MS2M_CONTAINERD_ADDRESS: run hack/start-containerd.sh"

digest="$(cat "$DIGEST_FILE")"
current="$(ctr_ms2m images ls 2>/dev/null | awk -v n="$MS2M_TEST_IMAGE" '$1 == n {print $3}')"
if [ "$FORCE" = 0 ] && [ "$current" = "$digest" ]; then
    log "image $MS2M_TEST_IMAGE ($digest) already in containerd"
    exit 0
fi
log "importing $MS2M_TEST_IMAGE into containerd (namespace $MS2M_NAMESPACE)"
ctr_ms2m images import --platform "linux/$ARCH" "$ARCHIVE" >/dev/null
current="$(ctr_ms2m images ls 2>/dev/null | awk -v n="$MS2M_TEST_IMAGE" '$1 == n {print $3}')"
[ "$current" = "$digest" ] || die "import did not register $MS2M_TEST_IMAGE with $digest (got '${current:-nothing}')"
log "image $MS2M_TEST_IMAGE ready ($digest)"
