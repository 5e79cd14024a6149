#!/usr/bin/env bash
# Starts a RabbitMQ node of ms2m's own (node ms2m@localhost, its own data and
# log dirs) unless one answers with the current config. AMQP listens on every
# address (port 5672), and guest may log in from anywhere: host B
# (hack/host-b.sh, network namespace ms2m-b) reaches the broker at 10.88.0.1
# over a veth. A test-only node: do not run it on a machine whose port 5672
# is exposed to a network you do not trust.
# A node still running with an older config of this script (version marker
# below; version 1 listened on loopback only) is stopped and started again.
# The AMQP tests, the broker demo and host B need it; nothing else starts it.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

: "${MS2M_RABBITMQ_NODE:=ms2m@localhost}"
: "${MS2M_RABBITMQ_BASE:=/var/lib/ms2m/rabbitmq}"
: "${MS2M_RABBITMQ_PORT:=5672}"
export RABBITMQ_NODENAME="$MS2M_RABBITMQ_NODE"
export RABBITMQ_MNESIA_BASE="$MS2M_RABBITMQ_BASE/mnesia"
export RABBITMQ_LOG_BASE=/var/log/ms2m/rabbitmq
export RABBITMQ_CONFIG_FILE=/etc/ms2m/rabbitmq
export RABBITMQ_ENABLED_PLUGINS_FILE=/etc/ms2m/rabbitmq-enabled-plugins

command -v rabbitmq-server >/dev/null || die "rabbitmq-server not installed: run hack/setup.sh"

# Bump when the config below changes in a way a running node must pick up.
CONFIG_VERSION=2
CONFIG_MARKER="# ms2m-rabbitmq-config-version: $CONFIG_VERSION"

# True if AMQP listens on the wildcard address (what config version 2 gives).
listens_everywhere() {
    ss -Hltn "sport = :$MS2M_RABBITMQ_PORT" 2>/dev/null | awk '{print $4}' \
        | grep -qE "^(\*|0\.0\.0\.0|\[::\]):$MS2M_RABBITMQ_PORT\$"
}

if rabbitmqctl -q -n "$RABBITMQ_NODENAME" status >/dev/null 2>&1; then
    if grep -qxF "$CONFIG_MARKER" /etc/ms2m/rabbitmq.conf 2>/dev/null && listens_everywhere; then
        log "RabbitMQ node $RABBITMQ_NODENAME already running"
        exit 0
    fi
    log "RabbitMQ node $RABBITMQ_NODENAME runs with an older config (loopback only): restarting it"
    rabbitmqctl -q -n "$RABBITMQ_NODENAME" stop >/dev/null 2>&1 || true
    for _ in $(seq 1 60); do
        if ! rabbitmqctl -q -n "$RABBITMQ_NODENAME" status >/dev/null 2>&1 \
            && ! ss -Hltn "sport = :$MS2M_RABBITMQ_PORT" 2>/dev/null | grep -q .; then
            break
        fi
        sleep 0.5
    done
fi

# Debian's package may have started its own default node on 5672 when it was
# installed (on machines where services start on install): stop it, ours
# takes the port.
if ss -Hltn "sport = :$MS2M_RABBITMQ_PORT" 2>/dev/null | grep -q .; then
    log "port $MS2M_RABBITMQ_PORT is taken (Debian's default RabbitMQ node?): stopping it"
    (unset RABBITMQ_NODENAME RABBITMQ_MNESIA_BASE RABBITMQ_LOG_BASE RABBITMQ_CONFIG_FILE RABBITMQ_ENABLED_PLUGINS_FILE
     service rabbitmq-server stop >/dev/null 2>&1 || rabbitmqctl -q stop >/dev/null 2>&1 || true)
    for _ in $(seq 1 50); do
        ss -Hltn "sport = :$MS2M_RABBITMQ_PORT" 2>/dev/null | grep -q . || break
        sleep 0.2
    done
    ss -Hltn "sport = :$MS2M_RABBITMQ_PORT" 2>/dev/null | grep -q . \
        && die "port $MS2M_RABBITMQ_PORT is in use by something else: $(ss -Hltnp "sport = :$MS2M_RABBITMQ_PORT")"
fi

mkdir -p /etc/ms2m "$RABBITMQ_MNESIA_BASE" "$RABBITMQ_LOG_BASE"
chown -R rabbitmq:rabbitmq "$MS2M_RABBITMQ_BASE" "$RABBITMQ_LOG_BASE"
cat > /etc/ms2m/rabbitmq.conf <<CONF
# Written by ms2m's hack/start-rabbitmq.sh: AMQP on every address (host B
# reaches it over its veth), guest allowed from non-loopback: test-only node.
$CONFIG_MARKER
listeners.tcp.default = $MS2M_RABBITMQ_PORT
loopback_users = none
CONF
echo '[].' > /etc/ms2m/rabbitmq-enabled-plugins
chmod 644 /etc/ms2m/rabbitmq.conf /etc/ms2m/rabbitmq-enabled-plugins

log "starting RabbitMQ node $RABBITMQ_NODENAME (log: $RABBITMQ_LOG_BASE)"
rabbitmq-server -detached </dev/null 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&-
for _ in $(seq 1 120); do
    if rabbitmqctl -q -n "$RABBITMQ_NODENAME" await_startup >/dev/null 2>&1; then
        log "RabbitMQ ready on port $MS2M_RABBITMQ_PORT (all addresses)"
        exit 0
    fi
    sleep 0.5
done
tail -30 "$RABBITMQ_LOG_BASE"/*.log >&2 || true
die "RabbitMQ did not come up within 60 s"
