//! The few fields conntrack reads beyond the flow key: IP length, TCP
//! sequence numbers/window/window-scale option, and the header quoted in an
//! ICMP error. Every read is bounds-checked; `None` means the frame does not
//! hold what its flow key says.

use std::net::IpAddr;

use packet::flow::proto;
use packet::view::{icmp_error_quote, LaxNetSlice};
use packet::{FlowKey, L3};

use crate::key::{icmp_query_counterpart, is_icmp_error, ConnKey};
use crate::state::Seg;

fn be16(b: &[u8], i: usize) -> Option<u16> {
    match b.get(i..i + 2)? {
        &[x, y] => Some(u16::from_be_bytes([x, y])),
        _ => None,
    }
}

fn be32(b: &[u8], i: usize) -> Option<u32> {
    match b.get(i..i + 4)? {
        &[a, b, c, d] => Some(u32::from_be_bytes([a, b, c, d])),
        _ => None,
    }
}

/// Length of the IP packet (IPv4 total length, IPv6 40 + payload length).
pub(crate) fn ip_len(key: &FlowKey, frame: &[u8]) -> Option<u32> {
    let l3 = key.l3_bytes(frame);
    match key.l3 {
        L3::Ipv4(_) => be16(l3, 2).map(u32::from),
        L3::Ipv6(_) => be16(l3, 4).map(|p| 40 + u32::from(p)),
        _ => None,
    }
}

/// Largest window scale shift (RFC 7323 section 2.3).
const MAX_WSCALE: u8 = 14;

/// The TCP fields of a frame whose flow key says TCP.
pub(crate) fn tcp_seg(key: &FlowKey, frame: &[u8], ip_len: u32) -> Option<Seg> {
    let t = key.l4_bytes(frame);
    let doff = usize::from(*t.get(12)? >> 4) * 4;
    if doff < 20 || doff > t.len() {
        return None;
    }
    let flags = *t.get(13)?;
    let ip_end = usize::from(key.l3_offset) + usize::try_from(ip_len).ok()?;
    let len = ip_end.checked_sub(usize::from(key.l4_offset) + doff)?;
    let wscale = if flags & crate::state::flags::SYN != 0 {
        window_scale(t.get(20..doff)?)
    } else {
        None
    };
    Some(Seg {
        flags,
        seq: be32(t, 4)?,
        ack: be32(t, 8)?,
        win: be16(t, 14)?,
        wscale,
        len: u32::try_from(len).ok()?,
    })
}

/// The window scale option (kind 3, length 3) in TCP options, if any.
fn window_scale(mut opts: &[u8]) -> Option<u8> {
    // At most 40 bytes of options, each step consumes at least one byte.
    while let Some((&kind, rest)) = opts.split_first() {
        match kind {
            0 => return None,
            1 => opts = rest,
            _ => {
                let len = usize::from(*rest.first()?);
                if len < 2 {
                    return None;
                }
                if kind == 3 && len == 3 {
                    return rest.get(1).map(|s| (*s).min(MAX_WSCALE));
                }
                opts = opts.get(len..)?;
            }
        }
    }
    None
}

/// Why an ICMP error's quote gives no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BadQuote;

/// The key of the packet quoted in an ICMP(v6) error (`icmp` starts at the
/// ICMP header), in the quoted packet's own orientation.
pub(crate) fn quoted_key(zone: u32, icmp: &[u8], v6: bool) -> Result<ConnKey, BadQuote> {
    let q = icmp_error_quote(icmp, v6).ok_or(BadQuote)?;
    let net = q.net.as_ref().ok_or(BadQuote)?;
    let (src, dst) = match net {
        LaxNetSlice::Ipv4(ip) if !v6 => {
            let h = ip.header();
            if h.fragments_offset().value() != 0 {
                return Err(BadQuote);
            }
            (
                IpAddr::V4(h.source_addr()),
                IpAddr::V4(h.destination_addr()),
            )
        }
        LaxNetSlice::Ipv6(ip) if v6 => {
            let later = ip.extensions().clone().into_iter().any(|e| {
                matches!(e, etherparse::Ipv6ExtensionSlice::Fragment(f)
                    if f.fragment_offset().value() != 0)
            });
            if later {
                return Err(BadQuote);
            }
            let h = ip.header();
            (
                IpAddr::V6(h.source_addr()),
                IpAddr::V6(h.destination_addr()),
            )
        }
        _ => return Err(BadQuote),
    };
    let p = net.ip_payload_ref().ok_or(BadQuote)?;
    let l4 = p.payload;
    let ipproto = p.ip_number.0;
    let (src_port, dst_port) = match ipproto {
        proto::TCP | proto::UDP => (be16(l4, 0).ok_or(BadQuote)?, be16(l4, 2).ok_or(BadQuote)?),
        proto::ICMP | proto::ICMPV6 if (ipproto == proto::ICMPV6) == v6 => {
            let ty = *l4.first().ok_or(BadQuote)?;
            // Never an error about an error (RFC 1122 3.2.2, RFC 4443 2.4);
            // only queries have entries.
            if is_icmp_error(v6, ty) || icmp_query_counterpart(v6, ty).is_none() {
                return Err(BadQuote);
            }
            (be16(l4, 4).ok_or(BadQuote)?, u16::from(ty))
        }
        _ => (0, 0),
    };
    Ok(ConnKey {
        zone,
        src,
        dst,
        proto: ipproto,
        src_port,
        dst_port,
    })
}
