#!/usr/bin/env bash
# The main job: build vswitch, start vswitchd on a tenant config, bring the
# namespace lab up, ping between the first two VMs, print `vswitchctl show`,
# then tear everything down (or keep it running with --keep).
#
#   scripts/demo.sh [--keep] [CONFIG]      (default examples/one-tenant.toml)
set -euo pipefail
cd "$(dirname "$0")/.."

keep=0
config=examples/one-tenant.toml
for a in "$@"; do
  case "$a" in
    --keep) keep=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) config=$a ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "demo: needs root (taps and network namespaces)" >&2; exit 1; }

step() { printf '\n==> %s\n' "$*"; }
step "setup"
scripts/setup.sh
step "build (release)"
cargo build --release -p vswitch --bins
bin=target/release

run_dir=$(mktemp -d /tmp/vswitch-demo.XXXXXX)
sock=$run_dir/vswitchd.sock
pid=
cleanup() {
  set +e
  if [ "$keep" = 0 ]; then
    step "teardown"
    "$bin/vslab" down "$config"
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$run_dir"
  fi
}
trap cleanup EXIT

step "start vswitchd --config $config (log: $run_dir/vswitchd.log)"
"$bin/vswitchd" --config "$config" --socket "$sock" 2>"$run_dir/vswitchd.log" &
pid=$!
for _ in $(seq 100); do
  "$bin/vswitchctl" --socket "$sock" show >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { cat "$run_dir/vswitchd.log"; exit 1; }
  sleep 0.1
done

step "vslab up $config"
"$bin/vslab" up "$config"

# The first two ports of the first network with addresses.
read -r src dst dst_ip < <("$bin/vswitchctl" --socket "$sock" --json show | python3 -c '
import json, sys
d = json.load(sys.stdin)
ports = [p for p in d["ports"] if p["ip"]]
for p in ports:
    peers = [q for q in ports if q is not p and q["tenant"] == p["tenant"] and q["network"] == p["network"]]
    if peers:
        print(p["name"], peers[0]["name"], peers[0]["ip"]); break
')
step "vslab exec $src -- ping -c 3 $dst_ip   ($src -> $dst)"
"$bin/vslab" exec "$src" -- ping -c 3 -i 0.2 "$dst_ip"

step "vswitchctl show"
"$bin/vswitchctl" --socket "$sock" show

if [ "$keep" = 1 ]; then
  cat <<MSG

The lab keeps running (vswitchd pid $pid). Try:
  $bin/vslab exec $src -- ping $dst_ip
  $bin/vswitchctl --socket $sock fdb
Stop it with:
  $bin/vslab down $config && kill $pid
MSG
fi
