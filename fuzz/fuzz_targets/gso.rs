//! `packet::gso::segment` and `packet::gso::complete_checksum` on a
//! `PacketBuf` built from the input.
//!
//! Input layout: `[sel, mss_lo, mss_hi, start_lo, start_hi, off_lo, off_hi,
//! frame...]`. `sel & 7` picks the GSO type (mod 5), `sel & 8` sets ECN and
//! `(sel >> 4) & 3` the checksum mode: 0 none, 1 "auto" (a partial checksum
//! as a VM's kernel leaves it: start at the L4 header, the field holding the
//! pseudo-header sum), 2 or 3 raw start/offset from the input.
//!
//! Asserts: never panics; `segment` returns as many segments as it emitted,
//! `ceil(payload / gso_size)` of them, each a clean frame of the same flow
//! whose payload is at most `gso_size`, the payloads concatenate to the
//! original, TCP sequence numbers advance by the payload, FIN/PSH only on the
//! last segment, and every IPv4 header checksum and L4 checksum verifies;
//! `complete_checksum` clears the pending checksum, keeps the length, only
//! touches the checksum field, and in auto mode leaves a correct L4
//! checksum (also what `segment` emits for a non-GSO frame).
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use packet::checksum::{add, fold, pseudo_header_v4, pseudo_header_v6, sum, verify};
use packet::flow::tcp_flags;
use packet::{
    complete_checksum, segment, CsumOffload, FlowKey, Frag, GsoType, PacketBuf, L3, L4,
};

const HDR: usize = 7;

/// End of the IP packet when the frame parses cleanly as IP.
fn ip_end(frame: &[u8], key: &FlowKey) -> Option<usize> {
    let l3 = usize::from(key.l3_offset);
    let be16 = |i: usize| frame.get(i..i + 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    match key.l3 {
        L3::Ipv4(_) => Some(l3 + be16(l3 + 2)?),
        L3::Ipv6(_) => Some(l3 + 40 + be16(l3 + 4)?),
        _ => None,
    }
    .filter(|&e| e <= frame.len())
}

/// A clean, unfragmented TCP/UDP over IP frame: (key, ip, l4 offset, ip end, tcp).
fn clean_l4(frame: &[u8]) -> Option<(FlowKey, packet::IpKey, usize, usize, bool)> {
    let key = FlowKey::parse(frame).ok()?;
    if key.malformed.is_some() {
        return None;
    }
    let ip = match key.l3 {
        L3::Ipv4(ip) | L3::Ipv6(ip) if ip.frag == Frag::None => ip,
        _ => return None,
    };
    let tcp = match key.l4 {
        L4::Tcp { .. } => true,
        L4::Udp { .. } => false,
        _ => return None,
    };
    let end = ip_end(frame, &key)?;
    Some((key, ip, usize::from(key.l4_offset), end, tcp))
}

fn pseudo(ip: &packet::IpKey, l4_len: usize) -> u64 {
    match (ip.src, ip.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => pseudo_header_v4(s, d, ip.proto, l4_len as u16),
        (IpAddr::V6(s), IpAddr::V6(d)) => pseudo_header_v6(&s, &d, ip.proto, l4_len as u32),
        _ => unreachable!("FlowKey mixes address families"),
    }
}

/// The L4 checksum of a clean frame verifies.
fn l4_checksum_ok(frame: &[u8]) -> bool {
    let Some((_, ip, l4, end, _)) = clean_l4(frame) else {
        return false;
    };
    fold(add(pseudo(&ip, end - l4), sum(&frame[l4..end]))) == 0xffff
}

fuzz_target!(|data: &[u8]| {
    let Some((h, frame)) = data.split_first_chunk::<HDR>() else {
        return;
    };
    let sel = h[0];
    let mut buf = PacketBuf::from_frame(frame);
    let gso = [GsoType::None, GsoType::TcpV4, GsoType::TcpV6, GsoType::UdpL4, GsoType::Ufo]
        [usize::from(sel & 7) % 5];
    buf.offload.gso = gso;
    buf.offload.ecn = sel & 8 != 0;
    buf.offload.gso_size = u16::from_le_bytes([h[1], h[2]]);
    let mut auto = false;
    match (sel >> 4) & 3 {
        0 => {}
        1 => {
            if let Some((_, ip, l4, end, tcp)) = clean_l4(buf.frame()) {
                let field = l4 + if tcp { 16 } else { 6 };
                let partial = fold(pseudo(&ip, end - l4));
                buf.frame_mut()[field..field + 2].copy_from_slice(&partial.to_be_bytes());
                buf.offload.csum = Some(CsumOffload {
                    start: l4 as u16,
                    offset: (field - l4) as u16,
                });
                auto = true;
            }
        }
        _ => {
            buf.offload.csum = Some(CsumOffload {
                start: u16::from_le_bytes([h[3], h[4]]),
                offset: u16::from_le_bytes([h[5], h[6]]),
            });
        }
    }
    let before = buf.frame().to_vec();

    // ---- segment -------------------------------------------------------
    let mut segs: Vec<Vec<u8>> = Vec::new();
    let r = segment(&buf, |s| segs.push(s.to_vec()));
    assert_eq!(buf.frame(), &before[..], "segment does not touch its input");
    match r {
        Err(_) => assert!(segs.is_empty(), "emitted segments, then failed"),
        Ok(n) => {
            assert_eq!(n, segs.len());
            assert!(n >= 1);
            if gso == GsoType::None {
                assert_eq!(n, 1);
                assert_eq!(segs[0].len(), before.len());
                if auto {
                    assert!(l4_checksum_ok(&segs[0]), "segment() left a bad checksum");
                }
            } else {
                check_segments(&before, &segs, buf.offload.gso_size, gso);
            }
        }
    }

    // ---- complete_checksum ----------------------------------------------
    let pending = buf.offload.csum;
    match complete_checksum(&mut buf) {
        Err(_) => {
            assert_eq!(buf.offload.csum, pending, "failure keeps the pending checksum");
            assert_eq!(buf.frame(), &before[..], "failure leaves the frame alone");
        }
        Ok(()) => {
            assert_eq!(buf.offload.csum, None);
            let after = buf.frame();
            assert_eq!(after.len(), before.len());
            match pending {
                None => assert_eq!(after, &before[..]),
                Some(c) => {
                    let field = usize::from(c.start) + usize::from(c.offset);
                    for (i, (a, b)) in after.iter().zip(&before).enumerate() {
                        assert!(a == b || i == field || i == field + 1, "byte {i} changed");
                    }
                    if auto {
                        assert!(l4_checksum_ok(after), "complete_checksum left a bad checksum");
                    }
                }
            }
            // Idempotent once nothing is pending.
            let done = after.to_vec();
            assert_eq!(complete_checksum(&mut buf), Ok(()));
            assert_eq!(buf.frame(), &done[..]);
        }
    }
});

fn check_segments(orig: &[u8], segs: &[Vec<u8>], mss: u16, gso: GsoType) {
    let mss = usize::from(mss);
    let (okey, _, l4, end, tcp) = clean_l4(orig).expect("segment accepted an unclean frame");
    assert_eq!(tcp, gso != GsoType::UdpL4);
    let l4_hlen = if tcp { usize::from(orig[l4 + 12] >> 4) * 4 } else { 8 };
    let payload = &orig[l4 + l4_hlen..end];
    assert_eq!(segs.len(), payload.len().div_ceil(mss).max(1));
    let base_seq = u32::from_be_bytes([orig[l4 + 4], orig[l4 + 5], orig[l4 + 6], orig[l4 + 7]]);
    let mut got = Vec::with_capacity(payload.len());
    for (i, s) in segs.iter().enumerate() {
        let (key, _, sl4, send, stcp) =
            clean_l4(s).unwrap_or_else(|| panic!("segment {i} does not parse cleanly"));
        assert_eq!(send, s.len(), "segment {i} has trailing bytes");
        assert_eq!((sl4, stcp), (l4, tcp));
        assert_eq!((key.src_mac, key.dst_mac, key.vlan, key.inner_vlan), (okey.src_mac, okey.dst_mac, okey.vlan, okey.inner_vlan));
        match (key.l4, okey.l4) {
            (L4::Tcp { src_port: a, dst_port: b, flags }, L4::Tcp { src_port: c, dst_port: d, flags: of }) => {
                assert_eq!((a, b), (c, d));
                let seq = u32::from_be_bytes([s[l4 + 4], s[l4 + 5], s[l4 + 6], s[l4 + 7]]);
                assert_eq!(seq, base_seq.wrapping_add((i * mss) as u32));
                if i + 1 < segs.len() {
                    assert_eq!(flags & (tcp_flags::FIN | tcp_flags::PSH), 0);
                } else {
                    assert_eq!(flags & (tcp_flags::FIN | tcp_flags::PSH), of & (tcp_flags::FIN | tcp_flags::PSH));
                }
            }
            (L4::Udp { src_port: a, dst_port: b }, L4::Udp { src_port: c, dst_port: d }) => {
                assert_eq!((a, b), (c, d));
            }
            other => panic!("segment {i} changed L4: {other:?}"),
        }
        let chunk = &s[l4 + l4_hlen..];
        assert!(chunk.len() <= mss, "segment {i} payload {} > mss {mss}", chunk.len());
        got.extend_from_slice(chunk);
        if let L3::Ipv4(_) = key.l3 {
            let l3 = usize::from(key.l3_offset);
            assert!(verify(&s[l3..l4]), "segment {i}: IPv4 header checksum");
        }
        assert!(l4_checksum_ok(s), "segment {i}: L4 checksum");
    }
    assert_eq!(got, payload, "payloads reassemble");
}
