#!/usr/bin/env bash
# Runs every test: unit and property tests of all crates, then the
# namespace tests (real vswitchd, real ping/iperf3/tcpdump peers).
# Namespace tests need root; without it they skip loudly, unless
# VSWITCH_REQUIRE_NETNS=1 (CI), which turns a skip into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
  scripts/setup.sh
fi
echo "==> building release binaries for the namespace tests"
cargo build --release -p vswitch --bins
export VSWITCH_BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/release"
echo "==> cargo test --workspace"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --no-fail-fast -- --test-threads="${VSWITCH_TEST_THREADS:-2}" 2>&1 | tee "$log"
# One closing line over all test binaries (cargo's last lines are doc-test
# runs of crates that have none).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
