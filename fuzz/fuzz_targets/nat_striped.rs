//! `nat::striped`: a set of 4 `Nat` stripes (`striped::new_set`,
//! `translate`, `mappings`, `pools`, `export`/`import`, `Steering`) driven
//! by the op language of `nat_translate`, beside one `Nat` with the same
//! rules fed the same ops (a differential).
//!
//! Rules: SNAT zone 7 and zone 8 10.0.1.0/24 -> 203.0.113.2 with ports
//! 40000-40015 (4 per stripe, UDP 3 in stripe 3: one stripe runs out
//! soon); floating IP 203.0.113.10 <-> 10.0.1.11 in zone 7; port forwards
//! whose external and inside ports are in different stripes: tcp
//! 203.0.113.2:8081 -> 10.0.1.12:80 (stripes 1 and 0) and udp
//! 203.0.113.2:40003 -> 10.0.1.13:53 (3 and 1; a reserved port of the
//! range). conntrack: 32 entries, 16 per port (each stripe 8 and 4), default
//! timeouts.
//!
//! Input: `nat_translate`'s layout (at most 48 ops `[b0, b1, body...]`,
//! kinds 0-7, see that target), with `PORT_SET` at the same indices but
//! ports in every stripe class: 8080 -> 8081, 443 -> 5002, 1024 -> 40002,
//! and answers (kind 3) to packets of other IP protocols too. Every 4 ops
//! each stripe and the single NAT `expire(now, 3)`.
//!
//! Asserts after every op, on the set: never panics; the length never
//! changes; `NoMatch`/`Drop` leave the frame untouched; `Forward` only
//! uplink -> tenant, tenant -> uplink, tenant -> tenant as a hairpin, the
//! frame parses with the outcome's `dst` as its destination, only the
//! translatable bytes changed, checksums valid after if valid before (as
//! `nat_translate`), and a packet leaving from a tenant keeps its port's
//! stripe class (port % 4) unless it leaves from a forward's port. Stripe
//! `i`: its mappings' external ports are `i` mod 4, both keys of each entry
//! steer to `i` (`of_key`, `of_entry`), at most 8 entries, each stripe's
//! pools' `free + used in range` are its own unreserved ports; no key in
//! two stripes; every entry fits its rule kind; `striped::mappings` equals
//! the mappings derived from the entries, one per external port, SNAT ports
//! in range and not reserved; `striped::pools` lists the 6 pools with
//! `ports` (16) and `reserved` counted once, `used` = its mappings, `free +
//! used in range + reserved = ports`. The answer to a forwarded packet
//! (kind 3) and an ICMP error about one (kind 4), when forwarded while the
//! entries the packet went through are live and without a new entry,
//! reach its sender (address and port / identifier; an error quotes the
//! packet as sent) in the zone it came from, as a hairpin iff it was one.
//!
//! Differential: the single `Nat` gets the same ops (answers and errors
//! built from its own forwarded packets) and must give the same outcome
//! (variant, zone, dst, hairpin, drop reason), the same number of live
//! entries and the same live mappings (inside endpoint -> connections).
//! External port names differ (a stripe picks among its own ports), so a
//! port at one of our addresses in an op's frame is compared by meaning:
//! the same mapping's on both sides, or unmapped, the same number and not
//! used differently by entries without a mapping (hairpin and inbound
//! halves). The comparison ends (the set's checks go on) at the first op
//! where either side returns `Drop(PortsExhausted)` or `Drop(Limit(_))`
//! (one NAT and 4 stripes have different capacities), where the frame
//! names a port whose meaning differs, where a new mapping (all its
//! entries new, so its port was allocated, even the one it had) takes a
//! port that live entries without a mapping use, or where decoding
//! differs. Nothing else is tolerated (the one finding, an ICMP error whose
//! quote is known in another stripe, is fixed: see fuzz/README.md).
//!
//! At the end: `striped::export` survives JSON; a fresh set imports all of
//! it (nothing rejected, no conflicts), every entry into the stripe it was
//! in; the fresh set passes the same checks, keeps the mappings' ports,
//! exports the same entries, a second import adds nothing, and once the
//! old set's expired entries are reaped both sets' `striped::mappings` are
//! equal.
//!
//! `NAT_STRIPED_TRACE=1` prints every op, both sides' outcomes and live
//! entries, the answers checked, and why the comparison ended.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::ops::Range;

use conntrack::{ConnId, ConnKey};
use libfuzzer_sys::fuzz_target;
use nat::striped;
use nat::{
    FloatingIp, MappingKind, Nat, NatDrop, NatSnapshot, Outcome, PortForward, Proto, Rules, Share,
    Snat, Steering, EXTERNAL_ZONE,
};
use packet::checksum;
use packet::{FlowKey, L3, L4};

const STRIPES: usize = 4;
const Z7: u32 = 7;
const Z8: u32 = 8;
const EXT: u32 = EXTERNAL_ZONE;
const SNAT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const FIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const VM_FIP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 11);
const VM_TCP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 12);
const VM_UDP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 13);
const PORTS: (u16, u16) = (40000, 40015);
/// Stripe 1; its inside port 80 is stripe 0's.
const FWD_TCP: u16 = 8081;
/// Inside the SNAT range, stripe 3: a reserved port; its inside port 53
/// is stripe 1's.
const FWD_UDP: u16 = 40003;
const ICMP: u8 = 1;
const TCP: u8 = 6;
const UDP: u8 = 17;
const SEC: u64 = 1_000_000_000;
const T0: u64 = 1000 * SEC;
const MAX_OPS: usize = 48;
const EXPIRE_EVERY: usize = 4;
const EXPIRE_MAX: usize = 3;
const MAX_ENTRIES: usize = 32;
const MAX_PER_PORT: usize = 16;
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

/// Nibble 15: two raw bytes. Stripe classes (port % 4): 0: 80, 40000,
/// 40008, 5000, 0; 1: 8081, 53, 40001, 5001; 2: 5002, 40002; 3: 40003,
/// 40007, 39999, 65535.
const PORT_SET: [u16; 15] = [
    80, 8081, 53, 40000, 40001, 40003, 40007, 39999, 40008, 5000, 5001, 5002, 0, 40002, 65535,
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

fn new_set() -> Set {
    let (nats, steer) =
        striped::new_set(ct_config(), &rules(), STRIPES).expect("fixed rules are valid");
    assert_eq!(nats.len(), STRIPES, "stripes made");
    Set { nats, steer }
}

fn new_nat() -> Nat {
    Nat::new(ct_config(), rules()).expect("fixed rules are valid")
}

fn owned(a: Ipv4Addr) -> bool {
    a == SNAT_IP || a == FIP
}

fn reserved(external: Ipv4Addr, proto: u8, p: u16) -> bool {
    (external, proto, p) == (SNAT_IP, UDP, FWD_UDP)
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
#[derive(Clone)]
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

/// A frame NAT forwarded.
struct Sent {
    /// Zone it came from.
    from: u32,
    /// Zone it went to.
    zone: u32,
    hairpin: bool,
    /// As it came.
    before: Vec<u8>,
    /// As it went.
    frame: Vec<u8>,
    /// The entries it went through (new or counted it), by stripe.
    used: Vec<(usize, ConnId)>,
}

/// The forwarded packet an answer or an ICMP error is about.
struct About {
    from: u32,
    hairpin: bool,
    before: Vec<u8>,
    used: Vec<(usize, ConnId)>,
    /// An ICMP error (else an answer).
    error: bool,
}

impl About {
    fn of(s: &Sent, error: bool) -> About {
        About {
            from: s.from,
            hairpin: s.hairpin,
            before: s.before.clone(),
            used: s.used.clone(),
            error,
        }
    }
}

/// One decoded op.
enum Step {
    Packet {
        zone: u32,
        frame: Vec<u8>,
        about: Option<About>,
    },
    FlushZone(u32),
    FlushPort(u32),
    Nothing,
}

/// Decodes the body of op `[b0, b1]` (see `nat_translate`), answers and
/// errors about the packets in `hist`.
fn decode(inp: &mut Input, b0: u8, b1: u8, hist: &[Sent]) -> Step {
    let zone = [Z7, Z8, EXT, EXT][usize::from(b0 & 3)];
    let partial = b0 & 4 != 0;
    let port = 1 + u32::from(b0 >> 6);
    let m = b1 >> 4;
    let kind = (b0 >> 3) & 7;
    let (zone, mut ip, about) = match kind {
        0 => {
            let (s, d) = inp.addrs();
            let (sp, dp) = inp.ports();
            let sel = inp.u8();
            let flags = inp.tcp_flags(sel);
            let len = inp.payload_len();
            (
                zone,
                ipv4(s, d, TCP, &tcp(sp, dp, 1000, 0, flags, len)),
                None,
            )
        }
        1 => {
            let (s, d) = inp.addrs();
            let (sp, dp) = inp.ports();
            let len = inp.payload_len();
            (zone, ipv4(s, d, UDP, &udp(sp, dp, len)), None)
        }
        2 => {
            let (s, d) = inp.addrs();
            let b = inp.u8();
            let ident = inp.port(b);
            let ty = [8, 0, 13, 14, 15, 17, 9, 8][usize::from((b >> 4) & 7)];
            let len = inp.payload_len();
            (zone, ipv4(s, d, ICMP, &echo(ty, ident, 1, len)), None)
        }
        3 | 4 => {
            let sel = inp.u8();
            let Some(s) = hist.get(usize::from(sel & 3)) else {
                return Step::Nothing;
            };
            let ip = if kind == 3 {
                reply_to(s, sel, inp, partial)
            } else {
                error_about(s, sel, inp, partial)
            };
            let Some(ip) = ip else {
                return Step::Nothing;
            };
            (s.zone, ip, Some(About::of(s, kind == 4)))
        }
        5 => (zone, fresh_error(inp, partial), None),
        6 => {
            let (s, d) = inp.addrs();
            let proto = match inp.u8() {
                0 => 47,
                p => p,
            };
            let len = inp.payload_len();
            let body: Vec<u8> = payload(len).collect();
            (zone, ipv4(s, d, proto, &body), None)
        }
        _ => match inp.u8() & 3 {
            0 => {
                let n = usize::from(inp.u8());
                let frame = inp.bytes(n).to_vec();
                return Step::Packet {
                    zone,
                    frame,
                    about: None,
                };
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
                (zone, ipv4(s, d, proto, &l4), None)
            }
            2 => return Step::FlushZone(zone),
            _ => return Step::FlushPort(port),
        },
    };
    if kind < 3 || kind == 6 {
        fill_l4_csum(&mut ip, partial);
    }
    Step::Packet {
        zone,
        frame: finish(ip, m, inp),
        about,
    }
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
    // (nat_translate's `checked_sub` gives no answer to other protocols,
    // whose `l4_offset` is 0; `l4` is only read for TCP and ICMP.)
    let l4 = p.get(usize::from(k.l4_offset.saturating_sub(k.l3_offset))..)?;
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
    // The IPv4 checksum and addresses.
    let mut v: Vec<Range<usize>> = Vec::with_capacity(8);
    v.push(l3 + 10..l3 + 20);
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
            // A tenant's packet goes to the stripe of its source port, and
            // that stripe's ports are of the port's class; a forward's
            // port is the exception (its inside port is another class).
            let sent = match key.l4 {
                L4::Tcp { src_port, .. } | L4::Udp { src_port, .. } => Some(src_port),
                L4::Icmpv4 { ty, ident, .. } if is_query(ty) => Some(ident),
                _ => None,
            };
            if let (Some((proto, p)), Some(q)) = (sport, sent) {
                let forward = src == SNAT_IP
                    && ((proto, p) == (TCP, FWD_TCP) || (proto, p) == (UDP, FWD_UDP));
                assert!(
                    forward || usize::from(p) % STRIPES == usize::from(q) % STRIPES,
                    "port {q} left as {p} (proto {proto}), another stripe's"
                );
            }
        }
    }
}

// ---- the two NATs -----------------------------------------------------------------------

/// A striped set.
struct Set {
    nats: Vec<Nat>,
    steer: Steering,
}

/// What both sides of the differential offer: a translation, and their
/// NATs (one NAT is a set of one).
trait Table {
    fn go(
        &mut self,
        from: u32,
        port: u32,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
    ) -> Outcome;
    fn stripes(&self) -> &[Nat];
    fn stripes_mut(&mut self) -> &mut [Nat];
}

impl Table for Set {
    fn go(
        &mut self,
        from: u32,
        port: u32,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
    ) -> Outcome {
        striped::translate(
            &mut self.nats[..],
            &self.steer,
            from,
            port,
            key,
            frame,
            partial,
            now,
        )
    }

    fn stripes(&self) -> &[Nat] {
        &self.nats
    }

    fn stripes_mut(&mut self) -> &mut [Nat] {
        &mut self.nats
    }
}

impl Table for Nat {
    fn go(
        &mut self,
        from: u32,
        port: u32,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
    ) -> Outcome {
        self.translate(from, port, key, frame, partial, now)
    }

    fn stripes(&self) -> &[Nat] {
        std::slice::from_ref(self)
    }

    fn stripes_mut(&mut self) -> &mut [Nat] {
        std::slice::from_mut(self)
    }
}

struct Side<T> {
    t: T,
    /// The last forwarded packets, newest first.
    hist: Vec<Sent>,
}

/// Packets counted by every live entry, by stripe.
fn counts(nats: &[Nat], now: u64) -> HashMap<(usize, ConnId), [u64; 2]> {
    let mut m = HashMap::new();
    for (i, n) in nats.iter().enumerate() {
        for e in n.conntrack().entries(now) {
            m.insert((i, e.id), [e.stats[0].packets, e.stats[1].packets]);
        }
    }
    m
}

fn created(nats: &[Nat]) -> u64 {
    nats.iter().map(|n| n.conntrack().stats().created).sum()
}

fn all_live(nats: &[Nat], ids: &[(usize, ConnId)], now: u64) -> bool {
    ids.iter().all(|&(i, id)| {
        nats.get(i)
            .is_some_and(|n| n.conntrack().get(id, now).is_some())
    })
}

/// Translates `frame` (from zone `from`); `None` when it does not parse
/// (nothing to translate). `full`: the `Forward` checks of the set.
#[allow(clippy::too_many_arguments)]
fn step<T: Table>(
    side: &mut Side<T>,
    from: u32,
    port: u32,
    mut frame: Vec<u8>,
    partial: bool,
    now: u64,
    about: Option<&About>,
    full: bool,
) -> Option<Outcome> {
    let key = FlowKey::parse(&frame).ok()?;
    let before = frame.clone();
    let seen = counts(side.t.stripes(), now);
    let made = created(side.t.stripes());
    let intact =
        about.is_some_and(|a| !a.used.is_empty() && all_live(side.t.stripes(), &a.used, now));
    let out = side.t.go(from, port, &key, &mut frame, partial, now);
    assert_eq!(frame.len(), before.len(), "length changed");
    match out {
        Outcome::NoMatch | Outcome::Drop(_) => {
            assert!(
                frame == before,
                "{out:?} changed the frame: {before:02x?} -> {frame:02x?}"
            )
        }
        Outcome::Forward { zone, dst, hairpin } => {
            if full {
                check_forward(from, &key, &before, &frame, partial, zone, dst, hairpin);
            }
            if let Some(a) = about.filter(|_| intact && created(side.t.stripes()) == made) {
                check_back(a, &frame, zone, hairpin);
                if trace() {
                    eprintln!(
                        "checked: {} back to its sender",
                        if a.error { "error" } else { "answer" }
                    );
                }
            }
            let after = counts(side.t.stripes(), now);
            let used = after
                .iter()
                .filter(|(id, c)| seen.get(id) != Some(c))
                .map(|(id, _)| *id)
                .collect();
            side.hist.insert(
                0,
                Sent {
                    from,
                    zone,
                    hairpin,
                    before,
                    frame,
                    used,
                },
            );
            side.hist.truncate(HISTORY);
        }
    }
    Some(out)
}

/// An answer or ICMP error about a packet whose entries are intact went
/// back to that packet's sender.
fn check_back(a: &About, after: &[u8], zone: u32, hairpin: bool) {
    let Ok(ko) = FlowKey::parse(&a.before) else {
        return;
    };
    let (L3::Ipv4(ip), Some(l3)) = (ko.l3, frame_ip(&a.before, &ko)) else {
        return;
    };
    let (osrc, odst) = (addr_at(l3, 12), addr_at(l3, 16));
    let (proto, sport, dport) = match ko.l4 {
        L4::Tcp {
            src_port, dst_port, ..
        } => (TCP, Some(src_port), Some(dst_port)),
        L4::Udp { src_port, dst_port } => (UDP, Some(src_port), Some(dst_port)),
        L4::Icmpv4 { ty, ident, .. } if is_query(ty) => (ICMP, Some(ident), None),
        // An ICMP error or other message: not a connection's packet.
        L4::Icmpv4 { .. } => return,
        _ => (ip.proto, None, None),
    };
    let what = if a.error { "ICMP error" } else { "answer" };
    assert_eq!(zone, a.from, "{what} went to zone {zone}, not its sender's");
    assert_eq!(
        hairpin, a.hairpin,
        "{what}: hairpin {hairpin}, the packet's {}",
        a.hairpin
    );
    let k2 = FlowKey::parse(after).expect("a forwarded frame parses");
    let p2 = frame_ip(after, &k2).expect("a forwarded frame is IPv4");
    assert_eq!(
        addr_at(p2, 16),
        osrc,
        "{what} not addressed to the packet's sender"
    );
    if !a.error {
        let back = match k2.l4 {
            L4::Tcp { dst_port, .. } if proto == TCP => Some(dst_port),
            L4::Udp { dst_port, .. } if proto == UDP => Some(dst_port),
            L4::Icmpv4 { ty, ident, .. } if proto == ICMP && is_query(ty) => Some(ident),
            L4::None if sport.is_none() => None,
            l4 => panic!("answer to a {proto} packet is {l4:?}"),
        };
        assert_eq!(back, sport, "answer not sent to the sender's port");
        return;
    }
    // The error quotes the packet as its sender sent it.
    let q = usize::from(k2.l4_offset) + 8 - usize::from(k2.l3_offset);
    assert_eq!(
        (addr_at(p2, q + 12), addr_at(p2, q + 16)),
        (osrc, odst),
        "ICMP error quotes other addresses than the packet's"
    );
    let ihl = p2.get(q).expect("a translated ICMP error has its quote") & 15;
    let at = q + usize::from(ihl) * 4;
    match proto {
        TCP | UDP => {
            if let (Some(s), Some(d)) = (be16(p2, at), be16(p2, at + 2)) {
                assert_eq!(
                    (Some(s), Some(d)),
                    (sport, dport),
                    "ICMP error quotes other ports than the packet's"
                );
            }
        }
        ICMP => {
            if let Some(id) = be16(p2, at + 4) {
                assert_eq!(
                    Some(id),
                    sport,
                    "ICMP error quotes another identifier than the packet's"
                );
            }
        }
        _ => {}
    }
}

/// The IPv4 packet of a frame, from its header to its total length (or
/// the frame's end).
fn frame_ip<'a>(f: &'a [u8], k: &FlowKey) -> Option<&'a [u8]> {
    let L3::Ipv4(_) = k.l3 else { return None };
    let p = f.get(usize::from(k.l3_offset)..)?;
    let total = usize::from(be16(p, 2)?).min(p.len());
    p.get(..total)
}

// ---- differential -----------------------------------------------------------------------

/// (zone, inside, inside port, proto, external): a mapping.
type MapKey = (u32, Ipv4Addr, u16, u8, Ipv4Addr);
/// (one of our addresses, proto, port or ICMP identifier).
type Pt = (Ipv4Addr, u8, u16);
/// A port of ours in a key that no mapping explains (inbound and hairpin
/// halves): (port, zone of the key, it is the key's source, the other
/// address).
type Use = (Pt, u32, bool, IpAddr);

/// The mapping an entry holds (as `nat::ports::eim_of`) and its port.
fn mapping_of(o: &ConnKey, r: &ConnKey, kind: MappingKind) -> Option<(MapKey, u16)> {
    if !matches!(kind, MappingKind::Snat | MappingKind::FloatingOut) {
        return None;
    }
    let (IpAddr::V4(inside), IpAddr::V4(external)) = (o.src, r.dst) else {
        return None;
    };
    let port = if o.is_icmp() {
        r.src_port
    } else if matches!(o.proto, TCP | UDP) {
        r.dst_port
    } else {
        return None;
    };
    Some(((o.zone, inside, o.src_port, o.proto, external), port))
}

/// The port of ours at the source or destination of `k`.
fn owned_port(k: &ConnKey, src: bool) -> Option<Pt> {
    let IpAddr::V4(a) = (if src { k.src } else { k.dst }) else {
        return None;
    };
    if !owned(a) {
        return None;
    }
    if k.is_icmp() {
        return Some((a, ICMP, k.src_port));
    }
    match k.proto {
        TCP | UDP => Some((a, k.proto, if src { k.src_port } else { k.dst_port })),
        _ => None,
    }
}

/// The live entries of one side, up to port names.
#[derive(Default)]
struct Summary {
    /// Mapping ports and their mapping.
    owner: HashMap<Pt, MapKey>,
    /// Mappings and their ports.
    port: HashMap<MapKey, u16>,
    /// Live connections per mapping.
    conns: HashMap<MapKey, u32>,
    uses: HashSet<Use>,
    live: usize,
    /// Every live entry.
    all: HashSet<(usize, ConnId)>,
    /// The live entries of each mapping.
    ids: HashMap<MapKey, Vec<(usize, ConnId)>>,
}

impl Summary {
    fn of(nats: &[Nat], now: u64) -> Summary {
        let mut s = Summary::default();
        for (i, n) in nats.iter().enumerate() {
            for e in n.conntrack().entries(now) {
                s.live += 1;
                s.all.insert((i, e.id));
                let explained = mapping_of(&e.orig, &e.reply, e.ext.kind);
                if let Some((k, p)) = explained {
                    s.owner.insert((k.4, k.3, p), k);
                    s.port.insert(k, p);
                    *s.conns.entry(k).or_default() += 1;
                    s.ids.entry(k).or_default().push((i, e.id));
                }
                for (reply, k) in [(false, e.orig), (true, e.reply)] {
                    for src in [true, false] {
                        let Some(pt) = owned_port(&k, src) else {
                            continue;
                        };
                        let mapping = explained.map(|(m, p)| (m.4, m.3, p));
                        if reply && !src && mapping == Some(pt) {
                            continue;
                        }
                        let other = if src { k.dst } else { k.src };
                        s.uses.insert((pt, k.zone, src, other));
                    }
                }
            }
        }
        s
    }

    /// A mapping made since `before` (all its entries are new: its port
    /// was allocated, maybe the one it had) took a port that live entries
    /// without a mapping used then: a hairpin's second half outliving its
    /// first, met again by the new connection on one side, not on the
    /// other.
    fn reused(&self, before: &Summary) -> bool {
        let used: HashSet<Pt> = before.uses.iter().map(|u| u.0).collect();
        self.port.iter().any(|(k, &p)| {
            let fresh = self
                .ids
                .get(k)
                .is_some_and(|v| v.iter().all(|id| !before.all.contains(id)));
            fresh && used.contains(&(k.4, k.3, p))
        })
    }
}

fn push_ports(v: &mut Vec<Pt>, proto: u8, src: Ipv4Addr, dst: Ipv4Addr, sp: u16, dp: u16) {
    if owned(src) {
        v.push((src, proto, sp));
    }
    if owned(dst) {
        v.push((dst, proto, dp));
    }
}

/// The ports of ours a frame names (outer header, or an ICMP error's
/// quote); `None` if it does not parse.
fn refs(f: &[u8]) -> Option<Vec<Pt>> {
    let k = FlowKey::parse(f).ok()?;
    let mut v = Vec::new();
    let L3::Ipv4(ip) = k.l3 else { return Some(v) };
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (ip.src, ip.dst) else {
        return Some(v);
    };
    match k.l4 {
        L4::Tcp {
            src_port, dst_port, ..
        } => push_ports(&mut v, TCP, src, dst, src_port, dst_port),
        L4::Udp { src_port, dst_port } => push_ports(&mut v, UDP, src, dst, src_port, dst_port),
        L4::Icmpv4 { ty, ident, .. } if is_query(ty) => {
            push_ports(&mut v, ICMP, src, dst, ident, ident)
        }
        L4::Icmpv4 { ty, .. } if packet::view::is_icmpv4_error(ty) => {
            let q = usize::from(k.l4_offset) + 8;
            if let (Some(&b), Some(&proto), Some(qs), Some(qd)) = (
                f.get(q),
                f.get(q + 9),
                addr_at(f, q + 12),
                addr_at(f, q + 16),
            ) {
                let at = q + usize::from(b & 15) * 4;
                match proto {
                    TCP | UDP => {
                        if let (Some(sp), Some(dp)) = (be16(f, at), be16(f, at + 2)) {
                            push_ports(&mut v, proto, qs, qd, sp, dp);
                        }
                    }
                    ICMP => {
                        if let (Some(&ty), Some(id)) = (f.get(at), be16(f, at + 4)) {
                            if is_query(ty) {
                                push_ports(&mut v, ICMP, qs, qd, id, id);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
    Some(v)
}

/// Whether the set's frame `a` and the single NAT's frame `b` name ports of
/// ours that mean the same on both sides (see the module doc).
fn comparable(a: &[u8], b: &[u8], sa: &Summary, sb: &Summary) -> bool {
    let (Some(ra), Some(rb)) = (refs(a), refs(b)) else {
        return refs(a).is_none() && refs(b).is_none();
    };
    let differ: HashSet<Pt> = sa
        .uses
        .symmetric_difference(&sb.uses)
        .map(|u| u.0)
        .collect();
    ra.len() == rb.len()
        && ra.iter().zip(&rb).all(|(&p, &q)| {
            (p.0, p.1) == (q.0, q.1)
                && match (sa.owner.get(&p), sb.owner.get(&q)) {
                    (None, None) => p == q && !differ.contains(&p),
                    (x, y) => x == y,
                }
        })
}

fn show(f: &[u8]) -> String {
    match FlowKey::parse(f) {
        Ok(k) => format!("{:?} {:?} {:?}", k.l3, k.l4, k.malformed),
        Err(e) => format!("{e:?}"),
    }
}

/// `NAT_STRIPED_TRACE=1`: print every compared op's outcomes.
fn trace() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("NAT_STRIPED_TRACE").is_some())
}

fn capacity(o: &Option<Outcome>) -> bool {
    matches!(
        o,
        Some(Outcome::Drop(NatDrop::PortsExhausted | NatDrop::Limit(_)))
    )
}

// ---- checks of the set ------------------------------------------------------------------

/// An entry fits its rule kind.
fn check_entry(o: &ConnKey, r: &ConnKey, kind: MappingKind) {
    assert_eq!(o.proto, r.proto, "entry changes protocol: {o:?} {r:?}");
    let (osrc, odst, rsrc, rdst) = (v4(o.src), v4(o.dst), v4(r.src), v4(r.dst));
    if matches!(kind, MappingKind::Snat | MappingKind::FloatingOut) {
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
    match kind {
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
}

fn check_set(nats: &mut [Nat], steer: &Steering) {
    assert_eq!(
        (nats.len(), steer.count()),
        (STRIPES, STRIPES),
        "stripes, steering"
    );
    let mut keys: HashSet<ConnKey> = HashSet::new();
    let mut want: HashMap<MapKey, (u16, u32)> = HashMap::new();
    for (i, n) in nats.iter().enumerate() {
        assert_eq!(
            Some(n.share()),
            Share::new(i, STRIPES),
            "share of stripe {i}"
        );
        let ct = n.conntrack();
        assert!(
            ct.len() <= MAX_ENTRIES / STRIPES,
            "stripe {i} over its cap: {}",
            ct.len()
        );
        let maps = n.mappings();
        for m in &maps {
            assert_eq!(
                usize::from(m.external.port()) % STRIPES,
                i,
                "{m:?} in stripe {i}"
            );
        }
        for (_, o, r, m) in ct.all_keys() {
            assert_eq!(steer.of_key(&o), i, "{o:?} (orig, {m:?}) in stripe {i}");
            assert_eq!(steer.of_key(&r), i, "{r:?} (reply, {m:?}) in stripe {i}");
            assert_eq!(steer.of_entry(&o, &r), Some(i), "{o:?} {r:?}");
            for k in [o, r] {
                assert!(keys.insert(k), "key {k:?} twice (again in stripe {i})");
            }
            check_entry(&o, &r, m.kind);
            if let Some((k, p)) = mapping_of(&o, &r, m.kind) {
                let e = want.entry(k).or_insert((p, 0));
                assert_eq!(e.0, p, "one mapping, two external ports: {o:?} {r:?}");
                e.1 += 1;
            }
        }
        // A stripe's free ports are its own: `p % 4 == i`, not reserved.
        for p in n.pools() {
            let own = (PORTS.0..=PORTS.1)
                .filter(|&x| usize::from(x) % STRIPES == i && !reserved(p.external, p.proto, x))
                .count() as u32;
            let used_in_range = maps
                .iter()
                .filter(|m| (*m.external.ip(), m.proto) == (p.external, p.proto))
                .filter(|m| in_range(m.external.port()))
                .count() as u32;
            assert_eq!(
                p.free + used_in_range,
                own,
                "stripe {i}: {p:?}, mappings {maps:?}"
            );
        }
    }
    let total: usize = nats.iter().map(|n| n.conntrack().len()).sum();
    let maps = striped::mappings(nats);
    assert!(
        maps.len() <= total,
        "{} mappings for {total} entries",
        maps.len()
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
                in_range(p) && !reserved(SNAT_IP, m.proto, p),
                "SNAT mapping {m:?} outside the range or reserved"
            );
        }
    }
    assert_eq!(got, want, "striped::mappings differ from the entries");

    let pools = striped::pools(nats);
    let listed: Vec<(Ipv4Addr, u8)> = pools.iter().map(|p| (p.external, p.proto)).collect();
    let expect: Vec<(Ipv4Addr, u8)> = [SNAT_IP, FIP]
        .iter()
        .flat_map(|&a| [(a, ICMP), (a, TCP), (a, UDP)])
        .collect();
    assert_eq!(listed, expect, "pools listed");
    let ports = u32::from(PORTS.1 - PORTS.0) + 1;
    for p in &pools {
        let res = u32::from(p.external == SNAT_IP && p.proto == UDP);
        let mine: Vec<u16> = maps
            .iter()
            .filter(|m| (*m.external.ip(), m.proto) == (p.external, p.proto))
            .map(|m| m.external.port())
            .collect();
        let used_in_range = mine.iter().filter(|&&x| in_range(x)).count() as u32;
        assert_eq!((p.range, p.ports, p.reserved), (PORTS, ports, res), "{p:?}");
        assert_eq!(
            p.used as usize,
            mine.len(),
            "{p:?}: used is not its mappings {mine:?}"
        );
        if p.external == SNAT_IP {
            assert!(p.used <= ports - res, "{p:?}");
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

fn check_restart(set: &mut Set, now: u64) {
    let snap = striped::export(&mut set.nats[..], now);
    let json = serde_json::to_string(&snap).expect("snapshot serializes");
    let back: NatSnapshot = serde_json::from_str(&json).expect("snapshot parses back");
    assert_eq!(back, snap, "snapshot JSON round trip");
    let n = snap.conntrack.entries.len();
    let live: Vec<usize> = set
        .nats
        .iter()
        .map(|x| x.conntrack().entries(now).count())
        .collect();
    assert_eq!(n, live.iter().sum::<usize>(), "exported {n} of {live:?}");
    let mut fresh = new_set();
    let rep = striped::import(&mut fresh.nats[..], &fresh.steer, back, now)
        .expect("import into a fresh set");
    assert_eq!(
        (
            rep.conntrack.imported,
            rep.conntrack.conflicts,
            rep.rejected,
            rep.port_conflicts
        ),
        (n, 0, 0, 0),
        "{rep:?}"
    );
    let lens: Vec<usize> = fresh.nats.iter().map(|x| x.conntrack().len()).collect();
    assert_eq!(lens, live, "entries went to other stripes");
    check_set(&mut fresh.nats, &fresh.steer);
    let old: HashMap<_, _> = striped::mappings(&mut set.nats[..])
        .into_iter()
        .map(|m| {
            (
                (m.zone, m.proto, m.inside, *m.external.ip()),
                (m.external.port(), m.connections),
            )
        })
        .collect();
    for m in striped::mappings(&mut fresh.nats[..]) {
        let o = old.get(&(m.zone, m.proto, m.inside, *m.external.ip()));
        let Some(&(port, conns)) = o else {
            panic!("import made a new mapping {m:?}")
        };
        assert_eq!(port, m.external.port(), "import moved {m:?}");
        assert!(m.connections <= conns, "import added connections to {m:?}");
    }
    assert_eq!(
        entries_json(&striped::export(&mut fresh.nats[..], now)),
        entries_json(&snap),
        "export after import"
    );
    let again = striped::import(&mut fresh.nats[..], &fresh.steer, snap, now).expect("again");
    assert_eq!(
        (again.conntrack.imported, again.conntrack.conflicts),
        (0, n),
        "{again:?}"
    );
    let lens2: Vec<usize> = fresh.nats.iter().map(|x| x.conntrack().len()).collect();
    assert_eq!(lens2, lens, "second import changed the stripes");
    check_set(&mut fresh.nats, &fresh.steer);
    // Without the expired entries (which export leaves out) the old set
    // has exactly the imported mappings.
    for x in &mut set.nats {
        x.expire(now, usize::MAX);
    }
    assert_eq!(
        striped::mappings(&mut set.nats[..]),
        striped::mappings(&mut fresh.nats[..]),
        "mappings after the restart"
    );
}

// ---- the target -------------------------------------------------------------------------

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mut set = Side {
        t: new_set(),
        hist: Vec::with_capacity(HISTORY + 1),
    };
    // The single NAT, while the two still compare.
    let mut one = Some(Side {
        t: new_nat(),
        hist: Vec::with_capacity(HISTORY + 1),
    });
    let mut now = T0;
    let mut ops = 0;
    while !inp.is_empty() && ops < MAX_OPS {
        ops += 1;
        let (b0, b1) = (inp.u8(), inp.u8());
        let partial = b0 & 4 != 0;
        let port = 1 + u32::from(b0 >> 6);
        now += ADVANCE[usize::from(b1 & 15)];
        let start = inp.clone();
        let op = decode(&mut inp, b0, b1, &set.hist);
        // The same op for the single NAT, from its own history.
        let twin = one.as_ref().and_then(|o| {
            let mut i2 = start.clone();
            let t = decode(&mut i2, b0, b1, &o.hist);
            (i2.0.len() == inp.0.len()).then_some(t)
        });
        let mut keep = twin.is_some();
        if trace() {
            match &op {
                Step::Packet { zone, frame, .. } => {
                    eprintln!("op {ops}: from zone {zone} port {port}: {}", show(frame))
                }
                Step::FlushZone(z) => eprintln!("op {ops}: flush_zone({z})"),
                Step::FlushPort(p) => eprintln!("op {ops}: flush_port({p})"),
                Step::Nothing => eprintln!("op {ops}: nothing"),
            }
        }
        // Why the comparison ends (for NAT_STRIPED_TRACE).
        let mut why = "decoding differs";
        match op {
            Step::Packet { zone, frame, about } => {
                let pair = match (&one, twin) {
                    (
                        Some(o),
                        Some(Step::Packet {
                            zone: z2,
                            frame: f2,
                            about: a2,
                        }),
                    ) if z2 == zone => {
                        let sa = Summary::of(set.t.stripes(), now);
                        let sb = Summary::of(o.t.stripes(), now);
                        comparable(&frame, &f2, &sa, &sb).then_some((f2, a2, sa, sb))
                    }
                    _ => None,
                };
                let frame0 = frame.clone();
                let out = step(
                    &mut set,
                    zone,
                    port,
                    frame,
                    partial,
                    now,
                    about.as_ref(),
                    true,
                );
                keep = false;
                why = "the frame names a port that means another thing on each side";
                if let (Some(o), Some((f2, a2, sa, sb))) = (one.as_mut(), pair) {
                    why = "capacity (PortsExhausted, Limit) or a port reused";
                    let out2 = step(o, zone, port, f2, partial, now, a2.as_ref(), false);
                    let (aa, ab) = (
                        Summary::of(set.t.stripes(), now),
                        Summary::of(o.t.stripes(), now),
                    );
                    if trace() {
                        eprintln!("op {ops}: zone {zone}: set {out:?}, one {out2:?}");
                        for (name, nats) in [("set", set.t.stripes()), ("one", o.t.stripes())] {
                            if let Some(s) = set.hist.first().filter(|_| name == "set") {
                                eprintln!("  set sent {}", show(&s.before));
                            }
                            for (i, n) in nats.iter().enumerate() {
                                for e in n.conntrack().entries(now) {
                                    eprintln!(
                                        "  {name}[{i}] {:?} {:?} / {:?}",
                                        e.ext.kind, e.orig, e.reply
                                    );
                                }
                            }
                        }
                    }
                    if !(capacity(&out) || capacity(&out2) || aa.reused(&sa) || ab.reused(&sb)) {
                        assert_eq!(out, out2, "op {ops}: the set (left) and one NAT differ");
                    }
                }
            }
            Step::FlushZone(z) => {
                for n in &mut set.t.nats {
                    n.flush_zone(z);
                }
                if let Some(o) = one.as_mut() {
                    keep &= matches!(twin, Some(Step::FlushZone(x)) if x == z);
                    o.t.flush_zone(z);
                }
            }
            Step::FlushPort(p) => {
                for n in &mut set.t.nats {
                    n.flush_port(p);
                }
                if let Some(o) = one.as_mut() {
                    keep &= matches!(twin, Some(Step::FlushPort(x)) if x == p);
                    o.t.flush_port(p);
                }
            }
            Step::Nothing => keep &= matches!(twin, Some(Step::Nothing)),
        }
        if !keep {
            if trace() && one.is_some() {
                eprintln!("op {ops}: comparison ends: {why}");
            }
            one = None;
        }
        if let Some(o) = one.as_ref() {
            let (aa, ab) = (
                Summary::of(set.t.stripes(), now),
                Summary::of(o.t.stripes(), now),
            );
            assert_eq!(aa.live, ab.live, "op {ops}: live entries differ");
            assert_eq!(aa.conns, ab.conns, "op {ops}: live mappings differ");
        }
        if ops % EXPIRE_EVERY == 0 {
            for n in set.t.stripes_mut() {
                let k = n.expire(now, EXPIRE_MAX);
                assert!(k <= EXPIRE_MAX, "expire reaped {k} > {EXPIRE_MAX}");
            }
            if let Some(o) = one.as_mut() {
                o.t.expire(now, EXPIRE_MAX);
            }
        }
        check_set(&mut set.t.nats, &set.t.steer);
    }
    check_restart(&mut set.t, now);
});
