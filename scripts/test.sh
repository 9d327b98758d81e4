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
# A missing client is a failure here, not a skipped test.
export E2E_REQUIRE_CLIENTS=1

log "format"
cargo fmt --all -- --check

log "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "dependency hygiene"
# TLS must never come from OpenSSL, and SQLite (when present) must be the bundled one.
if cargo tree --workspace -i openssl-sys >/dev/null 2>&1; then
  echo "openssl-sys is in the dependency tree"; exit 1
fi

log "build"
# The end-to-end tests drive the real binary, so it is built before any test runs.
cargo build --workspace --all-targets --locked

log "tests"
profile=default
[ "${CI:-}" = "true" ] && profile=ci
cargo nextest run --workspace --locked --profile "$profile"
