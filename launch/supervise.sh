#!/usr/bin/env bash
# Keeps one component of a cluster running: runs COMMAND, and when it exits with an error (a killed rank takes
# its whole torchrun job down) runs it again after RESTART_DELAY seconds; the restarted instance says hello
# to its routers again and is marked up by its first heartbeat. SIGTERM/SIGINT drain it instead: the signal
# goes to the component's own processes (a torchrun job's ranks, which finish their requests first; then
# torchrun ends), and the supervisor exits with the component.
# Usage: bash launch/supervise.sh NAME COMMAND [ARGS...]
# Environment (all optional):
#   RESTART_DELAY=1   seconds before a restart
#   MAX_RESTARTS=-1   restarts before giving up (-1: no limit)
#   READY_FILE        restart only once this file exists (launch/local.sh creates it when the cluster is up),
#                     so a component that cannot start (a bad override) fails the start-up instead of looping
set -uo pipefail
NAME="$1"; shift
STOPPING=0 CHILD="" RESTARTS=0

forward() {
    STOPPING=1
    [ -n "$CHILD" ] || return 0
    # a torchrun job: its ranks (torchrun's children) drain and exit 0; a plain process gets the signal itself
    pkill -TERM -P "$CHILD" 2>/dev/null || kill -TERM "$CHILD" 2>/dev/null || true
}
trap forward TERM INT

while true; do
    "$@" &
    CHILD=$!
    rc=0
    while kill -0 "$CHILD" 2>/dev/null; do wait "$CHILD"; rc=$?; done  # a trapped signal ends a wait early
    CHILD=""
    if [ "$STOPPING" = 1 ] || [ "$rc" = 0 ]; then exit "$rc"; fi
    if [ -n "${READY_FILE:-}" ] && [ ! -e "$READY_FILE" ]; then
        echo "[supervise] $NAME exited ($rc) before the cluster was up: not restarting it" >&2
        exit "$rc"
    fi
    RESTARTS=$((RESTARTS + 1))
    if [ "${MAX_RESTARTS:--1}" -ge 0 ] && [ "$RESTARTS" -gt "${MAX_RESTARTS:--1}" ]; then
        echo "[supervise] $NAME exited ($rc) after $((RESTARTS - 1)) restart(s): giving up" >&2
        exit "$rc"
    fi
    echo "[supervise] $NAME exited ($rc); restarting it in ${RESTART_DELAY:-1} s (restart $RESTARTS)" >&2
    sleep "${RESTART_DELAY:-1}" &
    wait $! 2>/dev/null
    [ "$STOPPING" = 1 ] && exit "$rc"
done
