# A throwaway PostgreSQL cluster for the tests and the benchmark; sourced by scripts/test.sh
# and scripts/bench.sh, which must define `as_root` and `apt_install` first.
#
#   pg_throwaway_start [fsync]   fsync on (default) or off; starts a cluster in a new temporary
#                                directory, listening on 127.0.0.1 only, on a free port, with a
#                                random password; exports AGENTD_TEST_PG_URL and AGENTD_PG_BIN
#   pg_throwaway_stop            stops it and removes its directory (idempotent; put it in a trap)
#
# Debian's `postgresql` package is installed if no server binaries are found (without the
# package's own cluster). initdb refuses to run as root, so as root the cluster runs as the
# `postgres` system user (or `nobody`).

pg_throwaway_dir=""
pg_throwaway_run=()

pg_throwaway_bin() {
  if [ -n "${AGENTD_PG_BIN:-}" ] && [ -x "$AGENTD_PG_BIN/initdb" ]; then
    echo "$AGENTD_PG_BIN"
    return
  fi
  local dir
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

# Clusters whose script died without its trap (SIGKILL) are stopped and removed; those of
# scripts still running are left alone.
pg_throwaway_sweep() {
  local dir owner
  for dir in /tmp/agentd-pg.*; do
    [ -f "$dir/owner" ] || continue
    owner="$(cat "$dir/owner")"
    [ -n "$owner" ] && [ -d "/proc/$owner" ] && continue
    if [ -f "$dir/data/postmaster.pid" ]; then
      kill -KILL "$(head -n 1 "$dir/data/postmaster.pid")" 2>/dev/null || true
    fi
    rm -rf "$dir"
  done
}

pg_throwaway_start() {
  local fsync="${1:-on}" bin user password port attempt
  bin="$(pg_throwaway_bin || true)"
  if [ -z "$bin" ]; then
    # The package would otherwise create and start a cluster of its own on port 5432.
    if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
      as_root mkdir -p /etc/postgresql-common
      echo "create_main_cluster = false" | as_root tee /etc/postgresql-common/createcluster.conf >/dev/null
    fi
    apt_install postgresql
    bin="$(pg_throwaway_bin)"
  fi
  pg_throwaway_sweep
  pg_throwaway_dir="$(mktemp -d /tmp/agentd-pg.XXXXXX)"
  echo "$$" > "$pg_throwaway_dir/owner"
  pg_throwaway_run=()
  if [ "$(id -u)" = 0 ]; then
    user=postgres
    id -u "$user" >/dev/null 2>&1 || user=nobody
    pg_throwaway_run=(runuser -u "$user" --)
    chmod 0755 "$pg_throwaway_dir"
  fi
  mkdir -m 0700 "$pg_throwaway_dir/data" "$pg_throwaway_dir/sock" "$pg_throwaway_dir/log"
  password="$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
  printf '%s\n' "$password" > "$pg_throwaway_dir/password"
  chmod 0600 "$pg_throwaway_dir/password"
  if [ "$(id -u)" = 0 ]; then
    chown "$user" "$pg_throwaway_dir/data" "$pg_throwaway_dir/sock" "$pg_throwaway_dir/log" \
      "$pg_throwaway_dir/password"
  fi
  "${pg_throwaway_run[@]}" "$bin/initdb" -D "$pg_throwaway_dir/data" -U agentd \
    --pwfile="$pg_throwaway_dir/password" --auth=scram-sha-256 -E UTF8 --locale=C --no-sync \
    > "$pg_throwaway_dir/initdb.log" 2>&1 \
    || { cat "$pg_throwaway_dir/initdb.log"; return 1; }
  rm -f "$pg_throwaway_dir/password"
  # A port picked at random; another one if it is taken.
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    port=$((20000 + RANDOM % 40000))
    if "${pg_throwaway_run[@]}" "$bin/pg_ctl" -D "$pg_throwaway_dir/data" \
      -l "$pg_throwaway_dir/log/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$pg_throwaway_dir/sock -c fsync=$fsync -c max_connections=400" \
      start > /dev/null; then
      export AGENTD_TEST_PG_URL="postgres://agentd:$password@127.0.0.1:$port/postgres"
      export AGENTD_PG_BIN="$bin"
      echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (fsync $fsync), in $pg_throwaway_dir"
      return 0
    fi
  done
  cat "$pg_throwaway_dir/log/server.log"
  return 1
}

pg_throwaway_stop() {
  [ -n "$pg_throwaway_dir" ] || return 0
  local bin
  bin="$(pg_throwaway_bin || true)"
  if [ -n "$bin" ] && [ -f "$pg_throwaway_dir/data/postmaster.pid" ]; then
    "${pg_throwaway_run[@]}" "$bin/pg_ctl" -D "$pg_throwaway_dir/data" -m immediate -w stop \
      > /dev/null 2>&1 || true
  fi
  rm -rf "$pg_throwaway_dir"
  pg_throwaway_dir=""
}
