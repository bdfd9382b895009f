//! Underlay MTU: does an inner frame fit once encapsulated, and if not, the
//! ICMP reply that tells its sender the MTU to use.
//!
//! A VTEP never fragments VXLAN packets (outer DF set, RFC 7348 section
//! 4.3). An inner packet that would make an outer packet larger than the
//! underlay MTU is dropped, and the sender is told the inner IP MTU
//! (underlay MTU - 50 for an untagged inner frame over IPv4):
//!
//! * IPv4 with DF: ICMP destination unreachable, fragmentation needed
//!   (type 3 code 4) with the next-hop MTU (RFC 1191), quoting the IP
//!   header and the first 8 bytes of its payload ([`frag_needed`]);
//! * IPv6: ICMPv6 packet too big (type 2, RFC 4443 section 3.2), quoting as
//!   much of the packet as fits in a 1280-byte reply ([`packet_too_big`]);
//! * no reply ([`IcmpAction::Drop`]) for IPv4 without DF (inner
//!   fragmentation is not implemented), ICMP errors, later fragments, and
//!   packets from or (IPv4) to addresses that must not get ICMP errors
//!   (RFC 1122 section 3.2.2, RFC 4443 section 2.4).
//!
//! The replies come from the network's gateway (router MAC and address) and
//! go to the sender's MAC and IP address, with the sender's VLAN tags.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use packet::checksum::{add, checksum, fold, pseudo_header_v6, sum};
use packet::flow::{proto, Frag, L3, L4};
use packet::view::{is_icmpv4_error, is_icmpv6_error};
use packet::{FlowKey, GsoType, MacAddr, PacketBuf};

use crate::encap::largest_segment;
use crate::Family;

/// Largest IPv6 packet an ICMPv6 error may be (RFC 4443 section 2.4 (c)).
pub const IPV6_MIN_MTU: usize = 1280;
/// TTL / hop limit of the ICMP replies.
pub const REPLY_TTL: u8 = 64;

/// Outcome of [`check_mtu`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtuDecision {
    /// The encapsulated packet (every segment, for a super-frame) fits.
    Fits,
    /// It does not: drop it, and reply as `icmp` says.
    TooBig {
        /// The inner IP MTU to announce (underlay MTU minus the outer
        /// headers and the inner Ethernet header and tags).
        mtu: u16,
        /// What to tell the sender.
        icmp: IcmpAction,
    },
}

/// The reply to a packet that is too big.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpAction {
    /// IPv4 with DF set: send [`frag_needed`].
    FragNeeded,
    /// IPv6: send [`packet_too_big`].
    PacketTooBig,
    /// No reply may or can be sent; just drop.
    Drop,
}

/// Whether the frame in `buf` (flow key `key`) fits an underlay of
/// `underlay_mtu` bytes (IP MTU of the underlay interface) once
/// encapsulated over `family`.
///
/// For a TSO/USO super-frame the size that counts is its longest
/// segment's: inner headers (TCP data offset read from the frame) plus
/// `gso_size`, or the whole frame when that is shorter (one short segment).
/// [`crate::Encapsulator::encap_segments`] sizes segments the same way: a
/// super-frame this says fits is encapsulated at its `gso_size` (unless
/// software segmentation refuses the frame).
pub fn check_mtu(underlay_mtu: u16, family: Family, buf: &PacketBuf, key: &FlowKey) -> MtuDecision {
    let frame = buf.frame();
    let overhead = family.ip_overhead();
    let room = usize::from(underlay_mtu).saturating_sub(overhead);
    let len = match buf.offload.gso {
        GsoType::None => frame.len(),
        _ => largest_segment(frame, key, buf.offload.gso_size),
    };
    if len <= room {
        return MtuDecision::Fits;
    }
    let mtu = room.saturating_sub(usize::from(key.l3_offset));
    MtuDecision::TooBig {
        mtu: u16::try_from(mtu).unwrap_or(u16::MAX),
        icmp: icmp_action(frame, key),
    }
}

fn icmp_action(frame: &[u8], key: &FlowKey) -> IcmpAction {
    match key.l3 {
        L3::Ipv4(ip) => {
            let (IpAddr::V4(src), IpAddr::V4(dst)) = (ip.src, ip.dst) else {
                return IcmpAction::Drop;
            };
            let df = frame
                .get(usize::from(key.l3_offset) + 6)
                .is_some_and(|b| b & 0x40 != 0);
            let icmp_err = matches!(key.l4, L4::Icmpv4 { ty, .. } if is_icmpv4_error(ty));
            let bad_src = src.is_unspecified()
                || src.is_broadcast()
                || src.is_multicast()
                || src.is_loopback();
            let bad_dst = dst.is_broadcast() || dst.is_multicast();
            if !df || ip.frag == Frag::Later || icmp_err || bad_src || bad_dst {
                IcmpAction::Drop
            } else {
                IcmpAction::FragNeeded
            }
        }
        L3::Ipv6(ip) => {
            let IpAddr::V6(src) = ip.src else {
                return IcmpAction::Drop;
            };
            let icmp_err = matches!(key.l4, L4::Icmpv6 { ty, .. } if is_icmpv6_error(ty));
            // Packet too big may answer multicast destinations (RFC 4443
            // section 2.4 (e.3)), never an unspecified or multicast source.
            if icmp_err || src.is_unspecified() || src.is_multicast() || src.is_loopback() {
                IcmpAction::Drop
            } else {
                IcmpAction::PacketTooBig
            }
        }
        _ => IcmpAction::Drop,
    }
}

/// Why an ICMP reply could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IcmpError {
    /// The original is not IPv4 (for [`frag_needed`]) or IPv6 (for
    /// [`packet_too_big`]).
    #[error("original packet has the wrong IP version")]
    WrongFamily,
    /// The original frame is shorter than its headers.
    #[error("original packet truncated")]
    Truncated,
    /// The output buffer is too small.
    #[error("reply does not fit the output buffer")]
    NoRoom,
}

fn put16(b: &mut [u8], i: usize, v: u16) {
    if let Some(s) = b.get_mut(i..i + 2) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// Writes the reply's Ethernet header (with the original's VLAN tags and
/// EtherType, `orig[12..l3]`) into `area`.
fn reply_eth(area: &mut [u8], orig: &[u8], key: &FlowKey, gw_mac: MacAddr) -> Option<()> {
    let l3 = usize::from(key.l3_offset);
    area.get_mut(0..6)?.copy_from_slice(&key.src_mac.octets());
    area.get_mut(6..12)?.copy_from_slice(&gw_mac.octets());
    area.get_mut(12..l3)?.copy_from_slice(orig.get(12..l3)?);
    Some(())
}

/// Builds into `out` an ICMP "fragmentation needed and DF set" (type 3,
/// code 4) for the IPv4 frame `orig` (flow key `key`): next-hop MTU `mtu`
/// (RFC 1191), quoting the original IP header and the first 8 bytes of its
/// payload (RFC 792), from `gw_ip`/`gw_mac` to the original sender. Returns
/// the reply's length.
pub fn frag_needed(
    orig: &[u8],
    key: &FlowKey,
    mtu: u16,
    gw_mac: MacAddr,
    gw_ip: Ipv4Addr,
    out: &mut PacketBuf,
) -> Result<usize, IcmpError> {
    let L3::Ipv4(ip) = key.l3 else {
        return Err(IcmpError::WrongFamily);
    };
    let IpAddr::V4(dst) = ip.src else {
        return Err(IcmpError::WrongFamily);
    };
    let l3 = usize::from(key.l3_offset);
    let iph = orig.get(l3..).ok_or(IcmpError::Truncated)?;
    let first = *iph.first().ok_or(IcmpError::Truncated)?;
    let ihl = usize::from(first & 0x0f) * 4;
    let total = iph
        .get(2..4)
        .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    let quote_len = (ihl + 8).min(total).min(iph.len());
    if ihl < 20 || quote_len < ihl {
        return Err(IcmpError::Truncated);
    }
    let quote = iph.get(..quote_len).ok_or(IcmpError::Truncated)?;
    let icmp_len = 8 + quote_len;
    let ip_len = 20 + icmp_len;
    let n = l3 + ip_len;
    let area = out.rx_area();
    if area.len() < n {
        return Err(IcmpError::NoRoom);
    }
    reply_eth(area, orig, key, gw_mac).ok_or(IcmpError::Truncated)?;
    let h = &mut area[l3..n];
    h[..20].copy_from_slice(&[
        0x45,
        0xc0,
        0,
        0,
        0,
        0,
        0,
        0,
        REPLY_TTL,
        proto::ICMP,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    put16(h, 2, ip_len as u16);
    h[12..16].copy_from_slice(&gw_ip.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&h[..20]);
    put16(h, 10, c);
    let icmp = &mut h[20..];
    icmp[..8].copy_from_slice(&[3, 4, 0, 0, 0, 0, 0, 0]);
    put16(icmp, 6, mtu);
    icmp[8..].copy_from_slice(quote);
    let c = checksum(icmp);
    put16(icmp, 2, c);
    out.set_received(n);
    Ok(n)
}

/// Builds into `out` an ICMPv6 "packet too big" (type 2, code 0) for the
/// IPv6 frame `orig` (flow key `key`) announcing `mtu` (RFC 4443 section
/// 3.2), quoting as much of the original packet as keeps the reply within
/// 1280 bytes of IPv6, from `gw_ip`/`gw_mac` to the original sender.
/// Returns the reply's length.
pub fn packet_too_big(
    orig: &[u8],
    key: &FlowKey,
    mtu: u32,
    gw_mac: MacAddr,
    gw_ip: Ipv6Addr,
    out: &mut PacketBuf,
) -> Result<usize, IcmpError> {
    let L3::Ipv6(ip) = key.l3 else {
        return Err(IcmpError::WrongFamily);
    };
    let l3 = usize::from(key.l3_offset);
    let IpAddr::V6(dst) = ip.src else {
        return Err(IcmpError::WrongFamily);
    };
    let pkt = orig.get(l3..).ok_or(IcmpError::Truncated)?;
    if pkt.len() < 40 {
        return Err(IcmpError::Truncated);
    }
    let ip_end = 40 + usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
    let max_quote = IPV6_MIN_MTU - 40 - 8;
    let quote = &pkt[..ip_end.min(pkt.len()).min(max_quote)];
    let icmp_len = 8 + quote.len();
    let n = l3 + 40 + icmp_len;
    let area = out.rx_area();
    if area.len() < n {
        return Err(IcmpError::NoRoom);
    }
    reply_eth(area, orig, key, gw_mac).ok_or(IcmpError::Truncated)?;
    let h = &mut area[l3..n];
    h[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, 0, proto::ICMPV6, REPLY_TTL]);
    put16(h, 4, icmp_len as u16);
    h[8..24].copy_from_slice(&gw_ip.octets());
    h[24..40].copy_from_slice(&dst.octets());
    let icmp = &mut h[40..];
    icmp[..4].copy_from_slice(&[2, 0, 0, 0]);
    icmp[4..8].copy_from_slice(&mtu.to_be_bytes());
    icmp[8..].copy_from_slice(quote);
    let ps = pseudo_header_v6(&gw_ip, &dst, proto::ICMPV6, icmp_len as u32);
    let c = !fold(add(ps, sum(icmp)));
    put16(icmp, 2, c);
    out.set_received(n);
    Ok(n)
}
