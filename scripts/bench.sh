#!/usr/bin/env bash
# The benchmark suite against real backends (benches/suite, `cargo bench --bench suite`,
# release build). It installs and starts what it needs, and stops what it started:
#   - PostgreSQL 15, throwaway, with pg_stat_statements preloaded (unless BENCH_DATABASE_URL);
#   - LocalStack S3 (localstack/start.sh; unless BENCH_S3_ENDPOINT + BENCH_S3_BUCKET, or
#     `--backends bytea` without the maintenance suite);
#   - the direct clients: a virtualenv with benches/requirements.lock (psycopg[binary], boto3,
#     awscli; every version pinned) in ${PENDING_UPLOADS_CACHE:-~/.cache/pending-uploads}/bench-venv,
#     built once; psql comes with PostgreSQL;
#   - hey (apt-get) and oha (cargo install, into the cache) for the latency suite, when missing.
# Usage: scripts/bench.sh [--suite all|throughput|roundtrips|small|latency|longpoll|memory|maintenance]
#        [--backends bytea,s3] [...]; `scripts/bench.sh --help` lists every option.
# Markdown tables go to stdout (e.g. `scripts/bench.sh | tee bench.md`), progress to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pg.sh

args=" $* "
if [[ $args == *" --help "* || $args == *" -h "* ]]; then
  exec cargo bench --locked --bench suite -- --help
fi
# which suites and backends were asked for (so a bytea-only run needs no LocalStack, etc.)
suites=all backends=bytea,s3
prev=""
for a in "$@"; do
  case "$prev" in --suite) suites=$a ;; --backends) backends=$a ;; esac
  case "$a" in --suite=*) suites=${a#--suite=} ;; --backends=*) backends=${a#--backends=} ;; esac
  prev=$a
done
wants() { [[ ",$suites," == *",all,"* || ",$suites," == *",$1,"* ]]; }

cleanup() {
  local rc=$?
  # A failed run keeps its logs: the service's answer (a 503, say) says why only there.
  if [ "$rc" -ne 0 ] && [ -n "${BENCH_WORK_DIR:-}" ]; then
    local kept
    kept=$(mktemp -d /tmp/pending-uploads-bench-failed.XXXXXX)
    cp "$BENCH_WORK_DIR"/service-*.log "$kept"/ 2>/dev/null || true
    [ -n "${PG_DIR:-}" ] && { cp "$PG_DIR"/server.log "$kept"/postgres.log 2>/dev/null || true; }
    echo "bench failed (exit $rc): the service and PostgreSQL logs are kept in $kept" >&2
  fi
  [ -n "${LS_DIR:-}" ] && localstack/stop.sh "$LS_DIR"
  [ -n "${PG_DIR:-}" ] && pg_stop "$PG_DIR"
  rm -rf "${PG_DIR:-}" "${LS_DIR:-}" "${BENCH_WORK_DIR:-}"
  return 0
}
trap cleanup EXIT

# 10,000 waiting pollers (longpoll) hold as many sockets in the bench and in the service.
ulimit -Hn 65536 2>/dev/null || true
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cache=${PENDING_UPLOADS_CACHE:-$HOME/.cache/pending-uploads}
if wants throughput && [ -z "${BENCH_PYTHON:-}" ]; then
  venv=$cache/bench-venv
  lock_hash=$(sha256sum benches/requirements.lock | cut -c1-12)
  if [ "$(cat "$venv/.complete" 2>/dev/null)" != "$lock_hash" ]; then
    py=""
    for cand in python3 python3.13 python3.12 python3.11 python3.10 python3.9; do
      if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 9))'; then
        py=$cand; break
      fi
    done
    [ -n "$py" ] || { echo "the direct clients need Python >= 3.9" >&2; exit 1; }
    echo "building the benchmark virtualenv in $venv (psycopg, boto3, awscli; about a minute, once)" >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r benches/requirements.lock >&2
    echo "$lock_hash" >"$venv/.complete"
  fi
  export BENCH_PYTHON=$venv/bin/python BENCH_AWS_CLI=$venv/bin/aws
fi

if wants latency && [ -z "${BENCH_HEY:-}" ] && ! command -v hey >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "installing hey with apt-get (latency suite)" >&2
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey; }; } >&2 \
      || echo "could not install hey: the latency suite will be skipped" >&2
  else
    echo "hey is missing and apt-get is not available: the latency suite will be skipped" >&2
  fi
fi

# oha, an open-loop generator, from crates.io into the cache (a few minutes, once).
oha_version=1.16.0
if wants latency && [ -z "${BENCH_OHA:-}" ] && ! command -v oha >/dev/null 2>&1; then
  oha_root=$cache/oha-$oha_version
  if [ ! -x "$oha_root/bin/oha" ]; then
    echo "installing oha $oha_version with cargo into $oha_root (latency suite; a few minutes, once)" >&2
    CARGO_TARGET_DIR="$oha_root/build" cargo install -q oha --version "$oha_version" --locked --root "$oha_root" >&2 \
      && rm -rf "$oha_root/build" \
      || echo "could not install oha: its latency table will be skipped" >&2
  fi
  [ -x "$oha_root/bin/oha" ] && export BENCH_OHA=$oha_root/bin/oha
fi

if [ -z "${BENCH_DATABASE_URL:-}" ]; then
  PG_DIR=$(mktemp -d /tmp/pending-uploads-bench-pg.XXXXXX)
  PG_PORT=$(free_port)
  PG_EXTRA_OPTS="-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track_utility=on" \
    pg_start "$PG_DIR" "$PG_PORT"
  export BENCH_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
fi
export BENCH_PSQL=${BENCH_PSQL:-$(command -v psql || echo "$(pg_bindir)/psql")}

# The suites that run per backend (push, latency and longpoll run on bytea alone).
per_backend() { wants throughput || wants roundtrips || wants small || wants memory; }
if [ -z "${BENCH_S3_ENDPOINT:-}" ] && { { [[ ",$backends," == *",s3,"* ]] && per_backend; } || wants maintenance; }; then
  LS_DIR=$(mktemp -d /tmp/pending-uploads-bench-ls.XXXXXX)
  LS_PORT=$(free_port)
  localstack/start.sh "$LS_DIR" "$LS_PORT" pending-uploads-bench
  export BENCH_S3_ENDPOINT="http://127.0.0.1:$LS_PORT" BENCH_S3_BUCKET=pending-uploads-bench
  export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
  BENCH_S3_SERVER="LocalStack $(curl -fs "$BENCH_S3_ENDPOINT/_localstack/health" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin).get("version", "?"))' 2>/dev/null || echo '?')"
  export BENCH_S3_SERVER
fi

BENCH_WORK_DIR=$(mktemp -d /tmp/pending-uploads-bench-work.XXXXXX)
BENCH_GIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo '+uncommitted changes')"
export BENCH_WORK_DIR BENCH_GIT
cargo bench --locked --bench suite -- "$@"
