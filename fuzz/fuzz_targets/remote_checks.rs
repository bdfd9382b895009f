//! Frames decapsulated from a VXLAN peer: `vswitch::pipeline::overlay::
//! check_remote` and `Bridge::decide` with a VTEP pseudo-port as ingress
//! (`vswitch::underlay::VTEP_BASE` + peer index), as
//! `Snapshot::process_remote` runs them.
//!
//! Input: `[sel, sel2, frame...]`. `sel & 3`: the peer (ingress id
//! `VTEP_BASE + sel & 3`); `(sel >> 2) & 7`: overwrite the source MAC (0:
//! keep, then A, C, the gateway MAC, R1, R2, D, a multicast MAC); `sel >> 5`:
//! after the frame, that many frames with fresh source MACs from the same
//! peer (fills the small table: learned entries are evicted, statics must
//! not be). `sel2 & 7`: overwrite the IPv4 source / ARP sender address (0:
//! keep, then 10.0.0.1 (A), .2 (B), .50 (C, leased), .254 (gateway), .101
//! (R1), .77 (nobody's), 0.0.0.0); `sel2 & 8`: the ARP sender MAC becomes
//! the frame's source MAC.
//!
//! Tables: owners A 10.0.0.1, B 10.0.0.2, gateway 10.0.0.254 (switch), R1
//! 10.0.0.101 (a VM on peer 0, from the directory), C 10.0.0.50 (leased).
//! FDB (cap 12): statics A -> 1, B -> 2, C -> 3 (local ports), R1 ->
//! VTEP_BASE, R2 -> VTEP_BASE + 1 (remote, from the directory); learned
//! D -> 3 and E -> VTEP_BASE + 2.
//!
//! Asserts: never panics; `check_remote` equals a reference model of its
//! documentation (DHCP server message, then invalid source MAC, then ARP
//! sender MAC/address, then IPv4 source); an accepted frame has a unicast
//! source MAC, is no DHCP server message (IPv4/UDP from port 67), its IPv4
//! source or ARP sender address is nobody's or the source MAC's own (never
//! the gateway's), its ARP sender MAC is the source MAC. Bridge: runts and
//! non-unicast sources first; a source MAC that is a static entry of
//! another port (local or another peer) is refused as a hijack and counted,
//! and no static entry ever moves or disappears, whatever the peer sends;
//! an accepted source is learned on the peer; a forward never goes back to
//! the ingress and goes where the table says; multicast floods.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use packet::{FlowKey, MacAddr, L3, L4};
use vswitch::clock::Timestamp;
use vswitch::fdb::{Fdb, PortId};
use vswitch::pipeline::overlay::check_remote;
use vswitch::pipeline::{Addresses, Bridge, DropReason, Ingress, IpOwner, Leased, Verdict};
use vswitch::underlay::VTEP_BASE;

const A: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
const B: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);
const C: MacAddr = MacAddr([2, 0, 0, 0, 0, 3]);
const D: MacAddr = MacAddr([2, 0, 0, 0, 0, 4]);
const E: MacAddr = MacAddr([2, 0, 0, 0, 0, 5]);
const R1: MacAddr = MacAddr([2, 0, 0, 0, 1, 1]);
const R2: MacAddr = MacAddr([2, 0, 0, 0, 1, 2]);
const GW: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xfe]);
const MCAST: MacAddr = MacAddr([0x33, 0x33, 0, 0, 0, 1]);
const IP_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const IP_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const IP_C: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);
const IP_GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
const IP_R1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
const IP_FREE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 77);
const SEC: u64 = 1_000_000_000;

const STATICS: [(MacAddr, PortId); 5] =
    [(A, 1), (B, 2), (C, 3), (R1, VTEP_BASE), (R2, VTEP_BASE + 1)];
const MACS: [Option<MacAddr>; 8] = [None, Some(A), Some(C), Some(GW), Some(R1), Some(R2), Some(D), Some(MCAST)];
const IPS: [Option<Ipv4Addr>; 8] = [
    None,
    Some(IP_A),
    Some(IP_B),
    Some(IP_C),
    Some(IP_GW),
    Some(IP_R1),
    Some(IP_FREE),
    Some(Ipv4Addr::UNSPECIFIED),
];

fn owners() -> Addresses {
    let mut o = Addresses::default();
    for (ip, mac, gateway) in [(IP_A, A, false), (IP_B, B, false), (IP_GW, GW, true), (IP_R1, R1, false)] {
        o.fixed.insert(ip, IpOwner { mac, gateway });
    }
    let mut leased = Leased::new();
    leased.insert(IP_C, C);
    o.leased.store(Arc::new(leased));
    o
}

fn bridge() -> Bridge {
    let mut fdb = Fdb::new(12, Duration::from_secs(300));
    for (mac, port) in STATICS {
        fdb.add_static(mac, port);
    }
    fdb.learn(D, 3, Timestamp(10 * SEC));
    fdb.learn(E, VTEP_BASE + 2, Timestamp(10 * SEC));
    Bridge::new(fdb)
}

/// `check_remote` as overlay.rs documents it.
fn model(key: &FlowKey, addrs: &Addresses) -> Result<(), DropReason> {
    if let (L3::Ipv4(_), L4::Udp { src_port: 67, .. }) = (key.l3, key.l4) {
        return Err(DropReason::DhcpServerFromVm);
    }
    if key.src_mac.is_multicast() || key.src_mac == MacAddr::ZERO {
        return Err(DropReason::SrcMacInvalid);
    }
    // Owned by someone else, or the switch's own (gateway) address.
    let foreign = |ip: Ipv4Addr| addrs.owner(&ip).is_some_and(|o| o.gateway || o.mac != key.src_mac);
    match key.l3 {
        L3::Arp(a) if a.sha != key.src_mac || foreign(a.spa) => Err(DropReason::ArpSpoofed),
        L3::Ipv4(ip) => match ip.src {
            IpAddr::V4(src) if foreign(src) => Err(DropReason::IpSrcSpoofed),
            IpAddr::V4(_) => Ok(()),
            IpAddr::V6(_) => panic!("IPv4 key with an IPv6 source: {key:?}"),
        },
        _ => Ok(()),
    }
}

fuzz_target!(|data: &[u8]| {
    let [sel, sel2, frame @ ..] = data else {
        return;
    };
    let (sel, sel2) = (*sel, *sel2);
    let ingress = Ingress { id: VTEP_BASE + PortId::from(sel & 3), mac: MacAddr::ZERO, port_security: false };
    let mut f = frame.to_vec();
    if let (Some(mac), true) = (MACS[usize::from((sel >> 2) & 7)], f.len() >= 12) {
        f[6..12].copy_from_slice(&mac.0);
    }
    if let Ok(k) = FlowKey::parse(&f) {
        let l3 = usize::from(k.l3_offset);
        match (k.l3, IPS[usize::from(sel2 & 7)]) {
            (L3::Ipv4(_), Some(ip)) => f[l3 + 12..l3 + 16].copy_from_slice(&ip.octets()),
            (L3::Arp(_), Some(ip)) => f[l3 + 14..l3 + 18].copy_from_slice(&ip.octets()),
            _ => {}
        }
        if matches!(k.l3, L3::Arp(_)) && sel2 & 8 != 0 {
            f[l3 + 8..l3 + 14].copy_from_slice(&k.src_mac.0);
        }
    }
    let frame = &f[..];
    let addrs = owners();
    let bridge = bridge();
    let hijacks_before = bridge.fdb().read().stats().hijack_refused;

    if let Ok(key) = FlowKey::parse(frame) {
        let r = check_remote(&ingress, &key, &addrs);
        assert_eq!(r, model(&key, &addrs), "check_remote disagrees with its documentation for {key:?}");
        if r.is_ok() {
            check_accepted(&key, &addrs);
        }
    }

    let now = Timestamp(100 * SEC);
    let v = bridge.decide(&ingress, frame, now);
    check_decide(&bridge, &ingress, frame, v, hijacks_before);
    // More sources from the same peer: the table (cap 12) fills up and
    // evicts learned entries, never statics.
    for i in 0..(sel >> 5) {
        let mut g = f.clone();
        if g.len() >= 14 {
            g[6..12].copy_from_slice(&[2, 0x99, 0, 0, sel2, i]);
        }
        let before = bridge.fdb().read().stats().hijack_refused;
        let v = bridge.decide(&ingress, &g, Timestamp(now.0 + u64::from(i) * SEC));
        check_decide(&bridge, &ingress, &g, v, before);
    }
    // The first frame again, from another peer.
    let other = Ingress { id: VTEP_BASE + PortId::from(sel.wrapping_add(1) & 3), ..ingress };
    let before = bridge.fdb().read().stats().hijack_refused;
    let v = bridge.decide(&other, frame, Timestamp(now.0 + 10 * SEC));
    check_decide(&bridge, &other, frame, v, before);
});

fn check_accepted(key: &FlowKey, addrs: &Addresses) {
    assert!(key.src_mac.is_unicast(), "accepted a non-unicast source MAC {}", key.src_mac);
    let mine = |ip: Ipv4Addr| match addrs.owner(&ip) {
        None => true,
        Some(o) => !o.gateway && o.mac == key.src_mac,
    };
    match key.l3 {
        L3::Ipv4(ip) => {
            let IpAddr::V4(src) = ip.src else { panic!("IPv4 key with an IPv6 source") };
            assert!(mine(src), "accepted {src} from {}, owned by {:?}", key.src_mac, addrs.owner(&src));
            assert!(
                !matches!(key.l4, L4::Udp { src_port: 67, .. }),
                "accepted a DHCP server message"
            );
        }
        L3::Arp(a) => {
            assert_eq!(a.sha, key.src_mac, "accepted ARP with a foreign sender MAC");
            assert!(mine(a.spa), "accepted ARP for {} from {}, owned by {:?}", a.spa, key.src_mac, addrs.owner(&a.spa));
        }
        L3::Ipv6(_) | L3::None => {}
    }
}

fn check_decide(bridge: &Bridge, ingress: &Ingress, frame: &[u8], v: Verdict, hijacks_before: u64) {
    let fdb = bridge.fdb().read();
    for (mac, port) in STATICS {
        assert_eq!(fdb.lookup(&mac), Some(port), "static {mac} moved (ingress {:#x}, verdict {v:?})", ingress.id);
    }
    if frame.len() < 14 {
        assert_eq!(v, Verdict::Drop(DropReason::RuntFrame));
        return;
    }
    let dst = MacAddr::from_slice(&frame[0..6]).expect("6 bytes");
    let src = MacAddr::from_slice(&frame[6..12]).expect("6 bytes");
    if !src.is_unicast() {
        assert_eq!(v, Verdict::Drop(DropReason::SrcMacInvalid));
        return;
    }
    let hijack = STATICS.iter().any(|&(m, p)| m == src && p != ingress.id);
    if hijack {
        assert_eq!(v, Verdict::Drop(DropReason::SrcMacHijack), "peer {:#x} took over {src}", ingress.id);
        assert_eq!(fdb.stats().hijack_refused, hijacks_before + 1, "hijack not counted");
        return;
    }
    assert_ne!(v, Verdict::Drop(DropReason::SrcMacHijack));
    assert_eq!(fdb.lookup(&src), Some(ingress.id), "source {src} not learned on the peer");
    match v {
        Verdict::Forward(p) => {
            assert_ne!(p, ingress.id, "forwarded back to the peer");
            assert!(!dst.is_multicast(), "forwarded a multicast frame");
            assert_eq!(fdb.lookup(&dst), Some(p));
        }
        Verdict::Flood => assert!(dst.is_multicast() || fdb.lookup(&dst).is_none(), "flooded a known unicast"),
        Verdict::Drop(DropReason::DstSamePort) => assert_eq!(fdb.lookup(&dst), Some(ingress.id)),
        other => panic!("unexpected verdict {other:?}"),
    }
}
