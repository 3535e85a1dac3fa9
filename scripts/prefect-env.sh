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

alive() {  # alive PIDFILE: the recorded process is still running
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}
