# Sourced helpers: a throwaway or persistent PostgreSQL 15 cluster on loopback.
# initdb/postgres refuse to run as root, so as root they run as the `postgres` user.

# `return 0`, never a bare `return`: called from an EXIT trap (pg_stop), a bare one returns
# the status the script exits with, and a failed run's cluster was left running.
pg_bindir() {
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  if command -v apt-get >/dev/null 2>&1; then
    echo "PostgreSQL binaries missing: installing with apt-get" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
    for d in /usr/lib/postgresql/*/bin; do
      [ -x "$d/initdb" ] && { echo "$d"; return 0; }
    done
  fi
  echo "no PostgreSQL server binaries found and could not install them" >&2
  return 1
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# as_pg CMD...: run as the postgres user when we are root.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# pg_start DIR PORT: init (once) and start a cluster whose files live in DIR. Extra server
# options may be given in PG_EXTRA_OPTS (e.g. "-c shared_preload_libraries=pg_stat_statements");
# they come last, so they override the defaults here. MALLOC_MMAP_THRESHOLD_ and
# MALLOC_TRIM_THRESHOLD_, when set, replace the malloc thresholds given to the server.
pg_start() {
  local dir=$1 port=$2 bin
  bin=$(pg_bindir) || return 1
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    chown -R postgres "$dir"
    chmod o+x "$(dirname "$dir")" 2>/dev/null || true
  fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-locale --no-sync >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; return 1; }
  fi
  # glibc malloc thresholds for every backend (README, "PostgreSQL for the bytea backend").
  as_pg env MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-8388608}" \
    MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-16777216}" \
    "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 ${PG_EXTRA_OPTS:-}" \
    start >/dev/null || { cat "$dir/server.log" >&2; return 1; }
}

pg_stop() {
  local dir=$1 bin
  bin=$(pg_bindir) || return 0
  [ -f "$dir/data/postmaster.pid" ] && as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1
  return 0
}
