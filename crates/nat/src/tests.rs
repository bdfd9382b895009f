//! Unit and property tests. A test-owned clock (`H::now`, ns) drives every
//! timeout; frames are built with etherparse and every translated frame's
//! checksums are recomputed from scratch and compared with the
//! incrementally updated fields.

use std::net::{Ipv4Addr, SocketAddrV4};

use conntrack::{Config, ConnState, Invalid, TcpState};
use etherparse::{
    icmpv4::DestUnreachableHeader, IcmpEchoHeader, Icmpv4Type, IpNumber, Ipv4Options, PacketBuilder,
};
use packet::checksum::{add, checksum, fold, pseudo_header_v4, sum, udp_nonzero};
use packet::FlowKey;
use proptest::prelude::*;

use crate::*;

const NS: u64 = 1_000_000_000;
const T0: u64 = 1_000 * NS;
const Z7: u32 = 7;
const Z8: u32 = 8;
const PORT: u32 = 3;
const UPLINK: u32 = 0;

const VM: [u8; 4] = [10, 0, 1, 11];
const VM2: [u8; 4] = [10, 0, 1, 12];
const SRV: [u8; 4] = [203, 0, 113, 100];
const SRV2: [u8; 4] = [198, 51, 100, 7];
const ROUTER: [u8; 4] = [198, 51, 100, 1];
const E: [u8; 4] = [203, 0, 113, 2];
const FIP: [u8; 4] = [203, 0, 113, 10];

fn ip(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

fn sa(a: [u8; 4], p: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip(a), p)
}

fn snat(zone: u32) -> Snat {
    Snat {
        zone,
        inside: "10.0.1.0/24".parse().unwrap(),
        external: ip(E),
    }
}

fn floating() -> FloatingIp {
    FloatingIp {
        zone: Z7,
        inside: ip(VM),
        external: ip(FIP),
    }
}

fn forward() -> PortForward {
    PortForward {
        zone: Z7,
        proto: Proto::Tcp,
        external: sa(E, 8080),
        inside: sa(VM, 80),
    }
}

/// SNAT for zones 7 and 8 through E.
fn snat_rules() -> Rules {
    Rules {
        snat: vec![snat(Z7), snat(Z8)],
        ..Rules::default()
    }
}

/// SNAT, VM's floating IP, and a TCP forward E:8080 -> VM:80.
fn all_rules() -> Rules {
    Rules {
        snat: vec![snat(Z7), snat(Z8)],
        floating: vec![floating()],
        forwards: vec![forward()],
        ..Rules::default()
    }
}

// ---- frames ------------------------------------------------------------------

/// What a test frame carries.
#[derive(Clone, Copy, Debug)]
enum L {
    Syn(u32),
    SynAck(u32, u32),
    Ack(u32, u32),
    Rst(u32),
    Data(u32, u32, usize),
    Udp(usize),
    EchoReq(u16),
    EchoRep(u16),
}

/// An IP packet (no Ethernet header) from `s`:`sp` to `d`:`dp`.
fn ip_pkt(s: [u8; 4], d: [u8; 4], sp: u16, dp: u16, l: L) -> Vec<u8> {
    let b = PacketBuilder::ipv4(s, d, 64);
    let mut out = Vec::new();
    match l {
        L::Syn(seq) => b.tcp(sp, dp, seq, 64000).syn().write(&mut out, &[]),
        L::SynAck(seq, ack) => b
            .tcp(sp, dp, seq, 64000)
            .syn()
            .ack(ack)
            .write(&mut out, &[]),
        L::Ack(seq, ack) => b.tcp(sp, dp, seq, 64000).ack(ack).write(&mut out, &[]),
        L::Rst(seq) => b.tcp(sp, dp, seq, 0).rst().write(&mut out, &[]),
        L::Data(seq, ack, n) => b
            .tcp(sp, dp, seq, 64000)
            .ack(ack)
            .write(&mut out, &vec![0x5a; n]),
        L::Udp(n) => b.udp(sp, dp).write(&mut out, &vec![0x33; n]),
        L::EchoReq(id) => b
            .icmpv4(Icmpv4Type::EchoRequest(IcmpEchoHeader { id, seq: 9 }))
            .write(&mut out, &[1, 2, 3, 4, 5]),
        L::EchoRep(id) => b
            .icmpv4(Icmpv4Type::EchoReply(IcmpEchoHeader { id, seq: 9 }))
            .write(&mut out, &[1, 2, 3, 4, 5]),
    }
    .unwrap();
    out
}

fn eth(ip_pkt: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    f.extend_from_slice(ip_pkt);
    f
}

fn pkt(s: [u8; 4], d: [u8; 4], sp: u16, dp: u16, l: L) -> Vec<u8> {
    eth(&ip_pkt(s, d, sp, dp, l))
}

/// ICMP destination unreachable (port) from `s` to `d` quoting `q`.
fn unreach(s: [u8; 4], d: [u8; 4], q: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
        .ipv4(s, d, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ))
        .write(&mut out, q)
        .unwrap();
    out
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

/// What a parsed frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    src: SocketAddrV4,
    dst: SocketAddrV4,
}

fn seen(f: &[u8]) -> Seen {
    let k = FlowKey::parse(f).unwrap();
    let (s, d) = match k.l3 {
        L3::Ipv4(ip) => match (ip.src, ip.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (s, d),
            _ => unreachable!(),
        },
        _ => panic!("not IPv4"),
    };
    let (sp, dp) = match k.l4 {
        L4::Tcp {
            src_port, dst_port, ..
        }
        | L4::Udp { src_port, dst_port } => (src_port, dst_port),
        L4::Icmpv4 { ident, .. } => (ident, 0),
        _ => (0, 0),
    };
    Seen {
        src: SocketAddrV4::new(s, sp),
        dst: SocketAddrV4::new(d, dp),
    }
}

/// Recomputes, from scratch, the IPv4 header checksum and the L4 checksum
/// of the IP packet at `ip` and compares them with the fields; recurses
/// into the quote of an ICMP error (inner header always; inner L4 when the
/// quote holds the whole inner packet).
fn verify_ip(p: &[u8], what: &str) {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let mut h = p[..ihl].to_vec();
    let field = be16(&h, 10);
    h[10] = 0;
    h[11] = 0;
    assert_eq!(field, checksum(&h), "{what}: IPv4 header checksum");
    let total = usize::from(be16(p, 2));
    if total > p.len() {
        return; // a truncated quote: its L4 checksum covers bytes not here
    }
    let l4 = &p[ihl..total];
    let (src, dst) = (
        Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        Ipv4Addr::new(p[16], p[17], p[18], p[19]),
    );
    let mut c = l4.to_vec();
    match p[9] {
        6 => {
            let field = be16(&c, 16);
            c[16] = 0;
            c[17] = 0;
            let ps = pseudo_header_v4(src, dst, 6, c.len() as u16);
            assert_eq!(field, !fold(add(ps, sum(&c))), "{what}: TCP checksum");
        }
        17 => {
            let field = be16(&c, 6);
            if field != 0 {
                c[6] = 0;
                c[7] = 0;
                let ps = pseudo_header_v4(src, dst, 17, c.len() as u16);
                assert_eq!(
                    field,
                    udp_nonzero(!fold(add(ps, sum(&c)))),
                    "{what}: UDP checksum"
                );
            }
        }
        1 => {
            let field = be16(&c, 2);
            c[2] = 0;
            c[3] = 0;
            assert_eq!(field, checksum(&c), "{what}: ICMP checksum");
            if packet::view::is_icmpv4_error(c[0]) && c.len() >= 28 {
                verify_ip(&c[8..], "quoted packet");
            }
        }
        _ => {}
    }
}

fn verify(f: &[u8]) {
    let k = FlowKey::parse(f).unwrap();
    verify_ip(&f[usize::from(k.l3_offset)..], "frame");
    // etherparse agrees the frame is well formed.
    etherparse::SlicedPacket::from_ethernet(f).unwrap();
}

// ---- harness -------------------------------------------------------------------

struct H {
    nat: Nat,
    now: u64,
}

impl H {
    fn new(rules: Rules) -> H {
        H::with(Config::default(), rules)
    }

    fn with(cfg: Config, rules: Rules) -> H {
        H {
            nat: Nat::new(cfg, rules).unwrap(),
            now: T0,
        }
    }

    /// Translates `f` (in place) from `zone`.
    fn go(&mut self, zone: u32, f: &mut [u8]) -> Outcome {
        let k = FlowKey::parse(f).unwrap();
        let len = f.len();
        let o = self.nat.translate(zone, PORT, &k, f, false, self.now);
        assert_eq!(f.len(), len);
        self.check_pools();
        o
    }

    /// Translates and expects a forward to `zone`; checks the checksums
    /// and returns what the packet now says.
    fn fwd(&mut self, from: u32, f: &mut [u8], zone: u32) -> Seen {
        match self.go(from, f) {
            Outcome::Forward { zone: z, dst, .. } => {
                assert_eq!(z, zone, "target zone");
                assert_eq!(*seen(f).dst.ip(), dst, "Outcome dst is the new destination");
            }
            o => panic!("expected Forward to zone {zone}, got {o:?}"),
        }
        verify(f);
        seen(f)
    }

    /// The pools' used counts agree with the mappings.
    fn check_pools(&self) {
        let maps = self.nat.mappings();
        for p in self.nat.pools() {
            let n = maps
                .iter()
                .filter(|m| *m.external.ip() == p.external && m.proto == p.proto)
                .count() as u32;
            assert_eq!(p.used, n, "pool {p:?} vs mappings");
        }
        let conns: u32 = maps.iter().map(|m| m.connections).sum();
        let holding = self
            .nat
            .conntrack()
            .all_keys()
            .filter(|(_, o, r, m)| eim_of(o, r, m.kind).is_some())
            .count() as u32;
        assert_eq!(conns, holding, "mapping refcounts vs entries holding one");
    }

    fn used(&self, ext: [u8; 4], proto: u8) -> u32 {
        self.nat
            .pools()
            .iter()
            .find(|p| p.external == ip(ext) && p.proto == proto)
            .map_or(0, |p| p.used)
    }
}

// ---- SNAT ------------------------------------------------------------------------

#[test]
fn snat_tcp_handshake() {
    let mut h = H::new(snat_rules());
    let mut syn = pkt(VM, SRV, 40000, 80, L::Syn(100));
    let s = h.fwd(Z7, &mut syn, EXTERNAL_ZONE);
    assert_eq!(s.src, sa(E, 40000), "source rewritten, port preserved");
    assert_eq!(s.dst, sa(SRV, 80));
    assert_eq!(h.nat.stats().snat_new, 1);

    let mut sa_ = pkt(SRV, E, 80, 40000, L::SynAck(500, 101));
    let s = h.fwd(EXTERNAL_ZONE, &mut sa_, Z7);
    assert_eq!(s.src, sa(SRV, 80));
    assert_eq!(s.dst, sa(VM, 40000));

    let mut ack = pkt(VM, SRV, 40000, 80, L::Ack(101, 501));
    assert_eq!(h.fwd(Z7, &mut ack, EXTERNAL_ZONE).src, sa(E, 40000));
    let mut data = pkt(SRV, E, 80, 40000, L::Data(501, 101, 1000));
    assert_eq!(h.fwd(EXTERNAL_ZONE, &mut data, Z7).dst, sa(VM, 40000));

    let e = h.nat.conntrack().entries(h.now).next().unwrap();
    assert_eq!(e.state, ConnState::Tcp(TcpState::Established));
    assert_eq!(e.ext.kind, MappingKind::Snat);
    assert_eq!(e.orig.zone, Z7);
    assert_eq!(e.reply.zone, EXTERNAL_ZONE);
    assert_eq!(h.nat.stats().translated, 4);
    assert_eq!(
        h.nat.mappings(),
        vec![MappingView {
            zone: Z7,
            proto: 6,
            inside: sa(VM, 40000),
            external: sa(E, 40000),
            connections: 1,
        }]
    );
}

#[test]
fn endpoint_independent_mapping() {
    let mut h = H::new(snat_rules());
    let a = h.fwd(Z7, &mut pkt(VM, SRV, 5000, 53, L::Udp(10)), EXTERNAL_ZONE);
    let b = h.fwd(Z7, &mut pkt(VM, SRV2, 5000, 53, L::Udp(10)), EXTERNAL_ZONE);
    assert_eq!(a.src, sa(E, 5000));
    assert_eq!(b.src, a.src, "same inside endpoint, same external port");
    // Another inside host with the same source port.
    let c = h.fwd(Z7, &mut pkt(VM2, SRV, 5000, 53, L::Udp(10)), EXTERNAL_ZONE);
    assert_eq!(*c.src.ip(), ip(E));
    assert_ne!(c.src.port(), 5000);
    assert!((1024..=65535).contains(&c.src.port()));
    let m = h.nat.mappings();
    assert_eq!(m.len(), 2);
    assert_eq!(m[0].connections, 2);
    // Replies from both destinations reach the first host.
    let r = h.fwd(EXTERNAL_ZONE, &mut pkt(SRV2, E, 53, 5000, L::Udp(4)), Z7);
    assert_eq!(r.dst, sa(VM, 5000));
    let r = h.fwd(
        EXTERNAL_ZONE,
        &mut pkt(SRV, E, 53, c.src.port(), L::Udp(4)),
        Z7,
    );
    assert_eq!(r.dst, sa(VM2, 5000));
}

#[test]
fn two_tenants_same_private_address() {
    let mut h = H::new(snat_rules());
    let a = h.fwd(Z7, &mut pkt(VM, SRV, 40000, 80, L::Syn(1)), EXTERNAL_ZONE);
    let b = h.fwd(Z8, &mut pkt(VM, SRV, 40000, 80, L::Syn(7)), EXTERNAL_ZONE);
    assert_eq!(a.src, sa(E, 40000));
    assert_eq!(*b.src.ip(), ip(E));
    assert_ne!(b.src.port(), a.src.port());
    let r = h.fwd(
        EXTERNAL_ZONE,
        &mut pkt(SRV, E, 80, b.src.port(), L::SynAck(900, 8)),
        Z8,
    );
    assert_eq!(r.dst, sa(VM, 40000));
    let r = h.fwd(
        EXTERNAL_ZONE,
        &mut pkt(SRV, E, 80, 40000, L::SynAck(900, 2)),
        Z7,
    );
    assert_eq!(r.dst, sa(VM, 40000));
}

#[test]
fn port_allocation_exhaustion_and_release() {
    let mut rules = snat_rules();
    rules.ports = (40000, 40003);
    let mut h = H::new(rules);
    let mut got = Vec::new();
    for sp in [40001, 1, 2, 3] {
        let s = h.fwd(Z7, &mut pkt(VM, SRV, sp, 53, L::Udp(8)), EXTERNAL_ZONE);
        got.push(s.src.port());
    }
    assert_eq!(got[0], 40001, "preserved");
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, vec![40000, 40001, 40002, 40003]);
    assert_eq!(h.used(E, 17), 4);

    let mut f5 = pkt(VM, SRV, 4, 53, L::Udp(8));
    let before = f5.clone();
    assert_eq!(h.go(Z7, &mut f5), Outcome::Drop(NatDrop::PortsExhausted));
    assert_eq!(f5, before, "a dropped packet is not rewritten");
    assert_eq!(h.nat.stats().ports_exhausted, 1);
    assert_eq!(h.nat.conntrack().len(), 4, "nothing committed");
    // The first four still translate.
    for (i, sp) in [40001, 1, 2, 3].into_iter().enumerate() {
        let s = h.fwd(Z7, &mut pkt(VM, SRV, sp, 53, L::Udp(8)), EXTERNAL_ZONE);
        assert_eq!(s.src.port(), got[i]);
    }
    // TCP has its own pool.
    h.fwd(Z7, &mut pkt(VM, SRV, 9, 80, L::Syn(1)), EXTERNAL_ZONE);

    // Past the UDP timeout, expire() releases them.
    h.now += 121 * NS;
    assert_eq!(h.nat.expire(h.now, 100), 4);
    assert_eq!(h.used(E, 17), 0);
    assert_eq!(h.nat.stats().mappings_released, 4);
    let s = h.fwd(Z7, &mut pkt(VM, SRV, 4, 53, L::Udp(8)), EXTERNAL_ZONE);
    assert!((40000..=40003).contains(&s.src.port()));
    assert_eq!(h.used(E, 17), 1);
}

#[test]
fn ports_released_on_every_removal_path() {
    let mut rules = snat_rules();
    rules.ports = (40000, 40001);
    let mut h = H::new(rules);

    // An expired entry met by a lookup (no expire() call).
    h.fwd(Z7, &mut pkt(VM, SRV, 1, 53, L::Udp(8)), EXTERNAL_ZONE);
    h.fwd(Z7, &mut pkt(VM, SRV, 2, 53, L::Udp(8)), EXTERNAL_ZONE);
    assert_eq!(h.used(E, 17), 2);
    h.now += 121 * NS;
    let s = h.fwd(Z7, &mut pkt(VM, SRV, 1, 53, L::Udp(8)), EXTERNAL_ZONE);
    assert!((40000..=40001).contains(&s.src.port()));
    assert_eq!(h.nat.conntrack().entries(h.now).count(), 1);

    // A TCP connection closed by RST and reopened by a SYN from the same
    // endpoint: the old entry goes, its port with it, and the new one gets
    // a port again.
    let mut h = H::new({
        let mut r = snat_rules();
        r.ports = (40000, 40000);
        r
    });
    let s = h.fwd(Z7, &mut pkt(VM, SRV, 40000, 80, L::Syn(100)), EXTERNAL_ZONE);
    h.fwd(
        EXTERNAL_ZONE,
        &mut pkt(SRV, E, 80, 40000, L::SynAck(500, 101)),
        Z7,
    );
    h.fwd(EXTERNAL_ZONE, &mut pkt(SRV, E, 80, 40000, L::Rst(501)), Z7);
    assert_eq!(
        h.nat.conntrack().entries(h.now).next().unwrap().state,
        ConnState::Tcp(TcpState::Close)
    );
    // The only port is taken: another host cannot get one.
    assert_eq!(
        h.go(Z7, &mut pkt(VM2, SRV, 7, 80, L::Syn(1))),
        Outcome::Drop(NatDrop::PortsExhausted)
    );
    let again = h.fwd(
        Z7,
        &mut pkt(VM, SRV, 40000, 80, L::Syn(9000)),
        EXTERNAL_ZONE,
    );
    assert_eq!(again.src, s.src);
    assert_eq!(h.nat.conntrack().len(), 1);
    assert_eq!(h.nat.mappings()[0].connections, 1);
    assert_eq!(h.nat.stats().mappings_released, 1);

    // flush_zone and flush_port release too.
    assert_eq!(h.nat.flush_zone(Z7), 1);
    assert_eq!(h.used(E, 6), 0);
    h.fwd(Z7, &mut pkt(VM2, SRV, 7, 80, L::Syn(1)), EXTERNAL_ZONE);
    assert_eq!(h.nat.flush_port(PORT), 1);
    assert!(h.nat.mappings().is_empty());
}

#[test]
fn reaping_on_a_cap_releases_ports() {
    let cfg = Config {
        max_entries: 2,
        ..Config::default()
    };
    let mut rules = snat_rules();
    rules.ports = (40000, 40001);
    let mut h = H::with(cfg, rules);
    h.fwd(Z7, &mut pkt(VM, SRV, 1, 53, L::Udp(8)), EXTERNAL_ZONE);
    h.fwd(Z7, &mut pkt(VM, SRV, 2, 53, L::Udp(8)), EXTERNAL_ZONE);
    assert_eq!(
        h.go(Z7, &mut pkt(VM, SRV, 3, 53, L::Udp(8))),
        Outcome::Drop(NatDrop::Limit(conntrack::Limit::Global))
    );
    assert_eq!(h.nat.stats().refused, 1);
    h.now += 121 * NS;
    // The cap reaps the expired entries (queued, drained, released).
    h.fwd(Z7, &mut pkt(VM, SRV, 3, 53, L::Udp(8)), EXTERNAL_ZONE);
    assert_eq!(h.used(E, 17), 1);
}

// ---- port forwards and floating IPs ------------------------------------------------

#[test]
fn port_forward() {
    let mut rules = all_rules();
    rules.floating.clear();
    rules.ports = (8080, 8081);
    let mut h = H::new(rules);
    let s = h.fwd(EXTERNAL_ZONE, &mut pkt(SRV, E, 33000, 8080, L::Syn(10)), Z7);
    assert_eq!(s.src, sa(SRV, 33000));
    assert_eq!(s.dst, sa(VM, 80));
    assert_eq!(h.nat.stats().forward_new, 1);
    let r = h.fwd(
        Z7,
        &mut pkt(VM, SRV, 80, 33000, L::SynAck(70, 11)),
        EXTERNAL_ZONE,
    );
    assert_eq!(r.src, sa(E, 8080));
    assert_eq!(r.dst, sa(SRV, 33000));
    // Forwards do not take UDP or other ports.
    assert_eq!(
        h.go(EXTERNAL_ZONE, &mut pkt(SRV, E, 33000, 8080, L::Udp(3))),
        Outcome::NoMatch
    );
    assert_eq!(
        h.go(EXTERNAL_ZONE, &mut pkt(SRV, E, 33000, 8081, L::Syn(3))),
        Outcome::NoMatch
    );
    // SNAT never hands out the forwarded port, even to a source port 8080.
    let s = h.fwd(Z7, &mut pkt(VM2, SRV, 8080, 443, L::Syn(1)), EXTERNAL_ZONE);
    assert_eq!(s.src, sa(E, 8081));
    assert_eq!(
        h.go(Z7, &mut pkt(VM2, SRV, 8081, 443, L::Syn(1))),
        Outcome::Drop(NatDrop::PortsExhausted)
    );
    let pool = h
        .nat
        .pools()
        .into_iter()
        .find(|p| p.external == ip(E) && p.proto == 6)
        .unwrap();
    assert_eq!(
        (pool.ports, pool.used, pool.reserved, pool.free),
        (2, 1, 1, 0)
    );
}

#[test]
fn floating_ip_inbound_any_protocol_and_outbound() {
    let mut h = H::new(all_rules());
    let s = h.fwd(EXTERNAL_ZONE, &mut pkt(SRV, FIP, 33000, 22, L::Syn(10)), Z7);
    assert_eq!((s.src, s.dst), (sa(SRV, 33000), sa(VM, 22)));
    let s = h.fwd(
        EXTERNAL_ZONE,
        &mut pkt(SRV, FIP, 5353, 5353, L::Udp(20)),
        Z7,
    );
    assert_eq!(s.dst, sa(VM, 5353));
    let s = h.fwd(EXTERNAL_ZONE, &mut pkt(SRV, FIP, 77, 0, L::EchoReq(77)), Z7);
    assert_eq!(s.dst, sa(VM, 0));
    assert_eq!(s.src, sa(SRV, 77), "identifier unchanged inbound");
    let r = h.fwd(Z7, &mut pkt(VM, SRV, 77, 0, L::EchoRep(77)), EXTERNAL_ZONE);
    assert_eq!(*r.src.ip(), ip(FIP));
    let r = h.fwd(
        Z7,
        &mut pkt(VM, SRV, 22, 33000, L::SynAck(1, 11)),
        EXTERNAL_ZONE,
    );
    assert_eq!(r.src, sa(FIP, 22));
    assert_eq!(h.nat.stats().floating_in_new, 3);

    // Outbound from the VM leaves with its floating IP, port kept (even
    // below the SNAT range: the address is the VM's alone).
    let o = h.fwd(Z7, &mut pkt(VM, SRV2, 123, 123, L::Udp(48)), EXTERNAL_ZONE);
    assert_eq!(o.src, sa(FIP, 123));
    let o = h.fwd(Z7, &mut pkt(VM, SRV2, 40000, 443, L::Syn(5)), EXTERNAL_ZONE);
    assert_eq!(o.src, sa(FIP, 40000));
    assert_eq!(h.nat.stats().floating_out_new, 2);
    // Other VMs still use the SNAT address.
    let o = h.fwd(
        Z7,
        &mut pkt(VM2, SRV2, 40000, 443, L::Syn(5)),
        EXTERNAL_ZONE,
    );
    assert_eq!(o.src, sa(E, 40000));
    // Inbound to the SNAT address without a forward is not ours.
    assert_eq!(
        h.go(EXTERNAL_ZONE, &mut pkt(SRV, E, 1, 22, L::Syn(1))),
        Outcome::NoMatch
    );
}

#[test]
fn other_protocols_by_address() {
    let mut h = H::new(all_rules());
    let gre = |s: [u8; 4], d: [u8; 4]| {
        let mut out = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
            .ipv4(s, d, 64)
            .write(&mut out, IpNumber(47), &[0; 12])
            .unwrap();
        out
    };
    let s = h.fwd(Z7, &mut gre(VM2, SRV), EXTERNAL_ZONE);
    assert_eq!(*s.src.ip(), ip(E));
    // A second inside host to the same destination would share the tuple.
    assert_eq!(
        h.go(Z7, &mut gre([10, 0, 1, 13], SRV)),
        Outcome::Drop(NatDrop::PortsExhausted)
    );
    assert_eq!(h.nat.stats().tuple_taken, 1);
    let r = h.fwd(EXTERNAL_ZONE, &mut gre(SRV, E), Z7);
    assert_eq!(*r.dst.ip(), ip(VM2));
    // Inbound to a floating IP.
    let r = h.fwd(EXTERNAL_ZONE, &mut gre(SRV2, FIP), Z7);
    assert_eq!(*r.dst.ip(), ip(VM));
}

// ---- hairpin ----------------------------------------------------------------------------

#[test]
fn hairpin_to_own_floating_ip() {
    let mut h = H::new(all_rules());
    let mut f = pkt(VM, FIP, 40000, 80, L::Syn(100));
    let o = h.go(Z7, &mut f);
    assert_eq!(
        o,
        Outcome::Forward {
            zone: Z7,
            dst: ip(VM),
            hairpin: true
        }
    );
    verify(&f);
    let s = seen(&f);
    assert_eq!(*s.src.ip(), ip(FIP), "from its own floating IP");
    assert_eq!(s.dst, sa(VM, 80));
    let p = s.src.port();
    assert_eq!(h.nat.stats().hairpin, 1);
    assert_eq!(h.nat.stats().translated, 1, "one packet");

    // The VM (as server) answers; it comes back to the client socket.
    let mut r = pkt(VM, FIP, 80, p, L::SynAck(700, 101));
    assert_eq!(
        h.go(Z7, &mut r),
        Outcome::Forward {
            zone: Z7,
            dst: ip(VM),
            hairpin: true
        }
    );
    verify(&r);
    assert_eq!(seen(&r).src, sa(FIP, 80));
    assert_eq!(seen(&r).dst, sa(VM, 40000));
    let mut a = pkt(VM, FIP, 40000, 80, L::Ack(101, 701));
    h.go(Z7, &mut a);
    verify(&a);
    assert_eq!(seen(&a).src, sa(FIP, p));
    assert_eq!(h.nat.conntrack().len(), 2);
    assert!(h
        .nat
        .conntrack()
        .entries(h.now)
        .all(|e| e.state == ConnState::Tcp(TcpState::Established)));
}

/// Found by the `nat_translate` fuzz target: a hairpin whose second pass
/// is refused (here by the per-port cap) came back rewritten, and its first
/// pass's connection stayed, holding a port.
#[test]
fn hairpin_dropped_in_its_second_pass_leaves_nothing_behind() {
    let cfg = Config {
        max_entries: 64,
        max_per_port: 2,
        ..Config::default()
    };
    let mut h = H::with(cfg, all_rules());
    // One connection of the port already: the first pass takes the second
    // slot, the hairpin pass finds none.
    let mut f = pkt(VM2, SRV, 5000, 53, L::Udp(8));
    h.fwd(Z7, &mut f, EXTERNAL_ZONE);
    assert_eq!(h.nat.conntrack().len(), 1);
    let orig = pkt(VM2, FIP, 6000, 80, L::Udp(8));
    let mut f = orig.clone();
    let o = h.go(Z7, &mut f);
    assert!(matches!(o, Outcome::Drop(NatDrop::Limit(_))), "{o:?}");
    assert_eq!(f, orig, "the frame as the VM sent it");
    assert_eq!(h.nat.conntrack().len(), 1, "no half connection");
    assert_eq!(h.used(E, 17), 1, "its port released");
    h.check_pools();
}

#[test]
fn hairpin_degenerate_port_is_skipped() {
    // Source port 80 to FIP:80 from the VM itself: keeping port 80 would
    // give a reply key equal to its own reverse.
    let mut h = H::new(all_rules());
    let mut f = pkt(VM, FIP, 80, 80, L::Udp(4));
    assert!(matches!(
        h.go(Z7, &mut f),
        Outcome::Forward { hairpin: true, .. }
    ));
    let s = seen(&f);
    assert_eq!(*s.src.ip(), ip(FIP));
    assert_ne!(s.src.port(), 80);
    verify(&f);
}

#[test]
fn hairpin_to_another_vms_port_forward() {
    let mut h = H::new(all_rules());
    let mut f = pkt(VM2, E, 41000, 8080, L::Syn(5));
    assert_eq!(
        h.go(Z7, &mut f),
        Outcome::Forward {
            zone: Z7,
            dst: ip(VM),
            hairpin: true
        }
    );
    verify(&f);
    let s = seen(&f);
    assert_eq!(s.src, sa(E, 41000), "source is the SNAT address");
    assert_eq!(s.dst, sa(VM, 80));
    let mut r = pkt(VM, E, 80, 41000, L::SynAck(9, 6));
    assert!(matches!(
        h.go(Z7, &mut r),
        Outcome::Forward {
            hairpin: true,
            zone: Z7,
            ..
        }
    ));
    verify(&r);
    assert_eq!(seen(&r).src, sa(E, 8080));
    assert_eq!(seen(&r).dst, sa(VM2, 41000));
}

#[test]
fn hairpin_across_tenants_and_nothing_behind() {
    let mut h = H::new(all_rules());
    // A VM of zone 8 reaches zone 7's floating IP.
    let mut f = pkt(VM, FIP, 5000, 53, L::Udp(10));
    let o = h.go(Z8, &mut f);
    assert_eq!(
        o,
        Outcome::Forward {
            zone: Z7,
            dst: ip(VM),
            hairpin: true
        }
    );
    verify(&f);
    assert_eq!(seen(&f).src, sa(E, 5000));
    // To the SNAT address where nothing listens: it leaves as SNATed.
    let mut g = pkt(VM2, E, 5000, 9999, L::Udp(10));
    assert_eq!(
        h.go(Z7, &mut g),
        Outcome::Forward {
            zone: EXTERNAL_ZONE,
            dst: ip(E),
            hairpin: false
        }
    );
    // Our own addresses as source from the uplink are spoofed.
    assert_eq!(
        h.go(EXTERNAL_ZONE, &mut pkt(FIP, FIP, 80, 5000, L::Udp(1))),
        Outcome::NoMatch
    );
}

// ---- ICMP ------------------------------------------------------------------------------------

#[test]
fn icmp_echo_identifier_mapping() {
    let mut h = H::new(snat_rules());
    let a = h.fwd(Z7, &mut pkt(VM, SRV, 0, 0, L::EchoReq(4321)), EXTERNAL_ZONE);
    assert_eq!(a.src, sa(E, 4321), "identifier preserved");
    let b = h.fwd(Z8, &mut pkt(VM, SRV, 0, 0, L::EchoReq(4321)), EXTERNAL_ZONE);
    assert_ne!(b.src.port(), 4321, "same identifier from another tenant");
    let r = h.fwd(
        EXTERNAL_ZONE,
        &mut pkt(SRV, E, b.src.port(), 0, L::EchoRep(b.src.port())),
        Z8,
    );
    // seen() shows the identifier as the source "port".
    assert_eq!(
        (*r.dst.ip(), r.src.port()),
        (ip(VM), 4321),
        "identifier restored"
    );
    let r = h.fwd(EXTERNAL_ZONE, &mut pkt(SRV, E, 0, 0, L::EchoRep(4321)), Z7);
    assert_eq!((*r.dst.ip(), r.src.port()), (ip(VM), 4321));
    assert_eq!(h.used(E, 1), 2);
    // An echo reply nobody asked for, to our address: invalid, dropped.
    assert_eq!(
        h.go(EXTERNAL_ZONE, &mut pkt(SRV, E, 0, 0, L::EchoRep(999))),
        Outcome::Drop(NatDrop::Invalid(Invalid::IcmpReplyNoRequest))
    );
    // Identifier 0 is outside the range: mapped into it.
    let z = h.fwd(Z7, &mut pkt(VM2, SRV, 0, 0, L::EchoReq(0)), EXTERNAL_ZONE);
    assert!(z.src.port() >= 1024);
}

/// A whole inside packet translated out, and the error quoting it as it
/// left.
fn icmp_error_case(h: &mut H, out: Vec<u8>, from_router: bool) {
    let mut f = out.clone();
    h.fwd(Z7, &mut f, EXTERNAL_ZONE);
    let src = if from_router {
        ROUTER
    } else {
        seen(&f).dst.ip().octets()
    };
    let mut err = unreach(src, E, &f[14..]);
    let before = h.nat.stats().icmp_errors;
    let s = h.fwd(EXTERNAL_ZONE, &mut err, Z7);
    assert_eq!(h.nat.stats().icmp_errors, before + 1);
    assert_eq!(*s.dst.ip(), ip(VM), "outer destination is the VM");
    assert_eq!(s.src.ip().octets(), src, "outer source unchanged");
    // The quote reads as the packet the VM sent.
    let quote = &err[14 + 20 + 8..];
    assert_eq!(quote, &out[14..], "quote restored byte for byte");
}

#[test]
fn icmp_errors_translated_back() {
    let mut h = H::new(snat_rules());
    // UDP to a closed port, from the server and from a router.
    icmp_error_case(&mut h, pkt(VM, SRV, 33000, 33434, L::Udp(20)), false);
    icmp_error_case(&mut h, pkt(VM, SRV, 33001, 33434, L::Udp(20)), true);
    // TCP, with a port that is not preserved (VM2 after VM took it).
    h.fwd(Z7, &mut pkt(VM2, SRV, 40000, 80, L::Syn(1)), EXTERNAL_ZONE);
    icmp_error_case(&mut h, pkt(VM, SRV, 40000, 80, L::Syn(100)), true);
    // An echo request whose identifier was mapped.
    h.fwd(Z7, &mut pkt(VM2, SRV, 0, 0, L::EchoReq(7)), EXTERNAL_ZONE);
    icmp_error_case(&mut h, pkt(VM, SRV, 0, 0, L::EchoReq(7)), false);
    // UDP without checksum stays without.
    let mut nocs = pkt(VM, SRV2, 33002, 53, L::Udp(4));
    nocs[14 + 20 + 6] = 0;
    nocs[14 + 20 + 7] = 0;
    icmp_error_case(&mut h, nocs, true);

    // A truncated quote (RFC 792: header + 8 bytes): addresses and ports
    // restored, inner header checksum valid.
    let mut f = pkt(VM, SRV, 33003, 9, L::Udp(200));
    h.fwd(Z7, &mut f, EXTERNAL_ZONE);
    let mut err = unreach(ROUTER, E, &f[14..14 + 28]);
    h.fwd(EXTERNAL_ZONE, &mut err, Z7);
    let q = &err[14 + 28..];
    assert_eq!(&q[12..20], &[10, 0, 1, 11, 203, 0, 113, 100]);
    assert_eq!(be16(q, 20), 33003);

    // An error about nothing, to our address: invalid.
    let mut stray = unreach(ROUTER, E, &ip_pkt(E, SRV, 1, 2, L::Udp(4)));
    assert_eq!(
        h.go(EXTERNAL_ZONE, &mut stray),
        Outcome::Drop(NatDrop::Invalid(Invalid::IcmpErrorNoMatch))
    );
}

#[test]
fn icmp_error_from_inside_endpoint_gets_external_source() {
    let mut h = H::new(all_rules());
    // Inbound UDP through the floating IP; the VM answers port unreachable.
    let mut f = pkt(SRV, FIP, 5000, 9, L::Udp(16));
    h.fwd(EXTERNAL_ZONE, &mut f, Z7);
    let mut err = unreach(VM, SRV, &f[14..]);
    let s = h.fwd(Z7, &mut err, EXTERNAL_ZONE);
    assert_eq!(*s.src.ip(), ip(FIP), "the VM's address does not leak");
    assert_eq!(*s.dst.ip(), ip(SRV));
    let orig = pkt(SRV, FIP, 5000, 9, L::Udp(16));
    assert_eq!(&err[14 + 28..], &orig[14..]);

    // Through a hairpin: zone 8 sends to the floating IP, the VM refuses.
    let mut f = pkt(VM, FIP, 6000, 9, L::Udp(16));
    let sent = f.clone();
    assert!(matches!(
        h.go(Z8, &mut f),
        Outcome::Forward { hairpin: true, .. }
    ));
    let mut err = unreach(VM, seen(&f).src.ip().octets(), &f[14..]);
    let o = h.go(Z7, &mut err);
    assert_eq!(
        o,
        Outcome::Forward {
            zone: Z8,
            dst: ip(VM),
            hairpin: true
        }
    );
    verify(&err);
    assert_eq!(
        &err[14 + 28..],
        &sent[14..],
        "zone 8's VM sees its own packet"
    );
    assert_eq!(*seen(&err).src.ip(), ip(FIP));
}

// ---- checksums and offload ------------------------------------------------------------

#[test]
fn tso_super_frame_with_partial_checksum() {
    let mut h = H::new(snat_rules());
    h.fwd(Z7, &mut pkt(VM, SRV, 40000, 80, L::Syn(100)), EXTERNAL_ZONE);
    h.fwd(
        EXTERNAL_ZONE,
        &mut pkt(SRV, E, 80, 40000, L::SynAck(500, 101)),
        Z7,
    );
    let payload = 60_000;
    let mut f = pkt(VM, SRV, 40000, 80, L::Data(101, 501, payload));
    let l4_len = (20 + payload) as u16;
    assert_eq!(be16(&f, 14 + 2), 20 + 20 + payload as u16);
    // What a VM's stack hands over: the pseudo-header sum, not complemented.
    let partial = fold(pseudo_header_v4(ip(VM), ip(SRV), 6, l4_len));
    f[14 + 20 + 16..14 + 20 + 18].copy_from_slice(&partial.to_be_bytes());
    let payload_before = f[14 + 40..].to_vec();
    let k = FlowKey::parse(&f).unwrap();
    let len = f.len();
    let o = h.nat.translate(Z7, PORT, &k, &mut f, true, h.now);
    assert!(matches!(
        o,
        Outcome::Forward {
            zone: EXTERNAL_ZONE,
            ..
        }
    ));
    assert_eq!(f.len(), len);
    assert_eq!(&f[14 + 40..], &payload_before[..], "payload untouched");
    // The field is the new pseudo-header sum...
    assert_eq!(
        be16(&f, 14 + 36),
        fold(pseudo_header_v4(ip(E), ip(SRV), 6, l4_len))
    );
    // ...so offload completes it to the right checksum.
    let l4 = f[14 + 20..].to_vec();
    let completed = !fold(sum(&l4));
    let mut z = l4.clone();
    z[16] = 0;
    z[17] = 0;
    let scratch = !fold(add(pseudo_header_v4(ip(E), ip(SRV), 6, l4_len), sum(&z)));
    assert_eq!(completed, scratch);
    // The IPv4 header checksum is complete as always.
    let mut hd = f[14..34].to_vec();
    let c = be16(&hd, 10);
    hd[10] = 0;
    hd[11] = 0;
    assert_eq!(c, checksum(&hd));

    // The same connection's reply direction with a partial UDP-style field
    // is covered by the UDP case: a partial UDP checksum is updated too.
    let mut u = pkt(VM, SRV, 7000, 53, L::Udp(1000));
    let p = fold(pseudo_header_v4(ip(VM), ip(SRV), 17, 1008));
    u[14 + 26..14 + 28].copy_from_slice(&p.to_be_bytes());
    let k = FlowKey::parse(&u).unwrap();
    h.nat.translate(Z7, PORT, &k, &mut u, true, h.now);
    assert_eq!(
        be16(&u, 14 + 26),
        fold(pseudo_header_v4(ip(E), ip(SRV), 17, 1008))
    );
}

#[test]
fn vlan_tagged_frames_are_translated_at_their_offsets() {
    let mut h = H::new(snat_rules());
    let mut f = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
        .single_vlan(etherparse::VlanId::try_new(42).unwrap())
        .ipv4(VM, SRV, 64)
        .udp(5000, 53)
        .write(&mut f, &[9; 30])
        .unwrap();
    let s = h.fwd(Z7, &mut f, EXTERNAL_ZONE);
    assert_eq!(s.src, sa(E, 5000));
    assert_eq!(&f[12..16], &[0x81, 0x00, 0, 42], "tag untouched");
}

// ---- what is not NAT's ---------------------------------------------------------------------

#[test]
fn not_nats_packets_and_malformed_ones() {
    let mut h = H::new(all_rules());
    // IPv6.
    let mut v6 = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .udp(1, 2)
        .write(&mut v6, &[0; 4])
        .unwrap();
    assert_eq!(h.go(Z7, &mut v6), Outcome::NoMatch);
    // No rule for the source / not our address.
    assert_eq!(
        h.go(Z7, &mut pkt([10, 9, 9, 9], SRV, 1, 2, L::Udp(1))),
        Outcome::NoMatch
    );
    assert_eq!(
        h.go(EXTERNAL_ZONE, &mut pkt(SRV, SRV2, 1, 2, L::Udp(1))),
        Outcome::NoMatch
    );
    // TCP that is not a SYN: conntrack says invalid; dropped when it is
    // ours, not ours otherwise.
    assert_eq!(
        h.go(Z7, &mut pkt(VM2, SRV, 1, 2, L::Ack(1, 1))),
        Outcome::Drop(NatDrop::Invalid(Invalid::TcpNotSyn))
    );
    assert_eq!(
        h.go(Z7, &mut pkt([10, 9, 9, 9], SRV, 1, 2, L::Ack(1, 1))),
        Outcome::NoMatch
    );
    assert_eq!(h.nat.conntrack().len(), 0, "nothing committed");

    // IPv4 options: dropped when a rule or connection concerns it.
    let opts = |s: [u8; 4], d: [u8; 4]| {
        let mut hd = etherparse::Ipv4Header::new(8, 64, IpNumber::UDP, s, d).unwrap();
        hd.options = Ipv4Options::try_from(&[1u8, 1, 1, 0][..]).unwrap();
        let mut out = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
            .ip(etherparse::IpHeaders::Ipv4(hd, Default::default()))
            .udp(5, 6)
            .write(&mut out, &[0; 0])
            .unwrap();
        out
    };
    assert_eq!(
        h.go(Z7, &mut opts(VM2, SRV)),
        Outcome::Drop(NatDrop::Malformed)
    );
    assert_eq!(
        h.go(EXTERNAL_ZONE, &mut opts(SRV, FIP)),
        Outcome::Drop(NatDrop::Malformed)
    );
    assert_eq!(h.go(EXTERNAL_ZONE, &mut opts(SRV, SRV2)), Outcome::NoMatch);
    // A later fragment.
    let mut frag = pkt(SRV, FIP, 1, 2, L::Udp(30));
    frag[14 + 6] = 0;
    frag[14 + 7] = 10; // offset 80
    assert_eq!(
        h.go(EXTERNAL_ZONE, &mut frag),
        Outcome::Drop(NatDrop::Malformed)
    );
    // A truncated UDP header (malformed key).
    let mut cut = pkt(VM2, SRV, 1, 2, L::Udp(0));
    cut[14 + 3] = 24; // total length 24: 4 bytes of UDP
    cut.truncate(14 + 24);
    assert_eq!(h.go(Z7, &mut cut), Outcome::Drop(NatDrop::Malformed));
    assert!(h.nat.stats().invalid >= 5);
    assert!(h.nat.stats().no_match >= 5);
}

// ---- TCP state through NAT ------------------------------------------------------------

#[test]
fn rst_from_outside_and_timeouts_apply() {
    let mut h = H::new(snat_rules());
    h.fwd(Z7, &mut pkt(VM, SRV, 40000, 80, L::Syn(100)), EXTERNAL_ZONE);
    h.fwd(
        EXTERNAL_ZONE,
        &mut pkt(SRV, E, 80, 40000, L::SynAck(500, 101)),
        Z7,
    );
    h.fwd(
        Z7,
        &mut pkt(VM, SRV, 40000, 80, L::Ack(101, 501)),
        EXTERNAL_ZONE,
    );
    let st = |h: &H| h.nat.conntrack().entries(h.now).next().map(|e| e.state);
    assert_eq!(st(&h), Some(ConnState::Tcp(TcpState::Established)));
    // An out-of-window RST is invalid and dropped.
    assert_eq!(
        h.go(
            EXTERNAL_ZONE,
            &mut pkt(SRV, E, 80, 40000, L::Rst(3_000_000_000))
        ),
        Outcome::Drop(NatDrop::Invalid(Invalid::TcpRstOutOfWindow))
    );
    let r = h.fwd(EXTERNAL_ZONE, &mut pkt(SRV, E, 80, 40000, L::Rst(501)), Z7);
    assert_eq!(r.dst, sa(VM, 40000));
    assert_eq!(st(&h), Some(ConnState::Tcp(TcpState::Close)));
    // CLOSE lasts tcp_close_secs (240 s) from the RST, then the port goes.
    h.now += 239 * NS;
    assert_eq!(h.nat.expire(h.now, 10), 0);
    assert_eq!(h.used(E, 6), 1);
    h.now += 2 * NS;
    assert_eq!(h.nat.expire(h.now, 10), 1);
    assert_eq!(h.used(E, 6), 0);
}

// ---- rules -------------------------------------------------------------------------------

#[test]
fn rules_validation_errors() {
    let bad = |f: fn(&mut Rules)| {
        let mut r = all_rules();
        f(&mut r);
        let e = Nat::new(Config::default(), r.clone()).unwrap_err();
        let mut n = Nat::new(Config::default(), all_rules()).unwrap();
        assert_eq!(n.set_rules(r).unwrap_err(), e);
        assert_eq!(n.rules(), &all_rules(), "unchanged on error");
        e
    };
    let e = bad(|r| r.ports = (2000, 1000));
    assert!(matches!(
        e,
        RulesError::EmptyPortRange { lo: 2000, hi: 1000 }
    ));
    assert!(e.to_string().contains("1 <= lo <= hi"), "{e}");
    let e = bad(|r| r.ports = (0, 10));
    assert!(matches!(e, RulesError::EmptyPortRange { .. }));
    let e = bad(|r| r.floating[0].external = ip(E));
    assert!(matches!(e, RulesError::FloatingIsSnat { .. }));
    assert!(
        e.to_string()
            .contains("floating zone 7 10.0.1.11 <-> 203.0.113.2"),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("snat zone 7 10.0.1.0/24 -> 203.0.113.2"),
        "{e}"
    );
    let e = bad(|r| {
        let mut f = floating();
        f.inside = ip(VM2);
        r.floating.push(f);
    });
    assert!(matches!(e, RulesError::DuplicateFloating { .. }));
    let e = bad(|r| {
        let mut f = floating();
        f.external = Ipv4Addr::new(203, 0, 113, 11);
        r.floating.push(f);
    });
    assert!(matches!(
        e,
        RulesError::DuplicateFloatingInside { zone: 7, .. }
    ));
    let e = bad(|r| {
        let mut f = forward();
        f.inside = sa(VM2, 8080);
        r.forwards.push(f);
    });
    assert!(matches!(e, RulesError::DuplicateForward { .. }));
    assert!(
        e.to_string().contains("forward tcp 203.0.113.2:8080"),
        "{e}"
    );
    // The same port for UDP is another forward.
    let mut r = all_rules();
    let mut u = forward();
    u.proto = Proto::Udp;
    r.forwards.push(u);
    assert!(Nat::new(Config::default(), r).is_ok());
    let e = bad(|r| r.forwards[0].inside = sa(VM, 0));
    assert!(matches!(e, RulesError::ZeroPort { .. }));
    let e = bad(|r| r.snat[0].zone = EXTERNAL_ZONE);
    assert!(matches!(e, RulesError::ExternalZone { .. }));
    let e = bad(|r| r.floating[0].external = Ipv4Addr::BROADCAST);
    assert!(matches!(e, RulesError::NotUnicast { .. }));
    // A bad conntrack configuration.
    let e = Nat::new(
        Config {
            max_entries: 0,
            ..Config::default()
        },
        Rules::default(),
    )
    .unwrap_err();
    assert!(matches!(e, RulesError::Invalid(_)));
}

#[test]
fn set_rules_keeps_connections() {
    let mut h = H::new(all_rules());
    let o = h.fwd(Z7, &mut pkt(VM2, SRV, 5000, 53, L::Udp(4)), EXTERNAL_ZONE);
    h.fwd(EXTERNAL_ZONE, &mut pkt(SRV, FIP, 1, 22, L::Syn(1)), Z7);
    assert!(h.nat.owns(ip(FIP)));
    h.nat.set_rules(Rules::default()).unwrap();
    assert!(!h.nat.owns(ip(E)) && !h.nat.owns(ip(FIP)));
    // Tracked connections continue both ways.
    let s = h.fwd(Z7, &mut pkt(VM2, SRV, 5000, 53, L::Udp(4)), EXTERNAL_ZONE);
    assert_eq!(s.src, o.src);
    h.fwd(EXTERNAL_ZONE, &mut pkt(SRV, E, 53, 5000, L::Udp(4)), Z7);
    h.fwd(Z7, &mut pkt(VM, SRV, 22, 1, L::SynAck(1, 2)), EXTERNAL_ZONE);
    // The old pool is still listed while it holds a mapping.
    assert_eq!(h.used(E, 17), 1);
    // New connections follow the new rules.
    assert_eq!(
        h.go(Z7, &mut pkt(VM2, SRV, 5001, 53, L::Udp(4))),
        Outcome::NoMatch
    );
    // A floating IP added for VM2: new connections from the same socket
    // leave from it, the old mapping stays for the old connection.
    let mut r = all_rules();
    r.floating.push(FloatingIp {
        zone: Z7,
        inside: ip(VM2),
        external: Ipv4Addr::new(203, 0, 113, 12),
    });
    h.nat.set_rules(r).unwrap();
    let n = h.fwd(Z7, &mut pkt(VM2, SRV2, 5000, 53, L::Udp(4)), EXTERNAL_ZONE);
    assert_eq!(n.src, sa([203, 0, 113, 12], 5000));
    assert_eq!(h.nat.mappings().len(), 2);
}

// ---- export / import ----------------------------------------------------------------------------

#[test]
fn export_import_round_trip() {
    let mut rules = snat_rules();
    rules.ports = (40000, 40001);
    let mut h = H::new(rules.clone());
    h.fwd(Z7, &mut pkt(VM, SRV, 40000, 80, L::Syn(100)), EXTERNAL_ZONE);
    h.fwd(
        EXTERNAL_ZONE,
        &mut pkt(SRV, E, 80, 40000, L::SynAck(500, 101)),
        Z7,
    );
    h.fwd(
        Z7,
        &mut pkt(VM, SRV, 40000, 80, L::Ack(101, 501)),
        EXTERNAL_ZONE,
    );
    h.fwd(Z7, &mut pkt(VM2, SRV, 40000, 80, L::Syn(1)), EXTERNAL_ZONE);
    let json = serde_json::to_string(&h.nat.export(h.now)).unwrap();

    let mut h2 = H::new(rules);
    h2.now = 5 * NS; // another process, another clock
    let snap: NatSnapshot = serde_json::from_str(&json).unwrap();
    let rep = h2.nat.import(snap, h2.now).unwrap();
    assert_eq!(rep.conntrack.imported, 2);
    assert_eq!((rep.rejected, rep.port_conflicts), (0, 0));
    assert_eq!(h2.nat.mappings(), h.nat.mappings());
    h2.check_pools();
    // The established connection keeps translating.
    let s = h2.fwd(
        Z7,
        &mut pkt(VM, SRV, 40000, 80, L::Data(101, 501, 10)),
        EXTERNAL_ZONE,
    );
    assert_eq!(s.src, sa(E, 40000));
    let r = h2.fwd(
        EXTERNAL_ZONE,
        &mut pkt(SRV, E, 80, 40000, L::Ack(501, 111)),
        Z7,
    );
    assert_eq!(r.dst, sa(VM, 40000));
    // Its ports stay taken: the range (2 ports) is full.
    assert_eq!(
        h2.go(Z7, &mut pkt([10, 0, 1, 13], SRV, 40000, 80, L::Syn(1))),
        Outcome::Drop(NatDrop::PortsExhausted)
    );
    // Versions are checked.
    let mut snap: NatSnapshot = serde_json::from_str(&json).unwrap();
    snap.version = 99;
    assert_eq!(
        h2.nat.import(snap, h2.now),
        Err(NatImportError::Version { found: 99 })
    );
}

#[test]
fn import_rejects_contradicting_entries() {
    let mut h = H::new(snat_rules());
    h.fwd(Z7, &mut pkt(VM, SRV, 40000, 80, L::Syn(100)), EXTERNAL_ZONE);
    let snap = h.nat.export(h.now);
    // Importing the same snapshot into a NAT that already holds another
    // connection on the same external port.
    let mut h2 = H::new(snat_rules());
    h2.fwd(Z8, &mut pkt(VM, SRV2, 40000, 80, L::Syn(1)), EXTERNAL_ZONE);
    let rep = h2.nat.import(snap, h2.now).unwrap();
    assert_eq!(rep.conntrack.imported, 1);
    assert_eq!(rep.port_conflicts, 1);
    assert_eq!(h2.nat.conntrack().len(), 1);
    h2.check_pools();
    // A mapping kind that does not fit the keys.
    let mut j = serde_json::to_value(h.nat.export(h.now)).unwrap();
    j["conntrack"]["entries"][0]["ext"]["kind"] = "forward".into();
    let snap: NatSnapshot = serde_json::from_value(j).unwrap();
    let mut h3 = H::new(snat_rules());
    let rep = h3.nat.import(snap, h3.now).unwrap();
    assert_eq!(rep.rejected, 1);
    assert!(h3.nat.conntrack().is_empty());
}

// ---- property tests -------------------------------------------------------------------------

/// Frames of a small universe around the test rules, both directions,
/// including ICMP errors quoting translated packets.
fn valid_frames() -> Vec<(u32, Vec<u8>)> {
    let mut v = vec![
        (Z7, pkt(VM, SRV, 40000, 80, L::Syn(100))),
        (UPLINK, pkt(SRV, E, 80, 40000, L::SynAck(500, 101))),
        (Z7, pkt(VM, SRV, 40000, 80, L::Ack(101, 501))),
        (Z7, pkt(VM2, SRV, 5000, 53, L::Udp(20))),
        (UPLINK, pkt(SRV, E, 53, 5000, L::Udp(20))),
        (Z7, pkt(VM2, SRV, 0, 0, L::EchoReq(3))),
        (UPLINK, pkt(SRV, E, 0, 0, L::EchoRep(3))),
        (UPLINK, pkt(SRV, FIP, 9, 22, L::Syn(1))),
        (UPLINK, pkt(SRV, E, 9, 8080, L::Syn(1))),
        (Z7, pkt(VM, FIP, 1234, 80, L::Syn(1))),
        (Z8, pkt(VM, E, 1234, 8080, L::Syn(1))),
    ];
    let mut out = pkt(E, SRV, 5000, 53, L::Udp(20));
    v.push((UPLINK, unreach(SRV, E, &out[14..])));
    out = pkt(E, SRV, 40000, 80, L::Syn(100));
    v.push((UPLINK, unreach(ROUTER, E, &out[14..42])));
    v.push((Z7, unreach(VM, SRV, &pkt(SRV, VM, 9, 22, L::Syn(1))[14..])));
    v
}

fn seeded() -> Nat {
    let mut nat = Nat::new(
        Config {
            max_entries: 64,
            ..Config::default()
        },
        all_rules(),
    )
    .unwrap();
    for (z, mut f) in valid_frames() {
        let k = FlowKey::parse(&f).unwrap();
        nat.translate(z, PORT, &k, &mut f, false, T0);
    }
    nat
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200), zone in prop_oneof![Just(0u32), Just(7), Just(8)], partial in any::<bool>()) {
        let mut nat = seeded();
        let mut f = data.clone();
        // Make it IPv4 now and then, so the parse gets past Ethernet.
        if f.len() > 14 && f[0] & 1 == 0 {
            f[12] = 8;
            f[13] = 0;
        }
        if let Ok(k) = FlowKey::parse(&f) {
            let n = f.len();
            nat.translate(zone, PORT, &k, &mut f, partial, T0 + 1);
            prop_assert_eq!(f.len(), n);
        }
    }

    #[test]
    fn mutated_frames_never_panic(which in any::<prop::sample::Index>(), at in any::<usize>(), b in any::<u8>(), cut in any::<usize>(), zone in prop_oneof![Just(0u32), Just(7), Just(8)], partial in any::<bool>(), stale_key in any::<bool>()) {
        let mut nat = seeded();
        let frames = valid_frames();
        let (z0, f0) = &frames[which.index(frames.len())];
        let mut g = f0.clone();
        let n = g.len();
        g[at % n] = b;
        g.truncate(cut % (n + 1));
        let zone = if b % 2 == 0 { *z0 } else { zone };
        // A key parsed from the intact frame with the mutated bytes, or
        // the mutated frame's own key.
        let src = if stale_key { f0.clone() } else { g.clone() };
        if let Ok(k) = FlowKey::parse(&src) {
            let len = g.len();
            nat.translate(zone, PORT, &k, &mut g, partial, T0 + 1);
            prop_assert_eq!(g.len(), len);
            nat.expire(T0 + 1000 * NS, 100);
        }
        let maps = nat.mappings();
        let conns: u32 = maps.iter().map(|m| m.connections).sum();
        let holding = nat.conntrack().all_keys().filter(|(_, o, r, m)| eim_of(o, r, m.kind).is_some()).count() as u32;
        prop_assert_eq!(conns, holding);
    }

    /// Valid traffic with random ports: every translated frame has valid
    /// checksums, and the mapping counts stay equal to the entries.
    #[test]
    fn translated_checksums_always_valid(flows in proptest::collection::vec((0u8..4, 1u16..6, prop_oneof![Just(53u16), Just(80), Just(8080)], any::<bool>()), 1..40)) {
        let mut rules = all_rules();
        rules.ports = (1, 8);
        let mut h = H::new(rules);
        for (kind, sp, dp, inbound) in flows {
            let mut f = match (kind, inbound) {
                (0, false) => pkt(VM2, SRV, sp, dp, L::Udp(usize::from(sp))),
                (0, true) => pkt(SRV, E, dp, sp, L::Udp(3)),
                (1, false) => pkt(VM, SRV, sp, dp, L::Syn(1)),
                (1, true) => pkt(SRV, FIP, dp, sp, L::SynAck(9, 2)),
                (2, false) => pkt(VM2, SRV, sp, 0, L::EchoReq(sp)),
                (2, true) => pkt(SRV, E, sp, 0, L::EchoRep(sp)),
                (_, false) => pkt(VM2, FIP, sp, dp, L::Udp(2)),
                (_, true) => pkt(SRV, E, sp, 8080, L::Syn(3)),
            };
            let zone = if inbound { EXTERNAL_ZONE } else { Z7 };
            if let Outcome::Forward { .. } = h.go(zone, &mut f) {
                verify(&f);
            }
            h.now += NS;
        }
    }
}

#[test]
fn preview_says_what_translate_does_and_changes_nothing() {
    let mut h = H::new(all_rules());
    let pv = |h: &H, zone: u32, f: &[u8]| h.nat.preview(zone, &FlowKey::parse(f).unwrap(), h.now);
    // New SNAT connection: out through E, the port kept; nothing tracked.
    let syn = pkt(VM2, SRV, 40000, 80, L::Syn(1));
    assert_eq!(
        pv(&h, Z7, &syn),
        Preview::New {
            kind: MappingKind::Snat,
            zone: EXTERNAL_ZONE,
            src: sa(E, 40000),
            dst: sa(SRV, 80)
        }
    );
    assert!(h.nat.conntrack().is_empty());
    assert_eq!(h.nat.stats().translated, 0);
    // The floating IP and the port forward, inbound.
    assert_eq!(
        pv(&h, EXTERNAL_ZONE, &pkt(SRV, FIP, 1, 22, L::Syn(1))),
        Preview::New {
            kind: MappingKind::FloatingIn,
            zone: Z7,
            src: sa(SRV, 1),
            dst: sa(VM, 22)
        }
    );
    assert!(matches!(
        pv(&h, EXTERNAL_ZONE, &pkt(SRV, E, 1, 8080, L::Syn(1))),
        Preview::New { kind: MappingKind::Forward, zone: Z7, dst, .. } if dst == sa(VM, 80)
    ));
    // Once translated for real, the reply previews as the connection's.
    let mut s = syn.clone();
    let out = h.fwd(Z7, &mut s, EXTERNAL_ZONE);
    let reply = pkt(SRV, E, 80, out.src.port(), L::SynAck(9, 2));
    assert_eq!(
        pv(&h, EXTERNAL_ZONE, &reply),
        Preview::Established {
            kind: MappingKind::Snat,
            zone: Z7,
            src: sa(SRV, 80),
            dst: sa(VM2, 40000)
        }
    );
    // Nobody's packet.
    assert_eq!(
        pv(&h, EXTERNAL_ZONE, &pkt(SRV, SRV2, 1, 2, L::Udp(1))),
        Preview::NoMatch
    );
}

// ---- striped sets ------------------------------------------------------------------

mod striped_set {
    use super::*;

    /// A set of stripes driven as one NAT.
    struct S {
        nats: Vec<Nat>,
        steer: Steering,
        now: u64,
    }

    impl S {
        fn with(cfg: Config, rules: Rules, count: usize) -> S {
            let (nats, steer) = striped::new_set(cfg, &rules, count).unwrap();
            assert_eq!(nats.len(), count);
            S {
                nats,
                steer,
                now: T0,
            }
        }

        fn new(rules: Rules, count: usize) -> S {
            S::with(Config::default(), rules, count)
        }

        fn go(&mut self, zone: u32, f: &mut [u8]) -> Outcome {
            let k = FlowKey::parse(f).unwrap();
            let o = striped::translate(
                &mut self.nats[..],
                &self.steer,
                zone,
                PORT,
                &k,
                f,
                false,
                self.now,
            );
            self.check();
            o
        }

        fn fwd(&mut self, from: u32, f: &mut [u8], zone: u32) -> Seen {
            match self.go(from, f) {
                Outcome::Forward { zone: z, dst, .. } => {
                    assert_eq!(z, zone, "target zone");
                    assert_eq!(*seen(f).dst.ip(), dst);
                }
                o => panic!("expected Forward to zone {zone}, got {o:?}"),
            }
            verify(f);
            seen(f)
        }

        /// Connections per stripe.
        fn lens(&self) -> Vec<usize> {
            self.nats.iter().map(|n| n.conntrack().len()).collect()
        }

        /// Every stripe holds only its own ports, and only connections
        /// whose two keys lead to it.
        fn check(&self) {
            for (i, n) in self.nats.iter().enumerate() {
                for m in n.mappings() {
                    assert_eq!(
                        usize::from(m.external.port()) % self.nats.len(),
                        i,
                        "{m:?} in stripe {i}"
                    );
                }
                for (_, o, r, _) in n.conntrack().all_keys() {
                    assert_eq!(self.steer.of_key(&o), i, "{o:?} in stripe {i}");
                    assert_eq!(self.steer.of_key(&r), i, "{r:?} in stripe {i}");
                }
            }
        }
    }

    /// A forward whose external and inside ports are in different stripes
    /// of 4 (8081 % 4 == 1, 80 % 4 == 0), beside the VM's floating IP.
    fn cross_rules() -> Rules {
        Rules {
            snat: vec![snat(Z7), snat(Z8)],
            floating: vec![floating()],
            forwards: vec![PortForward {
                external: sa(E, 8081),
                ..forward()
            }],
            ..Rules::default()
        }
    }

    #[test]
    fn steering_counts_are_powers_of_two() {
        assert_eq!(Steering::new(&Rules::default(), 0).count(), 1);
        assert_eq!(Steering::new(&Rules::default(), 3).count(), 2);
        assert_eq!(Steering::new(&Rules::default(), 8).count(), 8);
        assert_eq!(Steering::new(&Rules::default(), 1000).count(), MAX_STRIPES);
    }

    #[test]
    fn snat_ports_stay_in_their_stripe_and_answers_find_them() {
        let mut s = S::new(snat_rules(), 4);
        let a = s.fwd(Z7, &mut pkt(VM, SRV, 40001, 80, L::Syn(1)), EXTERNAL_ZONE);
        assert_eq!(a.src, sa(E, 40001), "kept: 40001 is its stripe's");
        let b = s.fwd(Z7, &mut pkt(VM2, SRV, 40001, 80, L::Syn(1)), EXTERNAL_ZONE);
        assert_ne!(b.src.port(), 40001);
        assert_eq!(b.src.port() % 4, 1, "another port of the same stripe");
        assert_eq!(s.lens(), vec![0, 2, 0, 0]);
        // The answers come back to each VM.
        let r = s.fwd(
            EXTERNAL_ZONE,
            &mut pkt(SRV, E, 80, b.src.port(), L::SynAck(9, 2)),
            Z7,
        );
        assert_eq!(r.dst, sa(VM2, 40001));
        let r = s.fwd(
            EXTERNAL_ZONE,
            &mut pkt(SRV, E, 80, 40001, L::SynAck(9, 2)),
            Z7,
        );
        assert_eq!(r.dst, sa(VM, 40001));
        // Echo identifiers the same way.
        let e = s.fwd(Z8, &mut pkt(VM, SRV, 0, 0, L::EchoReq(7)), EXTERNAL_ZONE);
        let e2 = s.fwd(Z7, &mut pkt(VM, SRV, 0, 0, L::EchoReq(7)), EXTERNAL_ZONE);
        assert_ne!(e.src.port(), e2.src.port());
        assert_eq!((e.src.port() % 4, e2.src.port() % 4), (3, 3));
        let r = s.fwd(
            EXTERNAL_ZONE,
            &mut pkt(SRV, E, 0, 0, L::EchoRep(e2.src.port())),
            Z7,
        );
        assert_eq!((*r.dst.ip(), r.src.port()), (ip(VM), 7));
        // An error quoting a translated packet reaches its sender.
        let mut f = pkt(VM, SRV, 33002, 33434, L::Udp(20));
        let sent = f.clone();
        s.fwd(Z7, &mut f, EXTERNAL_ZONE);
        let mut err = unreach(ROUTER, E, &f[14..]);
        let x = s.fwd(EXTERNAL_ZONE, &mut err, Z7);
        assert_eq!(*x.dst.ip(), ip(VM));
        assert_eq!(&err[14 + 28..], &sent[14..]);
        let st = striped::stats(&mut s.nats[..]);
        assert_eq!((st.snat_new, st.icmp_errors), (5, 1));
        let pool = striped::pools(&mut s.nats[..])
            .into_iter()
            .find(|p| p.external == ip(E) && p.proto == 6)
            .unwrap();
        assert_eq!(pool.used, 2);
        assert_eq!(pool.used + pool.free, pool.ports, "the shares add up");
        assert_eq!(striped::mappings(&mut s.nats[..]).len(), 5);
    }

    #[test]
    fn a_forward_lives_in_its_targets_stripe() {
        let mut s = S::new(cross_rules(), 4);
        let f = s.fwd(EXTERNAL_ZONE, &mut pkt(SRV, E, 33000, 8081, L::Syn(1)), Z7);
        assert_eq!(f.dst, sa(VM, 80));
        let g = s.fwd(EXTERNAL_ZONE, &mut pkt(SRV, FIP, 33001, 80, L::Syn(1)), Z7);
        assert_eq!(g.dst, sa(VM, 80));
        assert_eq!(s.lens(), vec![2, 0, 0, 0], "both in 80's stripe");
        // VM:80 answers both, each through its own connection.
        let a = s.fwd(
            Z7,
            &mut pkt(VM, SRV, 80, 33000, L::SynAck(5, 2)),
            EXTERNAL_ZONE,
        );
        assert_eq!(a.src, sa(E, 8081));
        let b = s.fwd(
            Z7,
            &mut pkt(VM, SRV, 80, 33001, L::SynAck(5, 2)),
            EXTERNAL_ZONE,
        );
        assert_eq!(b.src, sa(FIP, 80));
        // An error about the forward's packet, quoting it as the VM got
        // it, goes out; one from outside quoting the answer comes in.
        let q = pkt(SRV, VM, 33000, 80, L::Syn(1));
        let mut err = unreach(VM, SRV, &q[14..]);
        let e = s.fwd(Z7, &mut err, EXTERNAL_ZONE);
        assert_eq!(*e.src.ip(), ip(E), "the VM's address does not leak");
        let mut a = pkt(VM, SRV, 80, 33000, L::Ack(6, 2));
        s.fwd(Z7, &mut a, EXTERNAL_ZONE);
        let mut err = unreach(ROUTER, E, &a[14..]);
        let e = s.fwd(EXTERNAL_ZONE, &mut err, Z7);
        assert_eq!(*e.dst.ip(), ip(VM));
        // A new connection of VM:80 starts there too.
        s.fwd(Z7, &mut pkt(VM, SRV2, 80, 443, L::Syn(1)), EXTERNAL_ZONE);
        assert_eq!(s.lens(), vec![3, 0, 0, 0]);
    }

    /// The `nat_striped` fuzz finding: an ICMP error quoting a packet as it
    /// arrived (not as NAT rewrote it) names the entry's other endpoint,
    /// whose stripe may not hold the entry. The set then asks the other
    /// endpoint's stripe and answers as one NAT does.
    #[test]
    fn an_error_quoting_a_packet_as_it_arrived_is_judged_like_one_nat() {
        let mut s = S::new(cross_rules(), 4);
        let mut one = H::new(cross_rules());
        // From outside: the forward's SYN (entry in 80's stripe, 0), then
        // the sender's own error about it, quoting it as it sent it (its
        // source port 33001 leads to stripe 1).
        let syn = pkt(SRV, E, 33001, 8081, L::Syn(1));
        s.fwd(EXTERNAL_ZONE, &mut syn.clone(), Z7);
        one.fwd(EXTERNAL_ZONE, &mut syn.clone(), Z7);
        let err = unreach(SRV, E, &syn[14..]);
        let want = one.go(EXTERNAL_ZONE, &mut err.clone());
        assert_eq!(
            want,
            Outcome::Drop(NatDrop::Invalid(Invalid::IcmpErrorAddrMismatch))
        );
        assert_eq!(s.go(EXTERNAL_ZONE, &mut err.clone()), want);
        // From a tenant: UDP to a neighbour's port 53 (SNAT entry in the
        // stripe of source port 40008, 0), then the neighbour's error
        // about it, quoting it as sent (destination port 53: stripe 1).
        let u = pkt(VM, VM2, 40008, 53, L::Udp(4));
        assert!(matches!(
            s.go(Z7, &mut u.clone()),
            Outcome::Forward { .. } | Outcome::NoMatch
        ));
        one.go(Z7, &mut u.clone());
        let err = unreach(VM2, VM, &u[14..]);
        let want = one.go(Z7, &mut err.clone());
        assert_eq!(s.go(Z7, &mut err.clone()), want);
        assert_eq!(s.lens().iter().sum::<usize>(), one.nat.conntrack().len());
    }

    #[test]
    fn export_import_keeps_connections_and_rejects_misplaced_ones() {
        let mut s = S::new(cross_rules(), 4);
        let a = s.fwd(Z7, &mut pkt(VM2, SRV, 40001, 80, L::Udp(4)), EXTERNAL_ZONE);
        s.fwd(Z8, &mut pkt(VM2, SRV, 40001, 80, L::Udp(4)), EXTERNAL_ZONE);
        s.fwd(EXTERNAL_ZONE, &mut pkt(SRV, E, 33000, 8081, L::Syn(1)), Z7);
        s.fwd(EXTERNAL_ZONE, &mut pkt(SRV, FIP, 33001, 80, L::Syn(1)), Z7);
        let snap = striped::export(&mut s.nats[..], s.now);
        assert_eq!(snap.conntrack.entries.len(), 4);

        let mut t = S::new(cross_rules(), 4);
        let rep = striped::import(&mut t.nats[..], &t.steer.clone(), snap.clone(), t.now).unwrap();
        assert_eq!((rep.conntrack.imported, rep.rejected), (4, 0));
        assert_eq!(t.lens(), s.lens());
        t.check();
        let r = t.fwd(
            EXTERNAL_ZONE,
            &mut pkt(SRV, E, 80, a.src.port(), L::Udp(4)),
            Z7,
        );
        assert_eq!(r.dst, sa(VM2, 40001));
        let r = t.fwd(
            Z7,
            &mut pkt(VM, SRV, 80, 33000, L::SynAck(5, 2)),
            EXTERNAL_ZONE,
        );
        assert_eq!(r.src, sa(E, 8081));
        // The ports stay taken: a new mapping does not get them.
        let n = t.fwd(Z8, &mut pkt(VM, SRV, 40001, 80, L::Udp(4)), EXTERNAL_ZONE);
        assert_ne!(n.src.port(), 40001);

        // Into one NAT everything fits.
        let mut one = H::new(cross_rules());
        let rep = one.nat.import(snap, one.now).unwrap();
        assert_eq!((rep.conntrack.imported, rep.rejected), (4, 0));

        // From one NAT: a port it picked outside the inside port's stripe
        // has no stripe that both directions look in.
        let mut h = H::new(snat_rules());
        h.fwd(Z7, &mut pkt(VM, SRV, 40001, 80, L::Udp(4)), EXTERNAL_ZONE);
        let p = h.fwd(Z7, &mut pkt(VM2, SRV, 40001, 80, L::Udp(4)), EXTERNAL_ZONE);
        assert_eq!(p.src.port(), 1024);
        let mut t = S::new(snat_rules(), 4);
        let steer = t.steer.clone();
        let rep = striped::import(&mut t.nats[..], &steer, h.nat.export(h.now), t.now).unwrap();
        assert_eq!((rep.conntrack.imported, rep.rejected), (1, 1));
    }

    /// One flow of the differential test.
    #[derive(Debug, Clone, Copy)]
    struct Flow {
        zone: u32,
        src: [u8; 4],
        sport: u16,
        dst: [u8; 4],
        dport: u16,
        kind: u8,
    }

    fn flow() -> impl Strategy<Value = Flow> {
        (
            prop_oneof![Just(Z7), Just(Z8), Just(EXTERNAL_ZONE)],
            prop_oneof![Just(VM), Just(VM2), Just(SRV)],
            prop_oneof![
                Just(80u16),
                Just(1100),
                Just(1101),
                Just(1102),
                Just(40001),
                Just(8081)
            ],
            prop_oneof![Just(SRV), Just(SRV2), Just(E), Just(FIP)],
            prop_oneof![Just(80u16), Just(8081), Just(53)],
            0u8..3,
        )
            .prop_map(|(zone, src, sport, dst, dport, kind)| Flow {
                zone,
                src,
                sport,
                dst,
                dport,
                kind,
            })
    }

    fn request(f: &Flow) -> Vec<u8> {
        match f.kind {
            0 => pkt(f.src, f.dst, f.sport, f.dport, L::Syn(1)),
            1 => pkt(f.src, f.dst, f.sport, f.dport, L::Udp(6)),
            _ => pkt(f.src, f.dst, 0, 0, L::EchoReq(f.sport)),
        }
    }

    fn answer(f: &Flow, to: &Seen) -> Vec<u8> {
        let (s, d) = (to.dst.ip().octets(), to.src.ip().octets());
        match f.kind {
            0 => pkt(s, d, to.dst.port(), to.src.port(), L::SynAck(7, 2)),
            1 => pkt(s, d, to.dst.port(), to.src.port(), L::Udp(6)),
            _ => pkt(s, d, 0, 0, L::EchoRep(to.src.port())),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// A set of 4 decides like one NAT: same outcome for every packet
        /// and its answer, and every answer reaches the sender as it sent.
        #[test]
        fn a_set_decides_like_one_nat(flows in proptest::collection::vec(flow(), 1..24)) {
            // A small table and range: the harness counts free ports on
            // every packet.
            let small = Config { max_entries: 1024, ..Config::default() };
            let rules = Rules { ports: (1024, 2047), ..cross_rules() };
            let mut one = H::with(small, rules.clone());
            let mut set = S::with(small, rules, 4);
            for f in &flows {
                let mut a = request(f);
                let mut b = a.clone();
                let oa = one.go(f.zone, &mut a);
                let ob = set.go(f.zone, &mut b);
                prop_assert_eq!(oa, ob, "{:?}", f);
                let Outcome::Forward { zone, .. } = oa else { continue };
                // Destinations agree; sources may differ in port only.
                let (sa_, sb) = (seen(&a), seen(&b));
                prop_assert_eq!(sa_.dst, sb.dst);
                prop_assert_eq!(sa_.src.ip(), sb.src.ip());
                let (mut ra, mut rb) = (answer(f, &sa_), answer(f, &sb));
                let back_a = one.go(zone, &mut ra);
                let back_b = set.go(zone, &mut rb);
                prop_assert_eq!(back_a, back_b, "answer to {:?}", f);
                if let Outcome::Forward { .. } = back_b {
                    // The sender's address and port (for echo, the
                    // answer's identifier).
                    let sent = seen(&request(f)).src;
                    let got = |s: Seen| match f.kind {
                        2 => SocketAddrV4::new(*s.dst.ip(), s.src.port()),
                        _ => s.dst,
                    };
                    prop_assert_eq!(got(seen(&rb)), sent, "{:?}", f);
                    prop_assert_eq!(got(seen(&ra)), sent, "{:?}", f);
                }
            }
        }
    }
}
