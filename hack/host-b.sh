#!/usr/bin/env bash
# Host B: a second containerd of ms2m's own on this machine, the target of
# live-migration tests. Host A is ms2m's usual containerd (hack/start-containerd.sh,
# host network namespace); host B is a separate containerd process in
#
#   - its own network namespace ($MS2M_HOSTB_NETNS, default ms2m-b), reached
#     over a veth: ms2m-a0 10.88.0.1/24 on the host <-> ms2m-b0 10.88.0.2/24
#     inside (lo up too; no default route: B sees the host at 10.88.0.1 only);
#   - its own mount namespace (pinned at $MS2M_HOSTB_MNTNS), a copy of the
#     host's taken when it is first created, in which runc's default roots
#     /run/ms2m/runc (ms2m's shim) and /run/containerd/runc (runc.v2 shim)
#     are bind mounts of $MS2M_HOSTB_RUNC_ROOT (/run/ms2m-b/runc). So a
#     container created on B never collides with one of the same id on A (same
#     namespace "ms2m"), whether or not the client passes a runc root
#     (`ctr run --runc-root` is only honoured for io.containerd.runc.v2; an
#     explicit root=/run/ms2m-b/runc names the same directory).
#     Mounts made on the host after the namespace was created are not seen
#     inside it when the host's mounts are private (they are on this machine
#     kind; on a systemd host they propagate into B);
#   - its own root, state, socket and config (/etc/ms2m/containerd-b.toml,
#     /var/lib/ms2m-b/containerd, /run/ms2m-b/containerd, containerd.sock and
#     .ttrpc), log /var/log/ms2m/containerd-b.log. Shims it spawns, and so the
#     containers' parents, live in B's network and mount namespaces.
#
# `start` also imports A's test image into B (exported from A), makes sure
# the RabbitMQ node listens on 10.88.0.1 (hack/start-rabbitmq.sh), and starts
# the migration agent inside B if the installed `ms2m` has an `agent`
# subcommand (listening on $MS2M_HOSTB_AGENT, default 10.88.0.2:7100).
#
#   hack/host-b.sh start    idempotent: sets up whatever is missing
#   hack/host-b.sh stop     stops the agent and containerd B; the namespaces,
#                           the veth, B's shims and containers stay (like
#                           stopping containerd on a real host); start again
#                           and containerd B reconnects to them
#   hack/host-b.sh status   what is there and what runs
#
# Run a command "on host B": hostb_exec CMD... (hack/lib.sh), i.e.
#   nsenter --mount=/run/ms2m-b/ns/mnt --net=/run/netns/ms2m-b -- CMD
# (not `ip netns exec`: it remounts /sys and so loses /sys/fs/cgroup, which
# runc needs.)
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ "$(id -u)" = 0 ] || die "hack/host-b.sh must run as root (namespaces, veth, containerd)"

NS="$MS2M_HOSTB_NETNS"
NS_DIR="$(dirname "$MS2M_HOSTB_MNTNS")"
CONTAINERD_PIDFILE="$MS2M_HOSTB_CONTAINERD_STATE/containerd.pid"
AGENT_PORT="${MS2M_HOSTB_AGENT##*:}"
# Where runc's default roots are inside B's mount namespace.
DEFAULT_RUNC_ROOTS=(/run/ms2m/runc /run/containerd/runc)

b_answers() { timeout 5 ctr --address "$MS2M_HOSTB_ADDRESS" version >/dev/null 2>&1; }

# pid_matching PIDFILE WORD: the pid in PIDFILE if that process is alive and
# its command line contains WORD; else nothing.
pid_matching() {
    local pid
    pid="$(cat "$1" 2>/dev/null || true)"
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 0
    if tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$2"; then echo "$pid"; fi
}
containerd_b_pid() { pid_matching "$CONTAINERD_PIDFILE" "$MS2M_HOSTB_CONFIG"; }
agent_pid() { pid_matching "$MS2M_HOSTB_AGENT_PIDFILE" "$MS2M_HOSTB_AGENT"; }

netns_exists() { [ -e "/run/netns/$NS" ] && ip -n "$NS" link show lo >/dev/null 2>&1; }
mntns_pinned() { [ "$(findmnt -rno FSTYPE --mountpoint "$MS2M_HOSTB_MNTNS" 2>/dev/null | tail -1)" = nsfs ]; }
in_netns() { nsenter --net="/run/netns/$NS" -- "$@"; }
in_mntns() { nsenter --mount="$MS2M_HOSTB_MNTNS" -- "$@"; }
agent_listens() { in_netns ss -Hltn "sport = :$AGENT_PORT" 2>/dev/null | grep -qF "$MS2M_HOSTB_IP:$AGENT_PORT"; }
broker_reachable() {
    in_netns timeout 3 bash -c "exec 3<>/dev/tcp/$MS2M_HOSTB_HOST_IP/5672" 2>/dev/null
}

setup_net() {
    if ! netns_exists; then
        log "creating network namespace $NS"
        ip netns add "$NS"
    fi
    # A host-side veth whose peer is not inside the netns (half-made pair) is
    # replaced.
    if ip link show "$MS2M_HOSTB_VETH_HOST" >/dev/null 2>&1 \
        && ! ip -n "$NS" link show "$MS2M_HOSTB_VETH_NS" >/dev/null 2>&1; then
        ip link del "$MS2M_HOSTB_VETH_HOST"
    fi
    if ! ip link show "$MS2M_HOSTB_VETH_HOST" >/dev/null 2>&1; then
        log "creating veth $MS2M_HOSTB_VETH_HOST <-> $NS:$MS2M_HOSTB_VETH_NS"
        ip link add "$MS2M_HOSTB_VETH_HOST" type veth peer name "$MS2M_HOSTB_VETH_NS" netns "$NS"
    fi
    ip addr replace "$MS2M_HOSTB_HOST_IP/$MS2M_HOSTB_PREFIXLEN" dev "$MS2M_HOSTB_VETH_HOST"
    ip link set "$MS2M_HOSTB_VETH_HOST" up
    ip -n "$NS" addr replace "$MS2M_HOSTB_IP/$MS2M_HOSTB_PREFIXLEN" dev "$MS2M_HOSTB_VETH_NS"
    ip -n "$NS" link set "$MS2M_HOSTB_VETH_NS" up
    ip -n "$NS" link set lo up
}

# Creates B's mount namespace once (pinned by a bind mount of its nsfs file,
# so it outlives containerd B: a restarted containerd finds its shims' view),
# drops its copies of A's container mounts and tests' mounts, and binds B's
# runc root over runc's default roots.
setup_mntns() {
    mkdir -p "$NS_DIR" "$MS2M_HOSTB_RUNC_ROOT" "${DEFAULT_RUNC_ROOTS[@]}"
    if ! mntns_pinned; then
        # unshare can pin a mount namespace only on a private mount.
        mountpoint -q "$NS_DIR" || mount --bind "$NS_DIR" "$NS_DIR"
        mount --make-private "$NS_DIR"
        touch "$MS2M_HOSTB_MNTNS"
        log "creating host B's mount namespace ($MS2M_HOSTB_MNTNS)"
        unshare --mount="$MS2M_HOSTB_MNTNS" --propagation slave true
        # Copies of mounts that belong to host A or to tests would only pin
        # their filesystems (private mounts get no unmount events).
        local t
        in_mntns findmnt -rno TARGET | grep -E "^($MS2M_CONTAINERD_STATE|$MS2M_CONTAINERD_ROOT|/run/containerd|/dev/shm/ms2m-tests)/" \
            | sort -r | while read -r t; do
                in_mntns umount -l "$(printf '%b' "$t")" 2>/dev/null || true
            done || true
    fi
    local d
    for d in "${DEFAULT_RUNC_ROOTS[@]}"; do
        if ! in_mntns mountpoint -q "$d"; then
            in_mntns mount --bind "$MS2M_HOSTB_RUNC_ROOT" "$d"
        fi
    done
}

start_containerd_b() {
    if b_answers; then log "containerd B already running at $MS2M_HOSTB_ADDRESS"; return; fi
    command -v containerd >/dev/null || die "containerd not installed: run hack/setup.sh"
    local old; old="$(containerd_b_pid)"
    [ -z "$old" ] || die "containerd B (pid $old) runs but does not answer at $MS2M_HOSTB_ADDRESS: hack/host-b.sh stop first"
    mkdir -p "$MS2M_HOSTB_CONTAINERD_ROOT" "$MS2M_HOSTB_CONTAINERD_STATE" "$(dirname "$MS2M_HOSTB_LOG")"
    write_containerd_config "$MS2M_HOSTB_CONFIG" "$MS2M_HOSTB_CONTAINERD_ROOT" \
        "$MS2M_HOSTB_CONTAINERD_STATE" "$MS2M_HOSTB_ADDRESS"
    log "starting containerd B in $NS (log: $MS2M_HOSTB_LOG)"
    # nsenter execs containerd (no --pid, so no fork): $! is containerd's pid.
    nohup nsenter --mount="$MS2M_HOSTB_MNTNS" --net="/run/netns/$NS" -- \
        containerd --config "$MS2M_HOSTB_CONFIG" >>"$MS2M_HOSTB_LOG" 2>&1 </dev/null 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&- &
    echo $! > "$CONTAINERD_PIDFILE"
    for _ in $(seq 1 100); do
        if b_answers; then log "containerd B ready at $MS2M_HOSTB_ADDRESS (pid $(cat "$CONTAINERD_PIDFILE"))"; return; fi
        sleep 0.1
    done
    tail -20 "$MS2M_HOSTB_LOG" >&2
    die "containerd B did not come up within 10 s"
}

image_digest() { "$@" images ls 2>/dev/null | awk -v n="$MS2M_TEST_IMAGE" '$1 == n {print $3}'; }

import_image() {
    local a b
    a="$(image_digest ctr_ms2m)"
    b="$(image_digest ctr_b)"
    if [ -z "$a" ]; then
        log "warning: host A has no $MS2M_TEST_IMAGE (run hack/build-image.sh): not importing it into B"
        return
    fi
    if [ "$a" = "$b" ]; then log "image $MS2M_TEST_IMAGE ($a) already in containerd B"; return; fi
    local arch tmp
    case "$(uname -m)" in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; *) arch="$(uname -m)" ;; esac
    tmp="$(mktemp "${TMPDIR:-/tmp}/ms2m-hostb-image.XXXXXX.tar")"
    log "importing $MS2M_TEST_IMAGE into containerd B (exported from A)"
    if ! { ctr_ms2m images export --platform "linux/$arch" "$tmp" "$MS2M_TEST_IMAGE" \
            && ctr_b images import --platform "linux/$arch" "$tmp" >/dev/null; }; then
        rm -f "$tmp"
        die "copying $MS2M_TEST_IMAGE from A to B failed"
    fi
    rm -f "$tmp"
    b="$(image_digest ctr_b)"
    [ "$a" = "$b" ] || die "import did not register $MS2M_TEST_IMAGE with $a in B (got '${b:-nothing}')"
}

ensure_broker() {
    command -v rabbitmq-server >/dev/null || { log "RabbitMQ not installed: skipping the broker"; return; }
    "$MS2M_ROOT/hack/start-rabbitmq.sh"
    if broker_reachable; then
        log "RabbitMQ reachable from host B at $MS2M_HOSTB_HOST_IP:5672"
    else
        log "warning: RabbitMQ does not answer at $MS2M_HOSTB_HOST_IP:5672 from inside $NS"
    fi
}

start_agent() {
    local pid; pid="$(agent_pid)"
    if [ -n "$pid" ]; then log "agent B already running (pid $pid)"; return; fi
    if agent_listens; then
        log "warning: something not started by this script listens on $MS2M_HOSTB_AGENT: not starting the agent"
        return
    fi
    if ! command -v ms2m >/dev/null || ! ms2m agent --help >/dev/null 2>&1; then
        log "the installed ms2m has no 'agent' subcommand: not starting the migration agent"
        return
    fi
    mkdir -p "$MS2M_HOSTB_AGENT_DIR" "$(dirname "$MS2M_HOSTB_AGENT_LOG")" "$(dirname "$MS2M_HOSTB_AGENT_PIDFILE")"
    log "starting the migration agent in host B on $MS2M_HOSTB_AGENT (log: $MS2M_HOSTB_AGENT_LOG)"
    nohup nsenter --mount="$MS2M_HOSTB_MNTNS" --net="/run/netns/$NS" -- \
        ms2m --address "$MS2M_HOSTB_ADDRESS" --namespace "$MS2M_NAMESPACE" agent \
        --listen "$MS2M_HOSTB_AGENT" --dir "$MS2M_HOSTB_AGENT_DIR" \
        --tap-upstream "$MS2M_HOSTB_TAP_UPSTREAM" --runc-root "$MS2M_HOSTB_RUNC_ROOT" \
        --cgroup-parent "$MS2M_HOSTB_CGROUP_PARENT" --token-file "$MS2M_AGENT_TOKEN_FILE" \
        >>"$MS2M_HOSTB_AGENT_LOG" 2>&1 </dev/null 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&- &
    echo $! > "$MS2M_HOSTB_AGENT_PIDFILE"
    for _ in $(seq 1 100); do
        if agent_listens; then log "agent B ready on $MS2M_HOSTB_AGENT"; return; fi
        [ -n "$(agent_pid)" ] || break
        sleep 0.1
    done
    tail -20 "$MS2M_HOSTB_AGENT_LOG" >&2 || true
    log "warning: the migration agent does not listen on $MS2M_HOSTB_AGENT (log: $MS2M_HOSTB_AGENT_LOG)"
}

# The agents' shared secret: `ms2m migrate` presents it (it reads
# /etc/ms2m/agent-token by default); made once, readable by root only.
ensure_agent_token() {
    [ -s "$MS2M_AGENT_TOKEN_FILE" ] && return
    mkdir -p "$(dirname "$MS2M_AGENT_TOKEN_FILE")"
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$MS2M_AGENT_TOKEN_FILE")
    log "made the migration agents' token $MS2M_AGENT_TOKEN_FILE"
}

# Host A's own agent (host network namespace, containerd A), so that a
# container on B can migrate back to A (`ms2m --address B migrate --to A`).
agent_a_pid() { pid_matching "$MS2M_HOSTA_AGENT_PIDFILE" "$MS2M_HOSTA_AGENT"; }
agent_a_listens() { ss -Hltn "sport = :${MS2M_HOSTA_AGENT##*:}" 2>/dev/null | grep -qF "$MS2M_HOSTA_AGENT"; }
start_agent_a() {
    local pid; pid="$(agent_a_pid)"
    if [ -n "$pid" ]; then log "agent A already running (pid $pid)"; return; fi
    if ! command -v ms2m >/dev/null || ! ms2m agent --help >/dev/null 2>&1; then
        log "the installed ms2m has no 'agent' subcommand: not starting agent A"
        return
    fi
    mkdir -p "$MS2M_HOSTA_AGENT_DIR" "$(dirname "$MS2M_HOSTA_AGENT_PIDFILE")"
    log "starting the migration agent of host A on $MS2M_HOSTA_AGENT (log: $MS2M_HOSTA_AGENT_LOG)"
    nohup ms2m --address "$MS2M_CONTAINERD_ADDRESS" --namespace "$MS2M_NAMESPACE" agent \
        --listen "$MS2M_HOSTA_AGENT" --dir "$MS2M_HOSTA_AGENT_DIR" \
        --tap-upstream "$MS2M_HOSTA_TAP_UPSTREAM" --cgroup-parent /ms2m \
        --token-file "$MS2M_AGENT_TOKEN_FILE" \
        >>"$MS2M_HOSTA_AGENT_LOG" 2>&1 </dev/null 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&- &
    echo $! > "$MS2M_HOSTA_AGENT_PIDFILE"
    for _ in $(seq 1 100); do
        if agent_a_listens; then log "agent A ready on $MS2M_HOSTA_AGENT"; return; fi
        [ -n "$(agent_a_pid)" ] || break
        sleep 0.1
    done
    tail -20 "$MS2M_HOSTA_AGENT_LOG" >&2 || true
    log "warning: agent A does not listen on $MS2M_HOSTA_AGENT (log: $MS2M_HOSTA_AGENT_LOG)"
}

# stop_pid NAME PID: SIGTERM, up to 10 s, then SIGKILL.
stop_pid() {
    local name="$1" pid="$2"
    [ -n "$pid" ] || { log "$name not running"; return; }
    log "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        [ -e "/proc/$pid" ] || return 0
        sleep 0.1
    done
    log "$name did not stop within 10 s: SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
}

cmd_start() {
    if ! command -v nsenter >/dev/null || ! command -v ip >/dev/null; then
        die "nsenter (util-linux) and ip (iproute2) are needed: run hack/setup.sh system"
    fi
    setup_net
    setup_mntns
    start_containerd_b
    import_image
    ensure_broker
    ensure_agent_token
    start_agent
    start_agent_a
    log "host B up: containerd $MS2M_HOSTB_ADDRESS, netns $NS ($MS2M_HOSTB_IP), runc root $MS2M_HOSTB_RUNC_ROOT"
}

cmd_stop() {
    stop_pid "agent A" "$(agent_a_pid)"
    rm -f "$MS2M_HOSTA_AGENT_PIDFILE"
    stop_pid "agent B" "$(agent_pid)"
    rm -f "$MS2M_HOSTB_AGENT_PIDFILE"
    stop_pid "containerd B" "$(containerd_b_pid)"
    rm -f "$CONTAINERD_PIDFILE"
}

cmd_status() {
    local rc=0 pid
    if netns_exists; then
        echo "netns      $NS: $(ip -n "$NS" -br addr show "$MS2M_HOSTB_VETH_NS" 2>/dev/null || echo "no $MS2M_HOSTB_VETH_NS")"
    else
        echo "netns      $NS: missing"; rc=1
    fi
    echo "veth       $(ip -br addr show "$MS2M_HOSTB_VETH_HOST" 2>/dev/null || echo "$MS2M_HOSTB_VETH_HOST missing")"
    if mntns_pinned; then echo "mount ns   $MS2M_HOSTB_MNTNS"; else echo "mount ns   missing"; rc=1; fi
    pid="$(containerd_b_pid)"
    if b_answers; then
        echo "containerd B  running (pid ${pid:-?}) at $MS2M_HOSTB_ADDRESS; tasks:"
        ctr_b tasks ls 2>/dev/null | sed 's/^/    /'
    else
        echo "containerd B  not answering${pid:+ (pid $pid alive)}"; rc=1
    fi
    pid="$(agent_pid)"
    if [ -n "$pid" ]; then
        echo "agent B    pid $pid, $(agent_listens && echo "listening on $MS2M_HOSTB_AGENT" || echo "NOT listening on $MS2M_HOSTB_AGENT")"
    else
        echo "agent B    not running"
    fi
    pid="$(agent_a_pid)"
    echo "agent A    ${pid:+pid $pid, }$(agent_a_listens && echo "listening on $MS2M_HOSTA_AGENT" || echo "NOT listening on $MS2M_HOSTA_AGENT")"
    if netns_exists && broker_reachable; then
        echo "broker     reachable from B at $MS2M_HOSTB_HOST_IP:5672"
    else
        echo "broker     not reachable from B at $MS2M_HOSTB_HOST_IP:5672"
    fi
    return "$rc"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 {start|stop|status}" >&2; exit 2 ;;
esac
