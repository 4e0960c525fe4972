#!/usr/bin/env bash
# Stops what localstack/start.sh DIR started (by PID).
dir=$1
[ -f "$dir/localstack.pid" ] || exit 0
pid=$(cat "$dir/localstack.pid")
kill "$pid" 2>/dev/null || exit 0
for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.25; done
kill -9 "$pid" 2>/dev/null || true
