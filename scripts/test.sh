#!/usr/bin/env bash
# Runs every test of the project, installing first whatever the tests need.
# Usage: scripts/test.sh            (from anywhere; CI calls exactly this)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

log "toolchain"
command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)"; exit 1; }
cargo --version
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

log "client dependencies"
# The end-to-end tests drive real clients: socket.io-client and headless Chromium (from
# tests/js), and the official web UI. Each step does nothing, quietly, when already done.
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  echo "installing $* (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
[ -x /usr/bin/chromium ] || apt_install chromium
lock_sum="$(sha256sum tests/js/package-lock.json | cut -d' ' -f1)"
if [ "$(cat tests/js/node_modules/.installed-lock 2>/dev/null)" != "$lock_sum" ]; then
  echo "installing tests/js dependencies (npm ci)"
  (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
  echo "$lock_sum" > tests/js/node_modules/.installed-lock
fi
scripts/fetch-webui.sh
# The built-in UI's committed third-party code must be what its script builds.
scripts/build-ui-vendor.sh --check
# A missing client is a failure here, not a skipped test.
export E2E_REQUIRE_CLIENTS=1

log "postgresql"
# The postgres storage tests (unit and end-to-end) run against a throwaway cluster: started
# here in a temporary directory, on loopback only, and stopped and removed however this ends.
# Without AGENTD_TEST_PG_URL those tests fail rather than skip. fsync is off: the tests crash
# processes, never the machine, and a disk flush per commit would only slow them.
source scripts/pg-throwaway.sh
trap pg_throwaway_stop EXIT
pg_throwaway_start off
unset AGENTD_TEST_PG_SKIP

log "format"
cargo fmt --all -- --check

# The isolation suite (tests/tests/isolation_*.rs) drives a test-only probe server inside the
# jail; it exists only with this feature, so release builds (`cargo build --release`) never
# contain it. Everything below is built and tested with it.
FEATURES=(--features supervisor/isolation-tests)

log "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --locked "${FEATURES[@]}" -- -D warnings

log "dependency hygiene"
# TLS must never come from OpenSSL, and SQLite (when present) must be the bundled one.
if cargo tree --workspace -i openssl-sys >/dev/null 2>&1; then
  echo "openssl-sys is in the dependency tree"; exit 1
fi
# The supervisor library never links the worker's code: the `supervisor` binary package joins
# the two, and what both sides must agree on lives in `shared`.
if cargo tree -p supervisor-core -e normal -i worker >/dev/null 2>&1; then
  echo "supervisor-core depends on the worker crate"; exit 1
fi
# No module imports one that imports it back (a lower layer never sees the layers above).
for crate in supervisor-core worker shared supervisor; do
  python3 scripts/import-graph.py "$crate/src" || { echo "import cycle in $crate"; exit 1; }
done

log "build"
# The end-to-end tests drive the real binary, so it is built before any test runs.
cargo build --workspace --all-targets --locked "${FEATURES[@]}"

log "isolation"
# The jail's tests run as root (CI does) so that every mode can be exercised: strict with
# per-session uids, strict rootless (the supervisor drops to uid 65534 itself) and chroot.
# `strict` must work here: its tests start the server with `--isolation=strict`, which exits
# 78 when the level is unavailable, so the suite fails rather than skips.
if [ "$(id -u)" != 0 ]; then
  echo "the isolation suite needs root (CI runs as root); the rootless and chroot modes will fail"
fi

# Session cgroups of supervisors that the tests SIGKILL are left empty; the next supervisor
# removes them, and this removes the last ones: only `agentd-<pid>` groups of dead pids, and
# only under this script's own cgroups (where the test servers ran).
sweep_cgroups() {
  local ctrls path base dir pid c
  while IFS=: read -r _ ctrls path; do
    local bases=()
    if [ -z "$ctrls" ]; then
      bases=("/sys/fs/cgroup/unified$path" "/sys/fs/cgroup$path")
    fi
    for c in ${ctrls//,/ }; do
      bases+=("/sys/fs/cgroup/$c$path")
    done
    for base in "${bases[@]}"; do
      {
        for dir in "$base"/agentd-*; do
          [ -d "$dir" ] || continue
          pid="${dir##*/agentd-}"
          pid="${pid%%-*}"
          [ -d "/proc/$pid" ] && continue
          find "$dir" -mindepth 1 -maxdepth 1 -type d -exec rmdir {} + 2>/dev/null || true
          rmdir "$dir" 2>/dev/null || true
        done
      }
    done
  done < /proc/self/cgroup
}

log "tests"
profile=default
[ "${CI:-}" = "true" ] && profile=ci
status=0
skips=target/debug/isolation-skips.txt
rm -f "$skips"
cargo nextest run --workspace --locked --profile "$profile" "${FEATURES[@]}" || status=$?
sweep_cgroups
if [ -s "$skips" ]; then
  log "isolation tests skipped here (each with its reason)"
  sort "$skips"
fi
exit "$status"
