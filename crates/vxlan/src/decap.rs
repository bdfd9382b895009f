//! Decapsulation: validate a received underlay frame as VXLAN over IPv4 and
//! strip the outer headers.
//!
//! Checked, in order (each failure is one [`DecapError`]): outer Ethernet
//! header present and EtherType IPv4; IPv4 version 4, IHL >= 5 and within
//! the frame, total length within the frame and covering the header, header
//! checksum, not a fragment, protocol UDP; UDP header present, destination
//! port the configured one, UDP length at least 8 and within the IP payload
//! (bytes past it are ignored, as Linux's `udp_rcv` trims); VXLAN header
//! present with the I flag; an inner frame of at least an Ethernet header.
//!
//! Reserved VXLAN bits and the other flag bits are ignored on receive
//! (RFC 7348 section 5). The outer UDP checksum is not verified here (0 is
//! allowed over IPv4; a non-zero one is the underlay NIC's or socket's job),
//! nor is the outer destination address: the caller compares
//! [`Decap::outer_dst`] with its VTEP address and [`Decap::outer_src`] with
//! its peers ([`crate::VtepTable::is_member`]).

use std::net::{IpAddr, Ipv4Addr};

use packet::checksum::verify;
use packet::flow::{ethertype, proto};
use packet::{MacAddr, PacketBuf};

use crate::{Vni, ETH_HLEN, FLAG_I, IPV4_HLEN, UDP_HLEN, VXLAN_HLEN};

/// Why a received frame is not an acceptable VXLAN packet. Small and `Copy`
/// for per-reason counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum DecapError {
    /// Fewer than 14 bytes.
    #[error("outer Ethernet header truncated")]
    EthTruncated,
    /// Outer EtherType is not IPv4 (0x0800; VLAN-tagged underlay included).
    #[error("outer EtherType is not IPv4")]
    NotIpv4,
    /// Fewer than 20 bytes of IPv4 header, or fewer than IHL says.
    #[error("outer IPv4 header truncated")]
    Ipv4Truncated,
    /// IP version is not 4.
    #[error("outer IP version is not 4")]
    Ipv4BadVersion,
    /// IHL below 5.
    #[error("outer IPv4 IHL below 5")]
    Ipv4BadIhl,
    /// Total length shorter than the header or longer than the frame.
    #[error("outer IPv4 total length inconsistent")]
    Ipv4BadTotalLen,
    /// Header checksum does not verify.
    #[error("outer IPv4 header checksum wrong")]
    Ipv4BadChecksum,
    /// More-fragments set or a fragment offset (VXLAN is never fragmented
    /// by a VTEP; reassembly is not done here).
    #[error("outer IPv4 packet is a fragment")]
    Ipv4Fragment,
    /// Protocol is not UDP.
    #[error("outer IPv4 protocol is not UDP")]
    NotUdp,
    /// Fewer than 8 bytes of UDP header.
    #[error("outer UDP header truncated")]
    UdpTruncated,
    /// UDP destination port is not the configured VXLAN port.
    #[error("UDP destination port is not the VXLAN port")]
    WrongPort,
    /// UDP length below 8 or beyond the IP payload.
    #[error("outer UDP length inconsistent")]
    UdpBadLength,
    /// Fewer than 8 bytes of VXLAN header.
    #[error("VXLAN header truncated")]
    VxlanTruncated,
    /// The I flag (valid VNI) is not set.
    #[error("VXLAN I flag not set")]
    NoIFlag,
    /// Inner frame shorter than an Ethernet header.
    #[error("inner frame shorter than 14 bytes")]
    InnerTooShort,
}

impl DecapError {
    /// Every variant, for counter tables.
    pub const ALL: [DecapError; 15] = [
        DecapError::EthTruncated,
        DecapError::NotIpv4,
        DecapError::Ipv4Truncated,
        DecapError::Ipv4BadVersion,
        DecapError::Ipv4BadIhl,
        DecapError::Ipv4BadTotalLen,
        DecapError::Ipv4BadChecksum,
        DecapError::Ipv4Fragment,
        DecapError::NotUdp,
        DecapError::UdpTruncated,
        DecapError::WrongPort,
        DecapError::UdpBadLength,
        DecapError::VxlanTruncated,
        DecapError::NoIFlag,
        DecapError::InnerTooShort,
    ];

    /// Short stable name for counters.
    pub fn name(&self) -> &'static str {
        match self {
            DecapError::EthTruncated => "vxlan_eth_truncated",
            DecapError::NotIpv4 => "vxlan_not_ipv4",
            DecapError::Ipv4Truncated => "vxlan_ipv4_truncated",
            DecapError::Ipv4BadVersion => "vxlan_ipv4_bad_version",
            DecapError::Ipv4BadIhl => "vxlan_ipv4_bad_ihl",
            DecapError::Ipv4BadTotalLen => "vxlan_ipv4_bad_total_len",
            DecapError::Ipv4BadChecksum => "vxlan_ipv4_bad_checksum",
            DecapError::Ipv4Fragment => "vxlan_ipv4_fragment",
            DecapError::NotUdp => "vxlan_not_udp",
            DecapError::UdpTruncated => "vxlan_udp_truncated",
            DecapError::WrongPort => "vxlan_wrong_port",
            DecapError::UdpBadLength => "vxlan_udp_bad_length",
            DecapError::VxlanTruncated => "vxlan_header_truncated",
            DecapError::NoIFlag => "vxlan_no_i_flag",
            DecapError::InnerTooShort => "vxlan_inner_too_short",
        }
    }
}

/// A validated VXLAN packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decap {
    /// VXLAN network identifier.
    pub vni: Vni,
    /// Outer source address: the sending VTEP (learn inner source MACs
    /// against it).
    pub outer_src: IpAddr,
    /// Outer destination address (should be this VTEP).
    pub outer_dst: IpAddr,
    /// Outer Ethernet source (the underlay's last hop).
    pub outer_src_mac: MacAddr,
    /// Outer UDP source port (the sender's flow entropy).
    pub src_port: u16,
    /// Offset of the inner Ethernet frame in the outer frame.
    pub inner_offset: usize,
    /// Length of the inner frame (up to the end of the UDP datagram).
    pub inner_len: usize,
}

#[inline]
fn be16(b: &[u8], i: usize) -> u16 {
    match b.get(i..i + 2) {
        Some(&[x, y]) => u16::from_be_bytes([x, y]),
        _ => 0,
    }
}

fn ipv4_at(b: &[u8], i: usize) -> Ipv4Addr {
    match b.get(i..i + 4) {
        Some(&[w, x, y, z]) => Ipv4Addr::new(w, x, y, z),
        _ => Ipv4Addr::UNSPECIFIED,
    }
}

/// Validates the VXLAN header (the UDP payload) and returns the VNI; for an
/// underlay read through a UDP socket, where the kernel already checked the
/// outer headers. The inner frame starts at [`VXLAN_HLEN`].
pub fn parse_header(udp_payload: &[u8]) -> Result<Vni, DecapError> {
    let h = udp_payload
        .get(..VXLAN_HLEN)
        .ok_or(DecapError::VxlanTruncated)?;
    if h[0] & FLAG_I == 0 {
        return Err(DecapError::NoIFlag);
    }
    if udp_payload.len() < VXLAN_HLEN + ETH_HLEN {
        return Err(DecapError::InnerTooShort);
    }
    Ok(Vni::from_bytes([h[4], h[5], h[6]]))
}

/// Validates `frame` as VXLAN over IPv4 with UDP destination port
/// `dst_port` and finds the inner frame. Never panics.
pub fn parse(frame: &[u8], dst_port: u16) -> Result<Decap, DecapError> {
    let eth = frame.get(..ETH_HLEN).ok_or(DecapError::EthTruncated)?;
    if be16(eth, 12) != ethertype::IPV4 {
        return Err(DecapError::NotIpv4);
    }
    let ip = frame.get(ETH_HLEN..).unwrap_or_default();
    if ip.len() < IPV4_HLEN {
        return Err(DecapError::Ipv4Truncated);
    }
    if ip[0] >> 4 != 4 {
        return Err(DecapError::Ipv4BadVersion);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < IPV4_HLEN {
        return Err(DecapError::Ipv4BadIhl);
    }
    let hdr = ip.get(..ihl).ok_or(DecapError::Ipv4Truncated)?;
    let total = usize::from(be16(ip, 2));
    if total < ihl || total > ip.len() {
        return Err(DecapError::Ipv4BadTotalLen);
    }
    if !verify(hdr) {
        return Err(DecapError::Ipv4BadChecksum);
    }
    if be16(ip, 6) & 0x3fff != 0 {
        return Err(DecapError::Ipv4Fragment);
    }
    if ip[9] != proto::UDP {
        return Err(DecapError::NotUdp);
    }
    let udp = ip.get(ihl..total).unwrap_or_default();
    if udp.len() < UDP_HLEN {
        return Err(DecapError::UdpTruncated);
    }
    if be16(udp, 2) != dst_port {
        return Err(DecapError::WrongPort);
    }
    let ulen = usize::from(be16(udp, 4));
    if ulen < UDP_HLEN || ulen > udp.len() {
        return Err(DecapError::UdpBadLength);
    }
    let payload = udp.get(UDP_HLEN..ulen).unwrap_or_default();
    let vni = parse_header(payload)?;
    Ok(Decap {
        vni,
        outer_src: IpAddr::V4(ipv4_at(ip, 12)),
        outer_dst: IpAddr::V4(ipv4_at(ip, 16)),
        outer_src_mac: MacAddr::from_slice(&eth[6..]).unwrap_or_default(),
        src_port: be16(udp, 0),
        inner_offset: ETH_HLEN + ihl + UDP_HLEN + VXLAN_HLEN,
        inner_len: ulen - UDP_HLEN - VXLAN_HLEN,
    })
}

/// Validates the frame in `buf` ([`parse`]) and strips the outer headers:
/// on success `buf` holds the inner frame (outer trailing bytes cut), and
/// offload metadata that pointed into the inner frame is moved with it
/// (a pending checksum on the outer headers is dropped). On error `buf` is
/// unchanged.
pub fn decap(buf: &mut PacketBuf, dst_port: u16) -> Result<Decap, DecapError> {
    let d = parse(buf.frame(), dst_port)?;
    let n = d.inner_offset;
    let n16 = u16::try_from(n).unwrap_or(u16::MAX);
    if buf.pull_front(n) {
        buf.truncate(d.inner_len);
    }
    let o = &mut buf.offload;
    o.csum = o.csum.and_then(|mut c| {
        c.start = c.start.checked_sub(n16)?;
        Some(c)
    });
    o.hdr_len = o.hdr_len.saturating_sub(n16);
    Ok(d)
}
