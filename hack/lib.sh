# Shared settings for the hack/ scripts. Sourced, not executed.
# Everything ms2m's scripts start lives under its own root, state and socket,
# so a containerd already running on the host is never touched.

MS2M_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MS2M_ROOT

# Where setup.sh puts what it builds or unpacks.
: "${MS2M_PREFIX:=/opt/ms2m}"
# The containerd instance the demo, tests and benchmarks talk to.
: "${MS2M_CONTAINERD_ROOT:=/var/lib/ms2m/containerd}"
: "${MS2M_CONTAINERD_STATE:=/run/ms2m/containerd}"
: "${MS2M_CONTAINERD_ADDRESS:=/run/ms2m/containerd/containerd.sock}"
: "${MS2M_CONTAINERD_CONFIG:=/etc/ms2m/containerd.toml}"
: "${MS2M_NAMESPACE:=ms2m}"
: "${MS2M_TEST_IMAGE:=docker.io/library/ms2m-test:latest}"
# Where setup installs CRIU's helpers (the shim's [criu] helper_dir default).
: "${MS2M_CRIU_HELPERS:=/usr/local/lib/ms2m/criu-helpers}"
export MS2M_CRIU_HELPERS MS2M_PREFIX MS2M_CONTAINERD_ROOT MS2M_CONTAINERD_STATE MS2M_CONTAINERD_ADDRESS \
    MS2M_CONTAINERD_CONFIG MS2M_NAMESPACE MS2M_TEST_IMAGE

# Cargo builds share one target dir.
: "${CARGO_TARGET_DIR:=$MS2M_ROOT/target}"
export CARGO_TARGET_DIR
export PATH="/usr/local/sbin:/usr/local/bin:$HOME/.cargo/bin:$PATH"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ctr against ms2m's own containerd.
ctr_ms2m() { ctr --address "$MS2M_CONTAINERD_ADDRESS" --namespace "$MS2M_NAMESPACE" "$@"; }

# apt-get with a private sources list for Debian unstable: the system's own
# lists are never changed.
MS2M_APT_DIR="$MS2M_PREFIX/apt-unstable"
apt_unstable() {
    apt-get -o Dir::Etc::SourceList="$MS2M_APT_DIR/sources.list" \
        -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::State::Lists="$MS2M_APT_DIR/lists" \
        -o Dir::Cache="$MS2M_APT_DIR/cache" "$@"
}
