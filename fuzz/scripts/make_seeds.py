#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ (a few valid inputs per
target, modelled on the crates' test fixtures). Deterministic; re-run after
changing an input layout of a target:  python3 fuzz/scripts/make_seeds.py
(or only some targets:  python3 fuzz/scripts/make_seeds.py nat_translate)
"""
import json
import os
import shutil
import struct
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ = os.path.dirname(HERE)
CORPUS = os.path.join(FUZZ, "corpus")
EXAMPLES = os.path.join(os.path.dirname(FUZZ), "examples")

A = bytes([2, 0, 0, 0, 0, 1])
B = bytes([2, 0, 0, 0, 0, 2])
C = bytes([2, 0, 0, 0, 0, 3])
GW = bytes([2, 0, 0, 0, 0, 0xFE])
BCAST = b"\xff" * 6
IP_A, IP_B, IP_C, IP_GW = (bytes([10, 0, 0, x]) for x in (1, 2, 50, 254))


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def eth(dst, src, ethertype, payload, vlan=None):
    tag = b"" if vlan is None else struct.pack("!HH", 0x8100, vlan)
    return dst + src + tag + struct.pack("!H", ethertype) + payload


def ipv4(src, dst, proto, l4, ident=0x1234, ttl=64, options=b""):
    ihl = 5 + len(options) // 4
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(l4), ident, 0x4000, ttl, proto, 0, src, dst) + options
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + l4


def ipv6(src, dst, nh, l4):
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), nh, 64, src, dst) + l4


def tcp(src_ip, dst_ip, sport, dport, payload, flags=0x18, v6=False):
    h = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, flags, 65535, 0, 0)
    seg = h + payload
    if v6:
        pseudo = src_ip + dst_ip + struct.pack("!IxxxB", len(seg), 6)
    else:
        pseudo = src_ip + dst_ip + struct.pack("!xBH", 6, len(seg))
    c = csum(pseudo + seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def udp(src_ip, dst_ip, sport, dport, payload):
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    c = csum(src_ip + dst_ip + struct.pack("!xBH", 17, len(seg)) + seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", c) + seg[8:]


def arp(eth_src, op, sha, spa, tpa):
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + sha + spa + b"\0" * 6 + tpa
    return eth(BCAST, eth_src, 0x0806, body)


def dns_query(name, qtype=1, ident=0xBEEF, edns=None):
    q = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 1 if edns else 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\0" + struct.pack("!HH", qtype, 1)
    if edns:
        q += b"\0" + struct.pack("!HHIH", 41, edns, 0, 0)
    return q


def dhcp_msg(mac, mtype, requested=None, server_id=None, ciaddr=b"\0" * 4, client_id=None):
    m = struct.pack("!BBBBIHH4s4s4s4s", 1, 1, 6, 0, 0x12345678, 0, 0, ciaddr, b"\0" * 4, b"\0" * 4, b"\0" * 4)
    m += mac + b"\0" * 10 + b"\0" * 64 + b"\0" * 128
    m += bytes([99, 130, 83, 99])
    m += bytes([53, 1, mtype])
    if requested:
        m += bytes([50, 4]) + requested
    if server_id:
        m += bytes([54, 4]) + server_id
    if client_id:
        m += bytes([61, len(client_id)]) + client_id
    m += bytes([55, 4, 1, 3, 6, 15, 255])
    return m


PAYLOAD = bytes(i & 0xFF for i in range(3000))
V6A = bytes.fromhex("fd000000000000000000000000000001")
V6B = bytes.fromhex("fd000000000000000000000000000002")

TCP4 = eth(B, A, 0x0800, ipv4(IP_A, IP_B, 6, tcp(IP_A, IP_B, 40000, 80, b"hello")))
TCP4_BIG = eth(B, A, 0x0800, ipv4(IP_A, IP_B, 6, tcp(IP_A, IP_B, 40000, 80, PAYLOAD)))
TCP6_BIG = eth(B, A, 0x86DD, ipv6(V6A, V6B, 6, tcp(V6A, V6B, 40000, 80, PAYLOAD[:2000], v6=True)))
UDP4_BIG = eth(B, A, 0x0800, ipv4(IP_A, IP_B, 17, udp(IP_A, IP_B, 5000, 5001, PAYLOAD[:2500])))
TCP4_VLAN = eth(B, A, 0x0800, ipv4(IP_A, IP_B, 6, tcp(IP_A, IP_B, 1, 2, b"x" * 40)), vlan=100)
ICMP4 = eth(B, A, 0x0800, ipv4(IP_A, IP_B, 1, struct.pack("!BBHHH", 8, 0, 0, 7, 1) + b"ping"))
ARP_REQ = arp(A, 1, A, IP_A, IP_B)
ARP_GW = arp(A, 1, A, IP_A, IP_GW)
DISCOVER = dhcp_msg(A, 1)
DHCP_FRAME = eth(BCAST, A, 0x0800, ipv4(b"\0" * 4, b"\xff" * 4, 17, udp(b"\0" * 4, b"\xff" * 4, 68, 67, DISCOVER)))
DNS_Q = dns_query("vm1.acme.internal")
DNS_FRAME = eth(GW, A, 0x0800, ipv4(IP_A, IP_GW, 17, udp(IP_A, IP_GW, 33333, 53, DNS_Q)))


# VXLAN (RFC 7348) over IPv4, as crates/vxlan encapsulates: outer Ethernet
# host -> next hop, IPv4 with DF, UDP to 4789 with checksum 0, VXLAN header
# with the I flag. `ihl_words` > 5 adds IPv4 options (NOPs), `pad` bytes
# after the UDP datagram (Ethernet padding / trailer) are not in it.
HOST_A = bytes([0x52, 0x54, 0, 0, 0, 0x0A])
NEXT_HOP = bytes([0x52, 0x54, 0, 0, 0, 0x0B])
VTEP_A, VTEP_B = bytes([198, 19, 0, 1]), bytes([198, 19, 0, 2])


def vxlan(inner, vni, sport=50000, ihl_words=5, pad=0, ident=0):
    vx = struct.pack("!B3xI", 0x08, vni << 8)
    dgram = struct.pack("!HHHH", sport, 4789, 8 + len(vx) + len(inner), 0) + vx + inner
    opts = b"\x01" * (4 * (ihl_words - 5))
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl_words, 0, 4 * ihl_words + len(dgram), ident, 0x4000, 64, 17, 0,
                    VTEP_A, VTEP_B) + opts
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return eth(NEXT_HOP, HOST_A, 0x0800, h + dgram) + b"\0" * pad


def with_partial_csum(frame, l4, field, v6=False):
    """A frame as a VM's kernel hands it with NEEDS_CSUM: the L4 checksum
    field holds the pseudo-header sum only."""
    ip = frame[14:]
    if v6:
        l4_len = struct.unpack("!H", ip[4:6])[0]
        pseudo = ip[8:24] + ip[24:40] + struct.pack("!IxxxB", l4_len, ip[6])
    else:
        l4_len = struct.unpack("!H", ip[2:4])[0] - (ip[0] & 15) * 4
        pseudo = ip[12:16] + ip[16:20] + struct.pack("!xBH", ip[9], l4_len)
    partial = (~csum(pseudo)) & 0xFFFF
    at = l4 + field
    return frame[:at] + struct.pack("!H", partial) + frame[at + 2:]


def vnet_hdr(gso=0, gso_size=0, csum_start=None, csum_off=0, hdr_len=0, ecn=False):
    flags = 0 if csum_start is None else 1
    return struct.pack("<BBHHHHH", flags, gso | (0x80 if ecn else 0), hdr_len, gso_size,
                       csum_start or 0, csum_off, 0)


def encap_input(vh, vni, mtu, flags, frame):
    return vh + struct.pack("!I", vni)[1:] + struct.pack("<H", mtu) + bytes([flags]) + frame


def lease_record(op, last, ip, key=None, host=None):
    body = {"op": op, "net": "net1", "key": key or "mac:02:00:00:00:00:%02x" % last,
            "mac": "02:00:00:00:00:%02x" % last, "ip": "10.0.0.%d" % ip, "exp": 1700000000 + ip}
    if host:
        body["host"] = host
    j = json.dumps(body, separators=(",", ":")).encode()
    return bytes([0xFF, 0xD5, 0x4C, 0x52]) + struct.pack("<II", len(j), zlib.crc32(j)) + j


def dhcp_step_structured(dt, ty, mac, flags=0, req=0, sid=0, ciaddr=0, cid=0):
    return bytes([dt, 0x80, ty, mac, flags, req, sid, ciaddr, cid])


def dhcp_step_raw(dt, msg):
    return bytes([dt, 1]) + struct.pack("<H", len(msg)) + msg


def gso_hdr(gso, mss, csum_mode, start=0, off=0):
    return bytes([gso | (csum_mode << 4)]) + struct.pack("<HHH", mss, start, off)


# Router (fuzz_targets/router.rs): leg 0 10.0.0.0/24 gateway .254 (GW),
# leg 1 10.0.2.0/24 gateway 10.0.2.1 (GW1); D 10.0.2.21 fixed, 10.0.2.99
# and 10.0.0.77 neighbours, 10.0.2.98 an expired neighbour.
GW1 = bytes([2, 0, 0, 0, 0, 0xF2])
D_MAC = bytes([2, 0, 0, 0, 0, 0xD1])
E_MAC = bytes([2, 0, 0, 0, 0, 0xE1])
IP_GW1 = bytes([10, 0, 2, 1])


def net1(x):
    return bytes([10, 0, 2, x])


def icmp_echo(ident, seq, payload, ty=8):
    m = struct.pack("!BBHHH", ty, 0, 0, ident, seq) + payload
    return m[:2] + struct.pack("!H", csum(m)) + m[4:]


def routed_udp(src_mac, src_ip, dst_ip, ttl=64, gw=GW, options=b"", payload=b"routed"):
    return eth(gw, src_mac, 0x0800, ipv4(src_ip, dst_ip, 17, udp(src_ip, dst_ip, 1000, 2000, payload), ttl=ttl,
                                         options=options))


def routed_echo(src_mac, src_ip, dst_ip, gw=GW, ttl=64):
    return eth(gw, src_mac, 0x0800, ipv4(src_ip, dst_ip, 1, icmp_echo(7, 9, b"hello router"), ttl=ttl))


def arp_reply_to(gw_mac, gw_ip, sha, spa):
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + sha + spa + gw_mac + gw_ip
    return eth(gw_mac, sha, 0x0806, body)


# Capture filter (fuzz_targets/capture_filter.rs): text NUL stages
# snaplen(3, LE) count, then [op, len(2, LE), frame] records. stages: bits
# 0-2 rx/tx/drop, 3 filter the session, 4 detach the second session
# half-way, 5 allow repeated offers; op: bits 0-1 stage (3: drain), 2-6
# drop reason, 7 offer 1100 times.
def capture_input(text, stages, snaplen, count, ops):
    out = text.encode() + b"\0" + bytes([stages]) + struct.pack("<I", snaplen)[:3] + bytes([count])
    for op, frame in ops:
        out += bytes([op]) + struct.pack("<H", len(frame)) + frame
    return out


# NAT (fuzz_targets/nat_translate.rs): ops [b0, b1, body]. b0: zone (bits
# 0-1: 7, 8, external), partial (bit 2), kind (bits 3-5), charged port - 1
# (bits 6-7); b1: clock advance index (bits 0-3), mutation (bits 4-7).
# Addresses and ports are nibbles into the target's ADDRS / PORT_SET.
NAT_ADDR = {"vm_fip": 0, "vm_tcp": 1, "vm_udp": 2, "vm5": 3, "snat": 4, "fip": 5, "remote": 6, "remote2": 7,
            "gw_in": 8, "router": 9, "outside": 10, "not_ours": 11}
NAT_PORT = {80: 0, 8080: 1, 53: 2, 40000: 3, 40001: 4, 40003: 5, 40007: 6, 39999: 7, 40008: 8, 5000: 9, 5001: 10,
            443: 11, 0: 12, 1024: 13, 65535: 14}
# nat_striped has the same layout; its PORT_SET keeps the indices with other
# ports (8081, 5002, 40002 instead of 8080, 443, 1024).
NAT_STRIPED_PORT = {80: 0, 8081: 1, 53: 2, 40000: 3, 40001: 4, 40003: 5, 40007: 6, 39999: 7, 40008: 8, 5000: 9,
                    5001: 10, 5002: 11, 0: 12, 40002: 13, 65535: 14}
# The port table the nat_* helpers encode with (see nat_striped_seeds).
NAT_PORTS = NAT_PORT
NAT_ZONE = {7: 0, 8: 1, 0: 2}
NAT_FLAGS = {"syn": 0, "synack": 1, "ack": 2, "pshack": 3, "finack": 4, "rst": 5, "rstack": 6}
# ADVANCE indices: 0 none, 4 1 s, 8 61 s, 9 121 s, 10 241 s, 11 301 s
ADV_1S, ADV_61S, ADV_121S, ADV_301S = 4, 8, 9, 11


def nat_op(zone, kind, body, partial=False, port=1, adv=0, mut=0):
    b0 = NAT_ZONE[zone] | (4 if partial else 0) | (kind << 3) | ((port - 1) << 6)
    return bytes([b0, adv | (mut << 4)]) + body


def nat_addrs(s, d):
    return bytes([NAT_ADDR[s] | NAT_ADDR[d] << 4])


def nat_ports(s, d):
    return bytes([NAT_PORTS[s] | NAT_PORTS[d] << 4])


def nat_tcp(zone, s, d, sp, dp, flags="syn", n=0, **kw):
    return nat_op(zone, 0, nat_addrs(s, d) + nat_ports(sp, dp) + bytes([NAT_FLAGS[flags], n]), **kw)


def nat_udp(zone, s, d, sp, dp, n=4, **kw):
    return nat_op(zone, 1, nat_addrs(s, d) + nat_ports(sp, dp) + bytes([n]), **kw)


def nat_echo(zone, s, d, ident, ty=0, n=4, **kw):
    """ty: 0 echo request, 1 echo reply, 2 timestamp, 6 router advertisement"""
    return nat_op(zone, 2, nat_addrs(s, d) + bytes([NAT_PORTS[ident] | ty << 4, n]), **kw)


def nat_reply(hist=0, flags="synack", n=0, **kw):
    """The answer to the hist-th last forwarded packet (in its zone)."""
    return nat_op(7, 3, bytes([hist | NAT_FLAGS[flags] << 2, n]), **kw)


def nat_error_about(hist=0, err=0, router=None, qlen=0, **kw):
    """ICMP error (ERRORS[err]: 0 port unreachable, 2 time exceeded, 3 frag
    needed) about the hist-th last forwarded packet, from its destination or
    from `router`; qlen: 0 header + 8, 1 whole, 2 header + 4, 3 header."""
    sel = hist | err << 2 | (0 if router else 0x20) | qlen << 6
    return nat_op(7, 4, bytes([sel]) + (bytes([NAT_ADDR[router]]) if router else b""), **kw)


def nat_fresh_error(zone, err, inner, outer_sd, inner_sd, ports, qlen=0, **kw):
    """inner: 0 TCP, 1 UDP, 2 echo, 3 GRE"""
    sel = err | inner << 3 | qlen << 5
    return nat_op(zone, 5, bytes([sel]) + nat_addrs(*outer_sd) + nat_addrs(*inner_sd) + nat_ports(*ports), **kw)


def nat_raw(zone, frame, **kw):
    return nat_op(zone, 7, bytes([0, len(frame)]) + frame, **kw)


def nat_flush_zone(zone, **kw):
    return nat_op(zone, 7, b"\x02", **kw)


NAT_UDP_SPORTS = [5000, 5001, 53, 443, 1024, 65535, 80, 8080, 39999, 40008]


UDP_DNS = eth(GW, A, 0x0800, ipv4(IP_A, IP_GW, 17, udp(IP_A, IP_GW, 55, 53, b"q" * 20)))
R1 = bytes([2, 0, 0, 0, 1, 1])
IP_R1 = bytes([10, 0, 0, 101])
IP_FREE = bytes([10, 0, 0, 77])
REMOTE_R = bytes([2, 0, 0, 0, 0, 0x33])

SEEDS = {
    "flow_key": {
        "tcp4": TCP4, "tcp4_vlan": TCP4_VLAN, "tcp6": TCP6_BIG[:200], "icmp4": ICMP4,
        "arp": ARP_REQ, "dhcp_discover": DHCP_FRAME,
    },
    "vnet_hdr": {
        "tso4": bytes([1, 1, 66, 0, 0xA8, 0x05, 34, 0, 16, 0, 0, 0]),
        "plain": bytes(12),
        "tso6_ecn": bytes([1, 0x84, 86, 0, 0x98, 0x05, 54, 0, 16, 0, 0, 0]),
        "uso_valid": bytes([2, 5, 42, 0, 0xC8, 0x05, 0, 0, 0, 0, 1, 0]),
    },
    "gso": {
        "tso4_auto": gso_hdr(1, 1448, 1) + TCP4_BIG,
        "tso6": gso_hdr(2, 1440, 0) + TCP6_BIG,
        "uso4": gso_hdr(3, 1200, 1) + UDP4_BIG,
        "csum_only": gso_hdr(0, 0, 1) + TCP4_VLAN,
        "raw_csum": gso_hdr(0, 0, 2, 34, 16) + TCP4,
    },
    "config": {},
    "control_request": {
        "show": b'{"cmd":"show"}', "fdb": b'{"cmd":"fdb","network":"acme/apps"}',
        "leases": b'{"cmd":"leases"}', "reload": b'{"cmd":"reload"}',
    },
    "pipeline": {
        "arp_for_b": b"\x00" + ARP_REQ, "arp_for_gw": b"\x00" + ARP_GW,
        "dns_to_gw": b"\x00" + DNS_FRAME, "dhcp_from_c": b"\x02" + DHCP_FRAME,
        "tcp_a_to_b": b"\x00" + TCP4, "tcp_vlan": b"\x08" + TCP4_VLAN,
    },
    "dhcp_server": {
        # DISCOVER, REQUEST (selecting) for the offered 10.0.0.2, RELEASE.
        "dora_release": bytes([3]) + dhcp_step_structured(0, 1, 0) + dhcp_step_structured(1, 3, 0, req=2, sid=1)
        + dhcp_step_structured(5, 7, 0, sid=1, ciaddr=2),
        # Reserved MAC, init-reboot of a wrong address (NAK), decline, expiry.
        "reserved_nak_decline": bytes([5]) + dhcp_step_structured(0, 1, 7, flags=7) + dhcp_step_structured(0, 3, 7, req=9)
        + dhcp_step_structured(0, 3, 7, req=5, sid=1) + dhcp_step_structured(3, 4, 7, req=5, sid=1) + bytes([200, 0x40]),
        # Two clients with client identifiers, renewing (ciaddr), and an INFORM.
        "client_ids": bytes([6]) + dhcp_step_structured(0, 1, 1, cid=1) + dhcp_step_structured(0, 1, 2, cid=2)
        + dhcp_step_structured(0, 3, 1, req=2, sid=1, cid=1) + dhcp_step_structured(60, 3, 1, ciaddr=2, cid=1)
        + dhcp_step_structured(0, 8, 3, ciaddr=20) + bytes([130, 0x40]),
        "raw_discover": bytes([1]) + dhcp_step_raw(0, DISCOVER),
    },
    "lease_log": {
        "bound_two": lease_record("bound", 1, 10, host="vm1") + lease_record("bound", 2, 11),
        "bound_released": lease_record("bound", 1, 10) + lease_record("released", 1, 10) + lease_record("bound", 3, 12, key="id:0102"),
        "torn_tail": lease_record("bound", 1, 10) + lease_record("bound", 2, 11)[:20],
        "garbage_between": lease_record("bound", 1, 10) + b"junk" + lease_record("expired", 1, 10),
    },
    "vxlan_decap": {
        "icmp4": vxlan(ICMP4, 0x123456),
        "tcp4": vxlan(TCP4, 1, ident=7),
        "tcp4_vlan_max_vni": vxlan(TCP4_VLAN, 0xFFFFFF, sport=65535),
        "arp_options_padding": vxlan(ARP_REQ + bytes(18), 42, ihl_words=6, pad=6),
        "tcp6": vxlan(TCP6_BIG[:200], 5000),
    },
    "vxlan_encap": {
        # plain TCP, MTU 1500, checksum complete
        "tcp4": encap_input(vnet_hdr(), 100, 1500, 0, TCP4),
        # plain TCP, NEEDS_CSUM, kept partial (flags bit 0)
        "tcp4_csum_partial": encap_input(vnet_hdr(csum_start=34, csum_off=16, hdr_len=54), 100, 1500, 1,
                                         with_partial_csum(TCP4, 34, 16)),
        # TSO4 super-frame, gso_size 1448 > 1500 - 36 - 54: MSS clamped to 1410
        "tso4": encap_input(vnet_hdr(1, 1448, 34, 16, 54), 7, 1500, 0, with_partial_csum(TCP4_BIG, 34, 16)),
        # TSO6 over a jumbo underlay
        "tso6_jumbo": encap_input(vnet_hdr(4, 1440, 54, 16, 74, ecn=True), 0xABCDEF, 9000, 0x10,
                                  with_partial_csum(TCP6_BIG, 54, 16, v6=True)),
        # USO4, 1200-byte segments fit 1500
        "uso4": encap_input(vnet_hdr(5, 1200, 34, 6, 42), 1, 1500, 0, with_partial_csum(UDP4_BIG, 34, 6)),
        # plain 2.5 KB UDP over MTU 1500: too big, ICMP fragmentation needed
        "udp4_too_big": encap_input(vnet_hdr(), 9, 1500, 0, UDP4_BIG),
        # plain IPv6 TCP over MTU 1280: too big, ICMPv6 packet too big
        "tcp6_too_big": encap_input(vnet_hdr(), 9, 1280, 0, TCP6_BIG),
        # VLAN-tagged frame, ARP
        "tcp4_vlan": encap_input(vnet_hdr(), 0xFFFFFF, 1500, 0x20, TCP4_VLAN),
        "arp": encap_input(vnet_hdr(), 3, 1500, 0, ARP_REQ),
        # Reproducers of a fixed finding (fuzz/README.md, "Findings"):
        # super-frames whose segments fit although headers + gso_size do
        # not, or fewer than 8 payload bytes would fit after clamping.
        # USO4, one 1-byte segment, gso_size 1400, MTU 576
        "uso_short_segment_exceeds_mtu": bytes.fromhex(
            "00050000780500000000000000000140020002000000000202000000000108004500001d123440004011149a0a00"
            "00010a0000021388138900094cc878"),
        # TSO4, 20 payload bytes, gso_size 4, MTU 94 (segments fill it exactly)
        "tso_small_mss_mtu_too_small": bytes.fromhex(
            "0001000004000000000000000000015e000002000000000202000000000108004500003c12344000400614860a00"
            "00010a00000200010002000003e8000000005018ffff6f9900006162636465666768696a6b6c6d6e6f7071727374"),
        # what libFuzzer found: VLAN, 28 bytes of TCP options, gso_size 6, MTU 129
        "tso_vlan_tcp_options_found_by_fuzzer": bytes.fromhex(
            "0001000006000000000000000000018100006408004500005012000000018100006408004500005012344000400614"
            "720a0000010a00000200010002000003e800000000c4ee1185000000005018ffff2e4e36000000220010000000000064"
            "dc052c0200000200802d344000370601000a00008c"),
    },
    "router": {
        # sel: 0x01 from leg 1, 0x02 from a network without a leg, 0x04 dst
        # MAC := ingress gateway, 0x08 frame-sized buffer, 0x80 vnet header.
        "forward_to_d": b"\x04" + routed_udp(A, IP_A, net1(21)),
        "forward_to_neighbour": b"\x00" + routed_udp(A, IP_A, net1(99)),
        "resolve_unknown": b"\x00" + routed_udp(A, IP_A, net1(77)),
        "resolve_expired_neighbour": b"\x00" + routed_udp(B, IP_B, net1(98)),
        "back_to_leased_c": b"\x05" + routed_udp(D_MAC, net1(21), IP_C, gw=GW1),
        "ttl_1_time_exceeded": b"\x00" + routed_udp(A, IP_A, net1(21), ttl=1),
        "no_route": b"\x00" + routed_udp(A, IP_A, bytes([192, 168, 9, 9])),
        "no_route_small_buffer": b"\x08" + routed_udp(A, IP_A, bytes([192, 168, 9, 9]), payload=b"x" * 600),
        "echo_gateway": b"\x00" + routed_echo(A, IP_A, IP_GW),
        "echo_other_gateway_small_buffer": b"\x0d" + routed_echo(D_MAC, net1(21), IP_GW, gw=GW1),
        "icmp_error_no_error_back": b"\x00" + eth(GW, A, 0x0800, ipv4(IP_A, bytes([8, 8, 8, 8]), 1,
                                                                      icmp_echo(0, 0, b"quoted", ty=3))),
        "ip_options_unsupported": b"\x00" + routed_udp(A, IP_A, net1(21), options=b"\x01\x01\x01\x00"),
        "ipv6": b"\x00" + eth(GW, A, 0x86DD, ipv6(V6A, V6B, 17, struct.pack("!HHHH", 1, 2, 10, 0) + b"v6")),
        "tso4_forward_keeps_offload": b"\x84" + vnet_hdr(1, 1448, 34, 16, 54)
        + with_partial_csum(eth(GW, A, 0x0800, ipv4(IP_A, net1(21), 6, tcp(IP_A, net1(21), 40000, 80, PAYLOAD))),
                            34, 16),
        "echo_with_offload": b"\x80" + vnet_hdr(0, 0, 34, 2, 42) + routed_echo(A, IP_A, IP_GW),
        "vlan_forward": b"\x00" + eth(GW, A, 0x0800, ipv4(IP_A, net1(21), 17, udp(IP_A, net1(21), 5, 6, b"v")),
                                      vlan=7),
        "arp_reply_to_gw1": b"\x01" + arp_reply_to(GW1, IP_GW1, E_MAC, net1(99)),
    },
    "remote_checks": {
        # sel: peer (bits 0-1), source MAC override (bits 2-4), extra learns
        # (bits 5-7); sel2: IPv4/ARP source override (bits 0-2), ARP sha :=
        # source MAC (bit 3).
        "r1_own_address": b"\x00\x00" + eth(A, R1, 0x0800, ipv4(IP_R1, IP_A, 17, udp(IP_R1, IP_A, 1, 2, b"r1"))),
        "free_address": b"\x01\x00" + eth(B, REMOTE_R, 0x0800, ipv4(IP_FREE, IP_B, 6, tcp(IP_FREE, IP_B, 3, 4, b"x"))),
        "spoof_a_address": b"\x00\x01" + eth(A, REMOTE_R, 0x0800, ipv4(IP_FREE, IP_B, 17, udp(IP_FREE, IP_B, 1, 2, b""))),
        "spoof_gateway_address": b"\x00\x04" + eth(A, REMOTE_R, 0x0800, ipv4(IP_FREE, IP_B, 17, udp(IP_FREE, IP_B, 1, 2, b""))),
        "hijack_local_mac": b"\x04\x00" + TCP4,
        "hijack_other_peer_mac": b"\x14\x00" + TCP4,
        "dhcp_server": b"\x00\x00" + eth(BCAST, REMOTE_R, 0x0800, ipv4(IP_FREE, b"\xff" * 4, 17,
                                                                       udp(IP_FREE, b"\xff" * 4, 67, 68, DISCOVER))),
        "arp_free": b"\x02\x00" + arp(REMOTE_R, 2, REMOTE_R, IP_FREE, IP_A),
        "arp_foreign_sha": b"\x02\x00" + arp(REMOTE_R, 1, B, IP_FREE, IP_A),
        "arp_spoof_c_leased": b"\x00\x0b" + arp(REMOTE_R, 1, REMOTE_R, IP_FREE, IP_A),
        "multicast_source": b"\x1c\x00" + TCP4,
        "fill_table": b"\xe3\x06" + eth(BCAST, REMOTE_R, 0x0800, ipv4(IP_FREE, IP_B, 17, udp(IP_FREE, IP_B, 1, 2, b"f"))),
        "runt": b"\x00\x00" + TCP4[:13],
    },
    "capture_filter": {
        "tcp_port_80": capture_input("tcp port 80", 0x0F, 100, 0, [
            (0, TCP4), (1, ARP_REQ), (2 | (9 << 2), ICMP4), (3, b""), (0, TCP4_VLAN), (0, UDP4_BIG)]),
        "not_arp_or_icmp_count_3": capture_input("not (arp or icmp) and src net 10.0.0.0/24", 0x0F, 64, 4, [
            (0, TCP4), (2 | (24 << 2), ICMP4), (1, UDP_DNS), (0, ARP_REQ), (0, TCP4_BIG), (0, TCP4)]),
        "ether_vlan_ip6": capture_input("ether src host 02:00:00:00:00:01 && vlan 100 || ip6", 0x1F, 262144, 0, [
            (0, TCP4_VLAN), (1, TCP6_BIG[:300]), (2, TCP4), (0, DHCP_FRAME)]),
        "portrange_or_gateway": capture_input("udp dst portrange 50-60 or dst host 10.0.0.254", 0x09, 1500, 0, [
            (0, UDP_DNS), (0, DNS_FRAME), (0, ARP_GW), (0, TCP4)]),
        "queue_overflow": capture_input("!(tcp)", 0x21, 0, 0, [
            (0x80, ARP_REQ), (0x80, ARP_REQ), (0x80, ARP_REQ), (0x80, ARP_REQ), (3, b""), (0, ICMP4)]),
        "count_reached_by_losses": capture_input("icmp", 0x29, 64, 200, [
            (0x80, ICMP4), (0x80, ICMP4), (0x80, ICMP4), (0x80, ICMP4)]),
        "bad_host": capture_input("host banana", 0x07, 64, 0, [(0, TCP4)]),
        "unclosed": b"(tcp or udp",
        "too_deep": ("(" * 70 + "tcp" + ")" * 70).encode(),
        "ipv6_host_net": capture_input("src host fd00::1 or dst net fd00::/64 and tcp src port 40000", 0x03, 64, 0, [
            (0, TCP6_BIG[:200]), (1, TCP4)]),
    },
    "nat_translate": {
        # zone 7 10.0.1.5:5000 -> 198.51.100.7:80: SYN out (SNAT to
        # 203.0.113.2:40000), SYN-ACK in, ACK out, data in, FIN both ways.
        "syn_out_synack_in": nat_tcp(7, "vm5", "remote", 5000, 80) + nat_reply(0, "synack", adv=ADV_1S)
        + nat_reply(0, "ack") + nat_reply(0, "pshack", n=20) + nat_reply(0, "finack") + nat_reply(0, "finack"),
        # from the uplink to 203.0.113.2:8080 (-> 10.0.1.12:80) and UDP to
        # the reserved 203.0.113.2:40003 (-> 10.0.1.13:53), and the answers.
        "port_forward_syn": nat_tcp(0, "remote", "snat", 5001, 8080) + nat_reply(0, "synack")
        + nat_reply(0, "ack") + nat_udp(0, "remote2", "snat", 5000, 40003) + nat_reply(0),
        # UDP out, port unreachable from the destination, time exceeded from
        # a router quoting the second flow of the same mapping; the inside
        # VM's own port unreachable for a forwarded datagram.
        "icmp_port_unreachable": nat_udp(7, "vm5", "remote", 5000, 53) + nat_error_about(0, 0)
        + nat_udp(7, "vm5", "remote2", 5000, 53) + nat_error_about(0, 2, router="router", qlen=1)
        + nat_udp(0, "remote", "snat", 5001, 40003) + nat_error_about(0, 0, qlen=2),
        # zone 7 and zone 8 reach the floating IP 203.0.113.10 and the port
        # forward through hairpins; the servers answer.
        "hairpin_floating": nat_tcp(7, "vm5", "fip", 5000, 80) + nat_reply(0, "synack") + nat_reply(0, "ack")
        + nat_tcp(8, "vm5", "fip", 5000, 80) + nat_reply(0, "synack")
        + nat_tcp(8, "vm_tcp", "snat", 5001, 8080) + nat_reply(0, "synack")
        + nat_udp(7, "vm_fip", "fip", 80, 80),
        # ten UDP flows from zone 7 and ten from zone 8 for seven ports, then
        # the timeout passes, expiry frees them and they are reused.
        "ports_exhausted_reuse": b"".join(nat_udp(7, "vm5", "remote", p, 53) for p in NAT_UDP_SPORTS)
        + b"".join(nat_udp(8, "vm5", "remote", p, 53) for p in NAT_UDP_SPORTS)
        + b"".join(nat_udp(8, "vm_fip", "remote", p, 53, adv=ADV_301S) for p in NAT_UDP_SPORTS[:8]),
        # ICMP echo from the floating IP's VM and from a SNAT'd VM, replies,
        # a timestamp request, an ICMP error about an echo.
        "echo_floating_and_snat": nat_echo(7, "vm_fip", "remote", 5000) + nat_reply(0)
        + nat_echo(8, "vm5", "remote", 40001) + nat_reply(0) + nat_echo(7, "vm5", "remote2", 443, ty=2)
        + nat_reply(0) + nat_error_about(1, 3, router="router"),
        # a made-up ICMP error about nothing, a GRE packet to the floating
        # IP, a raw frame, a tracked flow with IP options and as a later
        # fragment, TCP with a partial checksum, flush_zone.
        "odd_packets": nat_fresh_error(0, 0, 1, ("router", "snat"), ("snat", "remote"), (40000, 53))
        + nat_op(0, 6, nat_addrs("remote", "fip") + bytes([47, 8]))
        + nat_raw(7, eth(GW, A, 0x0800, ipv4(bytes([10, 0, 1, 5]), bytes([198, 51, 100, 7]), 17,
                                              udp(bytes([10, 0, 1, 5]), bytes([198, 51, 100, 7]), 7, 9, b"raw"))))
        + nat_udp(7, "vm5", "remote", 5001, 53) + nat_udp(7, "vm5", "remote", 5001, 53, mut=11)
        + nat_udp(7, "vm5", "remote", 5001, 53, mut=12) + nat_tcp(8, "vm5", "remote", 443, 80, partial=True)
        + nat_reply(0, "synack", partial=True) + nat_flush_zone(8),
        # Open finding (fuzz/README.md, Findings): a hairpin whose second
        # pass drops returns Drop with the first pass's rewrite (and, for a
        # new connection, its entry committed). Zone 8 connects to zone 7's
        # floating IP, tenant 7 is flushed, zone 8's next segment: the
        # second pass finds no connection (Invalid).
        "hairpin_after_flush_zone": nat_tcp(8, "vm5", "fip", 5000, 80) + nat_reply(0, "synack")
        + nat_reply(0, "ack") + nat_flush_zone(7) + nat_tcp(8, "vm5", "fip", 5000, 80, "pshack", n=10),
        # 7 UDP flows charged to port 1 (the 7 allocatable UDP ports of
        # 203.0.113.2), then 10.0.1.11:80 -> 203.0.113.10:80 UDP from zone 7:
        # the floating-out pass commits the 8th entry of port 1, the hairpin
        # pass is refused Limit(Port); the frame stays rewritten and the
        # first pass's entry stays in the table.
        "hairpin_refused_by_limit_keeps_first_pass": b"".join(
            nat_udp(7, "vm5", "remote", p, 53) for p in NAT_UDP_SPORTS[:7]) + nat_udp(7, "vm_fip", "fip", 80, 80),
    },
    "dns_answer": {
        "a_vm1": b"\x00" + DNS_Q,
        "ptr": b"\x00" + dns_query("1.0.0.10.in-addr.arpa", qtype=12),
        "many_edns": b"\x00" + dns_query("many.acme.internal", edns=1232),
        "many_classic": b"\x01" + dns_query("many"),
        "aaaa_nodata": b"\x00" + dns_query("vm2", qtype=28),
        "nxdomain": b"\x00" + dns_query("nope.acme.internal"),
    },
}


def nat_striped_seeds():
    """Seeds of fuzz_targets/nat_striped.rs (nat_translate's layout, its own
    PORT_SET). Stripe of a port: port % 4."""
    global NAT_PORTS
    NAT_PORTS = NAT_STRIPED_PORT
    try:
        return {
            # zone 7 10.0.1.5:5000 -> 198.51.100.7:80 (stripe 0: SNAT port
            # 40000), the answers; zone 8's same endpoint gets 40004 (stripe
            # 0 again), data both ways, FIN.
            "syn_out_synack_in": nat_tcp(7, "vm5", "remote", 5000, 80) + nat_reply(0, "synack", adv=ADV_1S)
            + nat_reply(0, "ack") + nat_tcp(8, "vm5", "remote", 5000, 80) + nat_reply(0, "synack")
            + nat_reply(0, "ack") + nat_reply(0, "pshack", n=20) + nat_reply(0, "finack") + nat_reply(0, "finack"),
            # port forwards whose external and inside ports are in other
            # stripes: tcp 203.0.113.2:8081 (1) -> 10.0.1.12:80 (0), udp
            # 203.0.113.2:40003 (3) -> 10.0.1.13:53 (1); the answers, the
            # VM's own port unreachable, a router's error about the answer.
            "forwards_across_stripes": nat_tcp(0, "remote", "snat", 5001, 8081) + nat_reply(0, "synack")
            + nat_reply(0, "ack") + nat_udp(0, "remote2", "snat", 5000, 40003) + nat_reply(0)
            + nat_error_about(1, 0, qlen=2) + nat_error_about(1, 2, router="router", qlen=1),
            # 4 UDP flows of zone 7 from stripe-0 ports take stripe 0's 4
            # ports (40000, 40008 kept, 80 and 5000 get 40004, 40012); the
            # 5th (port 0) and zone 8's are PortsExhausted (one NAT has room:
            # the comparison ends), stripe 1 still has ports; after the
            # timeout the ports are reused.
            "stripe_ports_exhausted": b"".join(nat_udp(7, "vm5", "remote", p, 53) for p in (40000, 40008, 80, 5000))
            + nat_udp(7, "vm5", "remote", 0, 53, port=2) + nat_udp(8, "vm5", "remote", 40000, 53, port=2)
            + nat_udp(8, "vm5", "remote", 5001, 53, port=2) + nat_reply(0)
            + nat_udp(8, "vm5", "remote", 40000, 53, port=2, adv=ADV_301S) + nat_reply(0),
            # hairpins whose two passes are in different stripes: zone 8 to
            # the floating IP (SNAT stripe 1, floating-in stripe 0), zone 7 to
            # the TCP forward from a stripe-2 port, the floating IP's VM to its
            # own address, zone 8 to the UDP forward; the servers answer.
            "hairpins_across_stripes": nat_tcp(8, "vm5", "fip", 5001, 80) + nat_reply(0, "synack")
            + nat_reply(0, "ack") + nat_tcp(7, "vm5", "snat", 5002, 8081) + nat_reply(0, "synack")
            + nat_udp(7, "vm_fip", "fip", 80, 80) + nat_reply(0)
            + nat_udp(8, "vm5", "snat", 40001, 40003) + nat_reply(0) + nat_error_about(0, 0),
            # ICMP echo from the floating IP's VM and SNAT'd VMs, identifiers of
            # three stripes, a timestamp, an error about an echo.
            "echo_identifiers": nat_echo(7, "vm_fip", "remote", 5000) + nat_reply(0)
            + nat_echo(8, "vm5", "remote", 40001) + nat_reply(0) + nat_echo(7, "vm5", "remote2", 5002, ty=2)
            + nat_reply(0) + nat_error_about(1, 3, router="router"),
            # an error about nothing, GRE to the floating IP (stripe 0), a
            # tracked flow with IP options and as a later fragment, TCP with a
            # partial checksum, flush_zone.
            "odd_packets": nat_fresh_error(0, 0, 1, ("router", "snat"), ("snat", "remote"), (40000, 53))
            + nat_op(0, 6, nat_addrs("remote", "fip") + bytes([47, 8])) + nat_reply(0)
            + nat_udp(7, "vm5", "remote", 5001, 53) + nat_udp(7, "vm5", "remote", 5001, 53, mut=11)
            + nat_udp(7, "vm5", "remote", 5001, 53, mut=12) + nat_tcp(8, "vm5", "remote", 5002, 80, partial=True)
            + nat_reply(0, "synack", partial=True) + nat_flush_zone(8),
            # Open finding (fuzz/README.md, Findings): ICMP errors quoting a
            # packet as it arrived are looked up in another stripe. Zone 7's
            # error about 10.0.1.1's own UDP packet (to 10.0.1.1 from
            # 10.0.1.13): one NAT NoMatch, the set Drop(Invalid(IcmpErrorNoMatch)).
            "error_quoting_a_tenants_own_packet": nat_udp(7, "gw_in", "vm_udp", 40008, 53)
            + nat_fresh_error(7, 0, 1, ("vm_udp", "gw_in"), ("gw_in", "vm_udp"), (40008, 53), qlen=1),
            # The same from outside, not addressed to the quoted sender: one
            # NAT Drop(Invalid(IcmpErrorAddrMismatch)), the set
            # Drop(Invalid(IcmpErrorNoMatch)).
            "error_from_outside_quoting_its_own_packet": nat_tcp(0, "remote", "snat", 5001, 8081)
            + nat_fresh_error(0, 0, 0, ("remote", "snat"), ("remote", "snat"), (5001, 8081)),
            # ... and in a hairpin's second pass: 10.0.1.11:40003 sends to
            # 203.0.113.2:40008 (nothing there: out of the uplink), then a port
            # unreachable about a packet 203.0.113.2:40008 -> 10.0.1.11:40003.
            # One NAT forwards it out of the uplink to 203.0.113.2, the set
            # drops it (Invalid(IcmpErrorNoMatch)).
            "error_in_hairpin_second_pass": nat_udp(7, "vm_fip", "snat", 40003, 40008)
            + nat_fresh_error(7, 0, 1, ("vm_fip", "snat"), ("snat", "vm_fip"), (40008, 40003), qlen=1),
        }
    finally:
        NAT_PORTS = NAT_PORT


SEEDS["nat_striped"] = nat_striped_seeds()


def main():
    only = sys.argv[1:]
    for ex in sorted(os.listdir(EXAMPLES)):
        if ex.endswith(".toml"):
            with open(os.path.join(EXAMPLES, ex), "rb") as f:
                SEEDS["config"][ex[:-5]] = f.read()
    for target, seeds in SEEDS.items():
        if only and target not in only:
            continue
        d = os.path.join(CORPUS, target)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for name, data in seeds.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
    print("wrote", sum(len(s) for t, s in SEEDS.items() if not only or t in only), "seeds to", CORPUS)


if __name__ == "__main__":
    main()
