//! Header rewriting with incremental checksum updates (RFC 1624), and the
//! translation of ICMP errors (RFC 5508). Every function checks all the
//! offsets it will write before writing any, so a frame that does not hold
//! what its flow key says is left untouched; nothing here changes a
//! frame's length or reads past the headers (a 64 KB TSO super-frame costs
//! what a small packet does).

use std::net::Ipv4Addr;

use packet::checksum::{self, udp_nonzero, update16, update32, update_partial_bytes};
use packet::flow::proto;

/// Addresses and ports a packet is rewritten to. For ICMP queries `sport`
/// is the identifier and `dport` (the type) is never written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tuple {
    pub(crate) src: Ipv4Addr,
    pub(crate) dst: Ipv4Addr,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
}

/// The L4 header NAT touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum L4Kind {
    Tcp,
    Udp,
    /// ICMP echo/timestamp/info/mask: identifier at 4.
    IcmpQuery,
    /// Addresses only.
    None,
}

impl L4Kind {
    /// Offset of the checksum in the L4 header and bytes needed to reach
    /// the fields NAT reads or writes.
    fn layout(self) -> Option<(usize, usize)> {
        match self {
            L4Kind::Tcp => Some((16, 18)),
            L4Kind::Udp => Some((6, 8)),
            L4Kind::IcmpQuery => Some((2, 6)),
            L4Kind::None => None,
        }
    }
}

pub(crate) fn rd16(b: &[u8], i: usize) -> Option<u16> {
    match b.get(i..i.checked_add(2)?)? {
        &[x, y] => Some(u16::from_be_bytes([x, y])),
        _ => None,
    }
}

pub(crate) fn rd_addr(b: &[u8], i: usize) -> Option<Ipv4Addr> {
    match b.get(i..i.checked_add(4)?)? {
        &[a, b, c, d] => Some(Ipv4Addr::new(a, b, c, d)),
        _ => None,
    }
}

/// Writes where the caller already checked the bounds; out of range is a
/// no-op rather than a panic.
fn wr16(b: &mut [u8], i: usize, v: u16) {
    if let Some(s) = b.get_mut(i..i + 2) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

fn wr_addr(b: &mut [u8], i: usize, a: Ipv4Addr) {
    if let Some(s) = b.get_mut(i..i + 4) {
        s.copy_from_slice(&a.octets());
    }
}

fn fits(b: &[u8], at: usize, len: usize) -> bool {
    at.checked_add(len).is_some_and(|end| end <= b.len())
}

/// A 16-bit word of the L4 header: offset, old value, new value.
type Word = (usize, u16, u16);

/// The port words (or the identifier) of an L4 header going from `old`
/// (source, destination port) to `new`; `n` of the array are used.
fn port_words(kind: L4Kind, old: (u16, u16), new: (u16, u16)) -> ([Word; 2], usize) {
    match kind {
        L4Kind::Tcp | L4Kind::Udp => ([(0, old.0, new.0), (2, old.1, new.1)], 2),
        L4Kind::IcmpQuery => ([(4, old.0, new.0), (0, 0, 0)], 1),
        L4Kind::None => ([(0, 0, 0); 2], 0),
    }
}

fn changed_addrs(
    a: [(Ipv4Addr, Ipv4Addr); 2],
) -> impl Iterator<Item = (Ipv4Addr, Ipv4Addr)> + Clone {
    a.into_iter().filter(|(o, n)| o != n)
}

/// An IPv4 header checksum after address changes.
fn ip_csum(c: u16, addrs: [(Ipv4Addr, Ipv4Addr); 2]) -> u16 {
    changed_addrs(addrs).fold(c, |c, (o, n)| update32(c, u32::from(o), u32::from(n)))
}

/// An L4 checksum after address (pseudo header) and port changes; only
/// changed values count, so an unchanged field keeps its exact value.
/// `partial`: the field holds the folded pseudo-header sum for offload to
/// complete, so only addresses matter there (ports are summed by the
/// offload). A UDP checksum of 0 means "none" and stays 0.
fn l4_csum(
    c: u16,
    kind: L4Kind,
    addrs: [(Ipv4Addr, Ipv4Addr); 2],
    words: &[Word],
    partial: bool,
) -> u16 {
    let ports = || words.iter().filter(|w| w.1 != w.2);
    match kind {
        L4Kind::Tcp | L4Kind::Udp if partial => changed_addrs(addrs).fold(c, |c, (o, n)| {
            update_partial_bytes(c, &o.octets(), &n.octets())
        }),
        L4Kind::Udp if c == 0 => 0,
        L4Kind::Tcp | L4Kind::Udp => {
            let c = ports().fold(ip_csum(c, addrs), |c, w| update16(c, w.1, w.2));
            if kind == L4Kind::Udp {
                udp_nonzero(c)
            } else {
                c
            }
        }
        // ICMPv4 has no pseudo header; a partial ICMP checksum (field 0,
        // the offload sums the message) needs nothing.
        L4Kind::IcmpQuery if partial => c,
        L4Kind::IcmpQuery => ports().fold(c, |c, w| update16(c, w.1, w.2)),
        L4Kind::None => c,
    }
}

/// Rewrites the IPv4 packet at `l3` (its L4 header at `l4`) to `to`,
/// changing only fields that differ. `Some(true)` if something changed,
/// `None` if the frame is too short for the fields (nothing written).
pub(crate) fn rewrite(
    frame: &mut [u8],
    l3: usize,
    l4: usize,
    kind: L4Kind,
    to: &Tuple,
    partial: bool,
) -> Option<bool> {
    if !fits(frame, l3, 20) {
        return None;
    }
    let addrs = [
        (rd_addr(frame, l3 + 12)?, to.src),
        (rd_addr(frame, l3 + 16)?, to.dst),
    ];
    let (words, n, csum_at) = match kind.layout() {
        Some((at, need)) => {
            if !fits(frame, l4, need) {
                return None;
            }
            let old = if kind == L4Kind::IcmpQuery {
                (rd16(frame, l4 + 4)?, 0)
            } else {
                (rd16(frame, l4)?, rd16(frame, l4 + 2)?)
            };
            let (w, n) = port_words(kind, old, (to.sport, to.dport));
            (w, n, Some(l4 + at))
        }
        None => ([(0, 0, 0); 2], 0, None),
    };
    let words = words.get(..n).unwrap_or_default();
    if changed_addrs(addrs).next().is_none() && words.iter().all(|w| w.1 == w.2) {
        return Some(false);
    }
    let c = rd16(frame, l3 + 10)?;
    wr16(frame, l3 + 10, ip_csum(c, addrs));
    wr_addr(frame, l3 + 12, to.src);
    wr_addr(frame, l3 + 16, to.dst);
    if let Some(at) = csum_at {
        let c = rd16(frame, at)?;
        wr16(frame, at, l4_csum(c, kind, addrs, words, partial));
        for &(off, _, v) in words {
            wr16(frame, l4 + off, v);
        }
    }
    Some(true)
}

/// The packet quoted in an ICMPv4 error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Quote {
    /// Offset of the quoted IPv4 header in the frame.
    ip: usize,
    /// Offset of the quoted L4 header.
    l4: usize,
    /// Quoted L4 bytes present.
    avail: usize,
    pub(crate) kind: L4Kind,
    pub(crate) proto: u8,
    pub(crate) src: Ipv4Addr,
    pub(crate) dst: Ipv4Addr,
    /// Ports; for ICMP queries the identifier and the type.
    pub(crate) sport: u16,
    pub(crate) dport: u16,
}

/// Reads the quote of the ICMPv4 error whose ICMP header is at `l4` and
/// whose IP packet ends at `end`, as conntrack keys it: the first fragment
/// of an IPv4 packet with at least its ports (TCP, UDP) or its type and
/// identifier (ICMP queries; never an error about an error).
pub(crate) fn quote(frame: &[u8], l4: usize, end: usize) -> Option<Quote> {
    if end > frame.len() || !packet::view::is_icmpv4_error(*frame.get(l4)?) {
        return None;
    }
    let ip = l4.checked_add(8)?;
    let b0 = *frame.get(ip)?;
    let ihl = usize::from(b0 & 0x0f) * 4;
    if b0 >> 4 != 4 || ihl < 20 || ip + ihl > end {
        return None;
    }
    if rd16(frame, ip + 6)? & 0x1fff != 0 {
        return None;
    }
    let proto = *frame.get(ip + 9)?;
    let src = rd_addr(frame, ip + 12)?;
    let dst = rd_addr(frame, ip + 16)?;
    let q4 = ip + ihl;
    let avail = end - q4;
    let (kind, sport, dport) = match proto {
        proto::TCP | proto::UDP => {
            if avail < 4 {
                return None;
            }
            let kind = if proto == proto::TCP {
                L4Kind::Tcp
            } else {
                L4Kind::Udp
            };
            (kind, rd16(frame, q4)?, rd16(frame, q4 + 2)?)
        }
        proto::ICMP => {
            let ty = *frame.get(q4)?;
            if avail < 6 || conntrack::icmp_query_counterpart(false, ty).is_none() {
                return None;
            }
            (L4Kind::IcmpQuery, rd16(frame, q4 + 4)?, u16::from(ty))
        }
        _ => (L4Kind::None, 0, 0),
    };
    Some(Quote {
        ip,
        l4: q4,
        avail,
        kind,
        proto,
        src,
        dst,
        sport,
        dport,
    })
}

/// Translates an ICMPv4 error (RFC 5508): the outer addresses to
/// `outer_src`/`outer_dst`, the quoted header `q` to `inner` (addresses
/// and the inner header checksum, ports or identifier and the quoted L4
/// checksum when the quote holds it), then the ICMP checksum recomputed
/// over the message (errors are small), unless `partial` (the offload sums
/// the message; ICMPv4 has no pseudo header, so the field needs nothing).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rewrite_icmp_error(
    frame: &mut [u8],
    l3: usize,
    l4: usize,
    end: usize,
    q: &Quote,
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    inner: &Tuple,
    partial: bool,
) -> Option<()> {
    if !fits(frame, l3, 20) || end > frame.len() || !fits(frame, l4, 8) || q.ip + 20 > end {
        return None;
    }
    // The quoted L4 header: ports (or identifier) always present (quote()
    // checked), the checksum only if the quote reaches it.
    let (words, n) = port_words(q.kind, (q.sport, q.dport), (inner.sport, inner.dport));
    let words = words.get(..n).unwrap_or_default();
    let inner_csum = q
        .kind
        .layout()
        .and_then(|(at, need)| (q.avail >= need.max(at + 2)).then_some(q.l4 + at));
    let addrs = [(q.src, inner.src), (q.dst, inner.dst)];

    // Inner IPv4 header.
    let c = rd16(frame, q.ip + 10)?;
    wr16(frame, q.ip + 10, ip_csum(c, addrs));
    wr_addr(frame, q.ip + 12, inner.src);
    wr_addr(frame, q.ip + 16, inner.dst);
    // Quoted L4 checksum (the quoted packet was complete on the wire).
    if let Some(at) = inner_csum {
        let c = rd16(frame, at)?;
        wr16(frame, at, l4_csum(c, q.kind, addrs, words, false));
    }
    for &(off, _, v) in words {
        wr16(frame, q.l4 + off, v);
    }

    // Outer IPv4 header.
    let outer = [
        (rd_addr(frame, l3 + 12)?, outer_src),
        (rd_addr(frame, l3 + 16)?, outer_dst),
    ];
    let c = rd16(frame, l3 + 10)?;
    wr16(frame, l3 + 10, ip_csum(c, outer));
    wr_addr(frame, l3 + 12, outer_src);
    wr_addr(frame, l3 + 16, outer_dst);

    if !partial {
        wr16(frame, l4 + 2, 0);
        let c = checksum::checksum(frame.get(l4..end)?);
        wr16(frame, l4 + 2, c);
    }
    Some(())
}
