//! Software fallback for offloads, used only when an egress cannot take a
//! frame as it is ([`crate::OffloadCaps::accepts`] is false): complete a
//! partial checksum, or cut a TSO/USO super-frame into wire-sized segments.
//!
//! Segmentation follows Linux (`tcp_gso_segment`, `__udp_gso_segment`,
//! `inet_gso_segment`): every segment gets the super-frame's headers with
//! its own lengths, IPv4 ID (incremented per segment), TCP sequence number,
//! full L4 checksum and IPv4 header checksum; FIN and PSH stay only on the
//! last TCP segment and CWR only on the first. UFO (IP fragmentation of a
//! UDP datagram) is not done here and reported as unsupported.
//!
//! Every length read from the frame is checked; bad input gives a
//! [`GsoError`], never a panic.

use std::net::IpAddr;

use crate::buf::PacketBuf;
use crate::checksum::{add, fold, pseudo_header_v4, pseudo_header_v6, sum, udp_nonzero};
use crate::flow::{tcp_flags, FlowKey, Frag, Malformed, ParseError, L3, L4};
use crate::offload::{GsoType, Offload};

/// Why a frame could not be checksummed or segmented in software.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    /// Ethernet header or VLAN tag truncated.
    #[error("cannot parse frame: {0}")]
    Parse(#[from] ParseError),
    /// An inner header is broken.
    #[error("malformed frame: {0}")]
    Malformed(Malformed),
    /// The checksum start/offset points outside the frame.
    #[error("partial checksum field outside the frame")]
    CsumOutOfBounds,
    /// The GSO type does not match the headers (e.g. TcpV4 on an IPv6 frame).
    #[error("GSO type {0:?} does not match the frame's headers")]
    Mismatch(GsoType),
    /// The super-frame is itself an IP fragment.
    #[error("GSO super-frame is an IP fragment")]
    Fragment,
    /// GSO with a segment size of 0.
    #[error("GSO frame with gso_size 0")]
    ZeroGsoSize,
    /// UFO needs IP fragmentation, which is not implemented.
    #[error("GSO type {0:?} is not supported in software")]
    Unsupported(GsoType),
}

fn be16(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(i..i + 2)?.try_into().ok()?))
}

fn put16(b: &mut [u8], i: usize, v: u16) {
    if let Some(s) = b.get_mut(i..i + 2) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// End of the IP packet in the frame (Ethernet padding excluded), when the
/// frame is IP and parsed cleanly.
fn ip_end(frame: &[u8], key: &FlowKey) -> Option<usize> {
    let l3 = usize::from(key.l3_offset);
    match key.l3 {
        L3::Ipv4(_) => Some(l3 + usize::from(be16(frame, l3 + 2)?)),
        L3::Ipv6(_) => Some(l3 + 40 + usize::from(be16(frame, l3 + 4)?)),
        _ => None,
    }
    .filter(|&e| e <= frame.len())
}

/// Folds a pending partial checksum into `frame`: sums from `start` to the
/// end of the IP packet (the field already holds the pseudo-header sum) and
/// writes the result at `start + offset`. A result of 0 is written as 0xffff
/// (as Linux's `skb_checksum_help`; correct for TCP and required for UDP).
fn fold_partial(frame: &mut [u8], start: u16, offset: u16) -> Result<(), GsoError> {
    let start = usize::from(start);
    let field = start + usize::from(offset);
    if field + 2 > frame.len() {
        return Err(GsoError::CsumOutOfBounds);
    }
    let end = FlowKey::parse(frame)
        .ok()
        .and_then(|k| ip_end(frame, &k))
        .filter(|&e| e >= field + 2)
        .unwrap_or(frame.len());
    let data = frame.get(start..end).ok_or(GsoError::CsumOutOfBounds)?;
    let c = udp_nonzero(!fold(sum(data)));
    put16(frame, field, c);
    Ok(())
}

/// Completes the partial checksum of `buf` in place and clears
/// `offload.csum`. A no-op when no checksum is pending.
pub fn complete_checksum(buf: &mut PacketBuf) -> Result<(), GsoError> {
    let Some(c) = buf.offload.csum else {
        return Ok(());
    };
    fold_partial(buf.frame_mut(), c.start, c.offset)?;
    buf.offload.csum = None;
    Ok(())
}

/// Recognises a frame whose TCP or UDP checksum a Linux sender left
/// partial: the checksum field holds the pseudo-header sum only (an skb in
/// `CHECKSUM_PARTIAL` crosses veths and the kernel's VXLAN without ever
/// being completed; only a real NIC would). When the checksum does not
/// verify but the field is exactly that sum, marks `buf.offload.csum` so
/// the egress (a tap) completes it, and returns true. A correct or simply
/// corrupt checksum is left alone (false). IP fragments are never touched.
pub fn recover_partial_checksum(buf: &mut PacketBuf) -> bool {
    match partial_checksum(buf) {
        Some(c) => {
            buf.offload.csum = Some(c);
            true
        }
        None => false,
    }
}

/// The checksum offload [`recover_partial_checksum`] would set, without
/// changing `buf`.
pub fn partial_checksum(buf: &PacketBuf) -> Option<crate::offload::CsumOffload> {
    if buf.offload.csum.is_some() || buf.offload.gso != GsoType::None {
        return None;
    }
    let frame = buf.frame();
    let Ok(key) = FlowKey::parse(frame) else {
        return None;
    };
    let (Some(ip), Some(end)) = (key.ip(), ip_end(frame, &key)) else {
        return None;
    };
    let field_off: usize = match key.l4 {
        L4::Tcp { .. } => 16,
        L4::Udp { .. } => 6,
        _ => return None,
    };
    if ip.frag != Frag::None || key.malformed.is_some() {
        return None;
    }
    let l4 = usize::from(key.l4_offset);
    let (Some(l4_len), Some(field)) = (
        end.checked_sub(l4).and_then(|n| u16::try_from(n).ok()),
        be16(frame, l4 + field_off),
    ) else {
        return None;
    };
    if l4 + field_off + 2 > end || (field_off == 6 && field == 0) {
        return None;
    }
    let pseudo = match (ip.src, ip.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => pseudo_header_v4(s, d, ip.proto, l4_len),
        (IpAddr::V6(s), IpAddr::V6(d)) => pseudo_header_v6(&s, &d, ip.proto, u32::from(l4_len)),
        _ => return None,
    };
    let data = frame.get(l4..end).unwrap_or_default();
    if fold(add(pseudo, sum(data))) == 0xffff || field != fold(pseudo) {
        return None;
    }
    Some(crate::offload::CsumOffload {
        start: key.l4_offset,
        offset: field_off as u16,
    })
}

/// Cuts the super-frame in `buf` into segments of at most `gso_size` payload
/// bytes and hands each complete frame (checksums done, no offload left) to
/// `emit`, in order. Returns the number of segments.
///
/// A frame with no GSO is emitted once, with a pending checksum completed.
/// One scratch buffer of one segment is allocated per call (slow path).
pub fn segment(buf: &PacketBuf, mut emit: impl FnMut(&[u8])) -> Result<usize, GsoError> {
    let frame = buf.frame();
    let o: Offload = buf.offload;
    match o.gso {
        GsoType::None => {
            match o.csum {
                None => emit(frame),
                Some(c) => {
                    let mut v = frame.to_vec();
                    fold_partial(&mut v, c.start, c.offset)?;
                    emit(&v);
                }
            }
            return Ok(1);
        }
        GsoType::Ufo => return Err(GsoError::Unsupported(o.gso)),
        GsoType::TcpV4 | GsoType::TcpV6 | GsoType::UdpL4 => {}
    }
    let mut v = Vec::new();
    segment_append(buf, &[], &mut v, |v, start| {
        emit(&v[start..]);
        v.truncate(start);
    })
}

/// A TSO/USO super-frame parsed once for cutting: the headers every
/// segment starts from and what changes per segment.
struct Cut<'a> {
    /// Ethernet to L4 header, as in the super-frame.
    hdr: &'a [u8],
    payload: &'a [u8],
    mss: usize,
    nseg: usize,
    v4: bool,
    tcp: bool,
    ip: crate::flow::IpKey,
    l3: usize,
    l4: usize,
    l4_hlen: usize,
    base_id: u16,
    base_seq: u32,
    flags: u8,
    csum_field: usize,
    mismatch: GsoError,
}

impl<'a> Cut<'a> {
    fn new(buf: &'a PacketBuf) -> Result<Cut<'a>, GsoError> {
        let frame = buf.frame();
        let o: Offload = buf.offload;
        if !matches!(o.gso, GsoType::TcpV4 | GsoType::TcpV6 | GsoType::UdpL4) {
            return Err(GsoError::Unsupported(o.gso));
        }
        let mss = usize::from(o.gso_size);
        if mss == 0 {
            return Err(GsoError::ZeroGsoSize);
        }
        let key = FlowKey::parse(frame)?;
        if let Some(m) = key.malformed {
            return Err(GsoError::Malformed(m));
        }
        let (v4, ip) = match key.l3 {
            L3::Ipv4(ip) => (true, ip),
            L3::Ipv6(ip) => (false, ip),
            _ => return Err(GsoError::Mismatch(o.gso)),
        };
        if ip.frag != Frag::None {
            return Err(GsoError::Fragment);
        }
        let tcp = match (o.gso, key.l4) {
            (GsoType::TcpV4, L4::Tcp { .. }) if v4 => true,
            (GsoType::TcpV6, L4::Tcp { .. }) if !v4 => true,
            (GsoType::UdpL4, L4::Udp { .. }) => false,
            _ => return Err(GsoError::Mismatch(o.gso)),
        };
        let mismatch = GsoError::Mismatch(o.gso);
        let l3 = usize::from(key.l3_offset);
        let l4 = usize::from(key.l4_offset);
        let end = ip_end(frame, &key).ok_or(mismatch)?;
        let l4_hlen = if tcp {
            usize::from(*frame.get(l4 + 12).ok_or(mismatch)? >> 4) * 4
        } else {
            8
        };
        let hdr_len = l4 + l4_hlen;
        let hdr = frame.get(..hdr_len).ok_or(mismatch)?;
        let payload = frame.get(hdr_len..end).ok_or(mismatch)?;
        let base_id = if v4 {
            be16(frame, l3 + 4).ok_or(mismatch)?
        } else {
            0
        };
        let base_seq = if tcp {
            let s: [u8; 4] = frame
                .get(l4 + 4..l4 + 8)
                .and_then(|s| s.try_into().ok())
                .ok_or(mismatch)?;
            u32::from_be_bytes(s)
        } else {
            0
        };
        Ok(Cut {
            hdr,
            payload,
            mss,
            nseg: payload.len().div_ceil(mss).max(1),
            v4,
            tcp,
            ip,
            l3,
            l4,
            l4_hlen,
            base_id,
            base_seq,
            flags: frame.get(l4 + 13).copied().unwrap_or(0),
            csum_field: l4 + if tcp { 16 } else { 6 },
            mismatch,
        })
    }

    /// Where segment `i`'s payload is in the super-frame.
    fn chunk(&self, i: usize) -> std::ops::Range<usize> {
        let from = (i * self.mss).min(self.payload.len());
        let to = (from + self.mss).min(self.payload.len());
        self.hdr.len() + from..self.hdr.len() + to
    }

    /// Turns `seg`, a copy of [`Cut::hdr`], into segment `i`'s headers
    /// for a payload of `payload_len` bytes summing to `payload_sum`
    /// (RFC 1071, unfolded): lengths, IPv4 ID and checksum, TCP sequence
    /// and flags, L4 checksum.
    fn finish(
        &self,
        i: usize,
        seg: &mut [u8],
        payload_len: usize,
        payload_sum: u64,
    ) -> Result<(), GsoError> {
        let (l3, l4, mismatch) = (self.l3, self.l4, self.mismatch);
        let l4_len = self.l4_hlen + payload_len;
        let l4_len16 = u16::try_from(l4_len).map_err(|_| mismatch)?;
        if self.v4 {
            let total = u16::try_from(l4 - l3 + l4_len).map_err(|_| mismatch)?;
            put16(seg, l3 + 2, total);
            put16(seg, l3 + 4, self.base_id.wrapping_add(i as u16));
            put16(seg, l3 + 10, 0);
            let c = !fold(sum(seg.get(l3..l4).unwrap_or_default()));
            put16(seg, l3 + 10, c);
        } else {
            let plen = u16::try_from(l4 - l3 - 40 + l4_len).map_err(|_| mismatch)?;
            put16(seg, l3 + 4, plen);
        }
        if self.tcp {
            let seq = self.base_seq.wrapping_add((i * self.mss) as u32);
            if let Some(s) = seg.get_mut(l4 + 4..l4 + 8) {
                s.copy_from_slice(&seq.to_be_bytes());
            }
            let mut f = self.flags;
            if i + 1 < self.nseg {
                f &= !(tcp_flags::FIN | tcp_flags::PSH);
            }
            if i > 0 {
                f &= !tcp_flags::CWR;
            }
            if let Some(b) = seg.get_mut(l4 + 13) {
                *b = f;
            }
        } else {
            put16(seg, l4 + 4, l4_len16);
        }
        put16(seg, self.csum_field, 0);
        let pseudo = match (self.ip.src, self.ip.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => pseudo_header_v4(s, d, self.ip.proto, l4_len16),
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                pseudo_header_v6(&s, &d, self.ip.proto, u32::from(l4_len16))
            }
            _ => return Err(mismatch),
        };
        // The L4 header has an even length (TCP: 4-byte words, UDP: 8), so
        // its sum and the payload's add up to the segment's.
        let header_sum = sum(seg.get(l4..).unwrap_or_default());
        let mut c = !fold(add(pseudo, add(header_sum, payload_sum)));
        if !self.tcp {
            c = udp_nonzero(c);
        }
        put16(seg, self.csum_field, c);
        Ok(())
    }
}

/// [`segment`] of a super-frame (GSO set) written straight into `out`:
/// each segment is appended as `prefix` (e.g. a VXLAN header) followed by
/// the segment, and `each(out, start)` is called with the offset where it
/// began (it may truncate `out` back to `start`). One copy of the payload,
/// summed while it is in cache.
pub fn segment_append(
    buf: &PacketBuf,
    prefix: &[u8],
    out: &mut Vec<u8>,
    mut each: impl FnMut(&mut Vec<u8>, usize),
) -> Result<usize, GsoError> {
    let cut = Cut::new(buf)?;
    let frame = buf.frame();
    let hdr_len = cut.hdr.len();
    for i in 0..cut.nseg {
        let chunk = frame.get(cut.chunk(i)).unwrap_or_default();
        let start = out.len();
        out.extend_from_slice(prefix);
        let seg_at = out.len();
        out.extend_from_slice(cut.hdr);
        // Copied, then summed below while in L1. Not fused with
        // `checksum::copy_and_sum`: a Vec must be zero-filled before it can
        // be written as a slice (no `unsafe` here), and that extra pass
        // costs more than the re-read (fused was ~5% slower in the
        // `gso/segment_append_tcp4_64k` bench).
        out.extend_from_slice(chunk);
        let payload_sum = sum(out.get(seg_at + hdr_len..).unwrap_or_default());
        let seg = out.get_mut(seg_at..seg_at + hdr_len).unwrap_or_default();
        cut.finish(i, seg, chunk.len(), payload_sum)?;
        each(out, start);
    }
    Ok(cut.nseg)
}

/// The headers of [`segment_append`]'s segments without copying their
/// payloads, for a scatter-gather send: segment `i` is `prefix` and its
/// headers, `hdrs[i * stride..(i + 1) * stride]` (`stride` returned, with
/// the count), followed by `buf.frame()[payloads[i]]`. The payloads are
/// only read (summed for the L4 checksums). `hdrs` and `payloads` are
/// cleared first.
pub fn segment_headers(
    buf: &PacketBuf,
    prefix: &[u8],
    hdrs: &mut Vec<u8>,
    payloads: &mut Vec<std::ops::Range<usize>>,
) -> Result<(usize, usize), GsoError> {
    hdrs.clear();
    payloads.clear();
    let cut = Cut::new(buf)?;
    let frame = buf.frame();
    let stride = prefix.len() + cut.hdr.len();
    for i in 0..cut.nseg {
        let range = cut.chunk(i);
        let chunk = frame.get(range.clone()).unwrap_or_default();
        let at = hdrs.len();
        hdrs.extend_from_slice(prefix);
        hdrs.extend_from_slice(cut.hdr);
        let seg = hdrs.get_mut(at + prefix.len()..).unwrap_or_default();
        cut.finish(i, seg, chunk.len(), sum(chunk))?;
        payloads.push(range);
    }
    Ok((cut.nseg, stride))
}

#[cfg(test)]
mod tests {
    #[test]
    fn partial_checksum_from_a_linux_sender_is_recognised() {
        for udp in [false, true] {
            let mut f = Vec::new();
            let b = PacketBuilder::ethernet2([2; 6], [4; 6]).ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64);
            if udp {
                b.udp(1000, 2000).write(&mut f, &[7u8; 300]).unwrap();
            } else {
                b.tcp(1000, 2000, 1, 1000)
                    .write(&mut f, &[7u8; 300])
                    .unwrap();
            }
            let field = 34 + if udp { 6 } else { 16 };
            let good = f.clone();
            // A complete checksum is left alone.
            let mut buf = PacketBuf::from_frame(&good);
            assert!(!recover_partial_checksum(&mut buf));
            // The pseudo-header sum alone, as CHECKSUM_PARTIAL leaves it.
            let p = fold(pseudo_header_v4(
                [10, 0, 0, 1].into(),
                [10, 0, 0, 2].into(),
                if udp { 17 } else { 6 },
                (good.len() - 34) as u16,
            ));
            f[field..field + 2].copy_from_slice(&p.to_be_bytes());
            let mut buf = PacketBuf::from_frame(&f);
            assert!(recover_partial_checksum(&mut buf));
            complete_checksum(&mut buf).unwrap();
            assert_eq!(buf.frame(), &good[..]);
            // Anything else wrong stays wrong.
            f[field] ^= 0x40;
            let mut buf = PacketBuf::from_frame(&f);
            assert!(!recover_partial_checksum(&mut buf));
        }
    }

    use super::*;
    use crate::flow::tests::mutated_frame;
    use crate::offload::CsumOffload;
    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice, VlanId};
    use proptest::prelude::*;

    const PAYLOAD: usize = 4000;

    fn payload() -> Vec<u8> {
        (0..PAYLOAD).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// A TSO4 super-frame as a guest hands it over a tap: one 4000-byte
    /// payload, PSH|FIN|CWR set, IPv4 total length covering all of it, the
    /// TCP checksum field holding only the pseudo-header sum.
    fn tso4(vlan: bool) -> PacketBuf {
        let mut f = Vec::new();
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        if vlan {
            b.single_vlan(VlanId::try_new(42).unwrap())
                .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .tcp(5000, 80, 0xffff_f000, 512)
                .psh()
                .fin()
                .cwr()
                .ack(1)
                .write(&mut f, &payload())
                .unwrap();
        } else {
            b.ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .tcp(5000, 80, 0xffff_f000, 512)
                .psh()
                .fin()
                .cwr()
                .ack(1)
                .write(&mut f, &payload())
                .unwrap();
        }
        let l3 = if vlan { 18 } else { 14 };
        let l4 = l3 + 20;
        let tcp_len = (f.len() - l4) as u16;
        let p = fold(pseudo_header_v4(
            [10, 0, 0, 1].into(),
            [10, 0, 0, 2].into(),
            6,
            tcp_len,
        ));
        f[l4 + 16..l4 + 18].copy_from_slice(&p.to_be_bytes());
        let mut b = PacketBuf::from_frame(&f);
        b.offload = Offload {
            gso: GsoType::TcpV4,
            ecn: true,
            gso_size: 1448,
            hdr_len: (l4 + 20) as u16,
            csum: Some(CsumOffload {
                start: l4 as u16,
                offset: 16,
            }),
            data_valid: false,
        };
        b
    }

    fn collect(b: &PacketBuf) -> Result<Vec<Vec<u8>>, GsoError> {
        let mut out = Vec::new();
        let n = segment(b, |s| out.push(s.to_vec()))?;
        assert_eq!(n, out.len());
        Ok(out)
    }

    #[test]
    fn tso4_segments_reparse() {
        for vlan in [false, true] {
            let segs = collect(&tso4(vlan)).unwrap();
            assert_eq!(segs.len(), 3);
            let mut data = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                let p = SlicedPacket::from_ethernet(s).unwrap();
                let Some(NetSlice::Ipv4(ip)) = &p.net else {
                    panic!("not ipv4")
                };
                let h = ip.header();
                let plen = if i < 2 { 1448 } else { PAYLOAD - 2 * 1448 };
                assert_eq!(usize::from(h.total_len()), 20 + 20 + plen);
                assert_eq!(h.identification(), i as u16);
                assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
                let Some(TransportSlice::Tcp(t)) = &p.transport else {
                    panic!("not tcp")
                };
                assert_eq!(
                    t.sequence_number(),
                    0xffff_f000u32.wrapping_add((i * 1448) as u32)
                );
                assert_eq!(
                    t.checksum(),
                    t.calc_checksum_ipv4(h.source(), h.destination()).unwrap()
                );
                assert_eq!((t.fin(), t.psh()), (i == 2, i == 2));
                assert_eq!(t.cwr(), i == 0);
                assert!(t.ack());
                assert_eq!(t.payload().len(), plen);
                data.extend_from_slice(t.payload());
                // Full re-sum over pseudo header + segment verifies too.
                let ps = pseudo_header_v4(
                    h.source_addr(),
                    h.destination_addr(),
                    6,
                    t.slice().len() as u16,
                );
                assert_eq!(fold(add(ps, sum(t.slice()))), 0xffff);
                assert_eq!(p.vlan_ids().first().map(|v| v.value()), vlan.then_some(42));
            }
            assert_eq!(data, payload());
        }
    }

    #[test]
    fn gathered_tso4_equals_copied() {
        for vlan in [false, true] {
            let b = tso4(vlan);
            let mut copied = Vec::new();
            assert_eq!(segment_append(&b, &[7; 8], &mut copied, |_, _| {}), Ok(3));
            let (mut hdrs, mut payloads) = (Vec::new(), Vec::new());
            let (n, stride) = segment_headers(&b, &[7; 8], &mut hdrs, &mut payloads).unwrap();
            assert_eq!((n, stride), (3, 8 + b.offload.hdr_len as usize));
            let mut gathered = Vec::new();
            for (i, r) in payloads.iter().enumerate() {
                gathered.extend_from_slice(&hdrs[i * stride..(i + 1) * stride]);
                gathered.extend_from_slice(&b.frame()[r.clone()]);
            }
            assert_eq!(gathered, copied);
        }
    }

    #[test]
    fn tso6_and_uso() {
        let (a, b) = ([0xfd; 16], [0xfe; 16]);
        // TSO6
        let mut f = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv6(a, b, 64)
            .tcp(1, 2, 100, 100)
            .write(&mut f, &payload())
            .unwrap();
        let mut buf = PacketBuf::from_frame(&f);
        buf.offload.gso = GsoType::TcpV6;
        buf.offload.gso_size = 1000;
        let segs = collect(&buf).unwrap();
        assert_eq!(segs.len(), 4);
        for (i, s) in segs.iter().enumerate() {
            let p = SlicedPacket::from_ethernet(s).unwrap();
            let Some(NetSlice::Ipv6(ip)) = &p.net else {
                panic!()
            };
            assert_eq!(ip.header().payload_length(), 20 + 1000);
            let Some(TransportSlice::Tcp(t)) = &p.transport else {
                panic!()
            };
            assert_eq!(t.sequence_number(), 100 + 1000 * i as u32);
            assert_eq!(
                t.checksum(),
                t.calc_checksum_ipv6(ip.header().source(), ip.header().destination())
                    .unwrap()
            );
        }
        // USO over IPv4 and IPv6
        for v6 in [false, true] {
            let mut f = Vec::new();
            let e = PacketBuilder::ethernet2([2; 6], [4; 6]);
            if v6 {
                e.ipv6(a, b, 64)
                    .udp(9, 10)
                    .write(&mut f, &payload())
                    .unwrap();
            } else {
                e.ipv4([1; 4], [2; 4], 64)
                    .udp(9, 10)
                    .write(&mut f, &payload())
                    .unwrap();
            }
            let mut buf = PacketBuf::from_frame(&f);
            buf.offload.gso = GsoType::UdpL4;
            buf.offload.gso_size = 1400;
            let segs = collect(&buf).unwrap();
            assert_eq!(segs.len(), 3);
            let mut data = Vec::new();
            for s in &segs {
                let p = SlicedPacket::from_ethernet(s).unwrap();
                let Some(TransportSlice::Udp(u)) = &p.transport else {
                    panic!()
                };
                assert_eq!(usize::from(u.length()), 8 + u.payload().len());
                let h = u.to_header();
                let want = match &p.net {
                    Some(NetSlice::Ipv4(ip)) => {
                        assert_eq!(
                            ip.header().header_checksum(),
                            ip.header().to_header().calc_header_checksum()
                        );
                        h.calc_checksum_ipv4_raw(
                            ip.header().source(),
                            ip.header().destination(),
                            u.payload(),
                        )
                        .unwrap()
                    }
                    Some(NetSlice::Ipv6(ip)) => h
                        .calc_checksum_ipv6_raw(
                            ip.header().source(),
                            ip.header().destination(),
                            u.payload(),
                        )
                        .unwrap(),
                    _ => panic!(),
                };
                assert_eq!(u.checksum(), want);
                data.extend_from_slice(u.payload());
            }
            assert_eq!(data, payload());
        }
    }

    #[test]
    fn complete_checksum_folds_partial() {
        let mut b = tso4(false);
        b.offload.gso = GsoType::None;
        b.offload.gso_size = 0;
        complete_checksum(&mut b).unwrap();
        assert_eq!(b.offload.csum, None);
        {
            let p = SlicedPacket::from_ethernet(b.frame()).unwrap();
            let Some(TransportSlice::Tcp(t)) = &p.transport else {
                panic!()
            };
            assert_eq!(
                t.checksum(),
                t.calc_checksum_ipv4([10, 0, 0, 1], [10, 0, 0, 2]).unwrap()
            );
        }
        // idempotent when nothing is pending
        complete_checksum(&mut b).unwrap();
        // out of bounds
        b.offload.csum = Some(CsumOffload {
            start: 60000,
            offset: 16,
        });
        assert_eq!(complete_checksum(&mut b), Err(GsoError::CsumOutOfBounds));
        // plain frame with pending checksum through segment(): one frame
        let mut c = tso4(false);
        c.offload.gso = GsoType::None;
        let segs = collect(&c).unwrap();
        assert_eq!(segs.len(), 1);
        let mut d = tso4(false);
        d.offload.gso = GsoType::None;
        complete_checksum(&mut d).unwrap();
        assert_eq!(segs[0], d.frame());
    }

    #[test]
    fn errors_not_panics() {
        let mut b = tso4(false);
        b.offload.gso = GsoType::TcpV6;
        assert_eq!(collect(&b), Err(GsoError::Mismatch(GsoType::TcpV6)));
        b.offload.gso = GsoType::UdpL4;
        assert_eq!(collect(&b), Err(GsoError::Mismatch(GsoType::UdpL4)));
        b.offload.gso = GsoType::Ufo;
        assert_eq!(collect(&b), Err(GsoError::Unsupported(GsoType::Ufo)));
        b.offload.gso = GsoType::TcpV4;
        b.offload.gso_size = 0;
        assert_eq!(collect(&b), Err(GsoError::ZeroGsoSize));
        b.offload.gso_size = 1448;
        b.truncate(100);
        assert_eq!(
            collect(&b),
            Err(GsoError::Malformed(Malformed::Ipv4TotalLenBeyondFrame))
        );
        b.truncate(10);
        assert_eq!(
            collect(&b),
            Err(GsoError::Parse(ParseError::EthernetTruncated))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn never_panics(
            f in mutated_frame(),
            gso in 0u8..5,
            size in 0u16..2000,
            csum in proptest::option::of((0u16..200, 0u16..40)),
        ) {
            let mut b = PacketBuf::from_frame(&f);
            b.offload.gso = [GsoType::None, GsoType::TcpV4, GsoType::TcpV6, GsoType::UdpL4, GsoType::Ufo][usize::from(gso)];
            b.offload.gso_size = size;
            b.offload.csum = csum.map(|(start, offset)| CsumOffload { start, offset });
            let mut total = 0usize;
            let r = segment(&b, |s| total += s.len());
            if let Ok(n) = r { prop_assert!(n >= 1); }
            let _ = complete_checksum(&mut b);
        }

        /// A gathered train (`segment_headers`: headers written, payloads
        /// left in the frame) is byte for byte `segment_append`'s, with the
        /// same count, or the same error, for any frame and offload.
        #[test]
        fn gathered_segments_equal_copied_ones(
            f in mutated_frame(),
            gso in 0u8..5,
            size in 0u16..2000,
            odd in any::<bool>(),
        ) {
            let mut b = PacketBuf::from_frame(&f);
            b.offload.gso = [GsoType::None, GsoType::TcpV4, GsoType::TcpV6, GsoType::UdpL4, GsoType::Ufo][usize::from(gso)];
            b.offload.gso_size = size;
            let prefix: &[u8] = if odd { &[9, 8, 7] } else { &[1, 2, 3, 4, 5, 6, 7, 8] };
            let mut copied = Vec::new();
            let mut lens = Vec::new();
            let a = segment_append(&b, prefix, &mut copied, |v, start| lens.push(v.len() - start));
            let (mut hdrs, mut payloads) = (Vec::new(), Vec::new());
            let g = segment_headers(&b, prefix, &mut hdrs, &mut payloads);
            match (a, g) {
                (Ok(n), Ok((m, stride))) => {
                    prop_assert_eq!(n, m);
                    prop_assert_eq!(payloads.len(), n);
                    prop_assert_eq!(hdrs.len(), n * stride);
                    let mut gathered = Vec::new();
                    for (i, r) in payloads.iter().enumerate() {
                        gathered.extend_from_slice(&hdrs[i * stride..(i + 1) * stride]);
                        gathered.extend_from_slice(&b.frame()[r.clone()]);
                        prop_assert_eq!(stride + r.len(), lens[i]);
                    }
                    prop_assert_eq!(gathered, copied);
                }
                (Err(x), Err(y)) => prop_assert_eq!(x, y),
                (x, y) => prop_assert!(false, "append {:?}, gathered {:?}", x, y),
            }
        }

        /// Round trip: the segments' payloads concatenate to the original.
        #[test]
        fn segments_reassemble(len in 0usize..6000, mss in 1u16..3000, v6 in any::<bool>()) {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut f = Vec::new();
            let e = PacketBuilder::ethernet2([2; 6], [4; 6]);
            if v6 {
                e.ipv6([1; 16], [2; 16], 64).tcp(1, 2, 3, 4).write(&mut f, &data).unwrap();
            } else {
                e.ipv4([1; 4], [2; 4], 64).tcp(1, 2, 3, 4).write(&mut f, &data).unwrap();
            }
            let mut b = PacketBuf::from_frame(&f);
            b.offload.gso = if v6 { GsoType::TcpV6 } else { GsoType::TcpV4 };
            b.offload.gso_size = mss;
            let mut got = Vec::new();
            let n = segment(&b, |s| {
                let p = SlicedPacket::from_ethernet(s).unwrap();
                let Some(TransportSlice::Tcp(t)) = p.transport else { panic!() };
                assert!(t.payload().len() <= usize::from(mss));
                got.extend_from_slice(t.payload());
            }).unwrap();
            prop_assert_eq!(n, len.div_ceil(usize::from(mss)).max(1));
            prop_assert_eq!(got, data);
        }
    }
}
