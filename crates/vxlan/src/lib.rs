//! VXLAN (RFC 7348) for vswitch, as a sans-IO library.
//!
//! What this crate is:
//!
//! * [`encap`]: prepends outer Ethernet + IPv4 + UDP + VXLAN headers to an
//!   inner frame in place, in the headroom of a [`packet::PacketBuf`]
//!   (zero copy of the inner frame). The UDP source port is a hash of the
//!   inner flow in 49152-65535 so the underlay can spread flows (ECMP,
//!   RSS). Three paths, chosen by the caller from the egress' abilities:
//!   [`Encapsulator::encap`] for one non-GSO frame,
//!   [`Encapsulator::encap_tunnel_gso`] which keeps a TSO/USO super-frame
//!   whole for an egress that can do UDP-tunnel segmentation, and
//!   [`Encapsulator::encap_segments`] which segments in software first
//!   ([`packet::gso::segment`]) and encapsulates every segment with
//!   complete inner checksums;
//! * [`decap`](mod@decap): validates and strips the outer headers of a received VXLAN
//!   packet ([`decap()`], [`decap::parse`]); every rejection is a small
//!   `Copy` [`DecapError`] for per-reason counters;
//! * [`mtu`]: the underlay MTU decision for an inner frame
//!   ([`mtu::check_mtu`]) and builders for the ICMP replies that tell the
//!   sender: IPv4 "fragmentation needed" (RFC 1191) and ICMPv6 "packet too
//!   big" (RFC 4443);
//! * [`vtep`]: the VTEP table: peers by host name and underlay address, and
//!   per-VNI flood lists (head-end replication).
//!
//! What it is not: it owns no sockets, threads or clocks, and it makes no
//! forwarding decisions. MAC learning (inner source MAC -> outer source
//! VTEP) belongs to the switch's FDB. IPv6 underlay addresses are accepted by
//! the types (`IpAddr`) but refused by the encapsulator
//! ([`EncapError::Ipv6Underlay`]) and not decapsulated yet. Inner IPv4
//! fragmentation (for non-DF packets that do not fit) is not done. Every
//! function here takes untrusted bytes and never panics on them.

#![forbid(unsafe_code)]

pub mod decap;
pub mod encap;
pub mod mtu;
pub mod vtep;

pub use decap::{decap, Decap, DecapError};
pub use encap::{
    flow_hash, src_port_from_hash, EncapConfig, EncapError, EncapInfo, Encapsulator, TunnelGso,
    Underlay,
};
pub use mtu::{check_mtu, frag_needed, packet_too_big, IcmpAction, IcmpError, MtuDecision};
pub use vtep::{VtepError, VtepTable};

/// IANA-assigned VXLAN UDP port (RFC 7348 section 5).
pub const DEFAULT_PORT: u16 = 4789;
/// Outer IPv4 TTL used unless configured otherwise.
pub const DEFAULT_TTL: u8 = 64;
/// Length of the VXLAN header.
pub const VXLAN_HLEN: usize = 8;
/// Length of the UDP header.
pub const UDP_HLEN: usize = 8;
/// Length of the outer (untagged) Ethernet header.
pub const ETH_HLEN: usize = 14;
/// Length of the outer IPv4 header (no options).
pub const IPV4_HLEN: usize = 20;
/// Length of the outer IPv6 header.
pub const IPV6_HLEN: usize = 40;
/// Outer headers over an IPv4 underlay: Ethernet + IPv4 + UDP + VXLAN.
pub const OUTER_V4_LEN: usize = ETH_HLEN + IPV4_HLEN + UDP_HLEN + VXLAN_HLEN;
/// Outer headers over an IPv6 underlay (for MTU arithmetic; encapsulation
/// over IPv6 is not implemented yet).
pub const OUTER_V6_LEN: usize = ETH_HLEN + IPV6_HLEN + UDP_HLEN + VXLAN_HLEN;
/// Lowest UDP source port used for flow entropy (RFC 7348 section 5).
pub const SRC_PORT_MIN: u16 = 49152;
/// Highest UDP source port used for flow entropy.
pub const SRC_PORT_MAX: u16 = 65535;
/// The VXLAN "I" flag: the VNI is valid. Required on receive.
pub const FLAG_I: u8 = 0x08;

/// A 24-bit VXLAN network identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vni(u32);

impl Vni {
    /// Largest VNI (2^24 - 1).
    pub const MAX: u32 = 0x00ff_ffff;

    /// `None` when `v` does not fit in 24 bits.
    pub const fn new(v: u32) -> Option<Vni> {
        if v <= Self::MAX {
            Some(Vni(v))
        } else {
            None
        }
    }

    /// The number.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The three bytes as they appear in the header (network order).
    pub const fn to_bytes(self) -> [u8; 3] {
        let b = self.0.to_be_bytes();
        [b[1], b[2], b[3]]
    }

    /// From the three header bytes.
    pub const fn from_bytes(b: [u8; 3]) -> Vni {
        Vni(u32::from_be_bytes([0, b[0], b[1], b[2]]))
    }
}

impl std::fmt::Display for Vni {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The 8-byte VXLAN header for `vni`: I flag set, reserved bits zero
/// (RFC 7348 section 5). For an underlay sent through a UDP socket, where
/// the kernel adds the outer IP and UDP headers.
pub const fn header(vni: Vni) -> [u8; VXLAN_HLEN] {
    let v = vni.to_bytes();
    [FLAG_I, 0, 0, 0, v[0], v[1], v[2], 0]
}

/// Underlay address family, for MTU arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4 underlay: 50 bytes of outer headers.
    V4,
    /// IPv6 underlay: 70 bytes of outer headers.
    V6,
}

impl Family {
    /// Bytes the outer headers add in front of the inner Ethernet frame.
    pub const fn outer_len(self) -> usize {
        match self {
            Family::V4 => OUTER_V4_LEN,
            Family::V6 => OUTER_V6_LEN,
        }
    }

    /// Bytes the encapsulation adds to the underlay IP packet beyond the
    /// inner Ethernet frame (outer L3 + UDP + VXLAN; the outer Ethernet
    /// header does not count against the IP MTU).
    pub const fn ip_overhead(self) -> usize {
        self.outer_len() - ETH_HLEN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vni_bounds_and_bytes() {
        assert_eq!(Vni::new(0x00ff_ffff).map(Vni::get), Some(0x00ff_ffff));
        assert_eq!(Vni::new(0x0100_0000), None);
        let v = Vni::new(0x12_3456).unwrap();
        assert_eq!(v.to_bytes(), [0x12, 0x34, 0x56]);
        assert_eq!(Vni::from_bytes([0x12, 0x34, 0x56]), v);
        assert_eq!(OUTER_V4_LEN, 50);
        assert_eq!(OUTER_V6_LEN, 70);
        assert_eq!(Family::V4.ip_overhead(), 36);
        assert_eq!(header(v), [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        let mut pkt = header(v).to_vec();
        pkt.extend_from_slice(&[0u8; 14]);
        assert_eq!(decap::parse_header(&pkt), Ok(v));
    }
}

#[cfg(test)]
mod wire_tests;
