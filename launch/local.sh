#!/usr/bin/env bash
# The whole PD cluster on this machine (tiny model, CPU, gloo): a prefill instance (2 ranks), a decode
# instance (4 ranks, EP 4) and the router, each kept running by launch/supervise.sh: a component that dies
# (a killed rank takes its torchrun job down) is restarted and re-registers with the router, while the others
# keep serving. Prints the router's URL once every instance is up, then runs until Ctrl-C / SIGTERM, which
# drains all three (requests in flight finish, up to DRAIN_TIMEOUT=30 s) and stops them.
# Logs: $RUN_DIR/{prefill,decode,router}.log.
#
# Arguments are Hydra overrides. model.* / model=... go to every component (e.g. model.path=/ckpt);
# other plain overrides go to both instances (e.g. kvcache.num_blocks=512); prefill:KEY=V, decode:KEY=V and
# router:KEY=V go to one. Environment (all optional):
#   ROUTER_PORT=8000 PREFILL_PORT=9100 DECODE_PORT=9200   (two clusters on one host need different ones)
#   PREFILL_RANKS=2 DECODE_RANKS=4
#   MODE=pd | colocated   (colocated: one instance of COLOCATED_RANKS=4 ranks does both phases: the baseline)
#   RUN_DIR=runs/local/<date>   PYTHON=.venv/bin/python   READY_TIMEOUT=300 (seconds)
#   DRAIN_TIMEOUT=30 (seconds; every component's drain_timeout_s)   RESTART_DELAY=1   MAX_RESTARTS=-1 (no limit)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
MODE="${MODE:-pd}"
ROUTER_PORT="${ROUTER_PORT:-8000}"; PREFILL_PORT="${PREFILL_PORT:-9100}"; DECODE_PORT="${DECODE_PORT:-9200}"
RUN_DIR="${RUN_DIR:-runs/local/$(date +%Y-%m-%d_%H-%M-%S)}"
mkdir -p "$RUN_DIR"

COMMON=() PREFILL=() DECODE=() ROUTER=()
for arg in "$@"; do
    case "$arg" in
        prefill:*) PREFILL+=("${arg#prefill:}") ;;
        decode:*) DECODE+=("${arg#decode:}") ;;
        router:*) ROUTER+=("${arg#router:}") ;;
        model=*|model.*|+model.*) COMMON+=("$arg"); ROUTER+=("$arg") ;;
        *) COMMON+=("$arg") ;;
    esac
done

DRAIN_TIMEOUT="${DRAIN_TIMEOUT:-30}"
export READY_FILE="$RUN_DIR/.ready" RESTART_DELAY="${RESTART_DELAY:-1}" MAX_RESTARTS="${MAX_RESTARTS:--1}"
rm -f "$READY_FILE"
PIDS=()
stop() {  # every supervisor drains its component; whatever is left after the drain timeout is killed
    trap - INT TERM EXIT
    [ "${#PIDS[@]}" -gt 0 ] || return 0
    kill -TERM "${PIDS[@]}" 2>/dev/null || true
    for _ in $(seq $(( (DRAIN_TIMEOUT + 15) * 2 ))); do
        kill -0 "${PIDS[@]}" 2>/dev/null || break
        sleep 0.5
    done
    for pid in "${PIDS[@]}"; do  # past the deadline: the component's processes, then its supervisor
        kill -0 "$pid" 2>/dev/null || continue
        for child in $(pgrep -P "$pid"); do pkill -KILL -P "$child" 2>/dev/null; kill -KILL "$child" 2>/dev/null; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap stop EXIT
trap 'exit 130' INT TERM

instance() {  # role ranks port log overrides...
    local role="$1" ranks="$2" port="$3" name="$4"; shift 4
    NPROC_PER_NODE="$ranks" RUN_DIR="$RUN_DIR/$name" PYTHON="$PYTHON" \
        bash launch/supervise.sh "$name" bash launch/_instance.sh "$role" port="$port" \
        drain_timeout_s="$DRAIN_TIMEOUT" "$@" >"$RUN_DIR/$name.log" 2>&1 &
    PIDS+=($!)
}

if [ "$MODE" = "colocated" ]; then
    instance colocated "${COLOCATED_RANKS:-4}" "$PREFILL_PORT" colocated "${COMMON[@]}" "${PREFILL[@]}"
    ROUTE=("colocated=[tcp://127.0.0.1:$PREFILL_PORT]")
else
    instance prefill "${PREFILL_RANKS:-2}" "$PREFILL_PORT" prefill "${COMMON[@]}" "${PREFILL[@]}"
    instance decode "${DECODE_RANKS:-4}" "$DECODE_PORT" decode "${COMMON[@]}" "${DECODE[@]}"
    ROUTE=("prefill=[tcp://127.0.0.1:$PREFILL_PORT]" "decode=[tcp://127.0.0.1:$DECODE_PORT]")
fi
bash launch/supervise.sh router "$PYTHON" -m moe_pd.serve.router "hydra.run.dir=$RUN_DIR/router" \
    port="$ROUTER_PORT" drain_timeout_s="$DRAIN_TIMEOUT" "${ROUTE[@]}" "${ROUTER[@]}" >"$RUN_DIR/router.log" 2>&1 &
PIDS+=($!)

URL="http://127.0.0.1:$ROUTER_PORT"
if ! "$PYTHON" -m moe_pd.serve.local_cluster wait "$URL" "${READY_TIMEOUT:-300}" "${PIDS[@]}"; then
    echo "start-up failed; the last lines of each log:" >&2
    for log in "$RUN_DIR"/*.log; do echo "== $log" >&2; tail -n 20 "$log" >&2; done
    # Every rank's own output (the instance logs show rank 0's, which torchrun may stop before it prints).
    echo "errors in the logs (lines, message):" >&2
    grep -rhE --include='*.log' "(^|\]:)(error: |[A-Za-z_.]*(Error|Exception): )" "$RUN_DIR" \
        | grep -v ChildFailedError | sed -E 's/^\[[a-z]+[0-9]+\]://' | sort | uniq -c | head -n 10 >&2 || true
    exit 1
fi
touch "$READY_FILE"
echo "moe_pd $MODE cluster ready: $URL/v1 (logs in $RUN_DIR)"
# A dead component is restarted by its supervisor, the others serve on; this returns only when every
# supervisor gave up (MAX_RESTARTS) or on Ctrl-C / SIGTERM.
wait "${PIDS[@]}" 2>/dev/null || true
echo "every component exited; see the logs in $RUN_DIR" >&2
exit 1
