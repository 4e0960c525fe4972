#!/usr/bin/env bash
# The chaos suite (tests/chaos): the real binary against its own PostgreSQL 15 clusters,
# s3s-fs and HAProxy, under client load while faults are injected (client disconnects,
# PostgreSQL restarts, S3 frozen and killed, the service SIGKILLed, a replica killed behind
# HAProxy, the spool disk full). Each scenario starts and stops what it needs and prints a
# `CHAOS <scenario>: ...` summary line. Needs root (PostgreSQL runs as the postgres user, the
# spool scenario mounts a tmpfs). Extra arguments go to the test binary (e.g. a scenario
# name filter such as `chaos_3`).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${PENDING_UPLOADS_CACHE:-$HOME/.cache/pending-uploads}
S3S_FS_VERSION=0.14.1

# HAProxy (Debian package), from PATH.
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
  echo "installing haproxy"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q -o DPkg::Lock::Timeout=300 haproxy \
    || { apt-get update -q && apt-get install -y -q -o DPkg::Lock::Timeout=300 haproxy; }
fi
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin" ;; esac
export PATH

# s3s-fs, built once (the same binary scripts/test.sh uses).
S3S_BIN=$CACHE/s3s-fs-$S3S_FS_VERSION/bin/s3s-fs
if [ ! -x "$S3S_BIN" ]; then
  echo "building s3s-fs $S3S_FS_VERSION (about 4 minutes, once)"
  cargo install "s3s-fs@$S3S_FS_VERSION" --locked --features binary --root "$CACHE/s3s-fs-$S3S_FS_VERSION" -q
fi
export CHAOS_S3S_FS=$S3S_BIN

cargo test --test chaos --locked -- --test-threads=1 --nocapture "$@"
