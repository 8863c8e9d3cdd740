#!/usr/bin/env bash
# A Docker engine for `make test-stack` on a machine that has none running (Debian's docker.io):
#
#   docker/stack/engine.sh start   # dockerd in the background; returns once it answers
#   docker/stack/engine.sh stop    # stops that dockerd (and the containers it runs)
#
# The daemon is started with no default bridge, no iptables rules, no masquerading and without
# turning on the host's IP forwarding: containers talk only to each other on the compose
# project's own network and to the host through published ports on 127.0.0.1. Its state lives
# under ICEFLEET_DOCKER_DIR (default /var/tmp/icefleet-docker); the socket is the default one,
# so `docker` and `docker compose` need no DOCKER_HOST. An engine already answering is left
# alone: `start` then does nothing and `stop` stops only a daemon this script started.
set -euo pipefail

state=${ICEFLEET_DOCKER_DIR:-/var/tmp/icefleet-docker}
pidfile=$state/dockerd.pid
log=$state/dockerd.log

running_pid() {
    [ -s "$pidfile" ] || return 1
    local pid
    pid=$(cat "$pidfile")
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

start() {
    if running_pid >/dev/null; then
        echo "engine.sh: dockerd already running (pid $(running_pid))"
        return 0
    fi
    if docker info >/dev/null 2>&1; then
        echo "engine.sh: a Docker engine already answers; using it"
        return 0
    fi
    command -v dockerd >/dev/null || {
        echo "engine.sh: no dockerd (apt-get install -y docker.io)" >&2
        return 1
    }
    mkdir -p "$state/data" "$state/exec"
    dockerd \
        --data-root "$state/data" --exec-root "$state/exec" --pidfile "$pidfile" \
        --storage-driver=overlay2 \
        --iptables=false --ip6tables=false --ip-masq=false --ip-forward=false --bridge=none \
        >"$log" 2>&1 &
    local deadline=$((SECONDS + 60))
    until docker info >/dev/null 2>&1; do
        if ! kill -0 $! 2>/dev/null; then
            echo "engine.sh: dockerd exited; its log:" >&2
            tail -n 30 "$log" >&2
            return 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "engine.sh: dockerd not answering after 60 s; its log:" >&2
            tail -n 30 "$log" >&2
            return 1
        fi
        sleep 0.2
    done
    echo "engine.sh: dockerd running (pid $(cat "$pidfile")), state in $state"
}

stop() {
    local pid
    if ! pid=$(running_pid); then
        echo "engine.sh: no dockerd of ours running"
        return 0
    fi
    # dockerd stops its containers (each within its own stop timeout) and its containerd
    kill -TERM "$pid"
    local deadline=$((SECONDS + 120))
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "engine.sh: dockerd still running after 120 s: SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    # what dockerd leaves mounted under its exec root (the host's network namespace handle)
    awk -v root="$state/" 'index($2, root) == 1 {print $2}' /proc/mounts | sort -r |
        while read -r mount; do umount "$mount" 2>/dev/null || true; done
    echo "engine.sh: dockerd stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *)
        echo "usage: $0 start|stop" >&2
        exit 2
        ;;
esac
