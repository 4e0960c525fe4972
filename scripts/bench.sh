#!/usr/bin/env bash
# The benchmark suite against real backends: starts a throwaway PostgreSQL and LocalStack
# (unless BENCH_DATABASE_URL / BENCH_S3_ENDPOINT are given), then runs benches/suite.rs.
# Arguments go to the bench: --suite all|throughput|matrix|latency|maintenance, --files, --size, --concurrency
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pg.sh
cleanup() {
  [ -n "${LS_DIR:-}" ] && localstack/stop.sh "$LS_DIR"
  [ -n "${PG_DIR:-}" ] && pg_stop "$PG_DIR"
  rm -rf "${PG_DIR:-}" "${LS_DIR:-}"
  return 0
}
trap cleanup EXIT
if [ -z "${BENCH_DATABASE_URL:-}" ]; then
  PG_DIR=$(mktemp -d /tmp/pending-uploads-bench-pg.XXXXXX)
  PG_PORT=$(free_port)
  pg_start "$PG_DIR" "$PG_PORT"
  export BENCH_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
fi
if [ -z "${BENCH_S3_ENDPOINT:-}" ]; then
  LS_DIR=$(mktemp -d /tmp/pending-uploads-bench-ls.XXXXXX)
  LS_PORT=$(free_port)
  localstack/start.sh "$LS_DIR" "$LS_PORT" pending-uploads-bench
  export BENCH_S3_ENDPOINT="http://127.0.0.1:$LS_PORT" BENCH_S3_BUCKET=pending-uploads-bench
  export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
fi
cargo bench --locked --bench suite -- "$@"
