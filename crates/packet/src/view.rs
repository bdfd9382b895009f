//! Zero-copy, bounds-checked views over frame headers.
//!
//! Per layer, vswitch uses etherparse 0.21's slice types (re-exported here so
//! every crate uses the same version) and adds what they lack. Every
//! constructor checks lengths once; no accessor panics afterwards.
//!
//! | layer | use | for |
//! |---|---|---|
//! | Ethernet + 802.1Q/QinQ | [`EthView`] (built on [`Ethernet2Slice`] and [`SingleVlanSlice`]) | MACs, both VLAN tags with PCP/DEI, EtherType, payload offset in one call |
//! | | [`Ethernet2Slice`], [`SingleVlanSlice`], [`DoubleVlanSlice`] | single headers |
//! | ARP | [`arp_eth_ipv4`] -> [`ArpEthIpv4Packet`]; [`ArpPacketSlice`] for other hardware types | ARP responder, port security |
//! | IPv4 | [`Ipv4Slice`] (strict: total length must fit), [`Ipv4HeaderSlice`] (header only), [`LaxIpv4Slice`] (cut-off packets) | |
//! | IPv6 | [`Ipv6Slice`] (walks extension headers), [`Ipv6HeaderSlice`], [`LaxIpv6Slice`] | |
//! | TCP / UDP | [`TcpSlice`], [`UdpSlice`] | options, flags, payload |
//! | ICMPv4 / ICMPv6 | [`Icmpv4Slice`], [`Icmpv6Slice`] (typed: [`Icmpv4Type`], [`Icmpv6Type`]) | ICMP responder, conntrack |
//! | headers quoted in ICMP errors | [`icmp_error_quote`] -> [`LaxSlicedPacket`] | NAT rewriting of ICMP errors |
//! | whole frame, debugging | [`SlicedPacket`] / [`LaxSlicedPacket`] | tests, trace |
//!
//! On the fast path, do not use these to re-parse: [`crate::FlowKey`] has
//! already found every offset; use a view at `key.l3_offset` /
//! `key.l4_offset` only when a stage needs a field the key does not carry.

pub use etherparse::{
    ArpEthIpv4Packet, ArpHardwareId, ArpOperation, ArpPacketSlice, DoubleVlanSlice, EtherType,
    Ethernet2Slice, Icmpv4Slice, Icmpv4Type, Icmpv6Slice, Icmpv6Type, IpNumber, Ipv4HeaderSlice,
    Ipv4Slice, Ipv6ExtensionsSlice, Ipv6HeaderSlice, Ipv6Slice, LaxIpv4Slice, LaxIpv6Slice,
    LaxNetSlice, LaxSlicedPacket, NetSlice, SingleVlanSlice, SlicedPacket, TcpSlice,
    TransportSlice, UdpSlice,
};

use crate::flow::{ethertype, ParseError, ETH_HLEN, MAX_VLAN_TAGS, VLAN_TAG_LEN};
use crate::mac::MacAddr;

/// One 802.1Q / 802.1ad tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VlanTag {
    /// Tag protocol identifier (0x8100, 0x88a8 or 0x9100).
    pub tpid: u16,
    /// Priority code point (0..=7).
    pub pcp: u8,
    /// Drop eligible indicator.
    pub dei: bool,
    /// VLAN identifier (0..=4095).
    pub vid: u16,
}

/// An Ethernet II header with up to [`MAX_VLAN_TAGS`] VLAN tags.
///
/// etherparse parses tags only as part of a whole packet; this view stops
/// after the tags, so a switch can read L2 without touching L3.
#[derive(Debug, Clone)]
pub struct EthView<'a> {
    eth: Ethernet2Slice<'a>,
    tags: [Option<VlanTag>; MAX_VLAN_TAGS],
    ethertype: u16,
    header_len: usize,
    frame: &'a [u8],
}

impl<'a> EthView<'a> {
    /// Parses the Ethernet header and its VLAN tags. A third tag is left as
    /// the EtherType (the payload then starts with its TCI).
    pub fn new_checked(frame: &'a [u8]) -> Result<EthView<'a>, ParseError> {
        let eth = Ethernet2Slice::from_slice_without_fcs(frame)
            .map_err(|_| ParseError::EthernetTruncated)?;
        let mut tags = [None; MAX_VLAN_TAGS];
        let mut et = eth.ether_type().0;
        let mut rest = eth.payload_slice();
        for slot in tags.iter_mut() {
            if !ethertype::is_vlan(et) {
                break;
            }
            let v = SingleVlanSlice::from_slice(rest).map_err(|_| ParseError::VlanTruncated)?;
            *slot = Some(VlanTag {
                tpid: et,
                pcp: v.priority_code_point().value(),
                dei: v.drop_eligible_indicator(),
                vid: v.vlan_identifier().value(),
            });
            et = v.ether_type().0;
            rest = v.payload_slice();
        }
        Ok(EthView {
            eth,
            tags,
            ethertype: et,
            header_len: frame.len() - rest.len(),
            frame,
        })
    }

    /// Destination MAC.
    pub fn dst(&self) -> MacAddr {
        MacAddr(self.eth.destination())
    }

    /// Source MAC.
    pub fn src(&self) -> MacAddr {
        MacAddr(self.eth.source())
    }

    /// Outer and inner tag.
    pub fn tags(&self) -> [Option<VlanTag>; MAX_VLAN_TAGS] {
        self.tags
    }

    /// VID of the outer tag.
    pub fn vlan(&self) -> Option<u16> {
        self.tags[0].map(|t| t.vid)
    }

    /// EtherType after the tags.
    pub fn ethertype(&self) -> u16 {
        self.ethertype
    }

    /// Ethernet header plus tags: the L3 offset.
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// Bytes after the tags.
    pub fn payload(&self) -> &'a [u8] {
        self.frame.get(self.header_len..).unwrap_or_default()
    }
}

/// Length of an Ethernet header with `tags` VLAN tags.
pub const fn eth_header_len(tags: usize) -> usize {
    ETH_HLEN + tags * VLAN_TAG_LEN
}

/// An Ethernet/IPv4 ARP packet from the bytes after the EtherType; `None`
/// when truncated or of another hardware/protocol type. Trailing padding is
/// ignored.
pub fn arp_eth_ipv4(l3: &[u8]) -> Option<ArpEthIpv4Packet> {
    let a = ArpPacketSlice::from_slice(l3).ok()?;
    if a.hw_addr_type() != ArpHardwareId::ETHERNET || a.proto_addr_type() != EtherType::IPV4 {
        return None;
    }
    Some(ArpEthIpv4Packet {
        operation: a.operation(),
        sender_mac: a.sender_hw_addr().try_into().ok()?,
        sender_ipv4: a.sender_protocol_addr().try_into().ok()?,
        target_mac: a.target_hw_addr().try_into().ok()?,
        target_ipv4: a.target_protocol_addr().try_into().ok()?,
    })
}

/// Offset of the quoted packet in an ICMP or ICMPv6 error message.
pub const ICMP_ERROR_QUOTE_OFFSET: usize = 8;

/// ICMPv4 error types that quote the offending packet: destination
/// unreachable (3), source quench (4), redirect (5), time exceeded (11),
/// parameter problem (12).
pub fn is_icmpv4_error(ty: u8) -> bool {
    matches!(ty, 3 | 4 | 5 | 11 | 12)
}

/// ICMPv6 error types (RFC 4443: types below 128).
pub fn is_icmpv6_error(ty: u8) -> bool {
    ty < 128
}

/// The IP packet quoted in an ICMP(v6) error message (`icmp` starts at the
/// ICMP header), parsed leniently: the quote is usually cut short, so the
/// inner IP length fields do not match and the inner L4 may be partial (for
/// TCP/UDP the ports are in its first 8 bytes, which RFC 792 guarantees).
/// `None` if the message is not an error or the quoted IP header is
/// unreadable.
pub fn icmp_error_quote(icmp: &[u8], v6: bool) -> Option<LaxSlicedPacket<'_>> {
    let ty = *icmp.first()?;
    let is_err = if v6 {
        is_icmpv6_error(ty)
    } else {
        is_icmpv4_error(ty)
    };
    if !is_err {
        return None;
    }
    LaxSlicedPacket::from_ip(icmp.get(ICMP_ERROR_QUOTE_OFFSET..)?).ok()
}

/// Ports of the transport header quoted in an ICMP error (first 4 bytes of
/// the quoted L4 header), found even when the quote is too short for
/// etherparse's TCP slice (8 bytes of TCP are all RFC 792 promises).
/// `None` when the quoted packet is a later IPv4 fragment (no L4 header);
/// the caller checks the quoted protocol is TCP or UDP.
pub fn quoted_ports(quote: &LaxSlicedPacket<'_>) -> Option<(u16, u16)> {
    let net = quote.net.as_ref()?;
    if let LaxNetSlice::Ipv4(ip) = net {
        if ip.header().fragments_offset().value() != 0 {
            return None;
        }
    }
    let p = net.ip_payload_ref()?;
    match p.payload {
        [a, b, c, d, ..] => Some((u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d]))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::tests::{arp_request, mutated_frame, tcp4, valid_frame};
    use crate::flow::FlowKey;
    use etherparse::{IcmpEchoHeader, Icmpv4Type, PacketBuilder, VlanId};
    use proptest::prelude::*;

    #[test]
    fn eth_view_qinq_fixture() {
        // dst, src, 88a8 tag (pcp 5, vid 100), 8100 tag (dei, vid 200), IPv4
        let f = [
            2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x88, 0xa8, 0xa0, 100, 0x81, 0x00, 0x10, 200, 0x08,
            0x00, 0x45,
        ];
        let e = EthView::new_checked(&f).unwrap();
        assert_eq!(e.dst(), MacAddr([2, 0, 0, 0, 0, 2]));
        assert_eq!(e.src(), MacAddr([2, 0, 0, 0, 0, 1]));
        assert_eq!(
            e.tags(),
            [
                Some(VlanTag {
                    tpid: 0x88a8,
                    pcp: 5,
                    dei: false,
                    vid: 100
                }),
                Some(VlanTag {
                    tpid: 0x8100,
                    pcp: 0,
                    dei: true,
                    vid: 200
                })
            ]
        );
        assert_eq!(e.vlan(), Some(100));
        assert_eq!(e.ethertype(), 0x0800);
        assert_eq!(e.header_len(), eth_header_len(2));
        assert_eq!(e.payload(), &[0x45]);
        assert_eq!(
            EthView::new_checked(&f[..17]).unwrap_err(),
            ParseError::VlanTruncated
        );
        assert_eq!(
            EthView::new_checked(&f[..13]).unwrap_err(),
            ParseError::EthernetTruncated
        );
    }

    #[test]
    fn arp_fixture() {
        let f = arp_request();
        let a = arp_eth_ipv4(&f[14..]).unwrap();
        assert_eq!(a.operation, ArpOperation::REQUEST);
        assert_eq!(a.sender_ipv4, [10, 0, 0, 2]);
        assert_eq!(a.target_ipv4, [10, 0, 0, 1]);
        assert_eq!(a.target_mac, [0; 6]);
        assert!(arp_eth_ipv4(&f[14..30]).is_none());
        let mut g = f.clone();
        g[17] = 6; // hardware type 6 (IEEE 802)
        assert!(arp_eth_ipv4(&g[14..]).is_none());
    }

    #[test]
    fn icmp_error_quote_fixture() {
        // Port unreachable quoting the first 28 bytes of a UDP datagram.
        let mut inner = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 5], [198, 51, 100, 7], 64)
            .udp(33000, 53)
            .write(&mut inner, &[0; 100])
            .unwrap();
        let mut outer = Vec::new();
        PacketBuilder::ipv4([198, 51, 100, 7], [10, 0, 0, 5], 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut outer, &inner[..28])
            .unwrap();
        let icmp = &outer[20..];
        let q = icmp_error_quote(icmp, false).unwrap();
        assert_eq!(quoted_ports(&q), Some((33000, 53)));
        match &q.net {
            Some(LaxNetSlice::Ipv4(ip)) => {
                assert_eq!(ip.header().source(), [10, 0, 0, 5]);
                assert_eq!(ip.header().total_len(), 128); // original, not the quote
            }
            other => panic!("{other:?}"),
        }
        // An echo is not an error.
        let mut echo = Vec::new();
        PacketBuilder::ipv4([1, 1, 1, 1], [2, 2, 2, 2], 1)
            .icmpv4(Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 1, seq: 1 }))
            .write(&mut echo, &[])
            .unwrap();
        assert!(icmp_error_quote(&echo[20..], false).is_none());
    }

    #[test]
    fn views_at_flow_key_offsets() {
        let f = tcp4(12);
        let k = FlowKey::parse(&f).unwrap();
        let ip = Ipv4Slice::from_slice(k.l3_bytes(&f)).unwrap();
        assert_eq!(ip.header().ttl(), 64);
        let t = TcpSlice::from_slice(k.l4_bytes(&f)).unwrap();
        assert_eq!(t.sequence_number(), 1000);
        assert_eq!(t.payload().len(), 12);
    }

    fn all_views(data: &[u8]) {
        if let Ok(e) = EthView::new_checked(data) {
            let _ = (e.dst(), e.src(), e.tags(), e.payload());
        }
        let _ = arp_eth_ipv4(data);
        for v6 in [false, true] {
            if let Some(q) = icmp_error_quote(data, v6) {
                let _ = quoted_ports(&q);
            }
        }
        let _ = Ethernet2Slice::from_slice_without_fcs(data);
        let _ = SingleVlanSlice::from_slice(data);
        let _ = Ipv4Slice::from_slice(data);
        let _ = Ipv6Slice::from_slice(data);
        let _ = TcpSlice::from_slice(data);
        let _ = UdpSlice::from_slice(data);
        let _ = Icmpv4Slice::from_slice(data).map(|s| s.icmp_type());
        let _ = Icmpv6Slice::from_slice(data).map(|s| s.icmp_type());
        let _ = SlicedPacket::from_ethernet(data);
        let _ = LaxSlicedPacket::from_ethernet(data);
        let _ = LaxSlicedPacket::from_ip(data);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn views_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            all_views(&data);
            if data.len() > 14 { all_views(&data[14..]); }
        }

        #[test]
        fn views_never_panic_on_mutations(f in mutated_frame()) {
            all_views(&f);
            if let Ok(k) = FlowKey::parse(&f) {
                all_views(k.l3_bytes(&f));
                all_views(k.l4_bytes(&f));
            }
        }

        /// Round trip: build with etherparse, read back with EthView and
        /// agree with FlowKey on every frame.
        #[test]
        fn eth_view_round_trip(v1 in 0u16..4096, v2 in 0u16..4096, double in any::<bool>()) {
            let b = PacketBuilder::ethernet2([1; 6], [2; 6]);
            let id = |v| VlanId::try_new(v).unwrap();
            let mut f = Vec::new();
            if double {
                b.double_vlan(id(v1), id(v2)).ipv4([1; 4], [2; 4], 1).udp(1, 2).write(&mut f, &[]).unwrap();
            } else {
                b.single_vlan(id(v1)).ipv4([1; 4], [2; 4], 1).udp(1, 2).write(&mut f, &[]).unwrap();
            }
            let e = EthView::new_checked(&f).unwrap();
            prop_assert_eq!(e.vlan(), Some(v1));
            prop_assert_eq!(e.tags()[1].map(|t| t.vid), double.then_some(v2));
            prop_assert_eq!(e.dst(), MacAddr([2; 6]));
            prop_assert_eq!(e.ethertype(), 0x0800);
        }

        #[test]
        fn eth_view_agrees_with_flow_key(f in valid_frame()) {
            let e = EthView::new_checked(&f).unwrap();
            let k = FlowKey::parse(&f).unwrap();
            prop_assert_eq!(e.header_len(), usize::from(k.l3_offset));
            prop_assert_eq!(e.ethertype(), k.ethertype);
            prop_assert_eq!(e.vlan(), k.vlan);
        }
    }
}
