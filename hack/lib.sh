# shellcheck shell=bash
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

# Host B: a second containerd of ms2m's own on this machine, for live-migration
# tests (hack/host-b.sh). Its own network namespace, reached over a veth
# (host side MS2M_HOSTB_HOST_IP, inside MS2M_HOSTB_IP), its own root, state,
# socket and config, and its own mount namespace (MS2M_HOSTB_MNTNS) in which
# runc's default roots (/run/ms2m/runc, /run/containerd/runc) are
# MS2M_HOSTB_RUNC_ROOT: containers created on B never collide with A's, even
# with the same namespace and id, without the client passing a runc root.
: "${MS2M_HOSTB_NETNS:=ms2m-b}"
: "${MS2M_HOSTB_VETH_HOST:=ms2m-a0}"
: "${MS2M_HOSTB_VETH_NS:=ms2m-b0}"
: "${MS2M_HOSTB_HOST_IP:=10.88.0.1}"
: "${MS2M_HOSTB_IP:=10.88.0.2}"
: "${MS2M_HOSTB_PREFIXLEN:=24}"
: "${MS2M_HOSTB_CONTAINERD_ROOT:=/var/lib/ms2m-b/containerd}"
: "${MS2M_HOSTB_CONTAINERD_STATE:=/run/ms2m-b/containerd}"
: "${MS2M_HOSTB_ADDRESS:=/run/ms2m-b/containerd/containerd.sock}"
: "${MS2M_HOSTB_CONFIG:=/etc/ms2m/containerd-b.toml}"
: "${MS2M_HOSTB_LOG:=/var/log/ms2m/containerd-b.log}"
: "${MS2M_HOSTB_RUNC_ROOT:=/run/ms2m-b/runc}"
# The pinned mount namespace of host B (a bind mount of an nsfs file).
: "${MS2M_HOSTB_MNTNS:=/run/ms2m-b/ns/mnt}"
# The migration agent inside host B (started only if `ms2m agent --help` works).
: "${MS2M_HOSTB_AGENT:=$MS2M_HOSTB_IP:7100}"
: "${MS2M_HOSTB_AGENT_DIR:=/var/lib/ms2m-b/incoming}"
: "${MS2M_HOSTB_AGENT_LOG:=/var/log/ms2m/agent-b.log}"
# Host B shares host A's kernel: its containers get cgroups of their own.
: "${MS2M_HOSTB_CGROUP_PARENT:=/ms2m-b}"
: "${MS2M_HOSTB_AGENT_PIDFILE:=/run/ms2m-b/agent.pid}"
# The broker as seen from inside host B.
: "${MS2M_HOSTB_TAP_UPSTREAM:=amqp://guest:guest@$MS2M_HOSTB_HOST_IP:5672/%2f}"
# The migration agents' shared secret (ms2m migrate reads it by default).
: "${MS2M_AGENT_TOKEN_FILE:=/etc/ms2m/agent-token}"
export MS2M_AGENT_TOKEN_FILE
# Host A's own agent (so consumers can migrate back from B to A).
: "${MS2M_HOSTA_AGENT:=$MS2M_HOSTB_HOST_IP:7101}"
: "${MS2M_HOSTA_AGENT_DIR:=/var/lib/ms2m/incoming}"
: "${MS2M_HOSTA_AGENT_LOG:=/var/log/ms2m/agent-a.log}"
: "${MS2M_HOSTA_AGENT_PIDFILE:=/run/ms2m/agent-a.pid}"
: "${MS2M_HOSTA_TAP_UPSTREAM:=amqp://guest:guest@127.0.0.1:5672/%2f}"
export MS2M_HOSTA_AGENT MS2M_HOSTA_AGENT_DIR MS2M_HOSTA_AGENT_LOG MS2M_HOSTA_AGENT_PIDFILE MS2M_HOSTA_TAP_UPSTREAM
export MS2M_HOSTB_NETNS MS2M_HOSTB_VETH_HOST MS2M_HOSTB_VETH_NS MS2M_HOSTB_HOST_IP MS2M_HOSTB_IP \
    MS2M_HOSTB_PREFIXLEN MS2M_HOSTB_CONTAINERD_ROOT MS2M_HOSTB_CONTAINERD_STATE MS2M_HOSTB_ADDRESS \
    MS2M_HOSTB_CONFIG MS2M_HOSTB_LOG MS2M_HOSTB_RUNC_ROOT MS2M_HOSTB_MNTNS MS2M_HOSTB_AGENT \
    MS2M_HOSTB_AGENT_DIR MS2M_HOSTB_AGENT_LOG MS2M_HOSTB_AGENT_PIDFILE MS2M_HOSTB_TAP_UPSTREAM

# Cargo builds share one target dir.
: "${CARGO_TARGET_DIR:=$MS2M_ROOT/target}"
export CARGO_TARGET_DIR
export PATH="/usr/local/sbin:/usr/local/bin:$HOME/.cargo/bin:$PATH"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ctr against ms2m's own containerd.
ctr_ms2m() { ctr --address "$MS2M_CONTAINERD_ADDRESS" --namespace "$MS2M_NAMESPACE" "$@"; }
# ctr against host B's containerd.
ctr_b() { ctr --address "$MS2M_HOSTB_ADDRESS" --namespace "$MS2M_NAMESPACE" "$@"; }

# hostb_exec CMD...: runs CMD "on host B": in its network namespace and its
# mount namespace. Not `ip netns exec`: that remounts /sys for the netns and
# so loses /sys/fs/cgroup, which runc (and containerd) need.
hostb_exec() { nsenter --mount="$MS2M_HOSTB_MNTNS" --net="/run/netns/$MS2M_HOSTB_NETNS" -- "$@"; }

# CRI (docs/kubernetes.md): host A's containerd serves the CRI API too, with
# ms2m as runtime handler "ms2m". No CNI plugin: CRI pods here use the host
# network. No registry either: the sandbox (pause) image and the test image
# are built here and imported into the CRI namespace under the name of a
# read-only registry on loopback (hack/cri-registry.py), which only a CRI
# restore needs (containerd pulls the checkpoint's base image by digest).
: "${MS2M_CRI_NAMESPACE:=k8s.io}"
: "${MS2M_CRI_REGISTRY:=127.0.0.1:5111}"
: "${MS2M_CRI_REGISTRY_DIR:=$MS2M_PREFIX/cri-registry}"
: "${MS2M_CRI_REGISTRY_PIDFILE:=/run/ms2m/cri-registry.pid}"
: "${MS2M_CRI_REGISTRY_LOG:=/var/log/ms2m/cri-registry.log}"
: "${MS2M_CRI_SANDBOX_IMAGE:=$MS2M_CRI_REGISTRY/ms2m/pause:1}"
: "${MS2M_CRI_TEST_IMAGE:=$MS2M_CRI_REGISTRY/ms2m/ms2m-test:latest}"
export MS2M_CRI_NAMESPACE MS2M_CRI_REGISTRY MS2M_CRI_REGISTRY_DIR MS2M_CRI_REGISTRY_PIDFILE \
    MS2M_CRI_REGISTRY_LOG MS2M_CRI_SANDBOX_IMAGE MS2M_CRI_TEST_IMAGE

# write_containerd_config CONFIG ROOT STATE ADDRESS [EXTRA_TOML] [cri]: writes
# the config of one of ms2m's containerd instances (version 3, ms2m
# registered as a CRI runtime handler); EXTRA_TOML is appended verbatim. The
# CRI plugins are disabled unless the sixth argument is "cri".
write_containerd_config() {
    local config="$1" root="$2" state="$3" address="$4" extra="${5:-}" cri="${6:-}"
    local disabled='["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"]'
    local cri_toml=""
    if [ "$cri" = cri ]; then
        disabled='[]'
        cri_toml="
# CRI: the sandbox image is built here (no registry to pull from); pods
# use the host network, so no CNI plugin is needed (docs/kubernetes.md).
[plugins.\"io.containerd.cri.v1.images\".pinned_images]
  sandbox = \"$MS2M_CRI_SANDBOX_IMAGE\"

# Lowering a process's oom_score_adj below containerd's own needs a
# privilege this machine's sandbox refuses: clamp it, as in rootless setups.
[plugins.\"io.containerd.cri.v1.runtime\"]
  restrict_oom_score_adj = true
"
    fi
    mkdir -p "$(dirname "$config")"
    cat > "$config" <<TOML
# Written by ms2m's hack/ scripts (write_containerd_config in hack/lib.sh)
version = 3
root = "$root"
state = "$state"
# Without CRI the tests drive containerd through ctr and its API only.
disabled_plugins = $disabled

[grpc]
  address = "$address"

[ttrpc]
  address = "$address.ttrpc"

[debug]
  level = "info"

# With CRI enabled, this makes "ms2m" a runtime handler (RuntimeClass); a
# pod's or container's io.ms2m.* annotations (the tap's opt-in) reach the
# shim through the OCI spec.
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.ms2m]
  runtime_type = "io.containerd.ms2m.v1"
  pod_annotations = ["io.ms2m.*"]
  container_annotations = ["io.ms2m.*"]
$cri_toml
TOML
    if [ -n "$extra" ]; then printf '\n%s\n' "$extra" >> "$config"; fi
}

# apt-get with a private sources list for Debian unstable: the system's own
# lists are never changed.
MS2M_APT_DIR="$MS2M_PREFIX/apt-unstable"
apt_unstable() {
    apt-get -o Dir::Etc::SourceList="$MS2M_APT_DIR/sources.list" \
        -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::State::Lists="$MS2M_APT_DIR/lists" \
        -o Dir::Cache="$MS2M_APT_DIR/cache" "$@"
}
