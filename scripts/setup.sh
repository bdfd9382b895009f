#!/usr/bin/env bash
# Installs what vswitch's demo, tests and benchmarks run on a fresh Debian
# machine: iproute2, ping, iperf3, tcpdump, python3, the DHCP clients
# dhclient/udhcpc/dhcpcd, dig, tshark and curl (the lab's real peers).
# Idempotent; needs root for apt-get.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have ip       || need+=(iproute2)
have ping     || need+=(iputils-ping)
have iperf3   || need+=(iperf3)
have tcpdump  || need+=(tcpdump)
have python3  || need+=(python3)
have ethtool  || need+=(ethtool)
have pkill    || need+=(procps)
have dhclient || need+=(isc-dhcp-client)
have udhcpc   || need+=(udhcpc)
have dhcpcd   || need+=(dhcpcd-base)
have dig      || need+=(dnsutils)
have tshark   || need+=(tshark)
have curl     || need+=(curl ca-certificates)
have ss       || need+=(iproute2)

if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! have cargo; then
  echo "setup: cargo not found; installing Debian's rust toolchain" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cargo rustc >/dev/null
fi
if ! [ -e /dev/net/tun ]; then
  mkdir -p /dev/net && mknod /dev/net/tun c 10 200 && chmod 0666 /dev/net/tun
fi
echo "setup: ok ($(cargo --version), $(ip -V 2>&1 | head -1))"
