#!/usr/bin/env bash
# Fuzzes the service against its own OpenAPI document with schemathesis: no 5xx, no status
# the document does not list, no response that breaks its schema or content type.
# Needs TEST_DATABASE_URL (scripts/test.sh sets it) and a built target/debug/pending-uploads.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pg.sh
CACHE=${PENDING_UPLOADS_CACHE:-$HOME/.cache/pending-uploads}
venv=$CACHE/schemathesis-$(sha256sum scripts/schemathesis.lock | cut -c1-12)
if [ ! -f "$venv/.complete" ]; then
  echo "building the schemathesis virtualenv in $venv (once)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r scripts/schemathesis.lock
  touch "$venv/.complete"
fi

db=schemathesis_$$
psql -q "$TEST_DATABASE_URL" -c "CREATE DATABASE $db"
db_url="${TEST_DATABASE_URL%/*}/$db"
port=$(free_port)
admin=schemathesis-admin-token
# Every generated registration comes from this one address: the per-client limit would
# refuse most of them after the first minute's worth.
DATABASE_URL=$db_url BIND_ADDR=127.0.0.1:$port ADMIN_TOKEN=$admin RUST_LOG=warn \
  REGISTRATIONS_PER_MINUTE_PER_CLIENT=600 \
  "${CARGO_TARGET_DIR:-target}/debug/pending-uploads" serve >/tmp/schemathesis-service-$$.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; psql -q "$TEST_DATABASE_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"; rm -f /tmp/schemathesis-service-$$.log' EXIT
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done

# One real workspace, so some generated requests reach past the existence checks.
curl -fs -X POST "http://127.0.0.1:$port/workspaces" -H "Authorization: Bearer $admin" \
  -H 'Content-Type: application/json' -d '{"id":"00000000-0000-4000-8000-000000000001","name":"fuzz","delivery_mode":"poll"}' >/dev/null

# One worker: schemathesis runs workers as threads, and CPython 3.11 (3.11.7 on this machine)
# keeps the AST constructor's recursion counter per interpreter, not per thread (see
# python/cpython#106905), so hypothesis describing a strategy in two threads at once can fail
# the run with "SystemError: AST constructor recursion depth mismatch". CI failed on it once.
"$venv/bin/schemathesis" --config-file scripts/schemathesis.toml run "http://127.0.0.1:$port/openapi.json" \
  --url "http://127.0.0.1:$port" \
  -H "Authorization: Bearer $admin" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --max-examples 40 --workers 1 --seed 7 --generation-database none --no-color
