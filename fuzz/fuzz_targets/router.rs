//! `vswitch::pipeline::router::route` and `router::arp_reply_for_gateway`
//! with a two-leg router on arbitrary frames.
//!
//! Input: `[sel, vnet_hdr(12) if sel & 0x80, frame...]`. `sel & 0x01`: the
//! frame comes from network 1 (else 0); `sel & 0x02`: from network 5, which
//! has no leg; `sel & 0x04`: the frame's destination MAC is overwritten with
//! the ingress network's gateway MAC (what the data path routes); `sel &
//! 0x08`: the buffer is exactly the frame's size (`PacketBuf::from_frame`,
//! replies must grow it) instead of a worker's 64 KB buffer; `sel & 0x80`:
//! the buffer carries `Offload::from_vnet_hdr` of the next 12 bytes.
//!
//! Tables: leg 0 = 10.0.0.0/24, gateway 10.0.0.254 at 02:..:fe (A .1, B .2
//! fixed, C .50 leased); leg 1 = 10.0.2.0/24, gateway 10.0.2.1 at 02:..:f2
//! (D .21 fixed). Neighbour caches: 10.0.0.77 and 10.0.2.99 fresh, 10.0.2.98
//! learned 400 s ago (expired).
//!
//! Asserts: never panics; the verdict equals a reference model of the
//! module documentation (gateway echo, unsupported / malformed drops, net
//! unreachable, TTL, owner / neighbour / ARP resolution, the RFC 1122 cases
//! that get no ICMP error); `Drop` leaves the buffer and offload untouched;
//! `Forward{net,dst}`: same length, destination MAC `dst` (the address's
//! owner), source MAC the destination leg's gateway MAC, TTL one less, the
//! IPv4 header checksum still verifies (when it did), only TTL and checksum
//! changed in the IP header, every byte after it unchanged, offload kept; a
//! TTL <= 1 or a destination outside both legs is never forwarded; `Reply`:
//! a well-formed untagged IPv4/ICMP frame from the ingress gateway MAC (and
//! the gateway address: the pinged one for echo, the ingress leg's for
//! errors) to the sender's MAC/IP, TTL 64, valid IP and ICMP checksums,
//! echo reply with the request's id/seq/payload, or type 11/3 quoting the
//! start of the packet, and no offload; `Resolve{net}`: a 42-byte ARP request
//! from that leg's gateway MAC/IP for the destination, no offload, and once
//! an ARP reply to that gateway is accepted by `arp_reply_for_gateway` and
//! learned, the same packet is forwarded to the answering MAC;
//! `arp_reply_for_gateway` on the input itself only returns a unicast MAC
//! (the frame's source) and an address inside the leg that is not the
//! gateway, for an ARP reply to the gateway.
//!
//! Found and fixed: the echo reply kept the request's offload (seed
//! `echo_with_offload`).
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use packet::{FlowKey, Frag, MacAddr, Offload, PacketBuf, L3, L4};
use vswitch::clock::Timestamp;
use vswitch::pipeline::router::{self, Leg, Neighbours, Routed, Router};
use vswitch::pipeline::{Addresses, DropReason, IpOwner, Leased};

const A: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
const B: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);
const C: MacAddr = MacAddr([2, 0, 0, 0, 0, 3]);
const D: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xd1]);
const E: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xe1]);
const F: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xf1]);
const STALE: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x5a]);
const R: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x77]);
const GW0: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xfe]);
const GW1: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xf2]);
const IP_GW0: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
const IP_GW1: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
const SEC: u64 = 1_000_000_000;
const T0: Timestamp = Timestamp(1000 * SEC);
const NOW: Timestamp = Timestamp(1010 * SEC);
const ICMP_QUOTE_MAX: usize = 576 - 20 - 8;

/// (network, prefix /24 as its first three octets, gateway IP, gateway MAC)
const LEGS: [(usize, [u8; 3], Ipv4Addr, MacAddr); 2] =
    [(0, [10, 0, 0], IP_GW0, GW0), (1, [10, 0, 2], IP_GW1, GW1)];

fn router() -> Router {
    Router::new(
        LEGS.iter()
            .map(|&(net, p, gw_ip, gw_mac)| Leg {
                net,
                cidr: format!("{}.{}.{}.0/24", p[0], p[1], p[2]).parse().expect("cidr"),
                gw_ip,
                gw_mac,
            })
            .collect(),
    )
}

fn owners() -> [Addresses; 2] {
    let mut o0 = Addresses::default();
    for (ip, mac, gateway) in [
        (Ipv4Addr::new(10, 0, 0, 1), A, false),
        (Ipv4Addr::new(10, 0, 0, 2), B, false),
        (IP_GW0, GW0, true),
    ] {
        o0.fixed.insert(ip, IpOwner { mac, gateway });
    }
    let mut leased = Leased::new();
    leased.insert(Ipv4Addr::new(10, 0, 0, 50), C);
    o0.leased.store(Arc::new(leased));
    let mut o1 = Addresses::default();
    for (ip, mac, gateway) in [(Ipv4Addr::new(10, 0, 2, 21), D, false), (IP_GW1, GW1, true)] {
        o1.fixed.insert(ip, IpOwner { mac, gateway });
    }
    [o0, o1]
}

fn neighbours() -> [Neighbours; 2] {
    let n0 = Neighbours::default();
    n0.learn(Ipv4Addr::new(10, 0, 0, 77), F, T0);
    let n1 = Neighbours::default();
    n1.learn(Ipv4Addr::new(10, 0, 2, 99), E, T0);
    n1.learn(Ipv4Addr::new(10, 0, 2, 98), STALE, Timestamp(T0.0 - 400 * SEC));
    [n0, n1]
}

/// The leg (index into `LEGS`) whose /24 holds `ip`.
fn leg_of_ip(ip: Ipv4Addr) -> Option<usize> {
    let o = ip.octets();
    LEGS.iter().position(|l| l.1 == [o[0], o[1], o[2]])
}

/// RFC 1071 sum of `b` is 0xffff, independently of `packet::checksum`.
fn sums_to_ffff(b: &[u8]) -> bool {
    let mut s: u32 = 0;
    for w in b.chunks(2) {
        s += u32::from(w[0]) << 8 | u32::from(*w.get(1).unwrap_or(&0));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s == 0xffff
}

fn be16(b: &[u8], i: usize) -> usize {
    usize::from(u16::from_be_bytes([b[i], b[i + 1]]))
}

/// What the router should do, from its module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Drop(DropReason),
    Echo,
    IcmpError(u8),
    Forward { net: usize, dst: MacAddr },
    Resolve { net: usize },
}

fn model(from: usize, key: &FlowKey, frame: &[u8], addrs: &[Addresses; 2], neigh: &[Neighbours; 2]) -> Expect {
    if from >= LEGS.len() {
        return Expect::Drop(DropReason::ToGatewayUnhandled);
    }
    let L3::Ipv4(ip) = key.l3 else {
        return Expect::Drop(DropReason::ToGatewayUnhandled);
    };
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (ip.src, ip.dst) else {
        panic!("IPv4 key with IPv6 addresses: {key:?}");
    };
    if key.malformed.is_some() {
        return Expect::Drop(DropReason::L3Malformed);
    }
    let l3 = usize::from(key.l3_offset);
    if frame[l3] & 0x0f != 5 {
        return Expect::Drop(DropReason::RouteUnsupported);
    }
    if LEGS.iter().any(|l| l.2 == dst) {
        return match key.l4 {
            L4::Icmpv4 { ty: 8, .. } => Expect::Echo,
            _ => Expect::Drop(DropReason::ToGatewayUnhandled),
        };
    }
    // RFC 1122 3.2.2: no error about an error, a later fragment, or to a
    // source that cannot take one.
    let error = |ty: u8| {
        let about_error = matches!(key.l4, L4::Icmpv4 { ty: 3 | 4 | 5 | 11 | 12, .. });
        if about_error
            || ip.frag == Frag::Later
            || src.is_unspecified()
            || src.is_broadcast()
            || src.is_multicast()
        {
            Expect::Drop(if ty == 11 { DropReason::TtlExceeded } else { DropReason::NoRoute })
        } else {
            Expect::IcmpError(ty)
        }
    };
    // Multicast and broadcast destinations are never routed nor answered;
    // a header whose checksum fails is never forwarded.
    if dst.is_multicast() || dst.is_broadcast() {
        return Expect::Drop(DropReason::NoRoute);
    }
    if !packet::checksum::verify(&frame[l3..l3 + 20]) {
        return Expect::Drop(DropReason::L3Malformed);
    }
    if ip.ttl <= 1 {
        return error(11);
    }
    // Outside both legs: the router hands it on (`Routed::Outside`), and
    // with no NAT behind it the switch answers network unreachable, as
    // `route` below does.
    let Some(leg) = leg_of_ip(dst) else {
        return error(3);
    };
    // A subnet's network and broadcast addresses (both legs are /24).
    if dst.octets()[3] == 0 || dst.octets()[3] == 255 {
        return Expect::Drop(DropReason::NoRoute);
    }
    let net = LEGS[leg].0;
    let owner = addrs[net].owner(&dst).filter(|o| !o.gateway).map(|o| o.mac);
    match owner.or_else(|| neigh[net].get(&dst, NOW)) {
        Some(dst) => Expect::Forward { net, dst },
        None => Expect::Resolve { net },
    }
}

/// The router stage as the switch runs it for a tenant without NAT: a
/// destination outside every network gets network unreachable.
fn route(from: usize, key: &FlowKey, buf: &mut PacketBuf, addrs: &[Addresses; 2], neigh: &[Neighbours; 2]) -> Routed {
    let r = router();
    match router::route(&r, from, key, buf, NOW, |i| addrs.get(i), |i| neigh.get(i)) {
        Routed::Outside => router::unreachable(&r, from, key, buf),
        other => other,
    }
}

fn new_buf(frame: &[u8], small: bool, offload: Offload) -> PacketBuf {
    let mut buf = if small {
        PacketBuf::from_frame(frame)
    } else {
        let mut b = PacketBuf::new();
        assert!(b.replace_frame(frame));
        b
    };
    assert_eq!(buf.frame(), frame);
    buf.offload = offload;
    buf
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, mut rest)) = data.split_first() else {
        return;
    };
    let mut offload = Offload::NONE;
    if sel & 0x80 != 0 {
        let Some(Ok(o)) = rest.get(..12).map(Offload::from_vnet_hdr) else {
            return;
        };
        offload = o;
        rest = &rest[12..];
    }
    if rest.len() > packet::MAX_FRAME {
        return;
    }
    let from = if sel & 0x02 != 0 { 5 } else { usize::from(sel & 1) };
    let mut frame = rest.to_vec();
    if sel & 0x04 != 0 && frame.len() >= 6 {
        frame[..6].copy_from_slice(&LEGS[usize::from(sel & 1)].3 .0);
    }
    let frame = &frame[..];
    let Ok(key) = FlowKey::parse(frame) else {
        return;
    };

    check_arp_reply_for_gateway(&key);

    let addrs = owners();
    let neigh = neighbours();
    let small = sel & 0x08 != 0;
    let mut buf = new_buf(frame, small, offload);
    let expect = model(from, &key, frame, &addrs, &neigh);
    let r = route(from, &key, &mut buf, &addrs, &neigh);

    if let Routed::Forward { .. } = r {
        let ip = key.ip().expect("forwarded a non-IP frame");
        assert!(ip.ttl > 1, "forwarded with TTL {}", ip.ttl);
        let IpAddr::V4(dst) = ip.dst else { panic!("forwarded IPv6") };
        assert!(leg_of_ip(dst).is_some(), "forwarded to {dst}, outside both legs");
    }

    match (expect, r) {
        (Expect::Drop(want), Routed::Drop(got)) => {
            assert_eq!(got, want);
            assert_eq!(buf.frame(), frame, "dropped ({got:?}) but the frame changed");
            assert_eq!(buf.offload, offload, "dropped ({got:?}) but the offload changed");
        }
        (Expect::Forward { net, dst }, Routed::Forward { net: n, dst: d }) => {
            assert_eq!((n, d), (net, dst));
            check_forward(&key, frame, &buf, offload, net, dst);
        }
        (Expect::Resolve { net }, Routed::Resolve { net: n }) => {
            assert_eq!(n, net);
            check_resolve(from, &key, frame, &buf, net, small, offload);
        }
        (Expect::Echo, Routed::Reply) => {
            check_reply(from, &key, frame, &buf, offload, None);
        }
        (Expect::IcmpError(ty), Routed::Reply) => {
            check_reply(from, &key, frame, &buf, offload, Some(ty));
        }
        (e, r) => panic!("expected {e:?}, router said {r:?} for {key:?}"),
    }
});

fn check_forward(key: &FlowKey, frame: &[u8], buf: &PacketBuf, offload: Offload, net: usize, dst: MacAddr) {
    let out = buf.frame();
    let l3 = usize::from(key.l3_offset);
    assert_eq!(out.len(), frame.len(), "forward changed the length");
    assert_eq!(&out[0..6], &dst.0, "destination MAC is not the next hop");
    assert_eq!(&out[6..12], &LEGS[net].3 .0, "source MAC is not the destination leg's gateway");
    assert_eq!(&out[12..l3], &frame[12..l3], "EtherType / VLAN tags changed");
    let (hi, ho) = (&frame[l3..l3 + 20], &out[l3..l3 + 20]);
    assert_eq!(ho[8], hi[8] - 1, "TTL not decremented by one");
    for i in (0..20).filter(|&i| i != 8 && i != 10 && i != 11) {
        assert_eq!(ho[i], hi[i], "IPv4 header byte {i} changed");
    }
    if sums_to_ffff(hi) {
        assert!(sums_to_ffff(ho), "IPv4 header checksum broken: {:02x?} -> {:02x?}", hi, ho);
    }
    assert_eq!(&out[l3 + 20..], &frame[l3 + 20..], "bytes after the IP header changed");
    assert_eq!(buf.offload, offload, "forward changed the offload");
}

fn check_resolve(from: usize, key: &FlowKey, frame: &[u8], buf: &PacketBuf, net: usize, small: bool, offload: Offload) {
    let IpAddr::V4(dst) = key.ip().expect("resolved a non-IP frame").dst else {
        panic!("resolved IPv6");
    };
    let (_, _, gw_ip, gw_mac) = LEGS[net];
    let mut want = Vec::with_capacity(42);
    want.extend_from_slice(&[0xff; 6]);
    want.extend_from_slice(&gw_mac.0);
    want.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    want.extend_from_slice(&gw_mac.0);
    want.extend_from_slice(&gw_ip.octets());
    want.extend_from_slice(&[0; 6]);
    want.extend_from_slice(&dst.octets());
    assert_eq!(buf.frame(), &want[..], "not the ARP request for {dst} from leg {net}'s gateway");
    assert_eq!(buf.offload, Offload::NONE, "ARP request with an offload");

    // The answer to it, as the VM that owns `dst` sends it (its MAC: the
    // frame's source if unicast).
    let m = if key.src_mac.is_unicast() { key.src_mac } else { R };
    let mut reply = Vec::with_capacity(42);
    reply.extend_from_slice(&gw_mac.0);
    reply.extend_from_slice(&m.0);
    reply.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    reply.extend_from_slice(&m.0);
    reply.extend_from_slice(&dst.octets());
    reply.extend_from_slice(&gw_mac.0);
    reply.extend_from_slice(&gw_ip.octets());
    let rk = FlowKey::parse(&reply).expect("ARP reply parses");
    let rt = router();
    let leg = rt.leg_of(net).expect("leg");
    let learned = router::arp_reply_for_gateway(&rk, leg);
    assert_eq!(learned, Some((dst, m)), "a valid ARP reply to the gateway was not accepted");
    let addrs = owners();
    let neigh = neighbours();
    neigh[net].learn(dst, m, NOW);
    let mut again = new_buf(frame, small, offload);
    let r = route(from, key, &mut again, &addrs, &neigh);
    assert_eq!(r, Routed::Forward { net, dst: m }, "learned neighbour not used");
}

fn check_reply(from: usize, key: &FlowKey, frame: &[u8], buf: &PacketBuf, offload: Offload, error: Option<u8>) {
    let _ = offload;
    assert_eq!(buf.offload, Offload::NONE, "router reply ({error:?}) keeps the request's offload");
    let out = buf.frame();
    let rk = FlowKey::parse(out).expect("reply parses");
    assert_eq!(rk.malformed, None, "reply is malformed: {rk:?}");
    assert_eq!((rk.vlan, rk.l3_offset), (None, 14), "reply not untagged Ethernet/IPv4");
    let (L3::Ipv4(rip), L3::Ipv4(qip)) = (rk.l3, key.l3) else {
        panic!("reply {rk:?} to {key:?}");
    };
    let L4::Icmpv4 { ty, code, .. } = rk.l4 else { panic!("reply is not ICMP: {rk:?}") };
    let (_, _, ingress_gw_ip, ingress_gw_mac) = LEGS[from];
    assert_eq!(rk.src_mac, ingress_gw_mac, "reply not from the ingress gateway MAC");
    assert_eq!(rk.dst_mac, key.src_mac, "reply not to the sender's MAC");
    assert_eq!(rip.dst, qip.src, "reply not to the sender's address");
    assert_eq!(rip.ttl, 64);
    let ip = &out[14..];
    assert_eq!(ip[0], 0x45);
    assert!(sums_to_ffff(&ip[..20]), "reply IPv4 header checksum");
    let total = be16(ip, 2);
    assert_eq!(total, ip.len(), "reply has trailing bytes");
    let icmp = &ip[20..total];
    assert!(sums_to_ffff(icmp), "reply ICMP checksum");
    let l3 = usize::from(key.l3_offset);
    let q = &frame[l3..];
    match error {
        None => {
            assert_eq!(rip.src, qip.dst, "echo reply not from the pinged gateway address");
            let IpAddr::V4(pinged) = qip.dst else { unreachable!() };
            assert!(LEGS.iter().any(|l| l.2 == pinged));
            assert_eq!((ty, code), (0, 0), "not an echo reply");
            let ql4 = usize::from(key.l4_offset);
            let req = &frame[ql4..l3 + be16(q, 2)];
            assert_eq!(&icmp[4..8], &req[4..8], "echo reply changed id/seq");
            assert_eq!(&icmp[8..], &req[8..], "echo reply changed the payload");
        }
        Some(want) => {
            assert_eq!(rip.src, IpAddr::V4(ingress_gw_ip), "ICMP error not from the ingress gateway");
            assert_eq!((ty, code), (want, 0));
            assert_eq!(&icmp[4..8], &[0; 4], "ICMP error unused field");
            let quote = &icmp[8..];
            assert_eq!(quote.len(), q.len().min(ICMP_QUOTE_MAX), "quote length");
            assert_eq!(quote, &q[..quote.len()], "quote is not the packet's start");
        }
    }
}

fn check_arp_reply_for_gateway(key: &FlowKey) {
    let rt = router();
    for &(net, prefix, gw_ip, gw_mac) in &LEGS {
        let leg = rt.leg_of(net).expect("leg");
        let Some((ip, mac)) = router::arp_reply_for_gateway(key, leg) else {
            continue;
        };
        let L3::Arp(a) = key.l3 else { panic!("learned from a non-ARP frame: {key:?}") };
        assert_eq!(a.op, 2, "learned from an ARP request");
        assert_eq!((a.tpa, key.dst_mac), (gw_ip, gw_mac), "learned from an ARP reply to someone else");
        assert_eq!(ip.octets()[..3], prefix, "learned {ip} outside leg {net}");
        assert_ne!(ip, gw_ip, "learned the gateway address");
        assert!(mac.is_unicast(), "learned a non-unicast MAC {mac}");
        assert_eq!((ip, mac), (a.spa, key.src_mac), "learned something else than the sender");
        assert_eq!(a.sha, key.src_mac);
    }
}
