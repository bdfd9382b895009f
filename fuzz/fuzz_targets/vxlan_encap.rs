//! `vxlan::Encapsulator::{encap, encap_tunnel_gso, encap_segments}` and
//! `vxlan::check_mtu` (plus the ICMP too-big builders it leads to) on an
//! arbitrary inner frame with arbitrary offload metadata.
//!
//! Input layout: `[vnet_hdr(12), vni(3), mtu_lo, mtu_hi, flags, frame...]`.
//! The first 12 bytes are a virtio-net header parsed with
//! `packet::Offload::from_vnet_hdr` (inputs it refuses are skipped: that is
//! the `vnet_hdr` target's business), then the 24-bit VNI (big-endian), the
//! underlay IP MTU (little-endian) and `flags`: bit 0
//! `EncapConfig::inner_csum_partial`, bits 1-3 all set an IPv6 (bit 4 set)
//! or mixed-family underlay (refused), bits 4-7 the outer TOS; the hash seed
//! is derived from `flags`.
//! The flow key is the frame's (`FlowKey::parse`; a runt gets the key of an
//! all-zero Ethernet header).
//!
//! Asserts: never panics; every error is the documented one for its cause
//! and `encap_segments` leaves its buffer as it was; every packet any of the
//! three produces parses with `vxlan::decap::parse` on port 4789 to the VNI,
//! underlay addresses and source MAC given and the source port
//! `Encapsulator::src_port` picks (in 49152-65535), and its inner frame is
//! the input (checksum completed when the config says so) or, for
//! `encap_segments`, one segment; `decap` of an `encap`/`encap_tunnel_gso`
//! result gives the frame and its offload back; `encap_segments` emits
//! packets without offload whose outer IP length fits the underlay MTU, one
//! packet for a plain frame, and for a super-frame segments whose payloads
//! reassemble the original, each at most `gso_size` (TCP: at most the MSS
//! clamped to the MTU, all but the last exactly that), with correct inner
//! IPv4 header and L4 checksums; `check_mtu` is `Fits` exactly when a plain
//! frame fits (`len + 36 <= mtu` over IPv4, `+ 56` over IPv6), announces
//! `room - l3_offset`, only suggests ICMP for IPv4/IPv6 frames of the right
//! family, and for a plain frame agrees with `encap_segments`' `ExceedsMtu`;
//! a super-frame that `packet::segment` accepts and whose segments
//! `check_mtu` says fit is encapsulated by `encap_segments` (both functions
//! document that promise), and a USO `ExceedsMtu` or TCP `MtuTooSmall` comes
//! only with `check_mtu` saying the segments do not fit.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use packet::checksum::{add, fold, pseudo_header_v4, pseudo_header_v6, sum, verify};
use packet::{
    complete_checksum, segment, FlowKey, GsoError, GsoType, MacAddr, Offload, PacketBuf, L3, L4,
    VNET_HDR_LEN,
};
use vxlan::decap::parse;
use vxlan::mtu::{frag_needed, packet_too_big};
use vxlan::{
    check_mtu, decap, Decap, EncapConfig, EncapError, Encapsulator, Family, IcmpAction,
    MtuDecision, Underlay, Vni, DEFAULT_PORT, OUTER_V4_LEN, SRC_PORT_MAX, SRC_PORT_MIN,
};

const HDR: usize = VNET_HDR_LEN + 3 + 2 + 1;
/// Outer IPv4 + UDP + VXLAN: what the encapsulation adds to the IP length.
const V4_OVERHEAD: usize = OUTER_V4_LEN - 14;
const HOST_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x0a]);
const NEXT_HOP: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x0b]);
const GW_MAC: MacAddr = MacAddr([0x02, 0xaa, 0, 0, 0, 1]);

fn buf_with(frame: &[u8], o: Offload) -> PacketBuf {
    let mut b = PacketBuf::from_frame(frame);
    b.offload = o;
    b
}

/// Checks one encapsulated packet; returns what `parse` found.
fn check_packet(out: &[u8], u: &Underlay, vni: Vni, sport: u16, tos: u8) -> Decap {
    let d = parse(out, DEFAULT_PORT)
        .unwrap_or_else(|e| panic!("encapsulated packet does not decap: {e:?}"));
    assert_eq!(d.vni, vni);
    assert_eq!((d.outer_src, d.outer_dst), (u.src_ip, u.dst_ip));
    assert_eq!(d.outer_src_mac, u.src_mac);
    assert_eq!(out[..6], u.dst_mac.octets());
    assert_eq!(d.src_port, sport);
    assert!((SRC_PORT_MIN..=SRC_PORT_MAX).contains(&d.src_port));
    assert_eq!(d.inner_offset, OUTER_V4_LEN);
    assert_eq!(d.inner_len, out.len() - OUTER_V4_LEN, "no trailing bytes");
    assert_eq!(out[14], 0x45);
    assert_eq!(out[15], tos);
    assert_eq!(out[20] & 0x40, 0x40, "DF");
    assert!(verify(&out[14..34]), "outer IPv4 header checksum");
    assert_eq!(out[40..42], [0, 0], "outer UDP checksum 0");
    d
}

/// The frame as `encap` sends it: checksum completed unless kept partial.
/// `Err` is what `complete_checksum` says.
fn completed(frame: &[u8], o: Offload, keep_partial: bool) -> Result<Vec<u8>, GsoError> {
    let mut b = buf_with(frame, o);
    if !keep_partial {
        complete_checksum(&mut b)?;
    }
    Ok(b.frame().to_vec())
}

/// `o` as `decap` restores it after `encap` shifted it by 50 bytes (both
/// shifts saturate at the ends of `u16`).
fn round_tripped(o: Offload) -> Offload {
    let n = OUTER_V4_LEN as u16;
    let mut w = o;
    if let Some(c) = w.csum.as_mut() {
        c.start = c.start.saturating_add(n) - n;
    }
    if w.hdr_len != 0 {
        w.hdr_len = w.hdr_len.saturating_add(n) - n;
    }
    w
}

fn l4_sum_ok(seg: &[u8], key: &FlowKey, l4: usize) -> bool {
    let Some(ip) = key.ip() else { return false };
    let len = seg.len() - l4;
    let ps = match (ip.src, ip.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => pseudo_header_v4(s, d, ip.proto, len as u16),
        (IpAddr::V6(s), IpAddr::V6(d)) => pseudo_header_v6(&s, &d, ip.proto, len as u32),
        _ => return false,
    };
    fold(add(ps, sum(&seg[l4..]))) == 0xffff
}

/// Inner headers (Ethernet .. L4) of a TCP/UDP frame and the end of its IP
/// packet.
fn hdr_and_end(frame: &[u8], key: &FlowKey) -> (usize, usize) {
    let l3 = usize::from(key.l3_offset);
    let l4 = usize::from(key.l4_offset);
    let hdr = match key.l4 {
        L4::Tcp { .. } => l4 + usize::from(frame[l4 + 12] >> 4) * 4,
        L4::Udp { .. } => l4 + 8,
        other => panic!("a super-frame with L4 {other:?} was segmented"),
    };
    let be16 = |i: usize| usize::from(u16::from_be_bytes([frame[i], frame[i + 1]]));
    let end = match key.l3 {
        L3::Ipv4(_) => l3 + be16(l3 + 2),
        L3::Ipv6(_) => l3 + 40 + be16(l3 + 4),
        other => panic!("a super-frame with L3 {other:?} was segmented"),
    };
    (hdr, end)
}

fuzz_target!(|data: &[u8]| {
    let Some((h, frame)) = data.split_first_chunk::<HDR>() else {
        return;
    };
    let Ok(offload) = Offload::from_vnet_hdr(&h[..VNET_HDR_LEN]) else {
        return;
    };
    let vni = Vni::from_bytes([h[12], h[13], h[14]]);
    assert!(vni.get() <= Vni::MAX);
    let mtu = u16::from_le_bytes([h[15], h[16]]);
    let flags = h[17];
    let v6 = flags & 0x0e == 0x0e;
    let cfg = EncapConfig {
        inner_csum_partial: flags & 1 != 0,
        tos: flags & 0xf0,
        hash_seed: u64::from(flags).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        ..EncapConfig::default()
    };
    let underlay = if v6 {
        // IPv6 (bit 4 set) or mixed families: both refused.
        let dst = if flags & 0x10 != 0 {
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2))
        } else {
            IpAddr::V4(Ipv4Addr::new(198, 19, 0, 2))
        };
        Underlay {
            src_mac: HOST_MAC,
            dst_mac: NEXT_HOP,
            src_ip: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
            dst_ip: dst,
        }
    } else {
        Underlay::v4(
            HOST_MAC,
            NEXT_HOP,
            Ipv4Addr::new(198, 19, 0, 1),
            Ipv4Addr::new(198, 19, 0, 2),
        )
    };
    let key = FlowKey::parse(frame)
        .or_else(|_| FlowKey::parse(&[0u8; 14]))
        .expect("14 zero bytes parse");
    let len = frame.len();
    let fits_one_packet = V4_OVERHEAD + len <= usize::from(u16::MAX);
    let mut e = Encapsulator::new(cfg);
    let sport = e.src_port(&key);
    assert!((SRC_PORT_MIN..=SRC_PORT_MAX).contains(&sport));
    assert_eq!(e.src_port(&key), sport, "same flow, same port");

    // ---- check_mtu --------------------------------------------------------
    let mb = buf_with(frame, offload);
    let d4 = check_mtu(mtu, Family::V4, &mb, &key);
    let d6 = check_mtu(mtu, Family::V6, &mb, &key);
    assert_eq!(check_mtu(mtu, Family::V4, &mb, &key), d4, "deterministic");
    if d6 == MtuDecision::Fits {
        assert_eq!(d4, MtuDecision::Fits, "fits over IPv6 but not over IPv4");
    }
    for (fam, dec) in [(Family::V4, d4), (Family::V6, d6)] {
        let room = usize::from(mtu).saturating_sub(fam.ip_overhead());
        if !offload.is_gso() {
            assert_eq!(
                dec == MtuDecision::Fits,
                len <= room,
                "{fam:?} mtu {mtu} len {len}"
            );
        }
        let MtuDecision::TooBig {
            mtu: announced,
            icmp,
        } = dec
        else {
            continue;
        };
        let want = room.saturating_sub(usize::from(key.l3_offset));
        assert_eq!(usize::from(announced), want.min(usize::from(u16::MAX)));
        match icmp {
            IcmpAction::Drop => {}
            IcmpAction::FragNeeded => {
                assert!(matches!(key.l3, L3::Ipv4(_)));
                let mut out = PacketBuf::new();
                let gw = Ipv4Addr::new(10, 0, 0, 254);
                if let Ok(n) = frag_needed(frame, &key, announced, GW_MAC, gw, &mut out) {
                    assert_eq!(out.len(), n);
                    let r = out.frame();
                    let rk = FlowKey::parse(r).expect("frag_needed reply parses");
                    assert_eq!((rk.dst_mac, rk.src_mac), (key.src_mac, GW_MAC));
                    assert_eq!(rk.l3_offset, key.l3_offset, "same VLAN tags");
                    let (L3::Ipv4(rip), L3::Ipv4(ip)) = (rk.l3, key.l3) else {
                        panic!("frag_needed reply is not IPv4: {:?}", rk.l3)
                    };
                    assert_eq!((rip.src, rip.dst), (IpAddr::V4(gw), ip.src));
                    assert!(
                        matches!(rk.l4, L4::Icmpv4 { ty: 3, code: 4, .. }),
                        "{:?}",
                        rk.l4
                    );
                    let l3 = usize::from(rk.l3_offset);
                    assert!(verify(&r[l3..l3 + 20]), "reply IPv4 header checksum");
                    assert!(verify(&r[l3 + 20..]), "reply ICMP checksum");
                    assert_eq!(r[l3 + 26..l3 + 28], announced.to_be_bytes());
                }
            }
            IcmpAction::PacketTooBig => {
                assert!(matches!(key.l3, L3::Ipv6(_)));
                let mut out = PacketBuf::new();
                let gw = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xfe);
                let m = u32::from(announced);
                if let Ok(n) = packet_too_big(frame, &key, m, GW_MAC, gw, &mut out) {
                    assert_eq!(out.len(), n);
                    let r = out.frame();
                    let l3 = usize::from(key.l3_offset);
                    assert!(n - l3 <= 1280, "ICMPv6 error larger than the minimum MTU");
                    let rk = FlowKey::parse(r).expect("packet_too_big reply parses");
                    assert_eq!((rk.dst_mac, rk.src_mac), (key.src_mac, GW_MAC));
                    let (L3::Ipv6(rip), L3::Ipv6(ip)) = (rk.l3, key.l3) else {
                        panic!("packet_too_big reply is not IPv6: {:?}", rk.l3)
                    };
                    assert_eq!((rip.src, rip.dst), (IpAddr::V6(gw), ip.src));
                    assert!(
                        matches!(rk.l4, L4::Icmpv6 { ty: 2, code: 0, .. }),
                        "{:?}",
                        rk.l4
                    );
                    assert!(l4_sum_ok(r, &rk, l3 + 40), "reply ICMPv6 checksum");
                    assert_eq!(r[l3 + 44..l3 + 48], m.to_be_bytes());
                }
            }
        }
    }

    // ---- encap --------------------------------------------------------------
    let mut b = buf_with(frame, offload);
    let pending = offload.csum.is_some();
    match e.encap(&mut b, &underlay, vni, &key) {
        Err(EncapError::GsoFrame) => {
            assert!(offload.is_gso());
            assert_eq!((b.frame(), b.offload), (frame, offload));
        }
        Err(EncapError::Ipv6Underlay) => {
            assert!(v6 && !offload.is_gso());
            assert_eq!((b.frame(), b.offload), (frame, offload));
        }
        Err(EncapError::TooLong) => assert!(!fits_one_packet),
        Err(EncapError::Gso(err)) => {
            assert!(pending && !cfg.inner_csum_partial);
            assert_eq!(completed(frame, offload, false), Err(err));
        }
        Err(EncapError::InnerTooShort) => {
            assert!(len < 14);
            let want = completed(frame, offload, cfg.inner_csum_partial);
            assert_eq!(Ok(b.frame().to_vec()), want);
        }
        Err(err) => panic!("encap: unexpected {err:?}"),
        Ok(info) => {
            assert!(!offload.is_gso() && !v6 && len >= 14 && fits_one_packet);
            let want =
                completed(frame, offload, cfg.inner_csum_partial).expect("encap completed it");
            assert_eq!(usize::from(info.outer_len), OUTER_V4_LEN);
            assert_eq!(info.src_port, sport);
            assert_eq!(info.inner_csum_partial, pending && cfg.inner_csum_partial);
            assert_eq!(info.inner_csum_partial, b.offload.csum.is_some());
            let out = b.frame().to_vec();
            check_packet(&out, &underlay, vni, sport, cfg.tos);
            assert_eq!(&out[OUTER_V4_LEN..], &want[..], "inner frame");
            let mut o = offload;
            if !cfg.inner_csum_partial {
                o.csum = None;
            }
            let d = decap(&mut b, DEFAULT_PORT).expect("decap of encap");
            assert_eq!(d.vni, vni);
            assert_eq!(b.frame(), &want[..]);
            assert_eq!(b.offload, round_tripped(o), "offload round trip");
        }
    }

    // ---- encap_tunnel_gso -------------------------------------------------
    let mut b = buf_with(frame, offload);
    match e.encap_tunnel_gso(&mut b, &underlay, vni, &key) {
        Err(EncapError::NotGso) => assert_eq!(offload.gso, GsoType::None),
        Err(EncapError::Gso(GsoError::Unsupported(GsoType::Ufo))) => {
            assert_eq!(offload.gso, GsoType::Ufo)
        }
        Err(EncapError::Ipv6Underlay) => assert!(v6),
        Err(EncapError::TooLong) => assert!(!fits_one_packet),
        Err(EncapError::InnerTooShort) => assert!(len < 14),
        Err(err) => panic!("encap_tunnel_gso: unexpected {err:?}"),
        Ok(t) => {
            assert!(matches!(
                offload.gso,
                GsoType::TcpV4 | GsoType::TcpV6 | GsoType::UdpL4
            ));
            assert!(!v6 && len >= 14 && fits_one_packet);
            assert_eq!((t.inner_gso, t.gso_size), (offload.gso, offload.gso_size));
            assert_eq!(
                (usize::from(t.outer_len), t.src_port),
                (OUTER_V4_LEN, sport)
            );
            let out = b.frame().to_vec();
            check_packet(&out, &underlay, vni, sport, cfg.tos);
            assert_eq!(&out[OUTER_V4_LEN..], frame, "super-frame kept whole");
            assert_eq!(
                (b.offload.gso, b.offload.gso_size),
                (offload.gso, offload.gso_size)
            );
            let d = decap(&mut b, DEFAULT_PORT).expect("decap of encap_tunnel_gso");
            assert_eq!(d.vni, vni);
            assert_eq!(b.frame(), frame);
            assert_eq!(b.offload, round_tripped(offload), "offload round trip");
        }
    }
    // ---- encap_segments -----------------------------------------------------
    let mut b = buf_with(frame, offload);
    let mut outs: Vec<Vec<u8>> = Vec::new();
    let r = e.encap_segments(&mut b, &underlay, vni, &key, mtu, |p| {
        assert_eq!(
            p.offload,
            Offload::NONE,
            "offload left on an emitted packet"
        );
        outs.push(p.frame().to_vec());
    });
    assert_eq!(
        (b.frame(), b.offload),
        (frame, offload),
        "encap_segments leaves buf as it was"
    );
    let room = usize::from(mtu).saturating_sub(V4_OVERHEAD);
    let mut inners = Vec::with_capacity(outs.len());
    for out in &outs {
        assert!(
            out.len() - 14 <= usize::from(mtu),
            "{} bytes of IP > mtu {mtu}",
            out.len() - 14
        );
        check_packet(out, &underlay, vni, sport, cfg.tos);
        inners.push(&out[OUTER_V4_LEN..]);
    }
    match r {
        Err(EncapError::Ipv6Underlay) => assert!(v6),
        Err(EncapError::ExceedsMtu) => {
            assert!(!v6);
            match offload.gso {
                GsoType::None => assert!(len > room),
                // UDP segments cannot be cut smaller (also said for a
                // USO frame that is not UDP at all), but only when
                // check_mtu says they do not fit.
                GsoType::UdpL4 => assert_ne!(d4, MtuDecision::Fits, "USO ExceedsMtu"),
                other => panic!("ExceedsMtu for {other:?} (mtu {mtu})"),
            }
        }
        Err(EncapError::MtuTooSmall) => {
            // Only when the segments need cutting (check_mtu: too big).
            assert!(!v6 && matches!(offload.gso, GsoType::TcpV4 | GsoType::TcpV6));
            assert_ne!(d4, MtuDecision::Fits, "MtuTooSmall but check_mtu Fits");
        }
        Err(EncapError::Gso(_)) => assert!(!v6),
        Err(EncapError::InnerTooShort) => assert!(len < 14),
        Err(err) => panic!("encap_segments: unexpected {err:?}"),
        Ok(n) => {
            assert!(!v6);
            assert_eq!(n, outs.len());
            assert!(n >= 1);
            if offload.gso == GsoType::None {
                assert_eq!(n, 1);
                let want = completed(frame, offload, false).expect("segment completed it");
                assert_eq!(inners[0], &want[..]);
            } else {
                check_segments(frame, &key, offload, room, &inners);
            }
        }
    }
    // A plain frame is refused as too big exactly when check_mtu says it
    // does not fit, and a super-frame that software segmentation accepts and
    // whose segments check_mtu says fit is encapsulated.
    if !v6 {
        if offload.gso == GsoType::None {
            let too_big = matches!(r, Err(EncapError::ExceedsMtu));
            assert_eq!(
                too_big,
                d4 != MtuDecision::Fits,
                "check_mtu {d4:?}, encap_segments {r:?}"
            );
        } else if d4 == MtuDecision::Fits && segment(&mb, |_| {}).is_ok() {
            assert!(
                r.is_ok(),
                "check_mtu says Fits, encap_segments {r:?} (mtu {mtu}, {offload:?})"
            );
        }
    }
});

fn check_segments(frame: &[u8], key: &FlowKey, o: Offload, room: usize, inners: &[&[u8]]) {
    let (hdr, end) = hdr_and_end(frame, key);
    let payload = &frame[hdr..end];
    let gso_size = usize::from(o.gso_size);
    let tcp = matches!(key.l4, L4::Tcp { .. });
    let mss = if tcp {
        gso_size.min(room - hdr)
    } else {
        gso_size
    };
    assert_eq!(
        inners.len(),
        payload.len().div_ceil(mss).max(1),
        "segment count, mss {mss}"
    );
    let mut got = Vec::with_capacity(payload.len());
    for (i, s) in inners.iter().enumerate() {
        assert!(s.len() >= hdr);
        let chunk = &s[hdr..];
        if i + 1 < inners.len() {
            assert_eq!(chunk.len(), mss, "segment {i}");
        } else {
            assert!(chunk.len() <= mss, "last segment");
        }
        got.extend_from_slice(chunk);
        let sk = FlowKey::parse(s).expect("segment parses");
        assert_eq!(sk.malformed, None, "segment {i} is malformed");
        assert_eq!((sk.l3_offset, sk.l4_offset), (key.l3_offset, key.l4_offset));
        let l3 = usize::from(sk.l3_offset);
        let l4 = usize::from(sk.l4_offset);
        if let L3::Ipv4(_) = sk.l3 {
            assert!(
                verify(&s[l3..l4]),
                "segment {i}: inner IPv4 header checksum"
            );
        }
        assert!(l4_sum_ok(s, &sk, l4), "segment {i}: inner L4 checksum");
    }
    assert_eq!(got, payload, "segment payloads reassemble");
}
