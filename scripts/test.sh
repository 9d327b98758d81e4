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
