#!/usr/bin/env bash
# Measures the server from outside, on this machine: builds the release binary and the load
# generators, then prints the figures as tables and writes the main ones to target/bench.json.
# It reports; it asserts nothing (timings belong here, not in tests).
#   BENCH_SOAK_SECS   length of the 500-session soak (default 120)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p supervisor -p e2e --bin supervisor --bin bench --bin gateway_bench
target/release/bench target/release/supervisor --json target/bench.json
echo
echo "== model round trip through the gateway (fake LLM answering at once)"
target/release/gateway_bench 100
