//! The distributed router: each tenant's networks with a gateway are joined
//! by one router, run on the host where a packet enters (as OVN's
//! distributed logical router), so traffic between a tenant's subnets never
//! hairpins through another host.
//!
//! A frame from a VM to its network's gateway MAC reaches this stage:
//!
//! * ICMP echo to the gateway address: answered (the switch owns it);
//! * IPv4 to another address: routed. The destination network is the
//!   tenant's network whose prefix holds the address (longest prefix;
//!   none: see the last point). TTL 1 or less: ICMP time exceeded. Otherwise TTL - 1 (IPv4 header checksum
//!   updated incrementally; a TSO super-frame keeps its offload), source MAC
//!   = the destination network's gateway MAC, destination MAC = the
//!   address's owner (directory, leases, or the neighbour cache); the frame
//!   then goes to that MAC in the destination network (a local port or a
//!   peer's VTEP with the destination network's VNI);
//! * an owner nobody knows: the router asks (an ARP request from the
//!   destination network's gateway, flooded in that network), drops the
//!   packet (`route_arp_pending`, the sender retransmits) and learns the
//!   answer into a bounded neighbour cache;
//! * a destination outside every network of the tenant: [`Routed::Outside`];
//!   the caller hands it to NAT toward the uplink (`pipeline::external`),
//!   and when no NAT rule or connection takes it answers ICMP destination
//!   unreachable (network) with [`unreachable`].
//!
//! Not routed yet: IPv6 and IPv4 with options (dropped, counted).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use packet::{FlowKey, MacAddr, PacketBuf, L3, L4};
use parking_lot::RwLock;

use super::{Addresses, DropReason};
use crate::clock::Timestamp;

/// Most neighbour entries per network.
pub const NEIGHBOURS_MAX: usize = 1024;
/// How long a learned neighbour is believed.
const NEIGHBOUR_TTL_NS: u64 = 300 * 1_000_000_000;
/// TTL of packets the router makes.
const REPLY_TTL: u8 = 64;
/// Most bytes of the offending packet quoted in an ICMP error (RFC 1812
/// 4.3.2.3: as much as fits in 576 bytes).
const ICMP_QUOTE_MAX: usize = 576 - 20 - 8;

/// One network as the router sees it.
#[derive(Debug, Clone, Copy)]
pub struct Leg {
    /// Index of the network in the snapshot.
    pub net: usize,
    /// Its prefix.
    pub cidr: Ipv4Net,
    /// Its gateway address.
    pub gw_ip: Ipv4Addr,
    /// Its gateway MAC.
    pub gw_mac: MacAddr,
}

/// A tenant's router: its legs, longest prefix first.
#[derive(Debug, Default, Clone)]
pub struct Router {
    legs: Vec<Leg>,
}

impl Router {
    /// A router over `legs`.
    pub fn new(mut legs: Vec<Leg>) -> Router {
        legs.sort_by_key(|l| std::cmp::Reverse(l.cidr.prefix_len()));
        Router { legs }
    }

    /// The leg whose prefix holds `ip` (longest prefix).
    pub fn leg_for(&self, ip: Ipv4Addr) -> Option<&Leg> {
        self.legs.iter().find(|l| l.cidr.contains(&ip))
    }

    /// The leg of network `net`.
    pub fn leg_of(&self, net: usize) -> Option<&Leg> {
        self.legs.iter().find(|l| l.net == net)
    }
}

/// IPv4 -> MAC answers the router learned from ARP, per network (and one
/// for the uplink). Bounded: a full cache forgets its oldest entry. Every
/// routed frame reads it and only ARP answers write it, so it is a
/// reader-writer lock: workers routing at once never wait for each other.
#[derive(Debug, Default)]
pub struct Neighbours {
    map: RwLock<HashMap<Ipv4Addr, (MacAddr, Timestamp)>>,
}

impl Neighbours {
    /// The MAC of `ip` if learned within the neighbour lifetime.
    pub fn get(&self, ip: &Ipv4Addr, now: Timestamp) -> Option<MacAddr> {
        let m = self.map.read();
        m.get(ip)
            .filter(|(_, t)| now.0.saturating_sub(t.0) < NEIGHBOUR_TTL_NS)
            .map(|(mac, _)| *mac)
    }

    /// Records `ip` at `mac`.
    pub fn learn(&self, ip: Ipv4Addr, mac: MacAddr, now: Timestamp) {
        let mut m = self.map.write();
        if m.len() >= NEIGHBOURS_MAX && !m.contains_key(&ip) {
            if let Some(oldest) = m.iter().min_by_key(|(_, (_, t))| t.0).map(|(k, _)| *k) {
                m.remove(&oldest);
            }
        }
        m.insert(ip, (mac, now));
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the router did with a frame addressed to a gateway MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// `buf` holds the router's answer (echo reply, ICMP error) for the
    /// ingress port.
    Reply,
    /// `buf` was rewritten for network `net`; send it to `dst` there.
    Forward {
        /// Destination network index.
        net: usize,
        /// Next-hop MAC.
        dst: MacAddr,
    },
    /// The next hop is unknown: `buf` now holds an ARP request to flood in
    /// network `net` (the packet itself is dropped).
    Resolve {
        /// Destination network index.
        net: usize,
    },
    /// No network of the tenant holds the destination: the caller tries
    /// NAT toward the uplink, else answers with [`unreachable`]. `buf` is
    /// untouched; the TTL was checked.
    Outside,
    /// Dropped.
    Drop(DropReason),
}

/// Routes the frame in `buf` (parsed as `key`), which a VM of network
/// `from` sent to that network's gateway MAC. `addrs(net)` gives a
/// network's address owners, `neigh(net)` its neighbour cache.
pub fn route<'a>(
    router: &Router,
    from: usize,
    key: &FlowKey,
    buf: &mut PacketBuf,
    now: Timestamp,
    addrs: impl Fn(usize) -> Option<&'a Addresses>,
    neigh: impl Fn(usize) -> Option<&'a Neighbours>,
) -> Routed {
    let Some(ingress_leg) = router.leg_of(from) else {
        return Routed::Drop(DropReason::ToGatewayUnhandled);
    };
    let L3::Ipv4(ip) = key.l3 else {
        return Routed::Drop(DropReason::ToGatewayUnhandled);
    };
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (ip.src, ip.dst) else {
        return Routed::Drop(DropReason::L3Malformed);
    };
    if key.malformed.is_some() {
        return Routed::Drop(DropReason::L3Malformed);
    }
    let l3 = usize::from(key.l3_offset);
    let ihl = buf.frame().get(l3).map_or(0, |b| usize::from(b & 0x0f) * 4);
    if ihl != 20 {
        return Routed::Drop(DropReason::RouteUnsupported);
    }
    // To a gateway address of this tenant: the router itself.
    if router.legs.iter().any(|l| l.gw_ip == dst) {
        return match key.l4 {
            L4::Icmpv4 { ty: 8, .. } => {
                if echo_reply(buf, key, ingress_leg.gw_mac) {
                    Routed::Reply
                } else {
                    Routed::Drop(DropReason::L3Malformed)
                }
            }
            _ => Routed::Drop(DropReason::ToGatewayUnhandled),
        };
    }
    // Never routed, never answered with an error (RFC 1122 3.2.2, RFC
    // 2644): multicast, the limited broadcast, and a subnet's own network
    // or broadcast address.
    if dst.is_multicast() || dst.is_broadcast() {
        return Routed::Drop(DropReason::NoRoute);
    }
    // A corrupt header is not forwarded with its checksum patched.
    if !buf
        .frame()
        .get(l3..l3 + 20)
        .is_some_and(packet::checksum::verify)
    {
        return Routed::Drop(DropReason::L3Malformed);
    }
    if ip.ttl <= 1 {
        return icmp_error(buf, key, ingress_leg, 11, 0, src);
    }
    let Some(leg) = router.leg_for(dst).copied() else {
        return Routed::Outside;
    };
    forward_to(&leg, dst, buf, l3, now, addrs, neigh)
}

/// The ICMP network unreachable answer to the packet in `buf` (parsed as
/// `key`), from the gateway of the ingress network `from`.
pub fn unreachable(router: &Router, from: usize, key: &FlowKey, buf: &mut PacketBuf) -> Routed {
    let (Some(leg), Some(ip)) = (router.leg_of(from), key.ip()) else {
        return Routed::Drop(DropReason::NoRoute);
    };
    let IpAddr::V4(src) = ip.src else {
        return Routed::Drop(DropReason::NoRoute);
    };
    icmp_error(buf, key, leg, 3, 0, src)
}

/// Replaces `buf` with ICMP port unreachable to the sender, from the
/// ingress network's gateway (a load balancer with no backend).
pub fn port_unreachable(
    router: &Router,
    from: usize,
    key: &FlowKey,
    buf: &mut PacketBuf,
) -> Routed {
    let (Some(leg), Some(ip)) = (router.leg_of(from), key.ip()) else {
        return Routed::Drop(DropReason::LbNoBackend);
    };
    let IpAddr::V4(src) = ip.src else {
        return Routed::Drop(DropReason::LbNoBackend);
    };
    match icmp_error(buf, key, leg, 3, 3, src) {
        Routed::Drop(_) => Routed::Drop(DropReason::LbNoBackend),
        r => r,
    }
}

/// Routes the IPv4 packet in `buf` (IP header at `l3`, TTL already checked
/// to be above 1) into `leg`'s network toward `dst`: owner lookup (or an
/// ARP request when unknown), MACs, TTL - 1.
pub fn forward_to<'a>(
    leg: &Leg,
    dst: Ipv4Addr,
    buf: &mut PacketBuf,
    l3: usize,
    now: Timestamp,
    addrs: impl Fn(usize) -> Option<&'a Addresses>,
    neigh: impl Fn(usize) -> Option<&'a Neighbours>,
) -> Routed {
    let leg = *leg;
    if leg.cidr.prefix_len() < 31 && (dst == leg.cidr.network() || dst == leg.cidr.broadcast()) {
        return Routed::Drop(DropReason::NoRoute);
    }
    let owner = addrs(leg.net)
        .and_then(|a| a.owner(&dst))
        .filter(|o| !o.gateway)
        .map(|o| o.mac)
        .or_else(|| neigh(leg.net).and_then(|n| n.get(&dst, now)));
    let Some(next_hop) = owner else {
        build_arp_request(buf, leg, dst);
        return Routed::Resolve { net: leg.net };
    };
    if !rewrite(buf, l3, leg.gw_mac, next_hop) {
        return Routed::Drop(DropReason::L3Malformed);
    }
    Routed::Forward {
        net: leg.net,
        dst: next_hop,
    }
}

/// MACs, TTL - 1, IPv4 header checksum (RFC 1624 incremental).
pub fn rewrite(buf: &mut PacketBuf, l3: usize, src_mac: MacAddr, dst_mac: MacAddr) -> bool {
    let f = buf.frame_mut();
    if f.len() < l3 + 20 || l3 < 14 {
        return false;
    }
    f[0..6].copy_from_slice(&dst_mac.0);
    f[6..12].copy_from_slice(&src_mac.0);
    let old = u16::from_be_bytes([f[l3 + 8], f[l3 + 9]]);
    f[l3 + 8] = f[l3 + 8].saturating_sub(1);
    let new = u16::from_be_bytes([f[l3 + 8], f[l3 + 9]]);
    let csum = u16::from_be_bytes([f[l3 + 10], f[l3 + 11]]);
    let c = packet::checksum::update16(csum, old, new);
    f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    true
}

/// Replaces `buf` with the echo reply to the echo request in it, from
/// `gw_mac`.
pub fn echo_reply(buf: &mut PacketBuf, key: &FlowKey, gw_mac: MacAddr) -> bool {
    let (L3::Ipv4(ip), Some(l4)) = (key.l3, buf.frame().get(usize::from(key.l4_offset)..)) else {
        return false;
    };
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (ip.src, ip.dst) else {
        return false;
    };
    let total = buf
        .frame()
        .get(usize::from(key.l3_offset) + 2..usize::from(key.l3_offset) + 4)
        .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    let l4_len = total.saturating_sub(usize::from(key.l4_offset - key.l3_offset));
    let Some(icmp) = l4.get(..l4_len) else {
        return false;
    };
    if icmp.len() < 8 {
        return false;
    }
    let id = u16::from_be_bytes([icmp[4], icmp[5]]);
    let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
    let mut out = Vec::with_capacity(42 + icmp.len());
    let ok = etherparse::PacketBuilder::ethernet2(gw_mac.0, key.src_mac.0)
        .ipv4(dst.octets(), src.octets(), REPLY_TTL)
        .icmpv4_echo_reply(id, seq)
        .write(&mut out, &icmp[8..])
        .is_ok();
    if ok && set_frame(buf, &out) {
        // The request's offload (a partial checksum, GSO) is not the reply's.
        buf.offload = packet::Offload::NONE;
        true
    } else {
        false
    }
}

/// Replaces `buf` with an ICMP error (`ty`/`code`) to the sender of the
/// packet in it, from the ingress network's gateway, quoting the packet.
fn icmp_error(
    buf: &mut PacketBuf,
    key: &FlowKey,
    leg: &Leg,
    ty: u8,
    code: u8,
    to: Ipv4Addr,
) -> Routed {
    // Never an error about an ICMP error, a fragment past the first, or to
    // a source that cannot take one (RFC 1122 3.2.2).
    let is_error = matches!(key.l4, L4::Icmpv4 { ty, .. } if matches!(ty, 3 | 4 | 5 | 11 | 12));
    let later = key
        .ip()
        .is_some_and(|i| i.frag == packet::flow::Frag::Later);
    if is_error || later || to.is_unspecified() || to.is_broadcast() || to.is_multicast() {
        return Routed::Drop(if ty == 11 {
            DropReason::TtlExceeded
        } else {
            DropReason::NoRoute
        });
    }
    let l3 = usize::from(key.l3_offset);
    let quote = buf
        .frame()
        .get(l3..)
        .map(|q| &q[..q.len().min(ICMP_QUOTE_MAX)])
        .unwrap_or_default()
        .to_vec();
    let icmp_type = if ty == 11 {
        etherparse::Icmpv4Type::TimeExceeded(
            etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
        )
    } else if code == 3 {
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        )
    } else {
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Network,
        )
    };
    let mut out = Vec::with_capacity(42 + quote.len());
    let ok = etherparse::PacketBuilder::ethernet2(leg.gw_mac.0, key.src_mac.0)
        .ipv4(leg.gw_ip.octets(), to.octets(), REPLY_TTL)
        .icmpv4(icmp_type)
        .write(&mut out, &quote)
        .is_ok();
    if ok && set_frame(buf, &out) {
        buf.offload = packet::Offload::NONE;
        Routed::Reply
    } else {
        Routed::Drop(DropReason::L3Malformed)
    }
}

/// Replaces `buf` with an ARP request for `ip` from `leg`'s gateway.
fn build_arp_request(buf: &mut PacketBuf, leg: Leg, ip: Ipv4Addr) {
    arp_request(buf, leg.gw_mac, leg.gw_ip, ip);
}

/// Replaces `buf` with an ARP request for `ip` from `mac`/`from`.
pub fn arp_request(buf: &mut PacketBuf, mac: MacAddr, from: Ipv4Addr, ip: Ipv4Addr) {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&MacAddr::BROADCAST.0);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&from.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    set_frame(buf, &f);
    buf.offload = packet::Offload::NONE;
}

/// Puts `frame` in `buf`, growing it in the rare case it is too small (the
/// workers' buffers hold 64 KB).
fn set_frame(buf: &mut PacketBuf, frame: &[u8]) -> bool {
    if !buf.replace_frame(frame) {
        *buf = PacketBuf::from_frame(frame);
    }
    true
}

/// If `key` is an ARP reply to `leg`'s gateway (the answer to a request
/// the router sent) from an address inside the network, returns what to
/// learn.
pub fn arp_reply_for_gateway(key: &FlowKey, leg: &Leg) -> Option<(Ipv4Addr, MacAddr)> {
    let L3::Arp(a) = key.l3 else { return None };
    (a.op == 2
        && a.tpa == leg.gw_ip
        && key.dst_mac == leg.gw_mac
        && a.sha == key.src_mac
        && a.sha.is_unicast()
        && leg.cidr.contains(&a.spa)
        && a.spa != leg.gw_ip)
        .then_some((a.spa, a.sha))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    const GW2: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xf2]);
    const D: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xd1]);

    fn legs() -> Router {
        Router::new(vec![
            Leg {
                net: 0,
                cidr: "10.0.0.0/24".parse().unwrap(),
                gw_ip: IP_GW,
                gw_mac: GW,
            },
            Leg {
                net: 1,
                cidr: "10.0.2.0/24".parse().unwrap(),
                gw_ip: Ipv4Addr::new(10, 0, 2, 1),
                gw_mac: GW2,
            },
        ])
    }

    fn to_gw(dst: Ipv4Addr, ttl: u8) -> Vec<u8> {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(A.0, GW.0)
            .ipv4(IP_A.octets(), dst.octets(), ttl)
            .udp(1000, 2000)
            .write(&mut f, &[9u8; 40])
            .unwrap();
        f
    }

    #[test]
    fn routes_between_subnets_with_ttl_and_macs() {
        let mut o1 = Addresses::default();
        let d_ip = Ipv4Addr::new(10, 0, 2, 21);
        o1.fixed.insert(
            d_ip,
            super::super::IpOwner {
                mac: D,
                gateway: false,
            },
        );
        let n = Neighbours::default();
        let f = to_gw(d_ip, 64);
        let o0 = owners();
        let go = |f: &[u8]| {
            let mut buf = PacketBuf::from_frame(f);
            let r = route(
                &legs(),
                0,
                &key(f),
                &mut buf,
                Timestamp::ZERO,
                |i| if i == 0 { Some(&o0) } else { Some(&o1) },
                |_| Some(&n),
            );
            (r, buf)
        };
        let (r, buf) = go(&f);
        assert_eq!(r, Routed::Forward { net: 1, dst: D });
        let out = buf.frame();
        assert_eq!(&out[0..6], &D.0);
        assert_eq!(&out[6..12], &GW2.0);
        assert_eq!(out[14 + 8], 63);
        assert!(packet::checksum::verify(&out[14..34]), "IP header checksum");
        // TTL 1: time exceeded back to the sender, from the gateway.
        let f = to_gw(d_ip, 1);
        let (r, buf) = go(&f);
        assert_eq!(r, Routed::Reply);
        let k = key(buf.frame());
        assert!(
            matches!(
                k.l4,
                L4::Icmpv4 {
                    ty: 11,
                    code: 0,
                    ..
                }
            ),
            "{k:?}"
        );
        assert_eq!(k.dst_mac, A);
        assert_eq!(k.ip().unwrap().src, IpAddr::V4(IP_GW));
        // Outside the tenant: NAT's turn; without NAT, network unreachable.
        let f = to_gw(Ipv4Addr::new(192, 168, 9, 9), 64);
        let (r, mut buf) = go(&f);
        assert_eq!(r, Routed::Outside);
        assert_eq!(buf.frame(), &f[..], "untouched for NAT");
        let r = unreachable(&legs(), 0, &key(&f), &mut buf);
        assert_eq!(r, Routed::Reply);
        assert!(matches!(
            key(buf.frame()).l4,
            L4::Icmpv4 { ty: 3, code: 0, .. }
        ));
        // Unknown owner: an ARP request from the destination's gateway.
        let f = to_gw(Ipv4Addr::new(10, 0, 2, 99), 64);
        let (r, buf) = go(&f);
        assert_eq!(r, Routed::Resolve { net: 1 });
        let k = key(buf.frame());
        let L3::Arp(a) = k.l3 else { panic!("{k:?}") };
        assert_eq!((a.op, a.sha, a.tpa), (1, GW2, Ipv4Addr::new(10, 0, 2, 99)));
        // The answer is learned and used.
        let leg = *legs().leg_of(1).unwrap();
        let reply = arp(D, 2, D, Ipv4Addr::new(10, 0, 2, 99), leg.gw_ip);
        let mut reply = reply;
        reply[0..6].copy_from_slice(&GW2.0);
        let (ip, mac) = arp_reply_for_gateway(&key(&reply), &leg).unwrap();
        n.learn(ip, mac, Timestamp::ZERO);
        let (r, _) = go(&f);
        assert_eq!(r, Routed::Forward { net: 1, dst: D });
    }

    #[test]
    fn echo_to_the_gateway_is_answered() {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(A.0, GW.0)
            .ipv4(IP_A.octets(), IP_GW.octets(), 64)
            .icmpv4_echo_request(7, 9)
            .write(&mut f, b"hello")
            .unwrap();
        let o = owners();
        let n = Neighbours::default();
        let mut buf = PacketBuf::from_frame(&f);
        // A request with a partial checksum pending: the reply has none.
        buf.offload.csum = Some(packet::CsumOffload {
            start: 34,
            offset: 2,
        });
        let r = route(
            &legs(),
            0,
            &key(&f),
            &mut buf,
            Timestamp::ZERO,
            |_| Some(&o),
            |_| Some(&n),
        );
        assert_eq!(r, Routed::Reply);
        assert_eq!(buf.offload, packet::Offload::NONE);
        let k = key(buf.frame());
        assert!(matches!(k.l4, L4::Icmpv4 { ty: 0, .. }));
        assert_eq!(k.ip().unwrap().dst, IpAddr::V4(IP_A));
        assert!(buf.frame().ends_with(b"hello"));
    }

    #[test]
    fn broadcasts_multicasts_and_corrupt_headers_are_not_routed() {
        let o = owners();
        let n = Neighbours::default();
        let go = |f: &[u8]| {
            let mut buf = PacketBuf::from_frame(f);
            route(
                &legs(),
                0,
                &key(f),
                &mut buf,
                Timestamp::ZERO,
                |_| Some(&o),
                |_| Some(&n),
            )
        };
        for dst in [
            [224, 0, 0, 5],
            [255, 255, 255, 255],
            [10, 0, 2, 255],
            [10, 0, 2, 0],
        ] {
            assert_eq!(
                go(&to_gw(Ipv4Addr::from(dst), 64)),
                Routed::Drop(DropReason::NoRoute),
                "{dst:?}"
            );
        }
        let mut f = to_gw(Ipv4Addr::new(10, 0, 2, 21), 64);
        f[14 + 10] ^= 0xff;
        assert_eq!(go(&f), Routed::Drop(DropReason::L3Malformed));
    }

    #[test]
    fn neighbour_cache_is_bounded() {
        let n = Neighbours::default();
        for i in 0..(NEIGHBOURS_MAX as u32 + 100) {
            n.learn(Ipv4Addr::from(0x0a00_0000 + i), A, Timestamp(u64::from(i)));
        }
        assert_eq!(n.len(), NEIGHBOURS_MAX);
        assert_eq!(n.get(&Ipv4Addr::from(0x0a00_0000), Timestamp(0)), None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 14..200)) {
            let mut f = bytes;
            f[0..6].copy_from_slice(&GW.0);
            if let Ok(k) = FlowKey::parse(&f) {
                let o = owners();
                let n = Neighbours::default();
                let mut buf = PacketBuf::from_frame(&f);
                let _ = route(&legs(), 0, &k, &mut buf, Timestamp::ZERO, |_| Some(&o), |_| Some(&n));
            }
        }
    }
}
