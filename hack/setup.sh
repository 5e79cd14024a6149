#!/usr/bin/env bash
# Installs, builds and starts everything ms2m needs on a Debian bookworm
# machine. Idempotent: each step checks whether its result is already there.
#
#   hack/setup.sh            everything (packages, CRIU, containerd, ms2m, test image;
#                            ms2m's containerd, RabbitMQ and host B started)
#   hack/setup.sh system     only the system part (packages, CRIU, containerd)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
trap 'echo "error: hack/setup.sh failed at line $LINENO: $BASH_COMMAND" >&2' ERR

[ "$(id -u)" = 0 ] || die "setup must run as root (it installs packages and starts containerd)"

BOOKWORM_PACKAGES=(
    # runtime pieces (iproute2: also host B's netns and veth, hack/host-b.sh;
    # its nsenter and unshare come with util-linux, which is essential)
    runc iptables iproute2 rabbitmq-server
    # tools the scripts and tests call: pgrep (setup), script (terminal tests),
    # GNU tar and gzip (CRIU's tmpfs restore; criu-tar's comparison tests)
    procps bsdutils tar gzip
    # the CRI test registry's health check (hack/cri-setup.sh)
    curl
    # CRIU build dependencies (the brief lists them), plus the compiler
    build-essential pkgconf libbsd-dev libcap-dev libgnutls28-dev libnet1-dev
    libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev
    protobuf-c-compiler protobuf-compiler uuid-dev python3 xz-utils
    # test image: busybox, the host's python with pika for a third-party client
    busybox-static python3-pika
)

install_bookworm_packages() {
    local missing=()
    for p in "${BOOKWORM_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then log "bookworm packages present"; return; fi
    log "installing from bookworm: ${missing[*]}"
    apt-get update -qq
    # Services are started by ms2m's scripts, not by package postinsts.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

setup_unstable_list() {
    mkdir -p "$MS2M_APT_DIR/lists/partial" "$MS2M_APT_DIR/cache/archives/partial"
    cat > "$MS2M_APT_DIR/sources.list" <<LIST
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian unstable main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian unstable main
LIST
    if [ -z "$(ls -A "$MS2M_APT_DIR/lists" 2>/dev/null | grep -v partial)" ]; then
        log "fetching Debian unstable package lists (private list in $MS2M_APT_DIR)"
        apt_unstable update -qq
    fi
}

# CRIU keeps its kernel-probe cache (criu.kdat) only on tmpfs; /run is not
# tmpfs on this machine kind, so ms2m builds CRIU with its run dir on a small
# tmpfs of its own. Without the cache every CRIU call re-probes the kernel
# (~25-40 ms).
CRIU_RUNDIR=/run/criu

criu_ok() {
    command -v criu >/dev/null 2>&1 || return 1
    grep -aq "$CRIU_RUNDIR/criu.kdat" "$(command -v criu)" || return 1
    local v; v="$(criu --version 2>/dev/null | awk '/^Version:/ {print $2}')"
    [ -n "$v" ] || return 1
    # Need >= 4.2 (bookworm's 3.17 and trixie's 4.1 fail on this kernel).
    dpkg --compare-versions "$v" ge 4.2
}

install_criu() {
    if criu_ok; then log "CRIU $(criu --version | awk '/^Version:/ {print $2}') present"; return; fi
    setup_unstable_list
    local src="$MS2M_PREFIX/src/criu"
    mkdir -p "$src"
    (
        cd "$src"
        if ! ls criu_*.orig.tar.xz >/dev/null 2>&1; then
            log "downloading CRIU source from Debian unstable"
            # Only the upstream tarball is needed (apt checks its hash); the
            # Debian packaging files are not, and the mirror may lack them.
            apt_unstable source --download-only criu >/dev/null 2>&1 || true
            ls criu_*.orig.tar.xz >/dev/null 2>&1 || die "could not download CRIU's source from Debian unstable"
        fi
        local tarball; tarball="$(ls criu_*.orig.tar.xz | sort -V | tail -1)"
        # criu_4.2.1.orig.tar.xz unpacks into criu-4.2.1/
        local version="${tarball#criu_}"; version="${version%.orig.tar.xz}"
        local dir="criu-$version"
        [ -d "$dir" ] || tar -xJf "$tarball"
        [ -d "$dir" ] || die "unpacking $tarball did not give $dir"
        log "building CRIU from $tarball (make criu)"
        make -C "$dir" clean >/dev/null 2>&1 || true
        make -C "$dir" -j"$(nproc)" RUNDIR="$CRIU_RUNDIR" criu >"$src/build.log" 2>&1 || { tail -30 "$src/build.log"; die "CRIU build failed (log: $src/build.log)"; }
        install -m 0755 "$dir/criu/criu" /usr/local/sbin/criu
    )
    criu_ok || die "CRIU installed but 'criu --version' does not report >= 4.2"
    log "CRIU $(criu --version | awk '/^Version:/ {print $2}') installed to /usr/local/sbin/criu"
}

# CRIU caches its kernel probe in /run/criu.kdat, creating /run/criu.kdat.tmp
# exclusively first. A tmp file left by an interrupted CRIU blocks the cache
# for good, and every CRIU call then re-probes the kernel (~25 ms).
mount_criu_rundir() {
    mkdir -p "$CRIU_RUNDIR"
    if ! mountpoint -q "$CRIU_RUNDIR"; then
        mount -t tmpfs -o mode=0700,size=1m ms2m-criu "$CRIU_RUNDIR"
    fi
}

clear_stale_criu_cache() {
    local d
    for d in /run "$CRIU_RUNDIR"; do
        if [ -e "$d/criu.kdat.tmp" ] && ! pgrep -x criu >/dev/null 2>&1; then
            log "removing stale $d/criu.kdat.tmp"
            rm -f "$d/criu.kdat.tmp"
        fi
    done
}

# CRIU walks the host's whole conntrack hash table twice while dumping a
# container's network namespace; with the kernel's default 262144 buckets
# that is ~15-20 ms of every freeze. A smaller table is a host tuning the
# docs recommend (docs/operations.md); MS2M_CONNTRACK_BUCKETS=keep skips it.
tune_conntrack() {
    local want="${MS2M_CONNTRACK_BUCKETS:-4096}"
    [ "$want" = keep ] && return
    local f=/proc/sys/net/netfilter/nf_conntrack_buckets
    [ -w "$f" ] || { log "conntrack table not tunable here; leaving it"; return; }
    if [ "$(cat "$f")" != "$want" ]; then
        log "setting net.netfilter.nf_conntrack_buckets=$want (was $(cat "$f"))"
        echo "$want" > "$f" || log "could not set nf_conntrack_buckets; leaving it"
    fi
}

install_containerd() {
    if command -v containerd >/dev/null 2>&1 && containerd --version 2>/dev/null | grep -q ' v\?2\.'; then
        log "containerd $(containerd --version | awk '{print $3}') present"; return
    fi
    setup_unstable_list
    local dl="$MS2M_PREFIX/debs"
    mkdir -p "$dl"
    ( cd "$dl" && ls containerd_*.deb >/dev/null 2>&1 || apt_unstable download containerd >/dev/null )
    local deb; deb="$(ls "$dl"/containerd_*.deb | sort -V | tail -1)"
    log "unpacking $(basename "$deb") into $MS2M_PREFIX/containerd"
    rm -rf "$MS2M_PREFIX/containerd"
    dpkg-deb -x "$deb" "$MS2M_PREFIX/containerd"
    for b in containerd ctr containerd-shim-runc-v2; do
        ln -sf "$MS2M_PREFIX/containerd/usr/bin/$b" "/usr/local/bin/$b"
    done
    containerd --version >/dev/null || die "containerd from $deb does not run on this machine"
}

build_ms2m() {
    command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
    log "building ms2m (release)"
    (cd "$MS2M_ROOT" && cargo build --release --locked -q -p ms2m-shim -p ms2m-cli)
    install -m 0755 "$CARGO_TARGET_DIR/release/containerd-shim-ms2m-v1" /usr/local/bin/containerd-shim-ms2m-v1
    install -m 0755 "$CARGO_TARGET_DIR/release/ms2m" /usr/local/bin/ms2m
    # CRIU's fast tmpfs archiver, put first on the PATH of the CRIU the
    # shim runs for dumps ([criu] helper_dir in docs/configuration.md).
    # Static: CRIU forks and execs it five times inside every freeze, and
    # a static binary starts ~0.25 ms sooner (no dynamic loader).
    local target flagvar
    target="$(uname -m)-unknown-linux-gnu"
    flagvar="CARGO_TARGET_$(echo "$target" | tr 'a-z-' 'A-Z_')_RUSTFLAGS"
    (cd "$MS2M_ROOT" && env "$flagvar=-C target-feature=+crt-static" \
        cargo build --release --locked -q --target "$target" -p ms2m-criu-tar)
    install -D -m 0755 "$CARGO_TARGET_DIR/$target/release/ms2m-criu-tar" "$MS2M_CRIU_HELPERS/tar"
}

main() {
    install_bookworm_packages
    install_criu
    mount_criu_rundir
    clear_stale_criu_cache
    tune_conntrack
    install_containerd
    [ "${1:-all}" = system ] && return
    build_ms2m
    "$MS2M_ROOT/hack/start-containerd.sh"
    "$MS2M_ROOT/hack/build-image.sh"
    # CRI (docs/kubernetes.md): sandbox image, the loopback registry a CRI
    # restore pulls the base image from, containerd serving CRI, images in
    # the CRI namespace.
    "$MS2M_ROOT/hack/cri-setup.sh"
    # The broker for the AMQP tap, its tests and the demo.
    "$MS2M_ROOT/hack/start-rabbitmq.sh"
    # Host B, the live-migration target: a second containerd in its own
    # network namespace (hack/host-b.sh).
    "$MS2M_ROOT/hack/host-b.sh" start
    log "setup complete"
}

main "$@"
