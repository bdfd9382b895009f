//! Connection keys: zone + 5-tuple, in the orientation of one packet.
//!
//! A connection has two keys. The *original* key is the orientation of the
//! packet that created the entry (the canonical orientation shown by
//! `entries()`); the *reply* key is what a packet travelling the other way
//! carries. Without address translation the reply key is
//! [`ConnKey::reverse`] of the original; both are indexed, so a lookup with
//! either finds the entry and tells the direction.
//!
//! ICMP and ICMPv6 query messages (echo, and for ICMPv4 also timestamp,
//! information and address mask) have no ports: `src_port` holds the query
//! identifier and `dst_port` the ICMP type of the packet. Reversing a key
//! maps a request type to its reply type (echo request 8 <-> echo reply 0,
//! ICMPv6 128 <-> 129, ...), so an echo reply's key is the reply key of the
//! request's entry, and a request in the "reply" direction is a different
//! connection (as in Linux conntrack).

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use packet::flow::{proto, Frag};
use packet::{FlowKey, L3, L4};
use serde::{Deserialize, Serialize};

/// Direction of a packet relative to the connection's original key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dir {
    /// Same orientation as the packet that created the entry.
    Original,
    /// The other way.
    Reply,
}

impl Dir {
    /// The opposite direction.
    pub fn flip(self) -> Dir {
        match self {
            Dir::Original => Dir::Reply,
            Dir::Reply => Dir::Original,
        }
    }

    /// 0 for original, 1 for reply (index into per-direction arrays).
    pub fn index(self) -> usize {
        match self {
            Dir::Original => 0,
            Dir::Reply => 1,
        }
    }

    /// `"original"` / `"reply"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dir::Original => "original",
            Dir::Reply => "reply",
        }
    }
}

/// Zone + 5-tuple of one packet or one direction of a connection.
///
/// For TCP and UDP the ports are the L4 ports; for ICMP/ICMPv6 queries
/// `src_port` is the identifier and `dst_port` the ICMP type; for other IP
/// protocols both are 0. `src` and `dst` are of the same family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnKey {
    /// Zone (tenant or conntrack zone id): keys in different zones never
    /// match, so overlapping tenant address spaces stay apart.
    pub zone: u32,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number (IPv6: the upper-layer header).
    pub proto: u8,
    /// Source port; ICMP query identifier.
    pub src_port: u16,
    /// Destination port; ICMP type.
    pub dst_port: u16,
}

impl Hash for ConnKey {
    /// One `write` of the packed key: a keyed hasher (SipHash) pays per
    /// call, and the derived impl would make eight.
    fn hash<H: Hasher>(&self, h: &mut H) {
        let mut b = [0u8; 42];
        b[0..4].copy_from_slice(&self.zone.to_ne_bytes());
        b[4] = self.proto;
        b[6..8].copy_from_slice(&self.src_port.to_ne_bytes());
        b[8..10].copy_from_slice(&self.dst_port.to_ne_bytes());
        for (at, a) in [(10, &self.src), (26, &self.dst)] {
            match a {
                IpAddr::V4(x) => b[at..at + 4].copy_from_slice(&x.octets()),
                IpAddr::V6(x) => {
                    b[5] = 1;
                    b[at..at + 16].copy_from_slice(&x.octets());
                }
            }
        }
        h.write(&b);
    }
}

/// ICMPv4 query request types and their reply types.
const ICMP4_QUERIES: [(u8, u8); 4] = [(8, 0), (13, 14), (15, 16), (17, 18)];
/// ICMPv6 echo request and reply.
const ICMP6_QUERIES: [(u8, u8); 1] = [(128, 129)];

fn queries(v6: bool) -> &'static [(u8, u8)] {
    if v6 {
        &ICMP6_QUERIES
    } else {
        &ICMP4_QUERIES
    }
}

/// The matching reply type of a query request type, or the request type of
/// a reply; `None` for types that are not queries.
pub fn icmp_query_counterpart(v6: bool, ty: u8) -> Option<u8> {
    queries(v6).iter().find_map(|&(req, rep)| {
        if ty == req {
            Some(rep)
        } else if ty == rep {
            Some(req)
        } else {
            None
        }
    })
}

/// True for query request types (echo request, ...).
pub fn icmp_is_request(v6: bool, ty: u8) -> bool {
    queries(v6).iter().any(|&(req, _)| req == ty)
}

/// Why a parsed frame has no connection key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum NoKey {
    /// Not IPv4/IPv6 (ARP, other EtherTypes).
    NotIp,
    /// An inner layer is malformed ([`FlowKey::malformed`]).
    Malformed,
    /// A non-first IP fragment: no L4 header.
    Fragment,
    /// ICMP(v6) error: handled as possibly related, not keyed.
    IcmpError,
    /// ICMP(v6) message that is neither a query nor an error (neighbour
    /// discovery, MLD, router advertisements, ...).
    IcmpOther,
}

impl ConnKey {
    /// The key of a parsed frame in the packet's own orientation, or `None`
    /// when the frame carries no trackable connection: not IP, malformed,
    /// a later fragment, an ICMP error (see [`crate::Track::Related`]) or an
    /// ICMP message that is not a query.
    pub fn from_flow(zone: u32, key: &FlowKey) -> Option<ConnKey> {
        Self::classify(zone, key).ok()
    }

    pub(crate) fn classify(zone: u32, key: &FlowKey) -> Result<ConnKey, NoKey> {
        if key.malformed.is_some() {
            return Err(NoKey::Malformed);
        }
        let (ip, v6) = match &key.l3 {
            L3::Ipv4(ip) => (ip, false),
            L3::Ipv6(ip) => (ip, true),
            _ => return Err(NoKey::NotIp),
        };
        let (src_port, dst_port) = match key.l4 {
            L4::Tcp {
                src_port, dst_port, ..
            }
            | L4::Udp { src_port, dst_port } => (src_port, dst_port),
            L4::Icmpv4 { ty, ident, .. } | L4::Icmpv6 { ty, ident, .. } => {
                if icmp_query_counterpart(v6, ty).is_some() {
                    (ident, u16::from(ty))
                } else if is_icmp_error(v6, ty) {
                    return Err(NoKey::IcmpError);
                } else {
                    return Err(NoKey::IcmpOther);
                }
            }
            L4::None => {
                if ip.frag == Frag::Later {
                    return Err(NoKey::Fragment);
                }
                // FlowKey parses every L4 it knows or flags it malformed, so
                // TCP/UDP/ICMP here would be a caller mixing frames; refuse.
                let known = match ip.proto {
                    proto::TCP | proto::UDP => true,
                    proto::ICMP => !v6,
                    proto::ICMPV6 => v6,
                    _ => false,
                };
                if known {
                    return Err(NoKey::Malformed);
                }
                (0, 0)
            }
        };
        Ok(ConnKey {
            zone,
            src: ip.src,
            dst: ip.dst,
            proto: ip.proto,
            src_port,
            dst_port,
        })
    }

    /// True for an IPv6 key.
    pub fn is_v6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// True if this is an ICMP (on IPv4) or ICMPv6 (on IPv6) query key.
    pub fn is_icmp(&self) -> bool {
        (self.proto == proto::ICMP && !self.is_v6())
            || (self.proto == proto::ICMPV6 && self.is_v6())
    }

    /// The key a packet travelling the other way carries: addresses and
    /// ports swapped; for ICMP queries the identifier kept and the type
    /// mapped to its counterpart.
    pub fn reverse(&self) -> ConnKey {
        if self.is_icmp() {
            let ty = u8::try_from(self.dst_port).unwrap_or(0);
            let back = icmp_query_counterpart(self.is_v6(), ty).unwrap_or(ty);
            return ConnKey {
                zone: self.zone,
                src: self.dst,
                dst: self.src,
                proto: self.proto,
                src_port: self.src_port,
                dst_port: u16::from(back),
            };
        }
        ConnKey {
            zone: self.zone,
            src: self.dst,
            dst: self.src,
            proto: self.proto,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }
}

/// ICMPv4 error types (RFC 792) or ICMPv6 error types (RFC 4443: < 128).
pub(crate) fn is_icmp_error(v6: bool, ty: u8) -> bool {
    if v6 {
        packet::view::is_icmpv6_error(ty)
    } else {
        packet::view::is_icmpv4_error(ty)
    }
}

/// Short protocol name for display.
pub fn proto_name(proto: u8, v6: bool) -> Option<&'static str> {
    match (proto, v6) {
        (proto::TCP, _) => Some("tcp"),
        (proto::UDP, _) => Some("udp"),
        (proto::ICMP, false) => Some("icmp"),
        (proto::ICMPV6, true) => Some("icmpv6"),
        _ => None,
    }
}

impl fmt::Display for ConnKey {
    /// `zone 7 tcp 10.0.0.1:40000 -> 10.0.0.2:80`,
    /// `zone 7 icmp 10.0.0.1 -> 10.0.0.2 id 9 type 8`,
    /// `zone 7 proto 47 [fd00::1] -> [fd00::2]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v6 = self.is_v6();
        write!(f, "zone {} ", self.zone)?;
        match proto_name(self.proto, v6) {
            Some(n) => write!(f, "{n} ")?,
            None => write!(f, "proto {} ", self.proto)?,
        }
        let addr = |a: &IpAddr| match a {
            IpAddr::V6(x) => format!("[{x}]"),
            IpAddr::V4(x) => x.to_string(),
        };
        if self.is_icmp() {
            write!(
                f,
                "{} -> {} id {} type {}",
                self.src, self.dst, self.src_port, self.dst_port
            )
        } else if matches!(self.proto, proto::TCP | proto::UDP) {
            write!(
                f,
                "{}:{} -> {}:{}",
                addr(&self.src),
                self.src_port,
                addr(&self.dst),
                self.dst_port
            )
        } else {
            write!(f, "{} -> {}", addr(&self.src), addr(&self.dst))
        }
    }
}
