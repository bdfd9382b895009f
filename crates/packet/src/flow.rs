//! The flow key: everything later stages need from a frame's headers, parsed
//! once per frame, with the offsets of L3 and L4 so that port security,
//! the firewall, NAT, DHCP and the load balancer never parse again.
//!
//! [`FlowKey::parse`] fails only when the Ethernet header or a VLAN tag is
//! cut short (nothing can be switched then). A broken inner layer leaves that
//! layer and the ones under it `None` and records why in
//! [`FlowKey::malformed`], so the switch can still forward at L2 where its
//! policy allows, and count and drop otherwise.
//!
//! Not checked here: IPv4 header checksums and L4 checksums (offloads leave
//! them partial on purpose), IPv4 options contents, TCP options contents.
//!
//! Offload super-frames are normal input: a TSO frame's IPv4 total length
//! (or IPv6 payload length) may be anything up to 65535 as long as the frame
//! holds it. Bytes after the IP packet (Ethernet padding) are ignored.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::mac::MacAddr;

/// Length of an untagged Ethernet II header.
pub const ETH_HLEN: usize = 14;
/// Length of one 802.1Q / 802.1ad tag.
pub const VLAN_TAG_LEN: usize = 4;
/// VLAN tags parsed in front of the payload (802.1ad QinQ: outer + inner).
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before giving up (bounds the loop).
pub const MAX_IPV6_EXT_HEADERS: usize = 8;

/// EtherType values vswitch looks at.
pub mod ethertype {
    /// IPv4
    pub const IPV4: u16 = 0x0800;
    /// ARP
    pub const ARP: u16 = 0x0806;
    /// IPv6
    pub const IPV6: u16 = 0x86dd;
    /// 802.1Q customer VLAN tag
    pub const VLAN: u16 = 0x8100;
    /// 802.1ad service VLAN tag (QinQ outer)
    pub const QINQ: u16 = 0x88a8;
    /// Pre-standard QinQ outer tag
    pub const QINQ_OLD: u16 = 0x9100;

    /// True for the TPIDs parsed as VLAN tags.
    pub fn is_vlan(t: u16) -> bool {
        matches!(t, VLAN | QINQ | QINQ_OLD)
    }
}

/// IP protocol numbers vswitch looks at.
pub mod proto {
    /// ICMP
    pub const ICMP: u8 = 1;
    /// TCP
    pub const TCP: u8 = 6;
    /// UDP
    pub const UDP: u8 = 17;
    /// ICMPv6
    pub const ICMPV6: u8 = 58;
    /// IPv6 hop-by-hop options
    pub const HOPOPT: u8 = 0;
    /// IPv6 routing header
    pub const IPV6_ROUTE: u8 = 43;
    /// IPv6 fragment header
    pub const IPV6_FRAG: u8 = 44;
    /// Authentication header
    pub const AH: u8 = 51;
    /// IPv6 destination options
    pub const IPV6_OPTS: u8 = 60;
}

/// The Ethernet header or a VLAN tag is cut short: the frame cannot be
/// switched at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ParseError {
    /// Fewer than 14 bytes.
    #[error("Ethernet header truncated")]
    EthernetTruncated,
    /// A VLAN TPID not followed by a complete tag and EtherType.
    #[error("VLAN tag truncated")]
    VlanTruncated,
}

impl ParseError {
    /// Short stable name for counters.
    pub fn name(&self) -> &'static str {
        match self {
            ParseError::EthernetTruncated => "eth_truncated",
            ParseError::VlanTruncated => "vlan_truncated",
        }
    }
}

/// Why an inner layer was not parsed. Small and `Copy`: it becomes a drop
/// reason and a counter label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Malformed {
    /// More than [`MAX_VLAN_TAGS`] VLAN tags.
    TooManyVlanTags,
    /// ARP shorter than its address lengths say.
    ArpTruncated,
    /// ARP that is not Ethernet/IPv4 (htype 1, ptype 0x0800, 6/4).
    ArpNotEthIpv4,
    /// Fewer than 20 bytes, or fewer than IHL*4.
    Ipv4HeaderTruncated,
    /// Version field is not 4.
    Ipv4BadVersion,
    /// IHL below 5.
    Ipv4BadIhl,
    /// Total length shorter than the header.
    Ipv4TotalLenTooShort,
    /// Total length runs past the end of the frame.
    Ipv4TotalLenBeyondFrame,
    /// Fewer than 40 bytes.
    Ipv6Truncated,
    /// Version field is not 6.
    Ipv6BadVersion,
    /// Payload length runs past the end of the frame.
    Ipv6PayloadLenBeyondFrame,
    /// An extension header runs past the payload.
    Ipv6ExtTruncated,
    /// More than [`MAX_IPV6_EXT_HEADERS`] extension headers.
    Ipv6TooManyExtHeaders,
    /// Fewer than 20 bytes, or fewer than the data offset says.
    TcpTruncated,
    /// Data offset below 5.
    TcpBadDataOffset,
    /// Fewer than 8 bytes.
    UdpTruncated,
    /// UDP length below 8 or beyond the IP payload (unfragmented only).
    UdpBadLength,
    /// Fewer than 8 bytes of ICMP.
    Icmpv4Truncated,
    /// Fewer than 8 bytes of ICMPv6.
    Icmpv6Truncated,
}

impl Malformed {
    /// Short stable name for counters and traces.
    pub fn name(&self) -> &'static str {
        use Malformed::*;
        match self {
            TooManyVlanTags => "too_many_vlan_tags",
            ArpTruncated => "arp_truncated",
            ArpNotEthIpv4 => "arp_not_eth_ipv4",
            Ipv4HeaderTruncated => "ipv4_header_truncated",
            Ipv4BadVersion => "ipv4_bad_version",
            Ipv4BadIhl => "ipv4_bad_ihl",
            Ipv4TotalLenTooShort => "ipv4_total_len_too_short",
            Ipv4TotalLenBeyondFrame => "ipv4_total_len_beyond_frame",
            Ipv6Truncated => "ipv6_truncated",
            Ipv6BadVersion => "ipv6_bad_version",
            Ipv6PayloadLenBeyondFrame => "ipv6_payload_len_beyond_frame",
            Ipv6ExtTruncated => "ipv6_ext_truncated",
            Ipv6TooManyExtHeaders => "ipv6_too_many_ext_headers",
            TcpTruncated => "tcp_truncated",
            TcpBadDataOffset => "tcp_bad_data_offset",
            UdpTruncated => "udp_truncated",
            UdpBadLength => "udp_bad_length",
            Icmpv4Truncated => "icmpv4_truncated",
            Icmpv6Truncated => "icmpv6_truncated",
        }
    }
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// IP fragmentation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Frag {
    /// Not a fragment (an IPv6 atomic fragment counts as not fragmented).
    #[default]
    None,
    /// Offset 0, more fragments follow: carries the L4 header.
    First,
    /// Offset > 0: no L4 header.
    Later,
}

/// Ethernet/IPv4 ARP fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ArpKey {
    /// 1 request, 2 reply.
    pub op: u16,
    /// Sender hardware address.
    pub sha: MacAddr,
    /// Sender protocol address.
    pub spa: Ipv4Addr,
    /// Target hardware address.
    pub tha: MacAddr,
    /// Target protocol address.
    pub tpa: Ipv4Addr,
}

/// IPv4 or IPv6 header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpKey {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IPv4 protocol; for IPv6 the next header after the extension headers.
    pub proto: u8,
    /// TTL / hop limit.
    pub ttl: u8,
    /// IPv4 TOS / IPv6 traffic class (DSCP << 2 | ECN).
    pub tos: u8,
    /// Fragmentation state.
    pub frag: Frag,
}

/// Network layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L3 {
    /// Not ARP/IP, or malformed.
    None,
    /// Ethernet/IPv4 ARP.
    Arp(ArpKey),
    /// IPv4 (addresses are `IpAddr::V4`).
    Ipv4(IpKey),
    /// IPv6 (addresses are `IpAddr::V6`).
    Ipv6(IpKey),
}

/// Transport layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L4 {
    /// Other protocol, later fragment, or malformed.
    None,
    /// TCP; `flags` is header byte 13 (CWR ECE URG ACK PSH RST SYN FIN).
    Tcp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
        /// Flag bits, see [`tcp_flags`].
        flags: u8,
    },
    /// UDP.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// ICMP; `ident` is the echo/timestamp/info identifier, else 0.
    Icmpv4 {
        /// Type.
        ty: u8,
        /// Code.
        code: u8,
        /// Query identifier or 0.
        ident: u16,
    },
    /// ICMPv6; `ident` is the echo identifier, else 0.
    Icmpv6 {
        /// Type.
        ty: u8,
        /// Code.
        code: u8,
        /// Echo identifier or 0.
        ident: u16,
    },
}

/// TCP flag bits as in [`L4::Tcp::flags`].
pub mod tcp_flags {
    /// FIN
    pub const FIN: u8 = 0x01;
    /// SYN
    pub const SYN: u8 = 0x02;
    /// RST
    pub const RST: u8 = 0x04;
    /// PSH
    pub const PSH: u8 = 0x08;
    /// ACK
    pub const ACK: u8 = 0x10;
    /// URG
    pub const URG: u8 = 0x20;
    /// ECE
    pub const ECE: u8 = 0x40;
    /// CWR
    pub const CWR: u8 = 0x80;
}

/// A frame's headers, parsed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Destination MAC.
    pub dst_mac: MacAddr,
    /// Source MAC.
    pub src_mac: MacAddr,
    /// VID of the outer VLAN tag.
    pub vlan: Option<u16>,
    /// VID of the inner tag of a QinQ frame.
    pub inner_vlan: Option<u16>,
    /// EtherType after the VLAN tags.
    pub ethertype: u16,
    /// Offset of the L3 header in the frame (after the VLAN tags).
    pub l3_offset: u16,
    /// Network layer.
    pub l3: L3,
    /// Offset of the L4 header; 0 when `l4` is `None`.
    pub l4_offset: u16,
    /// Transport layer.
    pub l4: L4,
    /// Why an inner layer is `None`, if it is broken.
    pub malformed: Option<Malformed>,
}

#[inline]
fn be16(b: &[u8], i: usize) -> u16 {
    match b.get(i..i + 2) {
        Some(&[x, y]) => u16::from_be_bytes([x, y]),
        _ => 0,
    }
}

#[inline]
fn arr<const N: usize>(b: &[u8], i: usize) -> [u8; N] {
    b.get(i..i + N)
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0; N])
}

/// `usize` offset to the `u16` a key holds; offsets are bounded by the parse
/// (Ethernet + tags + 60 or 40 + 8 * 2048) so this never saturates.
#[inline]
fn off16(o: usize) -> u16 {
    u16::try_from(o).unwrap_or(u16::MAX)
}

impl FlowKey {
    /// Parses the headers of one Ethernet frame. Allocation free.
    pub fn parse(frame: &[u8]) -> Result<FlowKey, ParseError> {
        let eth: &[u8; ETH_HLEN] = frame
            .get(..ETH_HLEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(ParseError::EthernetTruncated)?;
        let mut key = FlowKey {
            dst_mac: MacAddr(arr(eth, 0)),
            src_mac: MacAddr(arr(eth, 6)),
            vlan: None,
            inner_vlan: None,
            ethertype: u16::from_be_bytes([eth[12], eth[13]]),
            l3_offset: ETH_HLEN as u16,
            l3: L3::None,
            l4_offset: 0,
            l4: L4::None,
            malformed: None,
        };
        let mut off = ETH_HLEN;
        let mut tags = 0;
        while ethertype::is_vlan(key.ethertype) {
            if tags == MAX_VLAN_TAGS {
                key.malformed = Some(Malformed::TooManyVlanTags);
                key.l3_offset = off16(off);
                return Ok(key);
            }
            let tag = frame
                .get(off..off + VLAN_TAG_LEN)
                .ok_or(ParseError::VlanTruncated)?;
            let vid = be16(tag, 0) & 0x0fff;
            if tags == 0 {
                key.vlan = Some(vid);
            } else {
                key.inner_vlan = Some(vid);
            }
            key.ethertype = be16(tag, 2);
            off += VLAN_TAG_LEN;
            tags += 1;
        }
        key.l3_offset = off16(off);
        let l3 = frame.get(off..).unwrap_or_default();
        let r = match key.ethertype {
            ethertype::IPV4 => key.parse_ipv4(l3, off),
            ethertype::IPV6 => key.parse_ipv6(l3, off),
            ethertype::ARP => key.parse_arp(l3),
            _ => Ok(()),
        };
        if let Err(m) = r {
            key.malformed = Some(m);
        }
        Ok(key)
    }

    fn parse_arp(&mut self, a: &[u8]) -> Result<(), Malformed> {
        if a.len() < 8 {
            return Err(Malformed::ArpTruncated);
        }
        let (hlen, plen) = (usize::from(a[4]), usize::from(a[5]));
        if a.len() < 8 + 2 * hlen + 2 * plen {
            return Err(Malformed::ArpTruncated);
        }
        if be16(a, 0) != 1 || be16(a, 2) != ethertype::IPV4 || hlen != 6 || plen != 4 {
            return Err(Malformed::ArpNotEthIpv4);
        }
        self.l3 = L3::Arp(ArpKey {
            op: be16(a, 6),
            sha: MacAddr(arr(a, 8)),
            spa: Ipv4Addr::from(arr::<4>(a, 14)),
            tha: MacAddr(arr(a, 18)),
            tpa: Ipv4Addr::from(arr::<4>(a, 24)),
        });
        Ok(())
    }

    fn parse_ipv4(&mut self, h: &[u8], base: usize) -> Result<(), Malformed> {
        if h.len() < 20 {
            return Err(Malformed::Ipv4HeaderTruncated);
        }
        if h[0] >> 4 != 4 {
            return Err(Malformed::Ipv4BadVersion);
        }
        let ihl = usize::from(h[0] & 0x0f) * 4;
        if ihl < 20 {
            return Err(Malformed::Ipv4BadIhl);
        }
        if ihl > h.len() {
            return Err(Malformed::Ipv4HeaderTruncated);
        }
        let total = usize::from(be16(h, 2));
        if total < ihl {
            return Err(Malformed::Ipv4TotalLenTooShort);
        }
        if total > h.len() {
            return Err(Malformed::Ipv4TotalLenBeyondFrame);
        }
        let fragf = be16(h, 6);
        let frag = if fragf & 0x1fff != 0 {
            Frag::Later
        } else if fragf & 0x2000 != 0 {
            Frag::First
        } else {
            Frag::None
        };
        let proto = h[9];
        self.l3 = L3::Ipv4(IpKey {
            src: IpAddr::V4(Ipv4Addr::from(arr::<4>(h, 12))),
            dst: IpAddr::V4(Ipv4Addr::from(arr::<4>(h, 16))),
            proto,
            ttl: h[8],
            tos: h[1],
            frag,
        });
        if frag == Frag::Later {
            return Ok(());
        }
        let l4 = h.get(ihl..total).unwrap_or_default();
        self.parse_l4(l4, base + ihl, proto, false, frag)
    }

    fn parse_ipv6(&mut self, h: &[u8], base: usize) -> Result<(), Malformed> {
        if h.len() < 40 {
            return Err(Malformed::Ipv6Truncated);
        }
        if h[0] >> 4 != 6 {
            return Err(Malformed::Ipv6BadVersion);
        }
        let end = 40 + usize::from(be16(h, 4));
        let pkt = h.get(..end).ok_or(Malformed::Ipv6PayloadLenBeyondFrame)?;
        let mut next = pkt[6];
        let mut pos = 40;
        let mut frag = Frag::None;
        let mut n = 0;
        loop {
            let len = match next {
                proto::HOPOPT | proto::IPV6_ROUTE | proto::IPV6_OPTS => {
                    let l = *pkt.get(pos + 1).ok_or(Malformed::Ipv6ExtTruncated)?;
                    (usize::from(l) + 1) * 8
                }
                proto::IPV6_FRAG => {
                    let f = be16(pkt, pos + 2);
                    if pkt.len() >= pos + 8 {
                        frag = if f & 0xfff8 != 0 {
                            Frag::Later
                        } else if f & 1 != 0 {
                            Frag::First
                        } else {
                            Frag::None
                        };
                    }
                    8
                }
                proto::AH => {
                    let l = *pkt.get(pos + 1).ok_or(Malformed::Ipv6ExtTruncated)?;
                    (usize::from(l) + 2) * 4
                }
                _ => break,
            };
            if pos + len > pkt.len() {
                return Err(Malformed::Ipv6ExtTruncated);
            }
            if n == MAX_IPV6_EXT_HEADERS {
                return Err(Malformed::Ipv6TooManyExtHeaders);
            }
            n += 1;
            next = pkt[pos];
            pos += len;
            if frag == Frag::Later {
                break;
            }
        }
        self.l3 = L3::Ipv6(IpKey {
            src: IpAddr::V6(Ipv6Addr::from(arr::<16>(pkt, 8))),
            dst: IpAddr::V6(Ipv6Addr::from(arr::<16>(pkt, 24))),
            proto: next,
            ttl: pkt[7],
            tos: (be16(pkt, 0) >> 4) as u8,
            frag,
        });
        if frag == Frag::Later {
            return Ok(());
        }
        let l4 = pkt.get(pos..).unwrap_or_default();
        self.parse_l4(l4, base + pos, next, true, frag)
    }

    fn parse_l4(
        &mut self,
        t: &[u8],
        off: usize,
        proto: u8,
        v6: bool,
        frag: Frag,
    ) -> Result<(), Malformed> {
        let l4 = match (proto, v6) {
            (proto::TCP, _) => {
                if t.len() < 20 {
                    return Err(Malformed::TcpTruncated);
                }
                let doff = usize::from(t[12] >> 4) * 4;
                if doff < 20 {
                    return Err(Malformed::TcpBadDataOffset);
                }
                if doff > t.len() {
                    return Err(Malformed::TcpTruncated);
                }
                L4::Tcp {
                    src_port: be16(t, 0),
                    dst_port: be16(t, 2),
                    flags: t[13],
                }
            }
            (proto::UDP, _) => {
                if t.len() < 8 {
                    return Err(Malformed::UdpTruncated);
                }
                let ulen = usize::from(be16(t, 4));
                // A first fragment holds only part of the datagram the
                // length describes.
                if frag == Frag::None && (ulen < 8 || ulen > t.len()) {
                    return Err(Malformed::UdpBadLength);
                }
                L4::Udp {
                    src_port: be16(t, 0),
                    dst_port: be16(t, 2),
                }
            }
            (proto::ICMP, false) => {
                if t.len() < 8 {
                    return Err(Malformed::Icmpv4Truncated);
                }
                let ident = match t[0] {
                    0 | 8 | 13 | 14 | 15 | 16 | 17 | 18 => be16(t, 4),
                    _ => 0,
                };
                L4::Icmpv4 {
                    ty: t[0],
                    code: t[1],
                    ident,
                }
            }
            (proto::ICMPV6, true) => {
                if t.len() < 8 {
                    return Err(Malformed::Icmpv6Truncated);
                }
                let ident = match t[0] {
                    128 | 129 => be16(t, 4),
                    _ => 0,
                };
                L4::Icmpv6 {
                    ty: t[0],
                    code: t[1],
                    ident,
                }
            }
            _ => return Ok(()),
        };
        self.l4 = l4;
        self.l4_offset = off16(off);
        Ok(())
    }

    /// The IP key, for IPv4 and IPv6.
    pub fn ip(&self) -> Option<&IpKey> {
        match &self.l3 {
            L3::Ipv4(k) | L3::Ipv6(k) => Some(k),
            _ => None,
        }
    }

    /// `(src_port, dst_port)` for TCP and UDP.
    pub fn ports(&self) -> Option<(u16, u16)> {
        match self.l4 {
            L4::Tcp {
                src_port, dst_port, ..
            }
            | L4::Udp { src_port, dst_port } => Some((src_port, dst_port)),
            _ => None,
        }
    }

    /// The frame from the L3 header on (empty if `frame` is shorter).
    pub fn l3_bytes<'a>(&self, frame: &'a [u8]) -> &'a [u8] {
        frame.get(usize::from(self.l3_offset)..).unwrap_or_default()
    }

    /// The frame from the L4 header on; empty when there is no L4.
    pub fn l4_bytes<'a>(&self, frame: &'a [u8]) -> &'a [u8] {
        if self.l4 == L4::None {
            return &[];
        }
        frame.get(usize::from(self.l4_offset)..).unwrap_or_default()
    }

    /// The UDP payload, bounded by the UDP length field (so Ethernet
    /// padding is excluded); `None` unless L4 is UDP and the datagram is
    /// whole in `frame`.
    pub fn udp_payload<'a>(&self, frame: &'a [u8]) -> Option<&'a [u8]> {
        if !matches!(self.l4, L4::Udp { .. }) {
            return None;
        }
        let udp = frame.get(usize::from(self.l4_offset)..)?;
        let len = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
        udp.get(8..len)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use etherparse::{PacketBuilder, VlanId};
    use proptest::prelude::*;

    #[test]
    fn udp_payload_excludes_padding() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(SRC, [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(68, 67)
            .write(&mut f, &[7, 7, 7])
            .unwrap();
        f.resize(60, 0); // Ethernet minimum-size padding
        let k = FlowKey::parse(&f).unwrap();
        assert_eq!(k.udp_payload(&f), Some(&[7u8, 7, 7][..]));
        assert_eq!(k.udp_payload(&f[..f.len() - 20]), None); // cut datagram
        let arp = FlowKey::parse(&[0u8; 60]).unwrap();
        assert_eq!(arp.udp_payload(&[0u8; 60]), None);
    }

    const SRC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const DST: [u8; 6] = [2, 0, 0, 0, 0, 2];

    pub(crate) fn tcp4(payload_len: usize) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(SRC, DST)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 80, 1000, 65535)
            .syn()
            .write(&mut v, &vec![0xaa; payload_len])
            .unwrap();
        v
    }

    pub(crate) fn udp4(payload_len: usize) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(SRC, DST)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(68, 67)
            .write(&mut v, &vec![0x55; payload_len])
            .unwrap();
        v
    }

    pub(crate) fn tcp6(payload_len: usize) -> Vec<u8> {
        let mut v = Vec::new();
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[15] = 1;
        let mut b = a;
        b[15] = 2;
        PacketBuilder::ethernet2(SRC, DST)
            .ipv6(a, b, 63)
            .tcp(443, 50000, 7, 1000)
            .ack(99)
            .write(&mut v, &vec![1; payload_len])
            .unwrap();
        v
    }

    pub(crate) fn arp_request() -> Vec<u8> {
        // Hand-written fixture: who-has 10.0.0.1 tell 10.0.0.2.
        let mut v = vec![0xff; 6];
        v.extend_from_slice(&SRC);
        v.extend_from_slice(&[0x08, 0x06]);
        v.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        v.extend_from_slice(&SRC);
        v.extend_from_slice(&[10, 0, 0, 2]);
        v.extend_from_slice(&[0; 6]);
        v.extend_from_slice(&[10, 0, 0, 1]);
        v.resize(60, 0); // Ethernet padding
        v
    }

    #[test]
    fn tcp4_fixture() {
        let f = tcp4(10);
        let k = FlowKey::parse(&f).unwrap();
        assert_eq!(k.dst_mac, MacAddr(DST));
        assert_eq!(k.src_mac, MacAddr(SRC));
        assert_eq!(k.vlan, None);
        assert_eq!(k.ethertype, 0x0800);
        assert_eq!(k.l3_offset, 14);
        assert_eq!(k.l4_offset, 34);
        assert_eq!(
            k.l3,
            L3::Ipv4(IpKey {
                src: "10.0.0.1".parse().unwrap(),
                dst: "10.0.0.2".parse().unwrap(),
                proto: 6,
                ttl: 64,
                tos: 0,
                frag: Frag::None
            })
        );
        assert_eq!(
            k.l4,
            L4::Tcp {
                src_port: 40000,
                dst_port: 80,
                flags: tcp_flags::SYN
            }
        );
        assert_eq!(k.malformed, None);
        assert_eq!(k.ports(), Some((40000, 80)));
        assert_eq!(k.l4_bytes(&f).len(), 30);
    }

    #[test]
    fn arp_fixture_with_padding() {
        let k = FlowKey::parse(&arp_request()).unwrap();
        assert_eq!(
            k.l3,
            L3::Arp(ArpKey {
                op: 1,
                sha: MacAddr(SRC),
                spa: Ipv4Addr::new(10, 0, 0, 2),
                tha: MacAddr::ZERO,
                tpa: Ipv4Addr::new(10, 0, 0, 1),
            })
        );
        assert_eq!(k.l4, L4::None);
        assert_eq!(k.malformed, None);
    }

    #[test]
    fn tcp6_fixture() {
        let k = FlowKey::parse(&tcp6(5)).unwrap();
        let ip = k.ip().unwrap();
        assert_eq!(ip.proto, 6);
        assert_eq!(ip.ttl, 63);
        assert_eq!(ip.src, "fd00::1".parse::<IpAddr>().unwrap());
        assert_eq!(k.l4_offset, 54);
        assert!(
            matches!(k.l4, L4::Tcp { src_port: 443, dst_port: 50000, flags } if flags == tcp_flags::ACK)
        );
    }

    #[test]
    fn qinq_and_triple_tag() {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(SRC, DST)
            .double_vlan(VlanId::try_new(100).unwrap(), VlanId::try_new(200).unwrap())
            .ipv4([1, 1, 1, 1], [2, 2, 2, 2], 9)
            .udp(1, 2)
            .write(&mut v, &[0; 4])
            .unwrap();
        let k = FlowKey::parse(&v).unwrap();
        assert_eq!((k.vlan, k.inner_vlan), (Some(100), Some(200)));
        assert_eq!(k.ethertype, 0x0800);
        assert_eq!(k.l3_offset, 22);
        assert_eq!(
            k.l4,
            L4::Udp {
                src_port: 1,
                dst_port: 2
            }
        );

        // A third tag: switched at L2 only, flagged.
        let mut t = v[..18].to_vec();
        t[16..18].copy_from_slice(&[0x81, 0x00]);
        t.extend_from_slice(&[0, 7, 0x81, 0x00]);
        t.extend_from_slice(&v[18..]);
        let k = FlowKey::parse(&t).unwrap();
        assert_eq!(k.malformed, Some(Malformed::TooManyVlanTags));
        assert_eq!(k.l3, L3::None);

        // Truncated tag is a hard error.
        assert_eq!(FlowKey::parse(&v[..16]), Err(ParseError::VlanTruncated));
        assert_eq!(FlowKey::parse(&v[..13]), Err(ParseError::EthernetTruncated));
    }

    #[test]
    fn malformed_inner_layers() {
        let f = tcp4(0);
        let m = |f: &[u8]| FlowKey::parse(f).unwrap().malformed;
        let mut x = f.clone();
        x[14] = 0x44; // IHL 4
        assert_eq!(m(&x), Some(Malformed::Ipv4BadIhl));
        let mut x = f.clone();
        x[16..18].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(m(&x), Some(Malformed::Ipv4TotalLenBeyondFrame));
        let mut x = f.clone();
        x[46] = 0x40; // data offset 4
        assert_eq!(m(&x), Some(Malformed::TcpBadDataOffset));
        let k = FlowKey::parse(&x).unwrap();
        assert!(matches!(k.l3, L3::Ipv4(_)));
        assert_eq!((k.l4, k.l4_offset), (L4::None, 0));
        assert_eq!(m(&f[..30]), Some(Malformed::Ipv4HeaderTruncated));
        // Cut inside TCP: the IPv4 total length no longer fits.
        assert_eq!(m(&f[..40]), Some(Malformed::Ipv4TotalLenBeyondFrame));
        let mut x = f.clone();
        x[16..18].copy_from_slice(&30u16.to_be_bytes());
        assert_eq!(m(&x[..44]), Some(Malformed::TcpTruncated));
        assert_eq!(m(&arp_request()[..30]), Some(Malformed::ArpTruncated));
        let u = udp4(4);
        let mut x = u.clone();
        x[38..40].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(m(&x), Some(Malformed::UdpBadLength));
        let t6 = tcp6(0);
        assert_eq!(m(&t6[..60]), Some(Malformed::Ipv6PayloadLenBeyondFrame));
        assert_eq!(m(&t6[..50]), Some(Malformed::Ipv6Truncated));
    }

    #[test]
    fn tso_super_frame_and_fragments() {
        // 64000-byte payload: total length 64040 matches the frame.
        let f = tcp4(64000);
        let k = FlowKey::parse(&f).unwrap();
        assert_eq!(k.malformed, None);
        assert!(matches!(k.l4, L4::Tcp { .. }));

        let mut x = tcp4(20);
        x[20] = 0x20; // MF
        let k = FlowKey::parse(&x).unwrap();
        assert_eq!(k.ip().unwrap().frag, Frag::First);
        assert!(matches!(k.l4, L4::Tcp { .. }));
        x[20] = 0x00;
        x[21] = 0x10; // offset 16*8
        let k = FlowKey::parse(&x).unwrap();
        assert_eq!(k.ip().unwrap().frag, Frag::Later);
        assert_eq!((k.l4, k.l4_offset, k.malformed), (L4::None, 0, None));
    }

    #[test]
    fn ipv6_fragment_header() {
        // Insert a fragment header (offset 0, M=1) before UDP.
        let mut v = Vec::new();
        let a = [0xfd; 16];
        PacketBuilder::ethernet2(SRC, DST)
            .ipv6(a, a, 1)
            .udp(5, 6)
            .write(&mut v, &[0; 100])
            .unwrap();
        let mut f = v[..54].to_vec();
        f[20] = 44; // next header: fragment
        f.extend_from_slice(&[17, 0, 0, 1, 0, 0, 0, 9]);
        f.extend_from_slice(&v[54..62]);
        f.extend_from_slice(&[0; 20]); // first part of the payload only
        let plen = (f.len() - 54) as u16;
        f[18..20].copy_from_slice(&plen.to_be_bytes());
        let k = FlowKey::parse(&f).unwrap();
        let ip = k.ip().unwrap();
        assert_eq!((ip.proto, ip.frag), (17, Frag::First));
        assert_eq!(
            k.l4,
            L4::Udp {
                src_port: 5,
                dst_port: 6
            }
        );
        assert_eq!(k.l4_offset, 62);
        assert_eq!(k.malformed, None);
        // later fragment
        f[57] = 8 << 3;
        let k = FlowKey::parse(&f).unwrap();
        assert_eq!(k.ip().unwrap().frag, Frag::Later);
        assert_eq!(k.l4, L4::None);
    }

    #[test]
    fn icmp_echo() {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(SRC, DST)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 254], 64)
            .icmpv4_echo_request(0x1234, 1)
            .write(&mut v, &[0; 8])
            .unwrap();
        let k = FlowKey::parse(&v).unwrap();
        assert_eq!(
            k.l4,
            L4::Icmpv4 {
                ty: 8,
                code: 0,
                ident: 0x1234
            }
        );
        let mut v = Vec::new();
        PacketBuilder::ethernet2(SRC, DST)
            .ipv6([1; 16], [2; 16], 64)
            .icmpv6_echo_reply(0x4321, 1)
            .write(&mut v, &[])
            .unwrap();
        let k = FlowKey::parse(&v).unwrap();
        assert_eq!(
            k.l4,
            L4::Icmpv6 {
                ty: 129,
                code: 0,
                ident: 0x4321
            }
        );
    }

    /// Valid frames of every kind the builder makes.
    pub(crate) fn valid_frame() -> impl Strategy<Value = Vec<u8>> {
        (
            0u8..6,
            0u8..3,
            any::<[u8; 4]>(),
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<u16>(),
            any::<u32>(),
            0usize..200,
            0u16..4096,
            0u16..4096,
        )
            .prop_map(|(kind, vlan, a4, a6, sp, dp, seq, plen, v1, v2)| {
                let eth = PacketBuilder::ethernet2(SRC, DST);
                let payload = vec![0x5a; plen];
                let mut out = Vec::new();
                let id = |v| VlanId::try_new(v).unwrap();
                macro_rules! finish {
                    ($step:expr) => {
                        match kind {
                            0 => $step
                                .ipv4(a4, [9, 9, 9, 9], 64)
                                .tcp(sp, dp, seq, 100)
                                .write(&mut out, &payload),
                            1 => $step
                                .ipv4(a4, [9, 9, 9, 9], 64)
                                .udp(sp, dp)
                                .write(&mut out, &payload),
                            2 => $step
                                .ipv6(a6, [9; 16], 64)
                                .tcp(sp, dp, seq, 100)
                                .write(&mut out, &payload),
                            3 => $step
                                .ipv6(a6, [9; 16], 64)
                                .udp(sp, dp)
                                .write(&mut out, &payload),
                            4 => $step
                                .ipv4(a4, [9, 9, 9, 9], 64)
                                .icmpv4_echo_request(sp, dp)
                                .write(&mut out, &payload),
                            _ => $step
                                .ipv6(a6, [9; 16], 64)
                                .icmpv6_echo_request(sp, dp)
                                .write(&mut out, &payload),
                        }
                    };
                }
                match vlan {
                    0 => finish!(eth),
                    1 => finish!(eth.single_vlan(id(v1))),
                    _ => finish!(eth.double_vlan(id(v1), id(v2))),
                }
                .unwrap();
                out
            })
    }

    /// Mutations that produce the malformed cases a fuzzer finds first.
    pub(crate) fn mutated_frame() -> impl Strategy<Value = Vec<u8>> {
        (valid_frame(), 0u8..8, any::<usize>(), any::<u8>()).prop_map(|(mut f, how, at, b)| {
            let n = f.len();
            let l3 = if f[12] == 0x81 || f[12] == 0x88 {
                if f[16] == 0x81 {
                    22
                } else {
                    18
                }
            } else {
                14
            };
            match how {
                0 => f.truncate(at % (n + 1)),
                1 => f[l3] = (f[l3] & 0xf0) | (b % 5), // IHL < 5
                2 => {
                    let v = 0xffffu16.saturating_sub(u16::from(b)).to_be_bytes();
                    f[l3 + 2] = v[0]; // IPv4 total length / IPv6 payload length
                    f[l3 + 3] = v[1];
                    f[l3 + 4] = v[0];
                    f[l3 + 5] = v[1];
                }
                3 => {
                    // TCP data offset < 5 (wherever L4 starts)
                    if let Ok(k) = FlowKey::parse(&f) {
                        let o = usize::from(k.l4_offset) + 12;
                        if k.l4_offset != 0 && o < n {
                            f[o] = (b % 5) << 4;
                        }
                    }
                }
                4 => {
                    // VLAN in VLAN in VLAN
                    let tag = [0x81, 0x00, b, b];
                    f.splice(12..12, tag);
                    f.splice(12..12, [0x88, 0xa8, 0, 1]);
                }
                5 => f[at % n] = b,
                6 => f[at % n] ^= 1 << (b % 8),
                _ => f.truncate(l3 + at % 60),
            }
            f
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = FlowKey::parse(&data);
        }

        #[test]
        fn never_panics_on_mutations(f in mutated_frame()) {
            if let Ok(k) = FlowKey::parse(&f) {
                prop_assert!(usize::from(k.l3_offset) <= f.len() + 4);
                if k.l4 != L4::None {
                    prop_assert!(usize::from(k.l4_offset) < f.len());
                    prop_assert!(k.ip().is_some());
                } else {
                    prop_assert_eq!(k.l4_offset, 0);
                }
            }
        }

        /// Differential against etherparse on valid frames.
        #[test]
        fn agrees_with_etherparse(f in valid_frame()) {
            let k = FlowKey::parse(&f).unwrap();
            prop_assert_eq!(k.malformed, None);
            let p = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
            let vids = p.vlan_ids();
            prop_assert_eq!(k.vlan, vids.first().map(|v| v.value()));
            prop_assert_eq!(k.inner_vlan, vids.get(1).map(|v| v.value()));
            match (&p.net, k.l3) {
                (Some(etherparse::NetSlice::Ipv4(s)), L3::Ipv4(ip)) => {
                    prop_assert_eq!(ip.src, IpAddr::V4(s.header().source_addr()));
                    prop_assert_eq!(ip.dst, IpAddr::V4(s.header().destination_addr()));
                    prop_assert_eq!(ip.proto, s.payload_ip_number().0);
                    prop_assert_eq!(usize::from(k.l3_offset), f.len() - s.header().slice().len() - s.payload().payload.len());
                }
                (Some(etherparse::NetSlice::Ipv6(s)), L3::Ipv6(ip)) => {
                    prop_assert_eq!(ip.src, IpAddr::V6(s.header().source_addr()));
                    prop_assert_eq!(ip.proto, s.payload().ip_number.0);
                    prop_assert_eq!(ip.ttl, s.header().hop_limit());
                }
                (n, l3) => prop_assert!(false, "mismatch {:?} {:?}", n, l3),
            }
            use etherparse::TransportSlice as T;
            match (&p.transport, k.l4) {
                (Some(T::Tcp(t)), L4::Tcp { src_port, dst_port, .. }) => {
                    prop_assert_eq!((src_port, dst_port), (t.source_port(), t.destination_port()));
                    prop_assert_eq!(usize::from(k.l4_offset), f.len() - t.slice().len());
                }
                (Some(T::Udp(u)), L4::Udp { src_port, dst_port }) => {
                    prop_assert_eq!((src_port, dst_port), (u.source_port(), u.destination_port()));
                    prop_assert_eq!(usize::from(k.l4_offset), f.len() - u.slice().len());
                }
                (Some(T::Icmpv4(i)), L4::Icmpv4 { ty, ident, .. }) => {
                    prop_assert_eq!(ty, i.type_u8());
                    prop_assert_eq!(ident.to_be_bytes(), [i.bytes5to8()[0], i.bytes5to8()[1]]);
                }
                (Some(T::Icmpv6(i)), L4::Icmpv6 { ty, ident, .. }) => {
                    prop_assert_eq!(ty, i.type_u8());
                    prop_assert_eq!(ident.to_be_bytes(), [i.bytes5to8()[0], i.bytes5to8()[1]]);
                }
                (t, l4) => prop_assert!(false, "mismatch {:?} {:?}", t, l4),
            }
        }
    }
}
