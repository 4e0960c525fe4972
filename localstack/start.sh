#!/usr/bin/env bash
# Starts LocalStack (S3 only) on the host, bound to loopback, from PyPI (no Docker), and
# creates a bucket. Usage: localstack/start.sh DIR PORT BUCKET
#   DIR     working folder (state, logs, pid file DIR/localstack.pid)
#   PORT    loopback port for the gateway
#   BUCKET  bucket to create once S3 is up
# The virtualenv is built once from requirements.lock (every version pinned) and cached in
# ${PENDING_UPLOADS_CACHE:-~/.cache/pending-uploads}. Stop with localstack/stop.sh DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=$1 port=$2 bucket=$3
mkdir -p "$dir"

lock_hash=$(sha256sum "$here/requirements.lock" | cut -c1-12)
cache=${PENDING_UPLOADS_CACHE:-$HOME/.cache/pending-uploads}
venv=$cache/localstack-$lock_hash
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  # localstack-core 2026.3.0 needs Python >= 3.12 syntax despite its metadata.
  py=""
  for cand in "$(pyenv root 2>/dev/null)/versions/3.13.0/bin/python" python3.13 python3.12; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
      py=$cand; break
    fi
  done
  [ -n "$py" ] || { echo "LocalStack needs Python >= 3.12 (pyenv 3.13.0 or python3.12/3.13)" >&2; exit 1; }
  echo "building the LocalStack virtualenv in $venv (about 2 minutes, once)" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.lock" >&2
  touch "$venv/.complete"
fi

# Workarounds for this host (see shared/ENVIRONMENT.md): not in Docker, state in $dir, the
# hypercorn gateway so it binds loopback only, S3 alone.
launch() {
  env OVERRIDE_IN_DOCKER=0 FILESYSTEM_ROOT="$dir/fs" XDG_CACHE_HOME="$dir/cache" \
    GATEWAY_SERVER=hypercorn GATEWAY_LISTEN="127.0.0.1:$port" \
    SERVICES=s3 DNS_ADDRESS=0 EAGER_SERVICE_LOADING=1 DISABLE_EVENTS=1 \
    LOCALSTACK_HOST="127.0.0.1:$port" SKIP_SSL_CERT_DOWNLOAD=1 \
    nohup "$venv/bin/python" -m localstack.runtime.main >"$dir/localstack.log" 2>&1 &
  echo $! >"$dir/localstack.pid"
}

# LocalStack gives its gateway 15 s to open its port and, past that, logs "gave up waiting
# for gateway server" and stays up without S3, for good: on a machine busy enough (a bench
# beside it) it started so once and this waited out its two minutes for nothing. Such a start
# is stopped and made again, up to three times.
for attempt in 1 2 3; do
  launch
  for _ in $(seq 1 240); do
    if curl -fs "http://127.0.0.1:$port/_localstack/health" 2>/dev/null | grep -Eq '"s3": *"(running|available)"'; then
      curl -fs -X PUT "http://127.0.0.1:$port/$bucket" >/dev/null
      echo "LocalStack S3 on http://127.0.0.1:$port (bucket $bucket)" >&2
      exit 0
    fi
    kill -0 "$(cat "$dir/localstack.pid")" 2>/dev/null || break
    grep -q 'gave up waiting for gateway server' "$dir/localstack.log" && break
    sleep 0.5
  done
  echo "LocalStack did not become healthy (attempt $attempt of 3); log follows" >&2
  tail -50 "$dir/localstack.log" >&2
  "$here/stop.sh" "$dir"
  # Anything else (it exited, or two minutes without health) is not a start to make again.
  grep -q 'gave up waiting for gateway server' "$dir/localstack.log" || exit 1
done
exit 1
