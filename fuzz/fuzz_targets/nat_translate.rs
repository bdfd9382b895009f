//! `nat::Nat` (`translate`, `expire`, `flush_zone`, `flush_port`, `pools`,
//! `mappings`, `export`/`import`) driven by a sequence of packets decoded
//! from the input, with fixed rules, a small conntrack table and a clock the
//! target owns.
//!
//! Rules: SNAT zone 7 and zone 8 10.0.1.0/24 -> 203.0.113.2 with ports
//! 40000-40007 (8 ports: exhaustion and reuse are reachable); floating IP
//! 203.0.113.10 <-> 10.0.1.11 in zone 7; port forwards tcp 203.0.113.2:8080
//! -> 10.0.1.12:80 and udp 203.0.113.2:40003 -> 10.0.1.13:53 (zone 7; the
//! UDP one is a reserved port inside the SNAT range). conntrack: 16 entries,
//! 8 per port (both caps reachable), default timeouts.
//!
//! Input: at most 48 ops, each `[b0, b1, body...]` (missing bytes read as 0).
//! `b0`: bits 0-1 zone (7, 8, external, external), bit 2 `partial_csum`,
//! bits 3-5 kind, bits 6-7 the port charged (1-4). `b1`: bits 0-3 clock
//! advance (0 to 1 day, see `ADVANCE`), bits 4-7 mutation of a built frame
//! (0-8 none, 9 Ethernet padding, 10 bad IPv4 header checksum, 11 IPv4
//! options, 12 later fragment, 13 first fragment, 14 cut the frame by
//! `[n] % 16 + 1` bytes, 15 a VLAN tag). Addresses and ports are nibbles
//! into `ADDRS` / `PORT_SET` (15: 4 or 2 raw bytes follow). Kinds:
//! - 0 TCP `[addrs, ports, flags, len]`; 1 UDP `[addrs, ports, len]`;
//!   2 ICMP query `[addrs, ident|type, len]`;
//! - 3 the reply to one of the last 4 forwarded packets `[sel, len]` (in
//!   the zone it was forwarded to; TCP flags from `sel`);
//! - 4 an ICMP error about one of the last 4 forwarded packets `[sel]`
//!   (type, quote length, from the packet's destination or `[addr]`);
//! - 5 an ICMP error about a made-up packet `[sel, outer addrs, inner
//!   addrs, inner ports]`; 6 another IP protocol `[addrs, proto, len]`;
//! - 7 `[c]`: raw frame `[len, bytes]`, an IPv4 header with raw L4 bytes
//!   `[addrs, proto, len, bytes]`, `flush_zone(zone)` or `flush_port(port)`.
//!
//! Built frames have valid IPv4 and L4 checksums (`partial_csum`: the L4
//! field holds the pseudo-header sum, as a VM leaves it for offload). Every
//! 4 ops `expire(now, 3)`.
//!
//! Asserts: never panics; the length never changes; `NoMatch`/`Drop` leave
//! the frame untouched; `Forward`: from the external zone to a tenant (never
//! a hairpin), from a tenant to the external zone, or back into a tenant
//! only as a hairpin; a tenant destination is in 10.0.1.0/24; the frame
//! parses and its IPv4 destination is the outcome's `dst`; only the IPv4
//! checksum/addresses and the L4 ports/identifier/checksum (for ICMP errors:
//! the ICMP checksum, the quoted header's checksum/addresses and quoted
//! ports/identifier/checksum) changed; IPv4 header, L4 (completed, when
//! partial), quoted IPv4 header checksums valid after if valid before, an
//! ICMP error's checksum valid (unless partial), its outer source is kept
//! or is the quoted destination; a non-error packet leaving has a NAT
//! source address (SNAT ports in the range or a forward's port). After
//! every op: every table entry fits its rule kind (zones, addresses, forward
//! ports); `mappings()` equals the mappings derived from the table's entries
//! (same external port for every connection of a mapping, connection count =
//! entries), at most one mapping per external port, SNAT ports in range and
//! never reserved; `pools()` lists exactly the 6 pools with the range, 8
//! ports, the reserved count, `used` = its mappings and `free + used in
//! range + reserved = ports`. At the end: the snapshot survives JSON, a
//! fresh `Nat` imports all of it (nothing rejected, no conflicts), holds no
//! more entries, passes the same checks, its mappings are the old ones,
//! its export equals the snapshot, and importing again adds nothing.
//!
//! Fixed finding (fuzz/README.md, Findings): a hairpin whose second pass
//! dropped came back as `Drop` with the frame as the first pass rewrote it
//! (and that pass's new entry committed). Seeds `hairpin_after_flush_zone`,
//! `hairpin_refused_by_limit_keeps_first_pass` reproduce it.
#![no_main]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::ops::Range;

use libfuzzer_sys::fuzz_target;
use nat::{
    FloatingIp, MappingKind, Nat, NatSnapshot, Outcome, PortForward, Proto, Rules, Snat,
    EXTERNAL_ZONE,
};
use packet::checksum;
use packet::{FlowKey, L3, L4};

const Z7: u32 = 7;
const Z8: u32 = 8;
const EXT: u32 = EXTERNAL_ZONE;
const SNAT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const FIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const VM_FIP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 11);
const VM_TCP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 12);
const VM_UDP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 13);
const PORTS: (u16, u16) = (40000, 40007);
const FWD_TCP: u16 = 8080;
/// Inside the SNAT range: a reserved port.
const FWD_UDP: u16 = 40003;
const ICMP: u8 = 1;
const TCP: u8 = 6;
const UDP: u8 = 17;
const SEC: u64 = 1_000_000_000;
const T0: u64 = 1000 * SEC;
const MAX_OPS: usize = 48;
const EXPIRE_EVERY: usize = 4;
const EXPIRE_MAX: usize = 3;
const MAX_ENTRIES: usize = 16;
const MAX_PER_PORT: usize = 8;
const HISTORY: usize = 4;

const ADVANCE: [u64; 16] = [
    0,
    0,
    SEC / 1000,
    SEC / 10,
    SEC,
    2 * SEC,
    10 * SEC,
    59 * SEC,
    61 * SEC,
    121 * SEC,
    241 * SEC,
    301 * SEC,
    601 * SEC,
    3600 * SEC,
    7441 * SEC,
    86400 * SEC,
];

/// Nibble 15: four raw bytes.
const ADDRS: [Ipv4Addr; 15] = [
    VM_FIP,
    VM_TCP,
    VM_UDP,
    Ipv4Addr::new(10, 0, 1, 5),
    SNAT_IP,
    FIP,
    Ipv4Addr::new(198, 51, 100, 7),
    Ipv4Addr::new(198, 51, 100, 8),
    Ipv4Addr::new(10, 0, 1, 1),
    Ipv4Addr::new(192, 0, 2, 1),
    Ipv4Addr::new(10, 0, 2, 5),
    Ipv4Addr::new(203, 0, 113, 3),
    Ipv4Addr::new(10, 0, 1, 255),
    Ipv4Addr::BROADCAST,
    Ipv4Addr::UNSPECIFIED,
];

/// Nibble 15: two raw bytes.
const PORT_SET: [u16; 15] = [
    80, 8080, 53, 40000, 40001, 40003, 40007, 39999, 40008, 5000, 5001, 443, 0, 1024, 65535,
];

/// (type, code) of ICMP errors.
const ERRORS: [(u8, u8); 8] = [
    (3, 3),
    (3, 1),
    (11, 0),
    (3, 4),
    (12, 0),
    (5, 1),
    (3, 0),
    (4, 0),
];

/// SYN, SYN-ACK, ACK, PSH-ACK, FIN-ACK, RST, RST-ACK; 7: a raw byte.
const FLAGS: [u8; 7] = [0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14];

fn rules() -> Rules {
    let inside = "10.0.1.0/24".parse().expect("cidr");
    Rules {
        snat: vec![
            Snat {
                zone: Z7,
                inside,
                external: SNAT_IP,
            },
            Snat {
                zone: Z8,
                inside,
                external: SNAT_IP,
            },
        ],
        floating: vec![FloatingIp {
            zone: Z7,
            inside: VM_FIP,
            external: FIP,
        }],
        forwards: vec![
            PortForward {
                zone: Z7,
                proto: Proto::Tcp,
                external: SocketAddrV4::new(SNAT_IP, FWD_TCP),
                inside: SocketAddrV4::new(VM_TCP, 80),
            },
            PortForward {
                zone: Z7,
                proto: Proto::Udp,
                external: SocketAddrV4::new(SNAT_IP, FWD_UDP),
                inside: SocketAddrV4::new(VM_UDP, 53),
            },
        ],
        ports: PORTS,
    }
}

fn ct_config() -> conntrack::Config {
    conntrack::Config {
        max_entries: MAX_ENTRIES,
        max_per_port: MAX_PER_PORT,
        timeouts: conntrack::Timeouts::default(),
    }
}

fn new_nat() -> Nat {
    Nat::new(ct_config(), rules()).expect("fixed rules are valid")
}

fn is_inside(a: Ipv4Addr) -> bool {
    a.octets()[..3] == [10, 0, 1]
}

fn in_range(p: u16) -> bool {
    (PORTS.0..=PORTS.1).contains(&p)
}

fn is_query(ty: u8) -> bool {
    conntrack::icmp_query_counterpart(false, ty).is_some()
}

fn be16(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

fn be32(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        *b.get(i)?,
        *b.get(i + 1)?,
        *b.get(i + 2)?,
        *b.get(i + 3)?,
    ]))
}

fn addr_at(b: &[u8], i: usize) -> Option<Ipv4Addr> {
    be32(b, i).map(Ipv4Addr::from)
}

fn v4(a: IpAddr) -> Ipv4Addr {
    match a {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => panic!("IPv6 address {a} in a NAT entry"),
    }
}

/// The fuzz input; reads past the end give zeros.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn addr(&mut self, nibble: u8) -> Ipv4Addr {
        match ADDRS.get(usize::from(nibble & 15)) {
            Some(&a) => a,
            None => Ipv4Addr::from(u32::from_be_bytes([
                self.u8(),
                self.u8(),
                self.u8(),
                self.u8(),
            ])),
        }
    }

    /// Source and destination from one byte.
    fn addrs(&mut self) -> (Ipv4Addr, Ipv4Addr) {
        let b = self.u8();
        (self.addr(b), self.addr(b >> 4))
    }

    fn port(&mut self, nibble: u8) -> u16 {
        match PORT_SET.get(usize::from(nibble & 15)) {
            Some(&p) => p,
            None => self.u16(),
        }
    }

    /// Source and destination ports from one byte.
    fn ports(&mut self) -> (u16, u16) {
        let b = self.u8();
        (self.port(b), self.port(b >> 4))
    }

    fn payload_len(&mut self) -> usize {
        usize::from(self.u8() & 63)
    }

    fn tcp_flags(&mut self, sel: u8) -> u8 {
        match FLAGS.get(usize::from(sel & 7)) {
            Some(&f) => f,
            None => self.u8(),
        }
    }
}

// ---- frame building ---------------------------------------------------------------------

fn payload(n: usize) -> impl Iterator<Item = u8> {
    (0..n).map(|i| b'a' + (i % 26) as u8)
}

/// An IPv4 header without options followed by `l4`, header checksum set.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let total = (20 + l4.len()) as u16;
    let mut p = Vec::with_capacity(usize::from(total));
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    set_ip_csum(&mut p);
    p.extend_from_slice(l4);
    p
}

fn set_ip_csum(p: &mut [u8]) {
    let ihl = usize::from(p[0] & 15) * 4;
    p[10..12].fill(0);
    let c = checksum::checksum(&p[..ihl]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
}

fn tcp(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, len: usize) -> Vec<u8> {
    let mut t = Vec::with_capacity(20 + len);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend(payload(len));
    t
}

fn udp(sport: u16, dport: u16, len: usize) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + len) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend(payload(len));
    u
}

fn icmp(ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    m
}

fn echo(ty: u8, ident: u16, seq: u16, len: usize) -> Vec<u8> {
    let [a, b] = ident.to_be_bytes();
    let [c, d] = seq.to_be_bytes();
    let body: Vec<u8> = payload(len).collect();
    icmp(ty, 0, [a, b, c, d], &body)
}

/// Offset of the L4 checksum of `proto`.
fn csum_at(proto: u8) -> Option<usize> {
    match proto {
        TCP => Some(16),
        UDP => Some(6),
        ICMP => Some(2),
        _ => None,
    }
}

/// Fills the L4 checksum of the IPv4 packet `p` (header without options):
/// complete, or as a VM leaves it for offload (`partial`: TCP/UDP the folded
/// pseudo-header sum, ICMP 0).
fn fill_l4_csum(p: &mut [u8], partial: bool) {
    let proto = p[9];
    let Some(at) = csum_at(proto) else { return };
    let (src, dst) = (addr_at(p, 12).expect("src"), addr_at(p, 16).expect("dst"));
    let seg = &mut p[20..];
    if seg.len() < at + 2 {
        return;
    }
    seg[at..at + 2].fill(0);
    let pseudo = if proto == ICMP {
        0
    } else {
        checksum::pseudo_header_v4(src, dst, proto, seg.len() as u16)
    };
    let c = match (partial, proto) {
        (true, ICMP) => 0,
        (true, _) => checksum::fold(pseudo),
        (false, _) => {
            let c = !checksum::fold(checksum::add(pseudo, checksum::sum(seg)));
            if proto == UDP {
                checksum::udp_nonzero(c)
            } else {
                c
            }
        }
    };
    seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

fn eth(ip: &[u8], vlan: bool) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + ip.len());
    f.extend_from_slice(&[2, 0, 0, 0, 0, 0xfe, 2, 0, 0, 0, 0, 1]);
    if vlan {
        f.extend_from_slice(&[0x81, 0, 0, 7]);
    }
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(ip);
    f
}

/// Wraps the IPv4 packet `p` in Ethernet after mutation `m` (see the module
/// documentation).
fn finish(mut p: Vec<u8>, m: u8, inp: &mut Input) -> Vec<u8> {
    match m {
        10 => p[10] ^= 0x5a,
        11 => {
            p.splice(20..20, [1, 1, 1, 0]);
            p[0] = 0x46;
            let total = (p.len() as u16).to_be_bytes();
            p[2..4].copy_from_slice(&total);
            set_ip_csum(&mut p);
        }
        12 => {
            p[6..8].copy_from_slice(&[0x00, 0x10]);
            set_ip_csum(&mut p);
        }
        13 => {
            p[6..8].copy_from_slice(&[0x20, 0x00]);
            set_ip_csum(&mut p);
        }
        _ => {}
    }
    let mut f = eth(&p, m == 15);
    match m {
        9 => f.extend_from_slice(&[0; 8]),
        14 => {
            let cut = usize::from(inp.u8() % 16) + 1;
            f.truncate(f.len().saturating_sub(cut));
        }
        _ => {}
    }
    f
}

/// A frame NAT forwarded, in the zone it went to.
struct Sent {
    zone: u32,
    frame: Vec<u8>,
}

/// The IPv4 packet of a forwarded frame: (key, packet from the IP header to
/// its end or the frame's).
fn ip_of(s: &Sent) -> Option<(FlowKey, &[u8])> {
    let k = FlowKey::parse(&s.frame).ok()?;
    let L3::Ipv4(_) = k.l3 else { return None };
    let p = s.frame.get(usize::from(k.l3_offset)..)?;
    let total = usize::from(be16(p, 2)?).min(p.len());
    Some((k, p.get(..total)?))
}

/// The answer to a forwarded packet, from its destination back to its
/// source.
fn reply_to(s: &Sent, sel: u8, inp: &mut Input, partial: bool) -> Option<Vec<u8>> {
    let (k, p) = ip_of(s)?;
    let (src, dst) = (addr_at(p, 12)?, addr_at(p, 16)?);
    let l4 = p.get(usize::from(k.l4_offset.checked_sub(k.l3_offset)?)..)?;
    let flags = inp.tcp_flags(sel >> 2);
    let len = inp.payload_len();
    let mut ip = match k.l4 {
        L4::Tcp {
            src_port,
            dst_port,
            flags: theirs,
        } => {
            let data = usize::from(l4.get(12)? >> 4) * 4;
            let seen = l4.len().saturating_sub(data) as u32 + u32::from(theirs & 0x03 != 0);
            let seq = be32(l4, 8)?;
            let ack = be32(l4, 4)?.wrapping_add(seen);
            ipv4(
                dst,
                src,
                TCP,
                &tcp(dst_port, src_port, seq, ack, flags, len),
            )
        }
        L4::Udp { src_port, dst_port } => ipv4(dst, src, UDP, &udp(dst_port, src_port, len)),
        L4::Icmpv4 { ty, ident, .. } if is_query(ty) => {
            let back = conntrack::icmp_query_counterpart(false, ty)?;
            ipv4(dst, src, ICMP, &echo(back, ident, be16(l4, 6)?, len))
        }
        _ => {
            let body: Vec<u8> = payload(len).collect();
            ipv4(dst, src, p[9], &body)
        }
    };
    fill_l4_csum(&mut ip, partial);
    Some(ip)
}

/// An ICMP error about a forwarded packet, to its source.
fn error_about(s: &Sent, sel: u8, inp: &mut Input, partial: bool) -> Option<Vec<u8>> {
    let (_, p) = ip_of(s)?;
    let ihl = usize::from(p[0] & 15) * 4;
    let qlen = match sel >> 6 {
        0 => ihl + 8,
        1 => ihl + 64,
        2 => ihl + 4,
        _ => ihl,
    };
    let quote = p.get(..qlen.min(p.len()))?;
    let (src, dst) = (addr_at(p, 12)?, addr_at(p, 16)?);
    let from = if sel & 0x20 != 0 {
        dst
    } else {
        let b = inp.u8();
        inp.addr(b)
    };
    Some(icmp_error(sel >> 2, from, src, quote, partial))
}

fn icmp_error(sel: u8, from: Ipv4Addr, to: Ipv4Addr, quote: &[u8], partial: bool) -> Vec<u8> {
    let (ty, code) = ERRORS[usize::from(sel & 7)];
    let rest = if (ty, code) == (3, 4) {
        [0, 0, 0x05, 0x78]
    } else {
        [0; 4]
    };
    let mut ip = ipv4(from, to, ICMP, &icmp(ty, code, rest, quote));
    fill_l4_csum(&mut ip, partial);
    ip
}

/// An ICMP error about a made-up packet.
fn fresh_error(inp: &mut Input, partial: bool) -> Vec<u8> {
    let sel = inp.u8();
    let (osrc, odst) = inp.addrs();
    let (isrc, idst) = inp.addrs();
    let (sp, dp) = inp.ports();
    let mut inner = match (sel >> 3) & 3 {
        0 => ipv4(isrc, idst, TCP, &tcp(sp, dp, 1000, 0, 0x02, 0)),
        1 => ipv4(isrc, idst, UDP, &udp(sp, dp, 4)),
        2 => ipv4(isrc, idst, ICMP, &echo(8, sp, 1, 4)),
        _ => ipv4(isrc, idst, 47, &[0, 0, 0x08, 0, 1, 2, 3, 4]),
    };
    fill_l4_csum(&mut inner, false);
    let qlen = match (sel >> 5) & 3 {
        0 => 28,
        1 => inner.len(),
        2 => 24,
        _ => 20,
    };
    inner.truncate(qlen);
    icmp_error(sel, osrc, odst, &inner, partial)
}

// ---- checks -----------------------------------------------------------------------------

/// Whether the L4 checksum of the IPv4 packet at `l3` (L4 header at `l4`)
/// verifies, after the offload completes it when `partial`. `None`: nothing
/// to check (other protocol, cut packet, UDP without checksum).
fn l4_csum_ok(f: &[u8], l3: usize, l4: usize, partial: bool) -> Option<bool> {
    let proto = *f.get(l3 + 9)?;
    let at = csum_at(proto)?;
    let end = l3 + usize::from(be16(f, l3 + 2)?);
    let mut seg = f.get(l4..end)?.to_vec();
    if seg.len() < 8 || seg.len() < at + 2 || (proto == TCP && seg.len() < 20) {
        return None;
    }
    if proto == UDP && !partial && be16(&seg, at)? == 0 {
        return None;
    }
    let pseudo = if proto == ICMP {
        0
    } else {
        checksum::pseudo_header_v4(
            addr_at(f, l3 + 12)?,
            addr_at(f, l3 + 16)?,
            proto,
            seg.len() as u16,
        )
    };
    if partial {
        let c = !checksum::fold(checksum::sum(&seg));
        let c = if proto == UDP {
            checksum::udp_nonzero(c)
        } else {
            c
        };
        seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    Some(checksum::fold(checksum::add(pseudo, checksum::sum(&seg))) == 0xffff)
}

fn header_ok(f: &[u8], at: usize) -> Option<bool> {
    let ihl = usize::from(*f.get(at)? & 15) * 4;
    if ihl < 20 {
        return None;
    }
    Some(checksum::verify(f.get(at..at + ihl)?))
}

/// Bytes a translation of a frame parsed as `key` may change.
fn changeable(key: &FlowKey, f: &[u8]) -> Vec<Range<usize>> {
    let (l3, l4) = (usize::from(key.l3_offset), usize::from(key.l4_offset));
    let mut v = vec![l3 + 10..l3 + 20];
    let ports = |v: &mut Vec<Range<usize>>, proto: u8, at: usize| match proto {
        TCP => v.extend([at..at + 4, at + 16..at + 18]),
        UDP => v.extend([at..at + 4, at + 6..at + 8]),
        ICMP => v.push(at + 2..at + 6),
        _ => {}
    };
    match key.l4 {
        L4::Tcp { .. } => ports(&mut v, TCP, l4),
        L4::Udp { .. } => ports(&mut v, UDP, l4),
        L4::Icmpv4 { ty, .. } if is_query(ty) => ports(&mut v, ICMP, l4),
        L4::Icmpv4 { ty, .. } if packet::view::is_icmpv4_error(ty) => {
            v.push(l4 + 2..l4 + 4);
            let q = l4 + 8;
            v.push(q + 10..q + 20);
            if let (Some(&b), Some(&proto)) = (f.get(q), f.get(q + 9)) {
                ports(&mut v, proto, q + usize::from(b & 15) * 4);
            }
        }
        _ => {}
    }
    v
}

#[allow(clippy::too_many_arguments)]
fn check_forward(
    from: u32,
    key: &FlowKey,
    before: &[u8],
    after: &[u8],
    partial: bool,
    to: u32,
    dst: Ipv4Addr,
    hairpin: bool,
) {
    assert!(
        [Z7, Z8, EXT].contains(&to),
        "forwarded into unknown zone {to}"
    );
    if from == EXT {
        assert!(
            to != EXT && !hairpin,
            "from the uplink to zone {to}, hairpin {hairpin}"
        );
    } else if hairpin {
        assert_ne!(to, EXT, "a hairpin that ends outside");
    } else {
        assert_eq!(to, EXT, "from zone {from} into zone {to} without a hairpin");
    }
    if to != EXT {
        assert!(
            is_inside(dst),
            "to zone {to} at {dst}, outside the tenants' network"
        );
    }
    let L3::Ipv4(_) = key.l3 else {
        panic!("forwarded a non-IPv4 frame: {key:?}")
    };
    let (l3, l4) = (usize::from(key.l3_offset), usize::from(key.l4_offset));
    assert_eq!(before[l3] & 15, 5, "forwarded a packet with IPv4 options");
    assert!(
        key.malformed.is_none(),
        "forwarded a malformed packet: {key:?}"
    );

    let allowed = changeable(key, before);
    for (i, (a, b)) in before.iter().zip(after).enumerate() {
        if a != b {
            assert!(
                allowed.iter().any(|r| r.contains(&i)),
                "byte {i} changed ({a:#04x} -> {b:#04x}), key {key:?}"
            );
        }
    }
    let k2 = FlowKey::parse(after).expect("a forwarded frame parses");
    let L3::Ipv4(ip2) = k2.l3 else {
        panic!("forwarded frame is not IPv4 any more: {k2:?}")
    };
    assert_eq!(
        ip2.dst,
        IpAddr::V4(dst),
        "frame's destination is not the outcome's"
    );
    if header_ok(before, l3) == Some(true) {
        assert_eq!(
            header_ok(after, l3),
            Some(true),
            "IPv4 header checksum broken"
        );
    }
    let src = addr_at(after, l3 + 12).expect("src");
    let error = matches!(key.l4, L4::Icmpv4 { ty, .. } if packet::view::is_icmpv4_error(ty));
    if error {
        let q = l4 + 8;
        if header_ok(before, q) == Some(true) {
            assert_eq!(
                header_ok(after, q),
                Some(true),
                "quoted IPv4 header checksum broken"
            );
        }
        assert_eq!(
            addr_at(after, q + 12),
            Some(dst),
            "ICMP error not sent to the quoted source"
        );
        let osrc = addr_at(before, l3 + 12).expect("src");
        assert!(
            src == osrc || Some(src) == addr_at(after, q + 16),
            "ICMP error source {osrc} became {src}, not the quoted destination"
        );
        if partial {
            assert_eq!(
                before[l4 + 2..l4 + 4],
                after[l4 + 2..l4 + 4],
                "partial ICMP checksum changed"
            );
        } else {
            let end = l3 + usize::from(be16(after, l3 + 2).expect("length"));
            let msg = after
                .get(l4..end)
                .expect("a translated ICMP error ends inside the frame");
            assert!(checksum::verify(msg), "ICMP error checksum");
        }
    } else {
        if l4_csum_ok(before, l3, l4, partial) == Some(true) {
            assert_eq!(
                l4_csum_ok(after, l3, l4, partial),
                Some(true),
                "L4 checksum broken (partial {partial})"
            );
        }
        if to == EXT {
            assert!(src == SNAT_IP || src == FIP, "left with source {src}");
            let sport = match k2.l4 {
                L4::Tcp { src_port, .. } => Some((TCP, src_port)),
                L4::Udp { src_port, .. } => Some((UDP, src_port)),
                L4::Icmpv4 { ty, ident, .. } if is_query(ty) => Some((ICMP, ident)),
                _ => None,
            };
            if let (SNAT_IP, Some((proto, p))) = (src, sport) {
                let forward = (proto, p) == (TCP, FWD_TCP) || (proto, p) == (UDP, FWD_UDP);
                let allocatable = in_range(p) && !(proto == UDP && p == FWD_UDP);
                assert!(
                    forward || allocatable,
                    "SNAT left with port {p} (proto {proto})"
                );
            }
        }
    }
}

/// Derived from the table: (zone, inside, inside port, proto, external) ->
/// (external port, connections).
type MapKey = (u32, Ipv4Addr, u16, u8, Ipv4Addr);

fn check_state(nat: &Nat) {
    let ct = nat.conntrack();
    assert!(ct.len() <= MAX_ENTRIES, "table over its cap: {}", ct.len());
    let mut want: HashMap<MapKey, (u16, u32)> = HashMap::new();
    for (_, o, r, m) in ct.all_keys() {
        assert_eq!(o.proto, r.proto, "entry changes protocol: {o:?} {r:?}");
        let (osrc, odst, rsrc, rdst) = (v4(o.src), v4(o.dst), v4(r.src), v4(r.dst));
        let out = matches!(m.kind, MappingKind::Snat | MappingKind::FloatingOut);
        if out {
            assert!(
                o.zone != EXT && r.zone == EXT,
                "outbound entry zones: {o:?} {r:?}"
            );
            assert!(is_inside(osrc), "outbound entry from {osrc}");
        } else {
            assert!(
                o.zone == EXT && r.zone != EXT,
                "inbound entry zones: {o:?} {r:?}"
            );
        }
        match m.kind {
            MappingKind::Snat => {
                assert_eq!(rdst, SNAT_IP, "SNAT entry {o:?} {r:?}");
                assert!(
                    !(o.zone == Z7 && osrc == VM_FIP),
                    "SNAT for the floating IP's host: {o:?}"
                );
            }
            MappingKind::FloatingOut => {
                assert_eq!(
                    (o.zone, osrc, rdst),
                    (Z7, VM_FIP, FIP),
                    "floating-out entry {o:?} {r:?}"
                )
            }
            MappingKind::FloatingIn => {
                assert_eq!(
                    (odst, r.zone, rsrc),
                    (FIP, Z7, VM_FIP),
                    "floating-in entry {o:?} {r:?}"
                )
            }
            MappingKind::Forward => {
                let rule = match o.proto {
                    TCP => (FWD_TCP, VM_TCP, 80),
                    UDP => (FWD_UDP, VM_UDP, 53),
                    p => panic!("forward entry of protocol {p}: {o:?}"),
                };
                assert_eq!(
                    (odst, o.dst_port, r.zone, rsrc, r.src_port),
                    (SNAT_IP, rule.0, Z7, rule.1, rule.2),
                    "forward entry {o:?} {r:?}"
                );
            }
        }
        let port = match o.proto {
            ICMP => r.src_port,
            TCP | UDP => r.dst_port,
            _ => continue,
        };
        if !out {
            continue;
        }
        let e = want
            .entry((o.zone, osrc, o.src_port, o.proto, rdst))
            .or_insert((port, 0));
        assert_eq!(e.0, port, "one mapping, two external ports: {o:?} {r:?}");
        e.1 += 1;
    }
    let maps = nat.mappings();
    assert!(
        maps.len() <= ct.len(),
        "{} mappings for {} entries",
        maps.len(),
        ct.len()
    );
    let mut got: HashMap<MapKey, (u16, u32)> = HashMap::new();
    let mut taken: HashMap<(Ipv4Addr, u8, u16), MapKey> = HashMap::new();
    for m in &maps {
        let k = (
            m.zone,
            *m.inside.ip(),
            m.inside.port(),
            m.proto,
            *m.external.ip(),
        );
        assert!(
            got.insert(k, (m.external.port(), m.connections)).is_none(),
            "mapping listed twice: {m:?}"
        );
        if let Some(other) = taken.insert((k.4, k.3, m.external.port()), k) {
            panic!("{m:?} and {other:?} share an external port");
        }
        assert!(m.connections > 0, "mapping without connections: {m:?}");
        if k.4 == SNAT_IP {
            let p = m.external.port();
            assert!(
                in_range(p) && !(m.proto == UDP && p == FWD_UDP),
                "SNAT mapping {m:?} outside the range or reserved"
            );
        }
    }
    assert_eq!(got, want, "mappings() differ from the table's entries");

    let pools = nat.pools();
    let keys: Vec<(Ipv4Addr, u8)> = pools.iter().map(|p| (p.external, p.proto)).collect();
    let expect: Vec<(Ipv4Addr, u8)> = [SNAT_IP, FIP]
        .iter()
        .flat_map(|&a| [(a, ICMP), (a, TCP), (a, UDP)])
        .collect();
    assert_eq!(keys, expect, "pools listed");
    for p in &pools {
        let ports = u32::from(PORTS.1 - PORTS.0) + 1;
        let reserved = u32::from(p.external == SNAT_IP && p.proto == UDP);
        let mine: Vec<u16> = maps
            .iter()
            .filter(|m| (*m.external.ip(), m.proto) == (p.external, p.proto))
            .map(|m| m.external.port())
            .collect();
        let used_in_range = mine.iter().filter(|&&x| in_range(x)).count() as u32;
        assert_eq!(
            (p.range, p.ports, p.reserved),
            (PORTS, ports, reserved),
            "{p:?}"
        );
        assert_eq!(
            p.used as usize,
            mine.len(),
            "{p:?}: used is not its mappings {mine:?}"
        );
        if p.external == SNAT_IP {
            assert!(p.used <= ports - reserved, "{p:?}");
        }
        assert_eq!(
            p.free + used_in_range + p.reserved,
            p.ports,
            "{p:?}, mappings {mine:?}"
        );
    }
}

fn entries_json(s: &NatSnapshot) -> Vec<String> {
    let mut v: Vec<String> = s
        .conntrack
        .entries
        .iter()
        .map(|e| serde_json::to_string(e).expect("entry serializes"))
        .collect();
    v.sort();
    v
}

fn check_restart(nat: &Nat, now: u64) {
    let snap = nat.export(now);
    let json = serde_json::to_string(&snap).expect("snapshot serializes");
    let back: NatSnapshot = serde_json::from_str(&json).expect("snapshot parses back");
    assert_eq!(back, snap, "snapshot JSON round trip");
    let n = snap.conntrack.entries.len();
    assert!(
        n <= nat.conntrack().len(),
        "exported {n} of {} entries",
        nat.conntrack().len()
    );
    let mut fresh = new_nat();
    let rep = fresh.import(back, now).expect("import into a fresh Nat");
    assert_eq!(
        rep.conntrack.imported, n,
        "not everything imported: {rep:?}"
    );
    assert_eq!((rep.rejected, rep.port_conflicts), (0, 0), "{rep:?}");
    assert_eq!(fresh.conntrack().len(), n, "{rep:?}");
    check_state(&fresh);
    let old: HashMap<_, _> = nat
        .mappings()
        .into_iter()
        .map(|m| {
            (
                (m.zone, m.proto, m.inside, *m.external.ip()),
                (m.external.port(), m.connections),
            )
        })
        .collect();
    for m in fresh.mappings() {
        let o = old.get(&(m.zone, m.proto, m.inside, *m.external.ip()));
        let Some(&(port, conns)) = o else {
            panic!("import made a new mapping {m:?}")
        };
        assert_eq!(port, m.external.port(), "import moved {m:?}");
        assert!(m.connections <= conns, "import added connections to {m:?}");
    }
    assert_eq!(
        entries_json(&fresh.export(now)),
        entries_json(&snap),
        "export after import"
    );
    let again = fresh.import(snap, now).expect("second import");
    assert_eq!(
        (again.conntrack.imported, again.conntrack.conflicts),
        (0, n),
        "{again:?}"
    );
    assert!(fresh.conntrack().len() <= n, "second import grew the table");
    check_state(&fresh);
}

// ---- the target -------------------------------------------------------------------------

fn translate(
    nat: &mut Nat,
    hist: &mut Vec<Sent>,
    from: u32,
    port: u32,
    mut frame: Vec<u8>,
    partial: bool,
    now: u64,
) {
    let Ok(key) = FlowKey::parse(&frame) else {
        return;
    };
    let before = frame.clone();
    let out = nat.translate(from, port, &key, &mut frame, partial, now);
    assert_eq!(frame.len(), before.len(), "length changed");
    match out {
        Outcome::NoMatch | Outcome::Drop(_) => {
            assert!(
                frame == before,
                "{out:?} changed the frame: {before:02x?} -> {frame:02x?}"
            )
        }
        Outcome::Forward { zone, dst, hairpin } => {
            check_forward(from, &key, &before, &frame, partial, zone, dst, hairpin);
            hist.insert(0, Sent { zone, frame });
            hist.truncate(HISTORY);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mut nat = new_nat();
    let mut now = T0;
    let mut hist: Vec<Sent> = Vec::with_capacity(HISTORY + 1);
    let mut ops = 0;
    while !inp.is_empty() && ops < MAX_OPS {
        ops += 1;
        let (b0, b1) = (inp.u8(), inp.u8());
        let mut zone = [Z7, Z8, EXT, EXT][usize::from(b0 & 3)];
        let partial = b0 & 4 != 0;
        let port = 1 + u32::from(b0 >> 6);
        now += ADVANCE[usize::from(b1 & 15)];
        let m = b1 >> 4;
        let ip = match (b0 >> 3) & 7 {
            0 => {
                let (s, d) = inp.addrs();
                let (sp, dp) = inp.ports();
                let sel = inp.u8();
                let flags = inp.tcp_flags(sel);
                let len = inp.payload_len();
                Some(ipv4(s, d, TCP, &tcp(sp, dp, 1000, 0, flags, len)))
            }
            1 => {
                let (s, d) = inp.addrs();
                let (sp, dp) = inp.ports();
                let len = inp.payload_len();
                Some(ipv4(s, d, UDP, &udp(sp, dp, len)))
            }
            2 => {
                let (s, d) = inp.addrs();
                let b = inp.u8();
                let ident = inp.port(b);
                let ty = [8, 0, 13, 14, 15, 17, 9, 8][usize::from((b >> 4) & 7)];
                let len = inp.payload_len();
                Some(ipv4(s, d, ICMP, &echo(ty, ident, 1, len)))
            }
            k @ (3 | 4) => {
                let sel = inp.u8();
                match hist.get(usize::from(sel & 3)) {
                    Some(s) => {
                        zone = s.zone;
                        if k == 3 {
                            reply_to(s, sel, &mut inp, partial)
                        } else {
                            error_about(s, sel, &mut inp, partial)
                        }
                    }
                    None => None,
                }
            }
            5 => Some(fresh_error(&mut inp, partial)),
            6 => {
                let (s, d) = inp.addrs();
                let proto = match inp.u8() {
                    0 => 47,
                    p => p,
                };
                let len = inp.payload_len();
                let body: Vec<u8> = payload(len).collect();
                Some(ipv4(s, d, proto, &body))
            }
            _ => match inp.u8() & 3 {
                0 => {
                    let n = usize::from(inp.u8());
                    let f = inp.bytes(n).to_vec();
                    translate(&mut nat, &mut hist, zone, port, f, partial, now);
                    None
                }
                1 => {
                    let (s, d) = inp.addrs();
                    let proto = match inp.u8() & 3 {
                        0 => TCP,
                        1 => UDP,
                        2 => ICMP,
                        _ => inp.u8(),
                    };
                    let n = usize::from(inp.u8());
                    let l4 = inp.bytes(n).to_vec();
                    Some(ipv4(s, d, proto, &l4))
                }
                2 => {
                    nat.flush_zone(zone);
                    None
                }
                _ => {
                    nat.flush_port(port);
                    None
                }
            },
        };
        if let Some(mut ip) = ip {
            if (b0 >> 3) & 7 < 3 || (b0 >> 3) & 7 == 6 {
                fill_l4_csum(&mut ip, partial);
            }
            let frame = finish(ip, m, &mut inp);
            translate(&mut nat, &mut hist, zone, port, frame, partial, now);
        }
        if ops % EXPIRE_EVERY == 0 {
            let n = nat.expire(now, EXPIRE_MAX);
            assert!(n <= EXPIRE_MAX, "expire reaped {n} > {EXPIRE_MAX}");
        }
        check_state(&nat);
    }
    check_restart(&nat, now);
});
