//! `vswitchctl trace` flows (`vswitch::trace::FlowSpec::parse`) on arbitrary
//! text from the control socket, and the synthetic frame built from an
//! accepted flow.
//!
//! Asserts: never panics; an accepted flow builds a frame that parses as
//! what the flow said (protocol, addresses, TCP/UDP ports), from the given
//! MACs (ARP: to broadcast).
#![no_main]
use libfuzzer_sys::fuzz_target;
use packet::{FlowKey, MacAddr, L3, L4};
use vswitch::trace::{FlowSpec, Proto};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = FlowSpec::parse(text) else {
        return;
    };
    let (src, dst) = (MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]));
    let frame = spec.frame(src, dst);
    let key = FlowKey::parse(&frame).expect("a built frame parses");
    assert_eq!(key.src_mac, src);
    match (spec.proto, key.l3, key.l4) {
        (Proto::Arp, L3::Arp(a), _) => {
            assert_eq!(key.dst_mac, MacAddr([0xff; 6]));
            assert_eq!((a.spa, a.tpa), (spec.src, spec.dst));
        }
        (p, L3::Ipv4(ip), l4) => {
            assert_eq!(key.dst_mac, dst);
            assert_eq!(
                (ip.src, ip.dst),
                (std::net::IpAddr::V4(spec.src), std::net::IpAddr::V4(spec.dst))
            );
            match (p, l4) {
                (Proto::Tcp(_), L4::Tcp { src_port, dst_port, .. })
                | (Proto::Udp, L4::Udp { src_port, dst_port }) => {
                    assert_eq!((src_port, dst_port), (spec.sport, spec.dport));
                }
                (Proto::Icmp(reply), L4::Icmpv4 { ty, .. }) => {
                    assert_eq!(ty, if reply { 0 } else { 8 });
                }
                other => panic!("{text:?} built {other:?}"),
            }
        }
        other => panic!("{text:?} built {other:?}"),
    }
});
