#!/usr/bin/env bash
# Runs the service. Uses DATABASE_URL if set; otherwise starts (once) a persistent local
# PostgreSQL under .dev/ and keeps it running between runs (scripts/run.sh stop-db stops it).
# Without ADMIN_TOKEN, one is generated into .dev/admin-token so the README walk-through works.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pg.sh

DEV=$PWD/.dev
if [ "${1:-}" = stop-db ]; then pg_stop "$DEV/pg"; exit 0; fi

if [ -z "${DATABASE_URL:-}" ]; then
  mkdir -p "$DEV"
  [ -f "$DEV/pg-port" ] || free_port >"$DEV/pg-port"
  PORT=$(cat "$DEV/pg-port")
  if ! "$(pg_bindir)/pg_isready" -q -h 127.0.0.1 -p "$PORT" 2>/dev/null; then
    echo "starting local PostgreSQL on 127.0.0.1:$PORT (data in .dev/pg)" >&2
    pg_start "$DEV/pg" "$PORT"
  fi
  export DATABASE_URL="postgres://postgres@127.0.0.1:$PORT/postgres"
fi
if [ -z "${ADMIN_TOKEN:-}" ]; then
  mkdir -p "$DEV"
  [ -f "$DEV/admin-token" ] || (umask 077; head -c 32 /dev/urandom | base64 | tr -d '/+=\n' >"$DEV/admin-token")
  ADMIN_TOKEN=$(cat "$DEV/admin-token")
  export ADMIN_TOKEN
  echo "ADMIN_TOKEN is in .dev/admin-token" >&2
fi
exec cargo run --release --locked -- serve "$@"
