#!/usr/bin/env bash
# Runs every check and test, starting what they need:
# - PostgreSQL: TEST_DATABASE_URL if set (a server where tests may create databases),
#   otherwise a throwaway cluster on a free loopback port;
# - S3: TEST_S3_ENDPOINT + TEST_S3_BUCKET if set, otherwise LocalStack on a free loopback
#   port (localstack/start.sh); then the S3 suite runs a second time against s3s-fs, which
#   verifies SigV4 signatures (two independent S3 implementations, one suite);
# - schemathesis (pinned, from PyPI) fuzzes the service against its OpenAPI document;
# - Chromium (Debian's package, installed when missing) runs the browser test of the canvas's
#   requests;
# - the chaos suite (scripts/chaos.sh: HAProxy from Debian, s3s-fs) injects faults into real
#   processes.
# Everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pg.sh
CACHE=${PENDING_UPLOADS_CACHE:-$HOME/.cache/pending-uploads}
# A cold run writes about 2 GB under target/; a full disk shows up as a linker SIGBUS.
echo "disk free here: $(df -Ph . | awk 'NR==2 {print $4}')"
S3S_FS_VERSION=0.14.1

cleanup() {
  [ -n "${S3S_PID:-}" ] && kill "$S3S_PID" 2>/dev/null
  [ -n "${LS_DIR:-}" ] && localstack/stop.sh "$LS_DIR"
  [ -n "${PG_DIR:-}" ] && pg_stop "$PG_DIR"
  rm -rf "${PG_DIR:-}" "${LS_DIR:-}" "${S3S_DIR:-}"
  return 0
}
trap cleanup EXIT

if [ -z "${TEST_DATABASE_URL:-}" ]; then
  PG_DIR=$(mktemp -d /tmp/pending-uploads-test-pg.XXXXXX)
  PG_PORT=$(free_port)
  pg_start "$PG_DIR" "$PG_PORT"
  export TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  echo "test PostgreSQL on 127.0.0.1:$PG_PORT"
fi

if [ -z "${TEST_S3_ENDPOINT:-}" ]; then
  LS_DIR=$(mktemp -d /tmp/pending-uploads-test-ls.XXXXXX)
  LS_PORT=$(free_port)
  localstack/start.sh "$LS_DIR" "$LS_PORT" pending-uploads-test
  export TEST_S3_ENDPOINT="http://127.0.0.1:$LS_PORT" TEST_S3_BUCKET=pending-uploads-test
  export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
fi

scripts/ensure-chromium.sh
# The TLS-only PostgreSQL test makes its certificates with the openssl CLI.
if ! command -v openssl >/dev/null 2>&1; then
  echo "installing openssl"
  apt-get install -y -q -o DPkg::Lock::Timeout=300 openssl \
    || { apt-get update -q && apt-get install -y -q -o DPkg::Lock::Timeout=300 openssl; }
fi

# s3s-fs, built once: the second S3 pass and the chaos suite run against it.
S3S_BIN=$CACHE/s3s-fs-$S3S_FS_VERSION/bin/s3s-fs
if [ ! -x "$S3S_BIN" ]; then
  echo "building s3s-fs $S3S_FS_VERSION (about 4 minutes, once)"
  cargo install "s3s-fs@$S3S_FS_VERSION" --locked --features binary --root "$CACHE/s3s-fs-$S3S_FS_VERSION" -q
fi

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# The chaos suite is `test = false`: --all-targets leaves it out, so it is linted on its own.
cargo clippy --test chaos --locked -- -D warnings
cargo test --all-targets --locked "$@"

# The HTTP surface against its own OpenAPI document.
scripts/schemathesis.sh

# The S3 suite again, against s3s-fs.
S3S_DIR=$(mktemp -d /tmp/pending-uploads-test-s3s.XXXXXX)
S3S_PORT=$(free_port)
mkdir -p "$S3S_DIR/data/pending-uploads-test"
"$S3S_BIN" --host 127.0.0.1 --port "$S3S_PORT" --access-key s3s-test --secret-key s3s-test-secret "$S3S_DIR/data" \
  >"$S3S_DIR/s3s-fs.log" 2>&1 &
S3S_PID=$!
for _ in $(seq 1 100); do
  (echo >/dev/tcp/127.0.0.1/"$S3S_PORT") 2>/dev/null && break
  sleep 0.1
done
echo "s3s-fs on 127.0.0.1:$S3S_PORT: running the S3 suite again"
TEST_S3_ENDPOINT="http://127.0.0.1:$S3S_PORT" TEST_S3_BUCKET=pending-uploads-test \
  AWS_ACCESS_KEY_ID=s3s-test AWS_SECRET_ACCESS_KEY=s3s-test-secret AWS_REGION=us-east-1 \
  cargo test --test api --locked s3::

# Faults against real processes: client disconnects, PostgreSQL restarts, S3 frozen and
# killed, the service SIGKILLed, a replica killed behind HAProxy, the spool disk full.
scripts/chaos.sh
