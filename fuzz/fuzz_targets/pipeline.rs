//! The pure pipeline stages of `vswitch::pipeline` on one frame, each run on
//! its own (not short-circuited, so every stage sees every input):
//! `port_security::check`, `arp::respond`, `dns_local::serve`,
//! `Bridge::decide` (twice, with a small FDB).
//!
//! Input: `[sel, frame...]`. `sel % 3` picks the ingress port (1: A, 2: B,
//! 3: C, whose address is DHCP-leased), `sel & 0x08` turns port security off,
//! `sel & 0x10` makes the ingress MAC the frame's source MAC (a port whose
//! MAC the frame does not spoof).
//!
//! The tables mirror the `testutil` of crates/vswitch/src/pipeline/mod.rs:
//! A 02:00:00:00:00:01 / 10.0.0.1 on port 1, B ..:02 / 10.0.0.2 on port 2,
//! gateway ..:fe / 10.0.0.254 (owned by the switch), plus C ..:03 leased
//! 10.0.0.50 on port 3 and a learned MAC ..:04 on port 3.
//!
//! Asserts:
//! - port security: without it only `DhcpServerFromVm` is possible; an
//!   accepted secured frame carries the port's MAC and (IPv4/ARP) an address
//!   the port owns;
//! - ARP: no answer leaves the frame untouched; an answer keeps the length,
//!   is an ARP reply from the owner of the asked address to the asker, and
//!   only rewrites the Ethernet addresses and the ARP body;
//! - DNS: anything but `Answered` leaves the buffer untouched; an answer is
//!   a clean IPv4/UDP frame from gateway:53 back to the client's MAC, IP and
//!   port, with a 12..=1232 byte DNS payload echoing the query ID, and no
//!   offload;
//! - bridge: runts and invalid source MACs are refused first; a forward
//!   never goes back to the ingress port and goes where the FDB says; a
//!   multicast destination never forwards; a configured MAC of another port
//!   is a hijack; after an accepted frame the source MAC sits on the ingress
//!   port; deciding the same frame again gives the same verdict.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use libfuzzer_sys::fuzz_target;
use packet::{FlowKey, MacAddr, PacketBuf, L3, L4};
use vswitch::clock::Timestamp;
use vswitch::fdb::Fdb;
use vswitch::pipeline::dns_local::{self, Outcome};
use vswitch::pipeline::{arp, port_security, Addresses, Bridge, DropReason, Ingress, IpOwner, Leased, Verdict};

const A: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
const B: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);
const C: MacAddr = MacAddr([2, 0, 0, 0, 0, 3]);
const D: MacAddr = MacAddr([2, 0, 0, 0, 0, 4]);
const GW: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xfe]);
const IP_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const IP_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const IP_C: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);
const IP_GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
const SEC: u64 = 1_000_000_000;

fn owners() -> Addresses {
    let mut o = Addresses::default();
    for (ip, mac, gateway) in [(IP_A, A, false), (IP_B, B, false), (IP_GW, GW, true)] {
        o.fixed.insert(ip, IpOwner { mac, gateway });
    }
    let mut leased = Leased::new();
    leased.insert(IP_C, C);
    o.leased.store(Arc::new(leased));
    o
}

fn zone() -> dns::Zone {
    let mut z = dns::Zone::new(Some("acme.internal")).expect("zone");
    z.insert("vm1", IP_A).expect("insert");
    z.insert("vm2", IP_B).expect("insert");
    z.insert("vm3", IP_C).expect("insert");
    z
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, frame)) = data.split_first() else {
        return;
    };
    let (id, port_mac) = [(1, A), (2, B), (3, C)][usize::from(sel % 3)];
    let mut ingress = Ingress { id, mac: port_mac, port_security: sel & 0x08 == 0 };
    if sel & 0x10 != 0 {
        if let Some(m) = frame.get(6..12).and_then(MacAddr::from_slice) {
            ingress.mac = m;
        }
    }
    let addrs = owners();

    let Ok(key) = FlowKey::parse(frame) else {
        // What a worker does with an unparseable frame: the bridge still
        // refuses runts.
        if frame.len() < 14 {
            let bridge = Bridge::new(Fdb::new(16, Duration::from_secs(300)));
            let v = bridge.decide(&ingress, frame, Timestamp(1000 * SEC));
            assert_eq!(v, Verdict::Drop(DropReason::RuntFrame));
        }
        return;
    };

    check_port_security(&ingress, &key, &addrs);
    check_arp(&ingress, &key, &addrs, frame);
    check_dns(&key, frame);
    check_bridge(&ingress, &key, frame);
});

fn check_port_security(ingress: &Ingress, key: &FlowKey, addrs: &Addresses) {
    let r = port_security::check(ingress, key, addrs);
    if !ingress.port_security {
        assert!(matches!(r, Ok(()) | Err(DropReason::DhcpServerFromVm)), "{r:?}");
        return;
    }
    if r.is_err() {
        return;
    }
    assert_eq!(key.src_mac, ingress.mac, "secured port accepted a foreign MAC");
    match (key.l3, key.l4) {
        (L3::Arp(a), _) => {
            assert_eq!(a.sha, ingress.mac);
            assert!(a.spa.is_unspecified() || addrs.owned_by(&a.spa, &ingress.mac));
        }
        (L3::Ipv4(ip), l4) => {
            let IpAddr::V4(src) = ip.src else { panic!("IPv4 key with a v6 source") };
            if src.is_unspecified() {
                assert!(matches!(l4, L4::Udp { src_port: 68, dst_port: 67 }));
            } else {
                assert!(addrs.owned_by(&src, &ingress.mac), "{src} not owned by {}", ingress.mac);
            }
        }
        (L3::None, _) => assert!(!matches!(key.ethertype, 0x0800 | 0x0806)),
        (L3::Ipv6(_), _) => {}
    }
}

fn check_arp(ingress: &Ingress, key: &FlowKey, addrs: &Addresses, frame: &[u8]) {
    let mut f = frame.to_vec();
    if !arp::respond(ingress, key, addrs, &mut f) {
        assert_eq!(f, frame, "no answer, but the frame changed");
        return;
    }
    let L3::Arp(req) = key.l3 else { panic!("answered a non-ARP frame") };
    assert_eq!(req.op, 1, "answered a non-request");
    let owner = addrs.owner(&req.tpa).expect("answered an unknown address");
    assert!(owner.gateway || owner.mac != ingress.mac, "answered the asker's own address");
    assert_eq!(f.len(), frame.len());
    let l3 = usize::from(key.l3_offset);
    for (i, (a, b)) in f.iter().zip(frame).enumerate() {
        assert!(a == b || i < 12 || (l3..l3 + 28).contains(&i), "byte {i} changed");
    }
    let r = FlowKey::parse(&f).expect("reply parses");
    let L3::Arp(rep) = r.l3 else { panic!("reply is not ARP: {r:?}") };
    assert_eq!(rep.op, 2);
    assert_eq!((rep.sha, rep.spa), (owner.mac, req.tpa));
    assert_eq!((rep.tha, rep.tpa), (req.sha, req.spa));
    assert_eq!((r.src_mac, r.dst_mac), (owner.mac, req.sha));
    assert_eq!((r.vlan, r.inner_vlan), (key.vlan, key.inner_vlan));
}

fn check_dns(key: &FlowKey, frame: &[u8]) {
    let zone = ArcSwap::from_pointee(zone());
    let mut buf = PacketBuf::with_capacity(frame.len().max(1600));
    assert!(buf.replace_frame(frame));
    buf.offload.data_valid = true;
    let out = dns_local::serve(&zone, IP_GW, GW, key, &mut buf);
    if out != Outcome::Answered {
        assert_eq!(buf.frame(), frame, "{out:?}, but the frame changed");
        assert!(buf.offload.data_valid, "{out:?}, but the offload changed");
        if let Outcome::Dropped(r) = out {
            assert_eq!(r, DropReason::DnsIgnored);
        }
        return;
    }
    let (L3::Ipv4(qip), L4::Udp { src_port: qport, dst_port: 53 }) = (key.l3, key.l4) else {
        panic!("answered a non-DNS frame: {key:?}");
    };
    assert_eq!(qip.dst, IpAddr::V4(IP_GW));
    assert_eq!(buf.offload, packet::Offload::NONE);
    let r = buf.frame();
    let rk = FlowKey::parse(r).expect("answer parses");
    assert_eq!(rk.malformed, None, "answer is malformed");
    let L3::Ipv4(rip) = rk.l3 else { panic!("answer not IPv4") };
    assert_eq!((rip.src, rip.dst), (IpAddr::V4(IP_GW), qip.src));
    assert_eq!(rk.l4, L4::Udp { src_port: 53, dst_port: qport });
    assert_eq!((rk.src_mac, rk.dst_mac), (GW, key.src_mac));
    let payload = &r[usize::from(rk.l4_offset) + 8..];
    assert!((12..=dns::EDNS_UDP_LEN).contains(&payload.len()), "DNS reply of {} bytes", payload.len());
    let qid = &frame[usize::from(key.l4_offset) + 8..][..2];
    assert_eq!(&payload[..2], qid, "reply does not echo the ID");
}

fn check_bridge(ingress: &Ingress, key: &FlowKey, frame: &[u8]) {
    let mut fdb = Fdb::new(16, Duration::from_secs(300));
    fdb.add_static(A, 1);
    fdb.add_static(B, 2);
    fdb.add_static(C, 3);
    fdb.learn(D, 3, Timestamp(10 * SEC));
    let bridge = Bridge::new(fdb);
    let now = Timestamp(100 * SEC);
    let v = bridge.decide(ingress, frame, now);
    let (src, dst) = (key.src_mac, key.dst_mac);
    if !src.is_unicast() {
        assert_eq!(v, Verdict::Drop(DropReason::SrcMacInvalid));
        return;
    }
    let statics = [(A, 1), (B, 2), (C, 3)];
    let hijack = statics.iter().any(|&(m, p)| m == src && p != ingress.id);
    if hijack {
        assert_eq!(v, Verdict::Drop(DropReason::SrcMacHijack));
    } else {
        assert_ne!(v, Verdict::Drop(DropReason::SrcMacHijack));
        assert_eq!(bridge.fdb().read().lookup(&src), Some(ingress.id), "source not learned");
    }
    match v {
        Verdict::Forward(p) => {
            assert_ne!(p, ingress.id, "forwarded back to the ingress port");
            assert!(!dst.is_multicast(), "forwarded a multicast frame");
            assert_eq!(bridge.fdb().read().lookup(&dst), Some(p));
        }
        Verdict::Flood => {
            let known = bridge.fdb().read().lookup(&dst);
            assert!(dst.is_multicast() || known.is_none(), "flooded a known unicast");
        }
        Verdict::Drop(DropReason::DstSamePort) => {
            assert_eq!(bridge.fdb().read().lookup(&dst), Some(ingress.id));
        }
        Verdict::Drop(DropReason::SrcMacHijack) => {}
        other => panic!("unexpected bridge verdict {other:?}"),
    }
    let again = bridge.decide(ingress, frame, Timestamp(now.0 + 2 * SEC));
    assert_eq!(again, v, "same frame, different verdict");
}
