# Sourced by the demo scripts: Prefect state under the project, server on the loopback address only.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$ROOT/.venv/bin
PORT=${SEED_PREFECT_PORT:-4200}
export PREFECT_HOME=$ROOT/.prefect
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_API_HOST=127.0.0.1
export HF_HUB_OFFLINE=1
mkdir -p "$PREFECT_HOME"

healthy() {
    "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen('$PREFECT_API_URL/health', timeout=2)" 2>/dev/null
}

alive() {  # alive PIDFILE: the recorded process still runs, leads its own process group (setsid) and is ours
    # (its command line names what the demo started): a pid the system gave to another process since, after
    # a reboot say, is not taken for it. A pidfile that fails this is stale and removed.
    local pid
    [ -f "$1" ] || return 1
    pid=$(cat "$1")
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
        && [ "$(ps -o pgid= -p "$pid" | tr -d ' ')" = "$pid" ] \
        && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qE 'prefect server start|-m flows\.serve'; then
        return 0
    fi
    rm -f "$1"
    return 1
}
