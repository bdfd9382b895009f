//! The balancer's data path on frames built with etherparse: new
//! connections pick, established ones follow their entry, replies come
//! back from the VIP, hairpins get the service address, no backend means
//! reject, other tenants' zones never match.

use super::*;
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

const ZONE: u32 = 7;
const NOW: u64 = 1_000_000_000;

fn sa(a: [u8; 4], p: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(a), p)
}

fn tcp(s: SocketAddrV4, d: SocketAddrV4, syn: bool, seq: u32, ack: Option<u32>) -> Vec<u8> {
    let mut out = Vec::new();
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(s.ip().octets(), d.ip().octets(), 64)
        .tcp(s.port(), d.port(), seq, 64000);
    let b = if syn { b.syn() } else { b };
    let b = match ack {
        Some(a) => b.ack(a),
        None => b,
    };
    b.write(&mut out, &[]).unwrap();
    out
}

fn udp(s: SocketAddrV4, d: SocketAddrV4) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(s.ip().octets(), d.ip().octets(), 64)
        .udp(s.port(), d.port())
        .write(&mut out, &[7; 20])
        .unwrap();
    out
}

/// Source and destination as etherparse reads them (checksums checked).
fn seen(f: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
    let p = SlicedPacket::from_ethernet(f).unwrap();
    let Some(NetSlice::Ipv4(ip)) = p.net else {
        panic!("not ipv4")
    };
    let h = ip.header();
    let (sp, dp) = match p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let sum = t
                .to_header()
                .calc_checksum_ipv4(&h.to_header(), t.payload())
                .unwrap();
            assert_eq!(sum, t.checksum(), "tcp checksum");
            (t.source_port(), t.destination_port())
        }
        Some(TransportSlice::Udp(u)) => (u.source_port(), u.destination_port()),
        _ => panic!("no l4"),
    };
    assert!(h.to_header().calc_header_checksum() == h.header_checksum());
    (
        SocketAddrV4::new(h.source_addr(), sp),
        SocketAddrV4::new(h.destination_addr(), dp),
    )
}

const VIP: [u8; 4] = [10, 0, 1, 100];
const SVC: [u8; 4] = [10, 0, 1, 2];

fn services() -> Services {
    let mut s = Services::new(conntrack::Config::default()).unwrap();
    let mut vips = HashMap::new();
    for (p, port) in [(proto::TCP, 80), (proto::UDP, 53)] {
        vips.insert(
            VipKey {
                zone: ZONE,
                addr: sa(VIP, port),
                proto: p,
            },
            VipRule {
                lb: 0,
                external: false,
                hairpin_src: Some(Ipv4Addr::from(SVC)),
            },
        );
    }
    let backends = [11u8, 12, 13]
        .iter()
        .flat_map(|&h| {
            [
                (ZONE, sa([10, 0, 1, h], 8000), proto::TCP),
                (ZONE, sa([10, 0, 1, h], 5353), proto::UDP),
            ]
        })
        .collect();
    s.set_rules(vips, backends);
    s
}

fn fwd(s: &mut Services, f: &mut [u8], backend: Option<[u8; 4]>, port: u16) -> Forward {
    let key = FlowKey::parse(f).unwrap();
    s.forward(ZONE, 1, false, &key, f, false, NOW, |_, _| {
        backend.map(|b| (BackendId(u32::from(b[3])), sa(b, port)))
    })
}

#[test]
fn new_connection_is_dnated_and_pinned() {
    let mut s = services();
    let client = sa([10, 0, 1, 50], 40000);
    let mut f = tcp(client, sa(VIP, 80), true, 1, None);
    assert_eq!(
        fwd(&mut s, &mut f, Some([10, 0, 1, 11]), 8000),
        Forward::To {
            dst: Ipv4Addr::new(10, 0, 1, 11),
            lb: 0,
            new: true
        }
    );
    assert_eq!(seen(&f), (client, sa([10, 0, 1, 11], 8000)));

    // The backend answers; the client sees the VIP.
    let mut r = tcp(sa([10, 0, 1, 11], 8000), client, true, 100, Some(2));
    let key = FlowKey::parse(&r).unwrap();
    assert!(s.may_be_reply(ZONE, &key));
    assert_eq!(
        s.reply(ZONE, &key, &mut r, false, NOW),
        Reply::To {
            dst: Ipv4Addr::new(10, 0, 1, 50),
            external: false
        }
    );
    assert_eq!(seen(&r), (sa(VIP, 80), client));

    // Later packets follow the entry whatever the table says now.
    let mut f = tcp(client, sa(VIP, 80), false, 2, Some(101));
    assert_eq!(
        fwd(&mut s, &mut f, Some([10, 0, 1, 13]), 8000),
        Forward::To {
            dst: Ipv4Addr::new(10, 0, 1, 11),
            lb: 0,
            new: false
        }
    );
    assert_eq!(seen(&f).1, sa([10, 0, 1, 11], 8000));
    let conns = s.connections(NOW);
    assert_eq!(conns.get(&(0, BackendId(11))), Some(&1));
}

#[test]
fn hairpin_gets_the_service_address() {
    let mut s = services();
    let me = sa([10, 0, 1, 12], 45000);
    let mut f = tcp(me, sa(VIP, 80), true, 1, None);
    assert!(matches!(
        fwd(&mut s, &mut f, Some([10, 0, 1, 12]), 8000),
        Forward::To { new: true, .. }
    ));
    assert_eq!(seen(&f), (sa(SVC, 45000), sa([10, 0, 1, 12], 8000)));
    let mut r = tcp(sa([10, 0, 1, 12], 8000), sa(SVC, 45000), true, 9, Some(2));
    let key = FlowKey::parse(&r).unwrap();
    assert!(s.may_be_reply(ZONE, &key));
    assert!(matches!(
        s.reply(ZONE, &key, &mut r, false, NOW),
        Reply::To { .. }
    ));
    assert_eq!(seen(&r), (sa(VIP, 80), me));
    assert_eq!(s.stats().hairpin, 1);
}

#[test]
fn no_backend_rejects_and_commits_nothing() {
    let mut s = services();
    let mut f = tcp(sa([10, 0, 1, 50], 40001), sa(VIP, 80), true, 1, None);
    let before = f.clone();
    assert_eq!(fwd(&mut s, &mut f, None, 8000), Forward::Reject(0));
    assert_eq!(f, before);
    assert!(s.conntrack().is_empty());
    // A segment other than a SYN with no entry is invalid, not balanced.
    let mut f = tcp(sa([10, 0, 1, 50], 40002), sa(VIP, 80), false, 1, Some(1));
    assert_eq!(
        fwd(&mut s, &mut f, Some([10, 0, 1, 11]), 8000),
        Forward::Drop(LbDrop::Invalid)
    );
}

#[test]
fn udp_and_other_ports_and_zones() {
    let mut s = services();
    let client = sa([10, 0, 1, 50], 3000);
    let mut f = udp(client, sa(VIP, 53));
    assert!(matches!(
        fwd(&mut s, &mut f, Some([10, 0, 1, 13]), 5353),
        Forward::To { new: true, .. }
    ));
    assert_eq!(seen(&f), (client, sa([10, 0, 1, 13], 5353)));
    // Another port of the VIP address, or the same VIP in another zone:
    // not balanced.
    let mut f = tcp(client, sa(VIP, 81), true, 1, None);
    assert_eq!(
        fwd(&mut s, &mut f, Some([10, 0, 1, 11]), 8000),
        Forward::NotVip
    );
    let mut f = tcp(client, sa(VIP, 80), true, 1, None);
    let key = FlowKey::parse(&f).unwrap();
    assert_eq!(
        s.forward(ZONE + 1, 1, false, &key, &mut f, false, NOW, |_, _| None),
        Forward::NotVip
    );
    assert!(s.is_vip_addr(ZONE, Ipv4Addr::from(VIP)));
    assert!(!s.is_vip_addr(ZONE + 1, Ipv4Addr::from(VIP)));
    // A backend's packet that answers no balanced connection is not ours
    // and stays as it was.
    let mut r = tcp(
        sa([10, 0, 1, 11], 8000),
        sa([10, 0, 1, 60], 1234),
        true,
        1,
        Some(1),
    );
    let before = r.clone();
    let key = FlowKey::parse(&r).unwrap();
    assert_eq!(s.reply(ZONE, &key, &mut r, false, NOW), Reply::NotOurs);
    assert_eq!(r, before);
}

#[test]
fn connections_survive_a_rule_change_until_they_end() {
    let mut s = services();
    let client = sa([10, 0, 1, 50], 40000);
    let mut f = tcp(client, sa(VIP, 80), true, 1, None);
    fwd(&mut s, &mut f, Some([10, 0, 1, 11]), 8000);
    // The load balancer is removed from the config.
    s.set_rules(HashMap::new(), HashSet::new());
    let mut r = tcp(sa([10, 0, 1, 11], 8000), client, true, 100, Some(2));
    let key = FlowKey::parse(&r).unwrap();
    // Its connection flows on both ways; new ones are not balanced.
    assert!(s.may_be_reply(ZONE, &key));
    assert!(matches!(
        s.reply(ZONE, &key, &mut r, false, NOW),
        Reply::To { .. }
    ));
    let mut f = tcp(client, sa(VIP, 80), false, 2, Some(101));
    assert!(matches!(
        fwd(&mut s, &mut f, None, 8000),
        Forward::To { new: false, .. }
    ));
    let mut f = tcp(sa([10, 0, 1, 51], 40000), sa(VIP, 80), true, 1, None);
    assert_eq!(
        fwd(&mut s, &mut f, Some([10, 0, 1, 11]), 8000),
        Forward::NotVip
    );
    // Once the connection is gone, so is the retired VIP.
    let later = NOW + 8000 * 1_000_000_000;
    s.expire(later, usize::MAX);
    assert!(s.vip_of(ZONE, &FlowKey::parse(&f).unwrap()).is_none());
}

#[test]
fn corrupt_headers_are_not_balanced_or_rewritten() {
    // Found by the lb_service fuzz target: a header whose checksum fails
    // was DNATed with its (bad) checksum patched.
    let mut s = services();
    let client = sa([10, 0, 1, 50], 40000);
    let mut f = tcp(client, sa(VIP, 80), true, 1, None);
    f[14 + 10] ^= 0xff;
    let before = f.clone();
    assert_eq!(
        fwd(&mut s, &mut f, Some([10, 0, 1, 11]), 8000),
        Forward::Drop(LbDrop::Malformed)
    );
    assert_eq!(f, before);
    assert!(s.conntrack().is_empty());
    let mut r = tcp(sa([10, 0, 1, 11], 8000), client, true, 100, Some(2));
    r[14 + 10] ^= 0xff;
    let before = r.clone();
    let key = FlowKey::parse(&r).unwrap();
    assert_eq!(s.reply(ZONE, &key, &mut r, false, NOW), Reply::NotOurs);
    assert_eq!(r, before);
}

#[test]
fn preview_rewrites_like_forward_and_commits_nothing() {
    let mut s = services();
    let client = sa([10, 0, 1, 50], 40001);
    let pick = |_: u32, _: u64| Some((BackendId(12), sa([10, 0, 1, 12], 8000)));
    // A new connection: the same backend and rewrite, no entry.
    let mut f = tcp(client, sa(VIP, 80), true, 1, None);
    let key = FlowKey::parse(&f).unwrap();
    let p = s.preview_forward(ZONE, &key, &mut f, false, NOW, pick);
    assert_eq!(
        p,
        Forward::To {
            dst: Ipv4Addr::new(10, 0, 1, 12),
            lb: 0,
            new: true
        }
    );
    assert_eq!(seen(&f), (client, sa([10, 0, 1, 12], 8000)));
    assert!(s.conntrack().is_empty());
    assert_eq!(s.stats().forwarded, 0);
    // Once forwarded for real, the preview follows the entry, whatever
    // the pool would pick now.
    let mut f = tcp(client, sa(VIP, 80), true, 1, None);
    assert!(matches!(
        fwd(&mut s, &mut f, Some([10, 0, 1, 13]), 8000),
        Forward::To { new: true, .. }
    ));
    let mut g = tcp(client, sa(VIP, 80), false, 2, Some(1));
    let key = FlowKey::parse(&g).unwrap();
    let p = s.preview_forward(ZONE, &key, &mut g, false, NOW, pick);
    assert!(matches!(p, Forward::To { new: false, .. }));
    assert_eq!(seen(&g).1, sa([10, 0, 1, 13], 8000));
    // The backend's reply previews back from the VIP, untracked.
    let mut r = tcp(sa([10, 0, 1, 13], 8000), client, true, 9, Some(2));
    let key = FlowKey::parse(&r).unwrap();
    let before = s.stats().replied;
    assert!(matches!(
        s.preview_reply(ZONE, &key, &mut r, false, NOW),
        Reply::To { .. }
    ));
    assert_eq!(seen(&r), (sa(VIP, 80), client));
    assert_eq!(s.stats().replied, before);
    // No backend: rejected, as forward would.
    let mut f = tcp(sa([10, 0, 1, 51], 1), sa(VIP, 80), true, 1, None);
    let key = FlowKey::parse(&f).unwrap();
    assert_eq!(
        s.preview_forward(ZONE, &key, &mut f, false, NOW, |_, _| None),
        Forward::Reject(0)
    );
}
