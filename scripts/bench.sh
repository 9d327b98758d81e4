#!/usr/bin/env bash
# Measures the server from outside, on this machine: builds the release binary and the load
# generators, then prints the figures as tables and writes the main ones to target/bench.json.
# It reports; it asserts nothing (timings belong here, not in tests).
#   BENCH_SOAK_SECS      length of the 500-session soak (default 120)
#   AGENTD_TEST_PG_URL   a PostgreSQL database for the postgres figures; unset, a throwaway
#                        cluster is started for them (fsync on, as a real one runs)
# Arguments are passed to the bench (e.g. `--only postgres`).
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  echo "installing $* (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
cargo build --release --locked -p supervisor -p e2e --bin supervisor --bin bench --bin gateway_bench
if [ -z "${AGENTD_TEST_PG_URL:-}" ]; then
  source scripts/pg-throwaway.sh
  trap pg_throwaway_stop EXIT
  pg_throwaway_start on
fi
if [ "$#" -gt 0 ]; then
  target/release/bench target/release/supervisor "$@"
  exit
fi
target/release/bench target/release/supervisor --json target/bench.json
echo
echo "== model round trip through the gateway (fake LLM answering at once)"
target/release/gateway_bench 100
