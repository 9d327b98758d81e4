#!/usr/bin/env bash
# Measures the server from outside, on this machine: builds the release binary and the load
# generator, then prints one table and writes the same figures to target/bench.json.
# It reports; it asserts nothing (timings belong here, not in tests).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p supervisor -p e2e --bin supervisor --bin bench
exec target/release/bench target/release/supervisor --json target/bench.json
