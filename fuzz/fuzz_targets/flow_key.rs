//! `packet::FlowKey::parse` on arbitrary frames.
//!
//! Asserts: only frames shorter than an Ethernet header (or with a cut VLAN
//! tag) are refused; every offset lies inside the frame and leaves room for
//! the header it points at; `l4_offset == 0` iff `l4` is `None`; the L3 kind
//! agrees with the EtherType and the address families; parsing is
//! deterministic.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use packet::flow::{ethertype, ETH_HLEN, MAX_VLAN_TAGS, VLAN_TAG_LEN};
use packet::{FlowKey, ParseError, L3, L4};

fuzz_target!(|frame: &[u8]| {
    let key = match FlowKey::parse(frame) {
        Ok(k) => k,
        Err(ParseError::EthernetTruncated) => {
            assert!(frame.len() < ETH_HLEN);
            return;
        }
        Err(ParseError::VlanTruncated) => {
            assert!(frame.len() >= ETH_HLEN);
            assert!(ethertype::is_vlan(u16::from_be_bytes([frame[12], frame[13]])));
            return;
        }
    };
    assert_eq!(FlowKey::parse(frame), Ok(key), "parse is deterministic");

    let len = frame.len();
    let l3 = usize::from(key.l3_offset);
    let l4 = usize::from(key.l4_offset);

    // L3 offset: after the Ethernet header and whole VLAN tags, inside the frame.
    assert!(l3 >= ETH_HLEN && l3 <= len, "l3_offset {l3} outside frame of {len}");
    assert_eq!((l3 - ETH_HLEN) % VLAN_TAG_LEN, 0);
    assert!(l3 <= ETH_HLEN + MAX_VLAN_TAGS * VLAN_TAG_LEN);
    assert!(key.inner_vlan.is_none() || key.vlan.is_some());
    assert!(key.vlan.is_none_or(|v| v < 4096) && key.inner_vlan.is_none_or(|v| v < 4096));
    assert_eq!(key.src_mac.0, frame[6..12]);
    assert_eq!(key.dst_mac.0, frame[..6]);

    // L4 offset is 0 exactly when there is no L4.
    assert_eq!(l4 == 0, key.l4 == L4::None, "l4_offset {l4} vs l4 {:?}", key.l4);

    // L3 kind agrees with the EtherType, addresses with the family, and
    // the fixed header fits in the frame.
    match key.l3 {
        L3::None => {}
        L3::Arp(_) => {
            assert_eq!(key.ethertype, ethertype::ARP);
            assert!(l3 + 28 <= len);
        }
        L3::Ipv4(ip) => {
            assert_eq!(key.ethertype, ethertype::IPV4);
            assert!(matches!((ip.src, ip.dst), (IpAddr::V4(_), IpAddr::V4(_))));
            assert!(l3 + 20 <= len);
        }
        L3::Ipv6(ip) => {
            assert_eq!(key.ethertype, ethertype::IPV6);
            assert!(matches!((ip.src, ip.dst), (IpAddr::V6(_), IpAddr::V6(_))));
            assert!(l3 + 40 <= len);
        }
    }

    // An L4 needs an IP L3, lies after it and its header fits in the frame.
    if key.l4 != L4::None {
        let (min_l4, ip_hdr) = match key.l3 {
            L3::Ipv4(_) => (l3 + 20, 20),
            L3::Ipv6(_) => (l3 + 40, 40),
            other => panic!("L4 {:?} without IP L3 {:?}", key.l4, other),
        };
        assert!(l4 >= min_l4, "l4_offset {l4} inside the {ip_hdr}-byte IP header at {l3}");
        let need = match key.l4 {
            L4::Tcp { .. } => 20,
            L4::Udp { .. } | L4::Icmpv4 { .. } | L4::Icmpv6 { .. } => 8,
            L4::None => 0,
        };
        assert!(l4 + need <= len, "L4 header at {l4}+{need} past frame of {len}");
        if let L4::Tcp { .. } = key.l4 {
            let doff = usize::from(frame[l4 + 12] >> 4) * 4;
            assert!(doff >= 20 && l4 + doff <= len);
        }
        assert!(matches!(
            (key.l3, key.l4),
            (L3::Ipv4(_), L4::Icmpv4 { .. })
                | (L3::Ipv6(_), L4::Icmpv6 { .. })
                | (_, L4::Tcp { .. })
                | (_, L4::Udp { .. })
        ));
        // A later fragment carries no L4 header.
        if let L3::Ipv4(ip) | L3::Ipv6(ip) = key.l3 {
            assert_ne!(ip.frag, packet::Frag::Later);
        }
    }

    // A malformed inner layer leaves at least the L4 empty.
    if key.malformed.is_some() {
        assert_eq!(key.l4, L4::None);
    }
});
