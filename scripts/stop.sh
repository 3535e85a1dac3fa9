#!/usr/bin/env bash
# Stop the servers the demo started, by the process ids it recorded (never by name).
set -u
source "$(dirname "$0")/prefect-env.sh"
for name in serve server; do
    pidfile=$PREFECT_HOME/$name.pid
    if alive "$pidfile"; then
        pid=$(cat "$pidfile")
        kill -TERM -- "-$pid" 2>/dev/null   # the whole group: the server's or serve's children too
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null
        echo "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
done
