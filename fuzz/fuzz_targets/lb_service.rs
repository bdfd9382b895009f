//! The load balancer's data path, `lb::Services::forward` and `reply`, on
//! hostile frames and sequences: what a VM (or the uplink) sends toward a
//! VIP and what a backend sends back.
//!
//! Input: a sequence of ops, each `[op, len, frame[len]...]`. `op & 3`: 0
//! forward from a tenant port, 1 forward from the uplink, 2 reply, 3
//! advance the clock by `(op >> 2)` seconds and reap. `op & 4` (forward):
//! the pool has no backend. `op & 8`: the frame's destination (forward) or
//! source (reply) address and port are overwritten with the VIP (forward)
//! or a backend (reply) so the fuzzer reaches the interesting paths, and
//! `op & 16` the other address with a backend's (hairpin).
//!
//! Asserts: never panics; a frame the balancer did not take (`NotVip`,
//! `NotOurs`, `Reject`, `Drop`) is left byte for byte as it came; a
//! forwarded frame now goes to a backend (destination = one of the
//! backends' endpoints, the `dst` reported) and its source is the client
//! or, after a hairpin, the service address; a rewritten reply comes from
//! the VIP; every rewritten frame still parses and its IPv4 header
//! checksum verifies; the table never holds more than its cap.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use libfuzzer_sys::fuzz_target;
use packet::{FlowKey, L3};

const ZONE: u32 = 9;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 100);
const SVC: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 0, 1, 11),
    Ipv4Addr::new(10, 0, 1, 12),
    Ipv4Addr::new(10, 0, 1, 13),
];
const CAP: usize = 64;

fn services() -> lb::Services {
    let cfg = conntrack::Config {
        max_entries: CAP,
        max_per_port: CAP,
        ..conntrack::Config::default()
    };
    let mut s = lb::Services::new(cfg).expect("config");
    let mut vips = HashMap::new();
    let mut backends = HashSet::new();
    for proto in [6u8, 17] {
        vips.insert(
            lb::VipKey { zone: ZONE, addr: SocketAddrV4::new(VIP, 80), proto },
            lb::VipRule { lb: 1, external: false, hairpin_src: Some(SVC) },
        );
        for b in BACKENDS {
            backends.insert((ZONE, SocketAddrV4::new(b, 8000), proto));
        }
    }
    s.set_rules(vips, backends);
    s
}

/// Overwrites the IPv4 source (`src`) or destination address and the L4
/// port at the key's offsets, when the frame holds them (checksums are left
/// stale on purpose: the balancer must not care or must not crash).
fn poke(frame: &mut [u8], key: &FlowKey, src: bool, ip: Ipv4Addr, port: u16) {
    let l3 = usize::from(key.l3_offset);
    let l4 = usize::from(key.l4_offset);
    let at = if src { l3 + 12 } else { l3 + 16 };
    if let Some(b) = frame.get_mut(at..at + 4) {
        b.copy_from_slice(&ip.octets());
    }
    let pat = if src { l4 } else { l4 + 2 };
    if l4 > l3 {
        if let Some(b) = frame.get_mut(pat..pat + 2) {
            b.copy_from_slice(&port.to_be_bytes());
        }
    }
}

fn header_ok(frame: &[u8]) -> Option<FlowKey> {
    let key = FlowKey::parse(frame).ok()?;
    let l3 = usize::from(key.l3_offset);
    let ok = frame
        .get(l3..l3 + 20)
        .is_some_and(packet::checksum::verify);
    assert!(ok, "rewritten frame has a bad IPv4 header checksum");
    Some(key)
}

fuzz_target!(|data: &[u8]| {
    let mut s = services();
    let mut now: u64 = 1_000_000_000;
    let mut rest = data;
    let mut ops = 0;
    while rest.len() >= 2 && ops < 64 {
        ops += 1;
        let (op, len) = (rest[0], usize::from(rest[1]));
        rest = &rest[2..];
        let take = len.min(rest.len());
        let mut frame = rest[..take].to_vec();
        rest = &rest[take..];
        if op & 3 == 3 {
            now += u64::from(op >> 2) * 1_000_000_000;
            s.expire(now, usize::MAX);
            continue;
        }
        let Ok(key0) = FlowKey::parse(&frame) else { continue };
        if op & 8 != 0 {
            let b = BACKENDS[usize::from(op >> 5) % BACKENDS.len()];
            if op & 3 == 2 {
                poke(&mut frame, &key0, true, b, 8000);
                if op & 16 != 0 {
                    poke(&mut frame, &key0, false, SVC, 40000);
                }
            } else {
                poke(&mut frame, &key0, false, VIP, 80);
                if op & 16 != 0 {
                    poke(&mut frame, &key0, true, b, 40000);
                }
            }
        }
        let Ok(key) = FlowKey::parse(&frame) else { continue };
        let before = frame.clone();
        let partial = op & 64 != 0;
        match op & 3 {
            0 | 1 => {
                let empty = op & 4 != 0;
                let out = s.forward(ZONE, 1, op & 3 == 1, &key, &mut frame, partial, now, |_, h| {
                    if empty {
                        return None;
                    }
                    let b = BACKENDS[(h % 3) as usize];
                    Some((lb::BackendId(u32::from(b.octets()[3])), SocketAddrV4::new(b, 8000)))
                });
                match out {
                    lb::Forward::To { dst, .. } => {
                        assert!(BACKENDS.contains(&dst), "forwarded to {dst}");
                        let k = header_ok(&frame).expect("forwarded frame no longer parses");
                        let L3::Ipv4(ip) = k.l3 else { panic!("forwarded frame is not IPv4") };
                        assert_eq!(ip.dst, IpAddr::V4(dst));
                        let L3::Ipv4(orig) = key.l3 else { panic!("took a non-IPv4 frame") };
                        assert!(
                            ip.src == orig.src || ip.src == IpAddr::V4(SVC),
                            "source became {:?}",
                            ip.src
                        );
                    }
                    _ => assert_eq!(frame, before, "{out:?} but the frame changed"),
                }
            }
            _ => match s.reply(ZONE, &key, &mut frame, partial, now) {
                lb::Reply::To { .. } => {
                    let k = header_ok(&frame).expect("reply no longer parses");
                    let L3::Ipv4(ip) = k.l3 else { panic!("reply is not IPv4") };
                    assert_eq!(ip.src, IpAddr::V4(VIP), "reply does not come from the VIP");
                }
                lb::Reply::NotOurs => assert_eq!(frame, before, "NotOurs but the frame changed"),
            },
        }
        assert!(s.conntrack().len() <= CAP, "table over its cap");
    }
});
