//! Byte-level tests of encap, decap, MTU decisions and ICMP replies.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    Icmpv4Type, Icmpv6Type, IpNumber, NetSlice, PacketBuilder, SlicedPacket, TransportSlice,
};
use packet::checksum::{add, fold, pseudo_header_v4, pseudo_header_v6, sum, verify};
use packet::{CsumOffload, FlowKey, GsoType, MacAddr, Offload, PacketBuf};
use proptest::prelude::*;

use crate::decap::{parse, parse_header};
use crate::mtu::{check_mtu, frag_needed, packet_too_big, IcmpAction, IcmpError, MtuDecision};
use crate::*;

const VM1: [u8; 6] = [2, 0, 0, 0, 0, 1];
const VM2: [u8; 6] = [2, 0, 0, 0, 0, 2];
const HOST_A: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0xa]);
const NEXT_HOP: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0xb]);
const GW_MAC: MacAddr = MacAddr([0x02, 0xaa, 0, 0, 0, 1]);

fn underlay() -> Underlay {
    Underlay::v4(
        HOST_A,
        NEXT_HOP,
        Ipv4Addr::new(192, 0, 2, 1),
        Ipv4Addr::new(192, 0, 2, 2),
    )
}

fn vni(v: u32) -> Vni {
    Vni::new(v).unwrap()
}

fn key(f: &[u8]) -> FlowKey {
    FlowKey::parse(f).unwrap()
}

/// ICMP echo request 10.0.0.1 -> 10.0.0.2 padded to 60 bytes.
fn small_inner() -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(VM1, VM2)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .icmpv4_echo_request(0x1234, 1)
        .write(&mut f, &[0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17])
        .unwrap();
    f.resize(60, 0);
    f
}

/// UDP/IPv4 frame with an IP packet of `ip_len` bytes (DF as given).
fn udp4_frame(ip_len: usize, df: bool, sport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(VM1, VM2)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .udp(sport, 9)
        .write(&mut f, &vec![0xab; ip_len - 28])
        .unwrap();
    if !df {
        // PacketBuilder sets DF; clear it and fix the header checksum.
        f[20] &= !0x40;
        f[24] = 0;
        f[25] = 0;
        let c = packet::checksum::checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
    }
    f
}

fn udp6_frame(ip_len: usize) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(VM1, VM2)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .udp(1000, 2000)
        .write(&mut f, &vec![0xcd; ip_len - 48])
        .unwrap();
    f
}

fn tso4(payload_len: usize, gso_size: u16) -> (PacketBuf, Vec<u8>) {
    let data: Vec<u8> = (0..payload_len).map(|i| (i * 7 % 251) as u8).collect();
    let mut f = Vec::new();
    PacketBuilder::ethernet2(VM1, VM2)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(5000, 80, 1000, 512)
        .ack(1)
        .psh()
        .write(&mut f, &data)
        .unwrap();
    let l4 = 34;
    let p = fold(pseudo_header_v4(
        [10, 0, 0, 1].into(),
        [10, 0, 0, 2].into(),
        6,
        (f.len() - l4) as u16,
    ));
    f[l4 + 16..l4 + 18].copy_from_slice(&p.to_be_bytes());
    let mut b = PacketBuf::from_frame(&f);
    b.offload = Offload {
        gso: GsoType::TcpV4,
        ecn: false,
        gso_size,
        hdr_len: 54,
        csum: Some(CsumOffload {
            start: l4 as u16,
            offset: 16,
        }),
        data_valid: false,
    };
    (b, data)
}

// ---- encap ----

#[test]
fn encap_fixture_every_field() {
    let inner = small_inner();
    let k = key(&inner);
    let mut b = PacketBuf::from_frame(&inner);
    let mut e = Encapsulator::new(EncapConfig::default());
    let info = e.encap(&mut b, &underlay(), vni(0x12_3456), &k).unwrap();
    let sport = e.src_port(&k);
    assert_eq!(info.src_port, sport);
    assert_eq!(info.outer_len, 50);
    assert!(!info.inner_csum_partial);
    assert!((SRC_PORT_MIN..=SRC_PORT_MAX).contains(&sport));
    let [sp0, sp1] = sport.to_be_bytes();
    #[rustfmt::skip]
    let want_outer: [u8; 50] = [
        // Ethernet: dst = next hop, src = host A, IPv4
        0x52, 0x54, 0, 0, 0, 0xb,  0x52, 0x54, 0, 0, 0, 0xa,  0x08, 0x00,
        // IPv4: v4 IHL 5, TOS 0, total 96, ID 0, DF, TTL 64, UDP, csum
        0x45, 0x00, 0x00, 0x60,  0x00, 0x00, 0x40, 0x00,  0x40, 0x11, 0xb6, 0x89,
        192, 0, 2, 1,  192, 0, 2, 2,
        // UDP: sport, 4789, length 76, checksum 0
        sp0, sp1, 0x12, 0xb5, 0x00, 0x4c, 0x00, 0x00,
        // VXLAN: I flag, reserved 0, VNI 0x123456, reserved 0
        0x08, 0x00, 0x00, 0x00, 0x12, 0x34, 0x56, 0x00,
    ];
    assert_eq!(&b.frame()[..50], &want_outer);
    assert_eq!(&b.frame()[50..], &inner[..]);
    assert!(verify(&b.frame()[14..34]));
    // etherparse agrees
    let p = SlicedPacket::from_ethernet(b.frame()).unwrap();
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    assert!(ip.header().dont_fragment());
    assert_eq!(ip.header().ttl(), 64);
    let Some(TransportSlice::Udp(u)) = &p.transport else {
        panic!()
    };
    assert_eq!(u.destination_port(), 4789);
    assert_eq!(u.payload().len(), 8 + 60);
    // the ID counter moves on
    let mut b2 = PacketBuf::from_frame(&inner);
    e.encap(&mut b2, &underlay(), vni(1), &k).unwrap();
    assert_eq!(&b2.frame()[18..20], &[0, 1]);
}

#[test]
fn encap_config_port_ttl_tos() {
    let inner = small_inner();
    let mut b = PacketBuf::from_frame(&inner);
    let mut e = Encapsulator::new(EncapConfig {
        dst_port: 8472,
        ttl: 9,
        tos: 0xb8,
        ..EncapConfig::default()
    });
    e.encap(&mut b, &underlay(), vni(7), &key(&inner)).unwrap();
    let f = b.frame();
    assert_eq!((f[15], f[22]), (0xb8, 9));
    assert_eq!(&f[36..38], &8472u16.to_be_bytes());
    assert!(verify(&f[14..34]));
    assert_eq!(parse(f, 8472).unwrap().vni, vni(7));
    assert_eq!(parse(f, 4789), Err(DecapError::WrongPort));
}

#[test]
fn encap_errors() {
    let inner = small_inner();
    let k = key(&inner);
    let mut e = Encapsulator::new(EncapConfig::default());
    // GSO frame to encap
    let (mut t, _) = tso4(3000, 1000);
    let tk = key(t.frame());
    assert_eq!(
        e.encap(&mut t, &underlay(), vni(1), &tk),
        Err(EncapError::GsoFrame)
    );
    // non-GSO to encap_tunnel_gso
    let mut b = PacketBuf::from_frame(&inner);
    assert_eq!(
        e.encap_tunnel_gso(&mut b, &underlay(), vni(1), &k),
        Err(EncapError::NotGso)
    );
    // IPv6 and mixed underlay
    let mut u6 = underlay();
    u6.dst_ip = IpAddr::V6(Ipv6Addr::LOCALHOST);
    assert_eq!(u6.family(), None);
    assert_eq!(
        e.encap(&mut b, &u6, vni(1), &k),
        Err(EncapError::Ipv6Underlay)
    );
    // runt
    let mut r = PacketBuf::from_frame(&inner[..13]);
    assert_eq!(
        e.encap(&mut r, &underlay(), vni(1), &k),
        Err(EncapError::InnerTooShort)
    );
    // headroom used up (a previous encapsulation)
    let mut h = PacketBuf::from_frame(&inner);
    h.push_front(100).unwrap();
    assert_eq!(
        e.encap(&mut h, &underlay(), vni(1), &k),
        Err(EncapError::NoHeadroom)
    );
    assert_eq!(h.len(), 160, "unchanged on error");
    // too long for one outer IPv4 packet
    let mut big = PacketBuf::from_frame(&vec![0u8; 65_500]);
    assert_eq!(
        e.encap(&mut big, &underlay(), vni(1), &k),
        Err(EncapError::TooLong)
    );
    assert_eq!(EncapError::TooLong.name(), "vxlan_too_long");
}

#[test]
fn pending_inner_checksum_completed_or_shifted() {
    let (mut sw, _) = tso4(500, 1448);
    sw.offload.gso = GsoType::None;
    sw.offload.gso_size = 0;
    let inner_k = key(sw.frame());
    let mut hw = PacketBuf::from_frame(sw.frame());
    hw.offload = sw.offload;

    // default: completed in software
    let mut e = Encapsulator::new(EncapConfig::default());
    let info = e.encap(&mut sw, &underlay(), vni(5), &inner_k).unwrap();
    assert!(!info.inner_csum_partial);
    assert_eq!(sw.offload.csum, None);
    let tcp = &sw.frame()[50 + 34..];
    let ps = pseudo_header_v4(
        [10, 0, 0, 1].into(),
        [10, 0, 0, 2].into(),
        6,
        tcp.len() as u16,
    );
    assert_eq!(fold(add(ps, sum(tcp))), 0xffff);

    // kept partial: start shifted by 50; completing later gives the same bytes
    let mut e = Encapsulator::new(EncapConfig {
        inner_csum_partial: true,
        ..EncapConfig::default()
    });
    let info = e.encap(&mut hw, &underlay(), vni(5), &inner_k).unwrap();
    assert!(info.inner_csum_partial);
    assert_eq!(
        hw.offload.csum,
        Some(CsumOffload {
            start: 84,
            offset: 16
        })
    );
    assert_eq!(hw.offload.hdr_len, 104);
    packet::complete_checksum(&mut hw).unwrap();
    assert_eq!(hw.frame(), sw.frame());
}

#[test]
fn tunnel_gso_keeps_super_frame_and_round_trips() {
    let (mut b, data) = tso4(20_000, 1398);
    let orig = b.frame().to_vec();
    let orig_off = b.offload;
    let k = key(&orig);
    let mut e = Encapsulator::new(EncapConfig::default());
    let t = e.encap_tunnel_gso(&mut b, &underlay(), vni(9), &k).unwrap();
    assert_eq!(t.inner_gso, GsoType::TcpV4);
    assert_eq!(t.gso_size, 1398);
    assert_eq!(t.outer_len, 50);
    assert_eq!(t.src_port, e.src_port(&k));
    assert_eq!(b.offload.gso, GsoType::TcpV4);
    assert_eq!(b.offload.csum.map(|c| c.start), Some(34 + 50));
    assert_eq!(b.offload.hdr_len, 54 + 50);
    assert_eq!(&b.frame()[50..], &orig[..]);
    // decap gives the super-frame back with its offload, and it still
    // segments correctly
    let d = decap(&mut b, DEFAULT_PORT).unwrap();
    assert_eq!(d.vni, vni(9));
    assert_eq!(b.frame(), &orig[..]);
    assert_eq!(b.offload, orig_off);
    let mut got = Vec::new();
    packet::segment(&b, |s| {
        let p = SlicedPacket::from_ethernet(s).unwrap();
        let Some(TransportSlice::Tcp(t)) = p.transport else {
            panic!()
        };
        got.extend_from_slice(t.payload());
    })
    .unwrap();
    assert_eq!(got, data);
    // a 64 KB super-frame does not fit one outer packet
    let (mut big, _) = tso4(65_480, 1398);
    let bk = key(big.frame());
    assert_eq!(
        e.encap_tunnel_gso(&mut big, &underlay(), vni(9), &bk),
        Err(EncapError::TooLong)
    );
}

/// Checks one emitted VXLAN packet and returns the inner TCP payload.
fn check_segment(outer: &[u8], mtu: usize, sport: u16) -> Vec<u8> {
    let ip_len = outer.len() - 14;
    assert!(ip_len <= mtu, "{ip_len} > {mtu}");
    let p = SlicedPacket::from_ethernet(outer).unwrap();
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    let h = ip.header();
    assert_eq!(usize::from(h.total_len()), ip_len);
    assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
    assert!(h.dont_fragment());
    let Some(TransportSlice::Udp(u)) = &p.transport else {
        panic!()
    };
    assert_eq!(usize::from(u.length()), ip_len - 20);
    assert_eq!(u.source_port(), sport);
    assert_eq!(u.checksum(), 0);
    let d = parse(outer, DEFAULT_PORT).unwrap();
    let inner = &outer[d.inner_offset..d.inner_offset + d.inner_len];
    let ip = etherparse::Ipv4Slice::from_slice(&inner[14..]).unwrap();
    let tcp = ip.payload().payload;
    let ps = pseudo_header_v4(
        ip.header().source_addr(),
        ip.header().destination_addr(),
        6,
        tcp.len() as u16,
    );
    assert_eq!(fold(add(ps, sum(tcp))), 0xffff, "inner TCP checksum");
    assert!(verify(ip.header().slice()), "inner IPv4 checksum");
    let t = etherparse::TcpSlice::from_slice(tcp).unwrap();
    t.payload().to_vec()
}

#[test]
fn encap_segments_tso4_fits_underlay() {
    // gso_size 1448 does not fit under 1500 - 50: cut at 1500 - 36 - 54 = 1410.
    for (gso, mtu, want_n, want_seg) in [
        (1448u16, 1500u16, 3usize, 1410usize),
        (1000, 1500, 4, 1000),
        (1448, 9000, 3, 1448),
    ] {
        let (mut b, data) = tso4(4000, gso);
        let k = key(b.frame());
        let before = (b.frame().to_vec(), b.offload);
        let mut e = Encapsulator::new(EncapConfig::default());
        let sport = e.src_port(&k);
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        let n = e
            .encap_segments(&mut b, &underlay(), vni(77), &k, mtu, |o| {
                assert_eq!(o.offload, Offload::NONE);
                let p = check_segment(o.frame(), usize::from(mtu), sport);
                sizes.push(p.len());
                got.extend_from_slice(&p);
            })
            .unwrap();
        assert_eq!(n, want_n);
        assert_eq!(sizes.len(), want_n);
        assert!(sizes[..n - 1].iter().all(|&s| s == want_seg), "{sizes:?}");
        assert_eq!(got, data);
        assert_eq!((b.frame().to_vec(), b.offload), before, "buf untouched");
    }
}

#[test]
fn encap_segments_plain_and_refusals() {
    // a plain frame with a pending checksum: one packet, checksum completed
    let (mut b, data) = tso4(1000, 0);
    b.offload.gso = GsoType::None;
    let k = key(b.frame());
    let mut e = Encapsulator::new(EncapConfig::default());
    let sport = e.src_port(&k);
    let mut n_out = 0;
    let n = e
        .encap_segments(&mut b, &underlay(), vni(1), &k, 1500, |o| {
            assert_eq!(check_segment(o.frame(), 1500, sport), data);
            n_out += 1;
        })
        .unwrap();
    assert_eq!((n, n_out), (1, 1));
    // a plain frame too big
    let big = udp4_frame(1451, true, 1);
    let mut bb = PacketBuf::from_frame(&big);
    assert_eq!(
        e.encap_segments(&mut bb, &underlay(), vni(1), &key(&big), 1500, |_| {}),
        Err(EncapError::ExceedsMtu)
    );
    // USO segments cannot be cut smaller
    let uso = udp4_frame(4000, true, 1);
    let mut ub = PacketBuf::from_frame(&uso);
    ub.offload.gso = GsoType::UdpL4;
    ub.offload.gso_size = 1430;
    assert_eq!(
        e.encap_segments(&mut ub, &underlay(), vni(1), &key(&uso), 1500, |_| {}),
        Err(EncapError::ExceedsMtu)
    );
    ub.offload.gso_size = 1400;
    let n = e
        .encap_segments(&mut ub, &underlay(), vni(1), &key(&uso), 1500, |o| {
            assert!(o.len() - 14 <= 1500);
        })
        .unwrap();
    assert_eq!(n, 3);
    // MTU too small for any TCP payload
    let (mut t, _) = tso4(4000, 1448);
    let tk = key(t.frame());
    assert_eq!(
        e.encap_segments(&mut t, &underlay(), vni(1), &tk, 90, |_| {}),
        Err(EncapError::MtuTooSmall)
    );
    // UFO is not done in software
    t.offload.gso = GsoType::Ufo;
    assert!(matches!(
        e.encap_segments(&mut t, &underlay(), vni(1), &tk, 1500, |_| {}),
        Err(EncapError::Gso(_))
    ));
}

// ---- encap_segments agrees with check_mtu (fuzz finding, vxlan_encap) ----

/// Reproducers of the `vxlan_encap` fuzz target (`fuzz/corpus/vxlan_encap/`),
/// in its input layout: `[vnet_hdr(12), vni(3), mtu(2, LE), flags, frame]`.
/// A USO frame with one 1-byte segment, `gso_size` 1400, MTU 576.
const FUZZ_USO_SHORT_SEGMENT: &str = "00050000780500000000000000000140020002000000000202000000000108004500001d123440004011149a0a0000010a0000021388138900094cc878";
/// A TSO4 frame with 20 payload bytes, `gso_size` 4, MTU 94: five 58-byte
/// segments fill the room (58) exactly.
const FUZZ_TSO_SMALL_MSS: &str = "0001000004000000000000000000015e000002000000000202000000000108004500003c12344000400614860a0000010a00000200010002000003e8000000005018ffff6f9900006162636465666768696a6b6c6d6e6f7071727374";
/// What libFuzzer found: a VLAN-tagged TSO4 frame with 28 bytes of TCP
/// options (86 bytes of headers), 12 payload bytes, `gso_size` 6, MTU 129
/// (room 93): two 92-byte segments.
const FUZZ_TSO_VLAN_TCP_OPTIONS: &str = "0001000006000000000000000000018100006408004500005012000000018100006408004500005012344000400614720a0000010a00000200010002000003e800000000c4ee1185000000005018ffff2e4e36000000220010000000000064dc052c0200000200802d344000370601000a00008c";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Decodes a `vxlan_encap` fuzz input as the target does (IPv4 underlay
/// only), checks that `check_mtu` says `Fits`, runs `encap_segments` and
/// checks every packet: fits the MTU, decaps to the VNI and source port,
/// inner segment parses cleanly with verifying IPv4 header and L4
/// checksums and at most `gso_size` payload bytes, payloads reassemble.
/// Returns the number of packets and the inner segment lengths.
fn encap_fuzz_input(hex: &str) -> (usize, Vec<usize>) {
    let data = unhex(hex);
    let (h, frame) = data.split_at(18);
    let offload = Offload::from_vnet_hdr(&h[..12]).unwrap();
    assert!(offload.is_gso());
    let v = Vni::from_bytes([h[12], h[13], h[14]]);
    let mtu = u16::from_le_bytes([h[15], h[16]]);
    let flags = h[17];
    assert_ne!(flags & 0x0e, 0x0e, "IPv6 underlay input");
    let cfg = EncapConfig {
        inner_csum_partial: flags & 1 != 0,
        tos: flags & 0xf0,
        hash_seed: u64::from(flags).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        ..EncapConfig::default()
    };
    let k = key(frame);
    assert_eq!(k.malformed, None);
    let mut b = PacketBuf::from_frame(frame);
    b.offload = offload;
    assert_eq!(check_mtu(mtu, Family::V4, &b, &k), MtuDecision::Fits);

    let l4 = usize::from(k.l4_offset);
    let hdr = match k.l4 {
        packet::L4::Tcp { .. } => l4 + usize::from(frame[l4 + 12] >> 4) * 4,
        packet::L4::Udp { .. } => l4 + 8,
        other => panic!("{other:?}"),
    };
    let l3 = usize::from(k.l3_offset);
    let end = l3 + usize::from(u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]));
    let payload = &frame[hdr..end];

    let mut e = Encapsulator::new(cfg);
    let sport = e.src_port(&k);
    let mut outs = Vec::new();
    let n = e
        .encap_segments(&mut b, &underlay(), v, &k, mtu, |o| {
            assert_eq!(o.offload, Offload::NONE);
            outs.push(o.frame().to_vec());
        })
        .unwrap_or_else(|err| panic!("check_mtu says Fits, encap_segments {err:?}"));
    assert_eq!((b.frame(), b.offload), (frame, offload), "buf untouched");
    assert_eq!(n, outs.len());
    let mut got = Vec::new();
    let mut lens = Vec::new();
    for out in &outs {
        assert!(
            out.len() - 14 <= usize::from(mtu),
            "{} > {mtu}",
            out.len() - 14
        );
        assert!(verify(&out[14..34]), "outer IPv4 checksum");
        let d = parse(out, DEFAULT_PORT).unwrap();
        assert_eq!((d.vni, d.src_port), (v, sport));
        let inner = &out[d.inner_offset..d.inner_offset + d.inner_len];
        lens.push(inner.len());
        let sk = key(inner);
        assert_eq!(sk.malformed, None);
        assert_eq!((sk.l3_offset, sk.l4_offset), (k.l3_offset, k.l4_offset));
        assert!(verify(&inner[l3..l4]), "inner IPv4 header checksum");
        let (Some(ip), true) = (sk.ip(), inner.len() >= hdr) else {
            panic!("segment without IP or headers: {sk:?}")
        };
        let (IpAddr::V4(src), IpAddr::V4(dst)) = (ip.src, ip.dst) else {
            panic!("not IPv4")
        };
        let ps = pseudo_header_v4(src, dst, ip.proto, (inner.len() - l4) as u16);
        assert_eq!(
            fold(add(ps, sum(&inner[l4..]))),
            0xffff,
            "inner L4 checksum"
        );
        assert!(inner.len() - hdr <= usize::from(offload.gso_size));
        got.extend_from_slice(&inner[hdr..]);
    }
    assert_eq!(got, payload, "segments reassemble the payload");
    (n, lens)
}

#[test]
fn encap_segments_uso_short_segment_fits() {
    // Headers + gso_size (1442) exceed the room (576 - 36 = 540), but the
    // only segment is the 43-byte frame: check_mtu says Fits, so it is sent
    // (it used to be ExceedsMtu).
    assert_eq!(encap_fuzz_input(FUZZ_USO_SHORT_SEGMENT), (1, vec![43]));
}

#[test]
fn encap_segments_tso_small_gso_size_needs_no_clamp() {
    // room 94 - 36 = 58, headers 54: only 4 bytes per segment would fit
    // after clamping (< 8), but gso_size 4 already fits, so no clamping and
    // no MtuTooSmall.
    assert_eq!(encap_fuzz_input(FUZZ_TSO_SMALL_MSS), (5, vec![58; 5]));
}

#[test]
fn encap_segments_tso_vlan_tcp_options_fuzzer_input() {
    // room 93 - 86 bytes of headers = 7 < 8, gso_size 6 fits.
    assert_eq!(
        encap_fuzz_input(FUZZ_TSO_VLAN_TCP_OPTIONS),
        (2, vec![92; 2])
    );
}

#[test]
fn encap_segments_short_payload_needs_no_clamp() {
    // TSO4 with 5 payload bytes, gso_size 1448: headers + gso_size do not
    // fit, the one 59-byte segment does, even with 5 bytes of room left
    // for payload (< 8): sent whole.
    let (mut b, data) = tso4(5, 1448);
    let k = key(b.frame());
    let mut e = Encapsulator::new(EncapConfig::default());
    let sport = e.src_port(&k);
    for mtu in [95u16, 100] {
        assert_eq!(check_mtu(mtu, Family::V4, &b, &k), MtuDecision::Fits);
        let mut got = Vec::new();
        let n = e
            .encap_segments(&mut b, &underlay(), vni(1), &k, mtu, |o| {
                got.extend(check_segment(o.frame(), usize::from(mtu), sport));
            })
            .unwrap();
        assert_eq!((n, &got), (1, &data));
    }
    // One byte less: does not fit, and cutting would leave 4 bytes.
    assert_ne!(check_mtu(94, Family::V4, &b, &k), MtuDecision::Fits);
    assert_eq!(
        e.encap_segments(&mut b, &underlay(), vni(1), &k, 94, |_| {}),
        Err(EncapError::MtuTooSmall)
    );
}

#[test]
fn source_port_entropy() {
    let e = Encapsulator::new(EncapConfig::default());
    let mut buckets = [0usize; 16];
    let mut seen = std::collections::HashSet::new();
    let n = 4000;
    for i in 0..n {
        let f = udp4_frame(100, true, 1024 + i as u16);
        let p = e.src_port(&key(&f));
        assert!((SRC_PORT_MIN..=SRC_PORT_MAX).contains(&p));
        // same flow, same port (a later packet of it)
        assert_eq!(e.src_port(&key(&udp4_frame(600, true, 1024 + i as u16))), p);
        buckets[usize::from(p - SRC_PORT_MIN) / 1024] += 1;
        seen.insert(p);
    }
    // ~4000^2 / (2 * 16384) = 488 expected collisions
    assert!(seen.len() > 3300, "only {} distinct ports", seen.len());
    // 250 expected per bucket, sd ~15.5
    for b in buckets {
        assert!((170..=330).contains(&b), "{buckets:?}");
    }
    // a different seed moves flows
    let e2 = Encapsulator::new(EncapConfig {
        hash_seed: 0xdead_beef,
        ..EncapConfig::default()
    });
    let f = udp4_frame(100, true, 5);
    let moved = (0..64)
        .filter(|i| {
            let f = udp4_frame(100, true, 5000 + i);
            e.src_port(&key(&f)) != e2.src_port(&key(&f))
        })
        .count();
    assert!(moved > 60);
    let _ = f;
    // non-IP frames spread by MAC
    let mut arp_ports = std::collections::HashSet::new();
    for i in 0..64u8 {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 1, i]);
        f.extend_from_slice(&[0x08, 0x06]);
        f.resize(60, 0);
        arp_ports.insert(e.src_port(&key(&f)));
    }
    assert!(arp_ports.len() > 55);
    // the mapping covers both ends of the range
    assert_eq!(src_port_from_hash(0), SRC_PORT_MIN);
    assert_eq!(src_port_from_hash(u32::MAX), SRC_PORT_MAX);
}

// ---- decap ----

/// A VXLAN packet as Linux's kernel vxlan driver sends it (`ip link add
/// vxlan0 type vxlan id 42 dstport 4789`, defaults: DF clear, TTL 64 from
/// the route, UDP checksum 0 over IPv4, source port from the local port
/// range), written out field by field per RFC 7348. Inner: ICMP echo
/// request 10.0.0.1 -> 10.0.0.2 (50 bytes, unpadded).
#[rustfmt::skip]
const LINUX_VXLAN: [u8; 100] = [
    // outer Ethernet: dst 52:54:00:12:34:56, src 52:54:00:ab:cd:ef, IPv4
    0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x52, 0x54, 0x00, 0xab, 0xcd, 0xef, 0x08, 0x00,
    // IPv4: 45 00, total 86, ID 0x1c46, no flags, TTL 64, UDP, csum 0xdae2,
    // 192.168.1.10 -> 192.168.1.20
    0x45, 0x00, 0x00, 0x56, 0x1c, 0x46, 0x00, 0x00, 0x40, 0x11, 0xda, 0xe2,
    0xc0, 0xa8, 0x01, 0x0a, 0xc0, 0xa8, 0x01, 0x14,
    // UDP: 54321 -> 4789, length 66, checksum 0
    0xd4, 0x31, 0x12, 0xb5, 0x00, 0x42, 0x00, 0x00,
    // VXLAN: flags 08, reserved, VNI 42, reserved
    0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x2a, 0x00,
    // inner Ethernet 02:..:01 -> 02:..:02, IPv4
    0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00,
    // inner IPv4: total 36, ID 0xbeef, DF, TTL 64, ICMP, csum 0x67e7
    0x45, 0x00, 0x00, 0x24, 0xbe, 0xef, 0x40, 0x00, 0x40, 0x01, 0x67, 0xe7,
    0x0a, 0x00, 0x00, 0x01, 0x0a, 0x00, 0x00, 0x02,
    // ICMP echo request id 0x1234 seq 1, csum 0x997a, 8 bytes of data
    0x08, 0x00, 0x99, 0x7a, 0x12, 0x34, 0x00, 0x01,
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17,
];

#[test]
fn decap_linux_fixture() {
    let d = parse(&LINUX_VXLAN, DEFAULT_PORT).unwrap();
    assert_eq!(d.vni, vni(42));
    assert_eq!(d.outer_src, IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10)));
    assert_eq!(d.outer_dst, IpAddr::V4(Ipv4Addr::new(192, 168, 1, 20)));
    assert_eq!(d.outer_src_mac, MacAddr([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
    assert_eq!(d.src_port, 54321);
    assert_eq!((d.inner_offset, d.inner_len), (50, 50));
    let mut b = PacketBuf::from_frame(&LINUX_VXLAN);
    assert_eq!(decap(&mut b, DEFAULT_PORT).unwrap(), d);
    assert_eq!(b.frame(), &LINUX_VXLAN[50..]);
    let k = key(b.frame());
    assert_eq!(k.src_mac, MacAddr(VM1));
    assert!(matches!(k.l4, packet::L4::Icmpv4 { ty: 8, .. }));
    // the fixture itself is valid per etherparse
    let p = SlicedPacket::from_ethernet(&LINUX_VXLAN).unwrap();
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    assert_eq!(
        ip.header().header_checksum(),
        ip.header().to_header().calc_header_checksum()
    );
}

#[test]
fn decap_trims_padding_and_accepts_ip_options() {
    // Ethernet padding after the outer IP packet is not part of the inner frame
    let mut f = LINUX_VXLAN.to_vec();
    f.extend_from_slice(&[0xee; 6]);
    let mut b = PacketBuf::from_frame(&f);
    decap(&mut b, DEFAULT_PORT).unwrap();
    assert_eq!(b.frame(), &LINUX_VXLAN[50..]);
    // IPv4 options (IHL 6): a 4-byte NOP/EOL option
    let mut g = LINUX_VXLAN[..14].to_vec();
    let mut ip = LINUX_VXLAN[14..34].to_vec();
    ip[0] = 0x46;
    ip[3] += 4;
    ip.extend_from_slice(&[1, 1, 1, 0]);
    fix_ip_csum(&mut ip);
    g.extend_from_slice(&ip);
    g.extend_from_slice(&LINUX_VXLAN[34..]);
    let d = parse(&g, DEFAULT_PORT).unwrap();
    assert_eq!(d.inner_offset, 54);
    assert_eq!(&g[54..54 + d.inner_len], &LINUX_VXLAN[50..]);
}

fn fix_ip_csum(ip: &mut [u8]) {
    let ihl = usize::from(ip[0] & 0xf) * 4;
    ip[10] = 0;
    ip[11] = 0;
    let c = packet::checksum::checksum(&ip[..ihl]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn reserved_bits_ignored_i_flag_required() {
    let mut f = LINUX_VXLAN;
    // every reserved bit and every other flag bit set
    f[42] = 0xff;
    f[43..46].copy_from_slice(&[0xff; 3]);
    f[49] = 0xff;
    let d = parse(&f, DEFAULT_PORT).unwrap();
    assert_eq!(d.vni, vni(42));
    // I flag cleared, everything else set
    f[42] = 0xf7;
    assert_eq!(parse(&f, DEFAULT_PORT), Err(DecapError::NoIFlag));
    f[42] = 0;
    assert_eq!(parse(&f, DEFAULT_PORT), Err(DecapError::NoIFlag));
    assert_eq!(parse_header(&f[42..]), Err(DecapError::NoIFlag));
    f[42] = 0x08;
    assert_eq!(parse_header(&f[42..]), Ok(vni(42)));
}

#[test]
fn every_decap_error() {
    use DecapError::*;
    let base = LINUX_VXLAN.to_vec();
    // (mutation, expected); `true` = re-fix the outer IPv4 checksum after
    type Case = (Box<dyn Fn(&mut Vec<u8>)>, bool, DecapError);
    let cases: Vec<Case> = vec![
        (Box::new(|f| f.truncate(13)), false, EthTruncated),
        (
            Box::new(|f| f[12..14].copy_from_slice(&[0x86, 0xdd])),
            false,
            NotIpv4,
        ),
        (
            Box::new(|f| f[12..14].copy_from_slice(&[0x81, 0x00])),
            false,
            NotIpv4,
        ),
        (Box::new(|f| f.truncate(14 + 19)), false, Ipv4Truncated),
        (Box::new(|f| f[14] = 0x65), true, Ipv4BadVersion),
        (Box::new(|f| f[14] = 0x44), true, Ipv4BadIhl),
        (
            Box::new(|f| {
                f[14] = 0x4f;
                f[16..18].copy_from_slice(&[0, 50]);
            }),
            true,
            Ipv4BadTotalLen,
        ),
        (
            Box::new(|f| {
                f[14] = 0x4f;
                f.truncate(40);
            }),
            false,
            Ipv4Truncated,
        ),
        (
            Box::new(|f| f[16..18].copy_from_slice(&[0, 19])),
            true,
            Ipv4BadTotalLen,
        ),
        (
            Box::new(|f| f[16..18].copy_from_slice(&[0, 87])),
            true,
            Ipv4BadTotalLen,
        ),
        (Box::new(|f| f[24] ^= 1), false, Ipv4BadChecksum),
        (Box::new(|f| f[20] = 0x20), true, Ipv4Fragment),
        (Box::new(|f| f[21] = 0x01), true, Ipv4Fragment),
        (Box::new(|f| f[23] = 6), true, NotUdp),
        (
            Box::new(|f| {
                f.truncate(14 + 20 + 7);
                f[16..18].copy_from_slice(&[0, 27]);
            }),
            true,
            UdpTruncated,
        ),
        (
            Box::new(|f| f[36..38].copy_from_slice(&[0x21, 0x18])),
            false,
            WrongPort,
        ),
        (
            Box::new(|f| f[38..40].copy_from_slice(&[0, 7])),
            false,
            UdpBadLength,
        ),
        (
            Box::new(|f| f[38..40].copy_from_slice(&[0, 67])),
            false,
            UdpBadLength,
        ),
        (
            Box::new(|f| {
                f.truncate(14 + 20 + 8 + 7);
                f[16..18].copy_from_slice(&[0, 35]);
                f[38..40].copy_from_slice(&[0, 15]);
            }),
            true,
            VxlanTruncated,
        ),
        (Box::new(|f| f[42] = 0), false, NoIFlag),
        (
            Box::new(|f| {
                f.truncate(50 + 13);
                f[16..18].copy_from_slice(&[0, 49]);
                f[38..40].copy_from_slice(&[0, 29]);
            }),
            true,
            InnerTooShort,
        ),
    ];
    let mut hit = std::collections::HashSet::new();
    for (i, (m, fix, want)) in cases.iter().enumerate() {
        let mut f = base.clone();
        m(&mut f);
        if *fix {
            let ihl = (usize::from(f[14] & 0xf) * 4).clamp(20, f.len() - 14);
            fix_ip_csum_raw(&mut f[14..14 + ihl]);
        }
        assert_eq!(parse(&f, DEFAULT_PORT), Err(*want), "case {i}");
        let mut b = PacketBuf::from_frame(&f);
        assert_eq!(decap(&mut b, DEFAULT_PORT), Err(*want));
        assert_eq!(b.frame(), &f[..], "unchanged on error");
        hit.insert(*want);
    }
    for e in DecapError::ALL {
        assert!(hit.contains(&e), "{e:?} not exercised");
        assert!(e.name().starts_with("vxlan_"));
    }
}

fn fix_ip_csum_raw(h: &mut [u8]) {
    h[10] = 0;
    h[11] = 0;
    let c = packet::checksum::checksum(h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
}

// ---- MTU and ICMP ----

#[test]
fn mtu_decisions_at_the_limit() {
    let fits = udp4_frame(1450, true, 1);
    let b = PacketBuf::from_frame(&fits);
    assert_eq!(
        check_mtu(1500, Family::V4, &b, &key(&fits)),
        MtuDecision::Fits
    );
    let big = udp4_frame(1451, true, 1);
    let b = PacketBuf::from_frame(&big);
    assert_eq!(
        check_mtu(1500, Family::V4, &b, &key(&big)),
        MtuDecision::TooBig {
            mtu: 1450,
            icmp: IcmpAction::FragNeeded
        }
    );
    // no DF: no ICMP (inner fragmentation is not done)
    let nodf = udp4_frame(1451, false, 1);
    let b = PacketBuf::from_frame(&nodf);
    assert_eq!(
        check_mtu(1500, Family::V4, &b, &key(&nodf)),
        MtuDecision::TooBig {
            mtu: 1450,
            icmp: IcmpAction::Drop
        }
    );
    // IPv6 inner
    for (len, want) in [
        (1450, MtuDecision::Fits),
        (
            1451,
            MtuDecision::TooBig {
                mtu: 1450,
                icmp: IcmpAction::PacketTooBig,
            },
        ),
    ] {
        let f = udp6_frame(len);
        let b = PacketBuf::from_frame(&f);
        assert_eq!(check_mtu(1500, Family::V4, &b, &key(&f)), want);
    }
    // IPv6 underlay: 20 more bytes of overhead
    let f = udp6_frame(1431);
    let b = PacketBuf::from_frame(&f);
    assert_eq!(
        check_mtu(1500, Family::V6, &b, &key(&f)),
        MtuDecision::TooBig {
            mtu: 1430,
            icmp: IcmpAction::PacketTooBig
        }
    );
    // a VLAN-tagged inner frame has 4 bytes less for IP
    let mut t = Vec::new();
    PacketBuilder::ethernet2(VM1, VM2)
        .single_vlan(etherparse::VlanId::try_new(5).unwrap())
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .udp(1, 2)
        .write(&mut t, &[0; 1447 - 28])
        .unwrap();
    let b = PacketBuf::from_frame(&t);
    assert_eq!(
        check_mtu(1500, Family::V4, &b, &key(&t)),
        MtuDecision::TooBig {
            mtu: 1446,
            icmp: IcmpAction::FragNeeded
        }
    );
    // GSO: the segment size counts, not the super-frame's
    let (mut s, _) = tso4(20_000, 1410);
    assert_eq!(
        check_mtu(1500, Family::V4, &s, &key(s.frame())),
        MtuDecision::Fits
    );
    s.offload.gso_size = 1411;
    assert!(matches!(
        check_mtu(1500, Family::V4, &s, &key(s.frame())),
        MtuDecision::TooBig {
            mtu: 1450,
            icmp: IcmpAction::FragNeeded
        }
    ));
}

#[test]
fn no_icmp_for_icmp_errors_and_bad_sources() {
    // an ICMP error (dest unreachable) that is too big
    let mut f = Vec::new();
    PacketBuilder::ethernet2(VM1, VM2)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ))
        .write(&mut f, &[0; 1500])
        .unwrap();
    let b = PacketBuf::from_frame(&f);
    assert!(matches!(
        check_mtu(1500, Family::V4, &b, &key(&f)),
        MtuDecision::TooBig {
            icmp: IcmpAction::Drop,
            ..
        }
    ));
    // broadcast destination
    let mut f = Vec::new();
    PacketBuilder::ethernet2(VM1, [0xff; 6])
        .ipv4([10, 0, 0, 1], [255, 255, 255, 255], 64)
        .udp(1, 2)
        .write(&mut f, &[0; 1500])
        .unwrap();
    let b = PacketBuf::from_frame(&f);
    assert!(matches!(
        check_mtu(1500, Family::V4, &b, &key(&f)),
        MtuDecision::TooBig {
            icmp: IcmpAction::Drop,
            ..
        }
    ));
    // non-IP
    let mut f = vec![0u8; 1600];
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    let b = PacketBuf::from_frame(&f);
    assert!(matches!(
        check_mtu(1500, Family::V4, &b, &key(&f)),
        MtuDecision::TooBig {
            icmp: IcmpAction::Drop,
            ..
        }
    ));
}

#[test]
fn frag_needed_bytes() {
    let orig = udp4_frame(1451, true, 4242);
    let k = key(&orig);
    let gw = Ipv4Addr::new(10, 0, 0, 254);
    let mut out = PacketBuf::new();
    let n = frag_needed(&orig, &k, 1450, GW_MAC, gw, &mut out).unwrap();
    let r = out.frame().to_vec();
    assert_eq!(r.len(), n);
    assert_eq!(n, 14 + 20 + 8 + 28);
    let p = SlicedPacket::from_ethernet(&r).unwrap();
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = &p.link else {
        panic!()
    };
    assert_eq!(eth.destination(), VM1);
    assert_eq!(eth.source(), GW_MAC.octets());
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!()
    };
    let h = ip.header();
    assert_eq!(h.source_addr(), gw);
    assert_eq!(h.destination_addr(), Ipv4Addr::new(10, 0, 0, 1));
    assert_eq!(h.protocol(), IpNumber::ICMP);
    assert_eq!(usize::from(h.total_len()), n - 14);
    assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
    assert!(verify(h.slice()));
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
        panic!()
    };
    assert_eq!(
        icmp.icmp_type(),
        Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1450 }
        )
    );
    // full re-sum of the ICMP message
    assert!(verify(icmp.slice()));
    assert_eq!(
        icmp.checksum(),
        icmp.icmp_type().calc_checksum(icmp.payload())
    );
    // quote: the original IP header + 8 bytes (the UDP header)
    assert_eq!(icmp.payload(), &orig[14..14 + 28]);
    let q = packet::view::icmp_error_quote(icmp.slice(), false).unwrap();
    assert_eq!(packet::view::quoted_ports(&q), Some((4242, 9)));

    // wrong family, truncated, no room
    let v6 = udp6_frame(1451);
    assert_eq!(
        frag_needed(&v6, &key(&v6), 1450, GW_MAC, gw, &mut out),
        Err(IcmpError::WrongFamily)
    );
    assert_eq!(
        frag_needed(&orig[..20], &k, 1450, GW_MAC, gw, &mut out),
        Err(IcmpError::Truncated)
    );
    let mut tiny = PacketBuf::with_capacity(40);
    assert_eq!(
        frag_needed(&orig, &k, 1450, GW_MAC, gw, &mut tiny),
        Err(IcmpError::NoRoom)
    );
}

#[test]
fn packet_too_big_bytes() {
    let orig = udp6_frame(1500);
    let k = key(&orig);
    let gw: Ipv6Addr = "fd00::1".parse().unwrap();
    let mut out = PacketBuf::new();
    let n = packet_too_big(&orig, &k, 1450, GW_MAC, gw, &mut out).unwrap();
    assert_eq!(n, 14 + 1280, "reply is exactly the IPv6 minimum MTU");
    let r = out.frame().to_vec();
    let p = SlicedPacket::from_ethernet(&r).unwrap();
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = &p.link else {
        panic!()
    };
    assert_eq!((eth.destination(), eth.source()), (VM1, GW_MAC.octets()));
    let Some(NetSlice::Ipv6(ip)) = &p.net else {
        panic!()
    };
    let h = ip.header();
    assert_eq!(h.source_addr(), gw);
    assert_eq!(h.destination_addr(), Ipv6Addr::from([0xfd; 16]));
    assert_eq!(h.next_header(), IpNumber::IPV6_ICMP);
    assert_eq!(usize::from(h.payload_length()), 1240);
    let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
        panic!()
    };
    assert_eq!(icmp.icmp_type(), Icmpv6Type::PacketTooBig { mtu: 1450 });
    let ps = pseudo_header_v6(&gw, &Ipv6Addr::from([0xfd; 16]), 58, 1240);
    assert_eq!(fold(add(ps, sum(icmp.slice()))), 0xffff, "full re-sum");
    assert_eq!(
        icmp.checksum(),
        icmp.icmp_type()
            .calc_checksum(h.source(), h.destination(), icmp.payload())
            .unwrap()
    );
    assert_eq!(icmp.payload(), &orig[14..14 + 1232]);

    // a small packet is quoted whole
    let small = udp6_frame(200);
    let n = packet_too_big(&small, &key(&small), 1280, GW_MAC, gw, &mut out).unwrap();
    assert_eq!(n, 14 + 40 + 8 + 200);
    assert_eq!(&out.frame()[14 + 48..], &small[14..]);
    let v4 = udp4_frame(100, true, 1);
    assert_eq!(
        packet_too_big(&v4, &key(&v4), 1280, GW_MAC, gw, &mut out),
        Err(IcmpError::WrongFamily)
    );
}

// ---- properties ----

fn inner_frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 14..1600),
        (any::<[u8; 4]>(), any::<u16>(), 0usize..1400).prop_map(|(a, p, n)| {
            let mut f = Vec::new();
            PacketBuilder::ethernet2(VM1, VM2)
                .ipv4(a, [10, 0, 0, 2], 64)
                .tcp(p, 80, 1, 100)
                .write(&mut f, &vec![7; n])
                .unwrap();
            f
        }),
    ]
}

fn mutated_vxlan() -> impl Strategy<Value = Vec<u8>> {
    (
        inner_frame(),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        any::<usize>(),
    )
        .prop_map(|(inner, flips, cut)| {
            let mut b = PacketBuf::from_frame(&inner);
            let k = FlowKey::parse(&inner).unwrap();
            Encapsulator::new(EncapConfig::default())
                .encap(&mut b, &underlay(), Vni::new(1).unwrap(), &k)
                .unwrap();
            let mut f = b.frame().to_vec();
            for (at, v) in flips {
                let i = at % 60.min(f.len());
                f[i] = v;
            }
            if cut % 3 == 0 {
                f.truncate(cut % (f.len() + 1));
            }
            f
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn encap_decap_round_trip(inner in inner_frame(), v in 0u32..=Vni::MAX, seed in any::<u64>()) {
        let k = FlowKey::parse(&inner).unwrap();
        let mut b = PacketBuf::from_frame(&inner);
        let mut e = Encapsulator::new(EncapConfig { hash_seed: seed, ..EncapConfig::default() });
        let info = e.encap(&mut b, &underlay(), vni(v), &k).unwrap();
        prop_assert_eq!(b.len(), inner.len() + 50);
        prop_assert!(verify(&b.frame()[14..34]));
        let d = decap(&mut b, DEFAULT_PORT).unwrap();
        prop_assert_eq!(d.vni, vni(v));
        prop_assert_eq!(d.src_port, info.src_port);
        prop_assert!((SRC_PORT_MIN..=SRC_PORT_MAX).contains(&d.src_port));
        prop_assert_eq!(d.outer_src, underlay().src_ip);
        prop_assert_eq!(d.outer_dst, underlay().dst_ip);
        prop_assert_eq!(d.outer_src_mac, HOST_A);
        prop_assert_eq!(b.frame(), &inner[..]);
    }

    #[test]
    fn decap_never_panics_random(f in proptest::collection::vec(any::<u8>(), 0..200), port in any::<u16>()) {
        let _ = parse(&f, port);
        let mut b = PacketBuf::from_frame(&f);
        if decap(&mut b, port).is_err() {
            prop_assert_eq!(b.frame(), &f[..]);
        }
        let _ = parse_header(&f);
    }

    #[test]
    fn decap_never_panics_mutated(f in mutated_vxlan()) {
        let mut b = PacketBuf::from_frame(&f);
        if let Ok(d) = decap(&mut b, DEFAULT_PORT) {
            prop_assert_eq!(b.len(), d.inner_len);
            prop_assert!(d.inner_len >= 14);
        }
    }

    /// Whenever check_mtu says a TSO/USO super-frame fits, encap_segments
    /// sends it cut at gso_size; every packet fits the MTU either way.
    #[test]
    fn encap_segments_agrees_with_check_mtu(payload in 0usize..400, gso in 1u16..500, mtu in 0u16..700, udp in any::<bool>()) {
        let mut b = if udp {
            let f = udp4_frame(payload + 28, true, 7);
            let mut b = PacketBuf::from_frame(&f);
            b.offload.gso = GsoType::UdpL4;
            b
        } else {
            tso4(payload, 0).0
        };
        b.offload.gso_size = gso;
        let k = key(b.frame());
        let fits = check_mtu(mtu, Family::V4, &b, &k) == MtuDecision::Fits;
        let hdr = if udp { 42 } else { 54 };
        let mut e = Encapsulator::new(EncapConfig::default());
        let mut sizes = Vec::new();
        let r = e.encap_segments(&mut b, &underlay(), vni(1), &k, mtu, |o| {
            sizes.push(o.len() - OUTER_V4_LEN - hdr);
            assert!(o.len() - 14 <= usize::from(mtu));
        });
        if fits {
            prop_assert_eq!(r, Ok(payload.div_ceil(usize::from(gso)).max(1)));
            prop_assert!(sizes.iter().all(|&s| s <= usize::from(gso)));
        } else if udp {
            prop_assert_eq!(r, Err(EncapError::ExceedsMtu));
        } else {
            let max = usize::from(mtu).saturating_sub(36 + hdr);
            if max < 8 {
                prop_assert_eq!(r, Err(EncapError::MtuTooSmall));
            } else {
                prop_assert_eq!(r, Ok(payload.div_ceil(max).max(1)));
            }
        }
    }

    #[test]
    fn mtu_and_icmp_never_panic(f in proptest::collection::vec(any::<u8>(), 14..1700), mtu in 0u16..3000, gso in any::<bool>()) {
        let k = FlowKey::parse(&f).unwrap();
        let mut b = PacketBuf::from_frame(&f);
        if gso { b.offload.gso = GsoType::TcpV4; b.offload.gso_size = 1000; }
        let _ = check_mtu(mtu, Family::V4, &b, &k);
        let mut out = PacketBuf::new();
        let _ = frag_needed(&f, &k, mtu, GW_MAC, Ipv4Addr::LOCALHOST, &mut out);
        let _ = packet_too_big(&f, &k, u32::from(mtu), GW_MAC, Ipv6Addr::LOCALHOST, &mut out);
    }
}
