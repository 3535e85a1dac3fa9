#!/usr/bin/env bash
# The main job: Fashion-MNIST shards -> local Prefect server + deployments -> a run of seed/full, followed here.
# Re-running it reuses the shards, the teacher, the cache and finished students. `make stop` ends the servers.
set -euo pipefail
source "$(dirname "$0")/prefect-env.sh"
cd "$ROOT"
CONFIG=${SEED_CONFIG:-configs/demo.yaml}
case "$CONFIG" in /*) ;; *) CONFIG=$ROOT/$CONFIG ;; esac
start=$(date +%s)

echo "== 1/4 data: Fashion-MNIST -> webdataset shards"
if [ -f data/shards/fashion-mnist/_info.json ]; then
    echo "shards already in data/shards/fashion-mnist"
else
    "$BIN/seed" shards fashion-mnist
fi

echo "== 2/4 Prefect server on 127.0.0.1:$PORT (state in $PREFECT_HOME)"
if healthy; then
    if alive "$PREFECT_HOME/server.pid"; then
        echo "server already up (pid $(cat "$PREFECT_HOME/server.pid"))"
    else  # another checkout's or user's: its state is not in this PREFECT_HOME
        echo "WARNING: a Prefect server this demo did not start answers on 127.0.0.1:$PORT; using it (set" \
             "SEED_PREFECT_PORT to give this checkout its own)" >&2
    fi
else
    # setsid: the server and its workers form one process group, stopped through the recorded pid
    setsid nohup "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" > "$PREFECT_HOME/server.log" 2>&1 &
    echo $! > "$PREFECT_HOME/server.pid"
    for _ in $(seq 1 300); do
        healthy && break
        alive "$PREFECT_HOME/server.pid" || { echo "Prefect server exited; see $PREFECT_HOME/server.log" >&2; exit 1; }
        sleep 1
    done
    healthy || { echo "Prefect server did not come up; see $PREFECT_HOME/server.log" >&2; exit 1; }
fi

echo "== 3/4 deployments seed/full and seed/student"
if alive "$PREFECT_HOME/serve.pid"; then
    echo "deployment server already running (pid $(cat "$PREFECT_HOME/serve.pid"))"
else
    setsid nohup "$BIN/python" -m flows.serve > "$PREFECT_HOME/serve.log" 2>&1 &
    echo $! > "$PREFECT_HOME/serve.pid"
fi
# the deployments stay registered from an earlier demo: the serve process itself must be up to take the run
for _ in $(seq 1 120); do
    alive "$PREFECT_HOME/serve.pid" || { echo "the deployment server exited; see $PREFECT_HOME/serve.log" >&2; exit 1; }
    "$BIN/prefect" deployment inspect seed/full > /dev/null 2>&1 && break
    sleep 2
done

echo "== 4/4 run seed/full and follow its log (stages, progress, losses; the UI shows the same)"
# flows.follow starts the deployment run through the Prefect client and prints the run's own log lines
# until it ends; it exits 1 when the run fails. Ctrl-C stops following, not the run.
if ! "$BIN/python" -m flows.follow --deployment seed/full --param "config=$CONFIG" --give-up 600; then
    echo "seed/full did not complete; the deployment server's output is in $PREFECT_HOME/serve.log" >&2
    exit 1
fi

run=data/runs/demo
report=$run/report.md
echo
echo "== done in $(( $(date +%s) - start )) s"
echo "cache:       $ROOT/data/caches/demo-fashion-mnist.zarr   (seed inspect data/caches/demo-fashion-mnist.zarr)"
echo "checkpoints: $ROOT/$run/*/checkpoint.pt"
echo "report:      $ROOT/$report"
echo "UI:          http://127.0.0.1:$PORT"
if [ -x "$BIN/tensorboard" ]; then
    echo "TensorBoard: $BIN/tensorboard --logdir $run   (per-step loss, lr, images/s of every student)"
fi
echo
sed -n '/^## Accuracy/,/^!\[accuracy\]/p' "$report" | grep '^|' || true
echo
sed -n '/^## Student training/,/^!\[loss\]/p' "$report" | grep '^|' || true
echo
echo "students only (no teacher):  PREFECT_API_URL=$PREFECT_API_URL $BIN/python -m flows.follow --deployment seed/student --param student_arch=resnet10t --param run=r10t"
echo "stop the servers:            make stop"
