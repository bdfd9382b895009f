//! External ports: endpoint-independent mappings (EIM) and one bitmap of
//! used ports per (external address, protocol).
//!
//! A mapping `(zone, inside address, inside port, protocol, external
//! address) -> external port` exists while at least one conntrack entry
//! uses it (`refs`); its port is marked used in the pool of `(external
//! address, protocol)` for exactly that long. The external address is part
//! of the key so that a rule change (an inside host gets a floating IP)
//! gives new connections a new mapping while old connections keep theirs.
//!
//! Pools exist only while they hold a used port: 16 KiB each (used and
//! reserved bitmaps), so their number is bounded by the number of
//! mappings, which is bounded by the conntrack table.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use conntrack::ConnKey;
use packet::flow::proto;
use serde::{Deserialize, Serialize};

use crate::MappingKind;

/// 65536 ports in 64-bit words.
const WORDS: usize = 1024;

/// Candidates a caller's check may reject (their reply key is taken in
/// conntrack by a connection the bitmap does not know: an inbound one, a
/// hairpin, an entry restored under other rules) before allocation gives
/// up: bounds the hash lookups one new connection costs.
pub const MAX_REJECTED: usize = 64;

/// Key of an endpoint-independent mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct EimKey {
    pub(crate) zone: u32,
    pub(crate) inside: Ipv4Addr,
    pub(crate) port: u16,
    pub(crate) proto: u8,
    pub(crate) external: Ipv4Addr,
}

#[derive(Debug, Clone, Copy)]
struct Eim {
    port: u16,
    refs: u32,
}

#[derive(Debug)]
struct Pool {
    used: Vec<u64>,
    reserved: Vec<u64>,
    /// The ports of every word this pool may hand out ([`Share::mask`]).
    own: u64,
    /// Next-fit: the search for a fresh port starts here, so a port just
    /// released is the last to be handed out again (a late packet of the
    /// old connection is less likely to reach a new one).
    cursor: u16,
    n_used: u32,
}

fn bit(words: &[u64], p: u16) -> bool {
    words
        .get(usize::from(p) / 64)
        .is_some_and(|w| w & (1 << (p % 64)) != 0)
}

fn set_bit(words: &mut [u64], p: u16, on: bool) {
    if let Some(w) = words.get_mut(usize::from(p) / 64) {
        if on {
            *w |= 1 << (p % 64);
        } else {
            *w &= !(1 << (p % 64));
        }
    }
}

impl Pool {
    fn new(reserved: &[u16], share: Share) -> Pool {
        let mut p = Pool {
            used: vec![0; WORDS],
            reserved: vec![0; WORDS],
            own: share.mask(),
            cursor: 0,
            n_used: 0,
        };
        p.set_reserved(reserved);
        p
    }

    fn set_reserved(&mut self, ports: &[u16]) {
        self.reserved.iter_mut().for_each(|w| *w = 0);
        for &p in ports {
            set_bit(&mut self.reserved, p, true);
        }
    }

    fn is_free(&self, p: u16) -> bool {
        !bit(&self.used, p) && !bit(&self.reserved, p) && self.own & (1 << (p % 64)) != 0
    }

    fn mark(&mut self, p: u16, on: bool) {
        if bit(&self.used, p) != on {
            set_bit(&mut self.used, p, on);
            if on {
                self.n_used += 1;
            } else {
                self.n_used = self.n_used.saturating_sub(1);
            }
        }
    }

    /// Free ports of `lo..=hi` in next-fit order from `start` (wrapping),
    /// each at most once; at most `WORDS + 2` words are read in all.
    fn free_from(&self, lo: u16, hi: u16, start: u16) -> FreePorts<'_> {
        let start = if (lo..=hi).contains(&start) {
            start
        } else {
            lo
        };
        FreePorts {
            pool: self,
            segs: [
                (u32::from(start), u32::from(hi)),
                (u32::from(lo), u32::from(start).saturating_sub(1)),
            ],
            seg: 0,
            pos: u32::from(start),
        }
    }

    /// Free ports in `lo..=hi` (for display).
    fn free_in(&self, lo: u16, hi: u16) -> u32 {
        (u32::from(lo)..=u32::from(hi))
            .filter(|&p| u16::try_from(p).is_ok_and(|p| self.is_free(p)))
            .count() as u32
    }
}

#[derive(Debug)]
struct FreePorts<'a> {
    pool: &'a Pool,
    /// Inclusive segments to walk: `start..=hi`, then `lo..=start-1`.
    segs: [(u32, u32); 2],
    seg: usize,
    pos: u32,
}

impl Iterator for FreePorts<'_> {
    type Item = u16;

    fn next(&mut self) -> Option<u16> {
        loop {
            let &(first, end) = self.segs.get(self.seg)?;
            if self.seg == 1 && self.pos < first {
                self.pos = first;
            }
            // The second segment is empty when start == lo.
            if self.pos > end || (self.seg == 1 && self.segs[0].0 == first) {
                self.seg += 1;
                self.pos = self.segs.get(self.seg).map_or(0, |s| s.0);
                continue;
            }
            let w = (self.pos / 64) as usize;
            let used = self.pool.used.get(w).copied().unwrap_or(u64::MAX);
            let res = self.pool.reserved.get(w).copied().unwrap_or(u64::MAX);
            let mut free = !(used | res) & self.pool.own;
            // Only bits from pos to the segment's end within this word.
            free &= u64::MAX << (self.pos % 64);
            let word_end = (w as u32) * 64 + 63;
            if end < word_end {
                free &= u64::MAX >> (word_end - end);
            }
            if free != 0 {
                let p = (w as u32) * 64 + free.trailing_zeros();
                self.pos = p + 1;
                return u16::try_from(p).ok();
            }
            self.pos = word_end + 1;
        }
    }
}

/// Which external ports one NAT of a striped set may hand out: `p` with
/// `p % count == index`, so a packet arriving from outside finds the
/// stripe that holds its connection from its destination port alone.
/// `count` is a power of two up to 64, so the ports a stripe owns are the
/// same bits of every 64-port bitmap word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    index: u8,
    count: u8,
}

impl Default for Share {
    fn default() -> Self {
        Share::WHOLE
    }
}

impl Share {
    /// Every port: an unstriped NAT.
    pub const WHOLE: Share = Share { index: 0, count: 1 };

    /// Share `index` of `count`; `None` unless `count` is a power of two
    /// up to 64 and `index < count`.
    pub fn new(index: usize, count: usize) -> Option<Share> {
        (count.is_power_of_two() && count <= 64 && index < count).then_some(Share {
            index: index as u8,
            count: count as u8,
        })
    }

    /// The stripe's index.
    pub fn index(self) -> usize {
        usize::from(self.index)
    }

    /// Number of stripes.
    pub fn count(self) -> usize {
        usize::from(self.count)
    }

    /// Whether port `p` is this share's.
    pub fn owns(self, p: u16) -> bool {
        usize::from(p) % self.count() == self.index()
    }

    /// The bits of a 64-port word this share owns.
    fn mask(self) -> u64 {
        (0..64u16)
            .filter(|&b| self.owns(b))
            .fold(0, |m, b| m | 1 << b)
    }
}

/// Every mapping and pool.
#[derive(Debug, Default)]
pub(crate) struct Ports {
    eim: HashMap<EimKey, Eim>,
    pools: HashMap<(Ipv4Addr, u8), Pool>,
    /// Port-forward external ports per (address, protocol): never
    /// allocated.
    reserved: HashMap<(Ipv4Addr, u8), Vec<u16>>,
    /// The ports this NAT may hand out.
    share: Share,
}

/// How to pick a fresh port.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Want {
    /// The range to allocate from.
    pub(crate) range: (u16, u16),
    /// Keep the inside port even outside `range` (a floating IP belongs
    /// to one inside host: any port of it is this host's to keep).
    pub(crate) preserve_any: bool,
}

impl Ports {
    pub(crate) fn new(reserved: HashMap<(Ipv4Addr, u8), Vec<u16>>, share: Share) -> Ports {
        Ports {
            reserved,
            share,
            ..Ports::default()
        }
    }

    /// Replaces the reserved ports (rules changed); mappings stay.
    pub(crate) fn set_reserved(&mut self, reserved: HashMap<(Ipv4Addr, u8), Vec<u16>>) {
        for (k, pool) in &mut self.pools {
            pool.set_reserved(reserved.get(k).map_or(&[][..], Vec::as_slice));
        }
        self.reserved = reserved;
    }

    /// The port of an existing mapping.
    pub(crate) fn existing(&self, k: &EimKey) -> Option<u16> {
        self.eim.get(k).map(|e| e.port)
    }

    /// One more connection uses an existing mapping.
    pub(crate) fn acquire(&mut self, k: &EimKey) {
        if let Some(e) = self.eim.get_mut(k) {
            e.refs = e.refs.saturating_add(1);
        }
    }

    /// A new mapping for `k`: the inside port if it is free (and in the
    /// range, unless `preserve_any`), else the next free port of the range
    /// after the pool's cursor. `ok` vetoes a candidate (its connection
    /// would collide in conntrack); after [`MAX_REJECTED`] vetoes, or when
    /// the range is full, `None`.
    pub(crate) fn allocate(
        &mut self,
        k: EimKey,
        want: Want,
        mut ok: impl FnMut(u16) -> bool,
    ) -> Option<u16> {
        let pk = (k.external, k.proto);
        let reserved = self.reserved.get(&pk).map_or(&[][..], Vec::as_slice);
        let share = self.share;
        let pool = self
            .pools
            .entry(pk)
            .or_insert_with(|| Pool::new(reserved, share));
        let (lo, hi) = want.range;
        let preserve = (want.preserve_any || (lo..=hi).contains(&k.port)) && pool.is_free(k.port);
        let mut vetoes = 0;
        let mut chosen = None;
        if preserve {
            if ok(k.port) {
                chosen = Some(k.port);
            } else {
                vetoes += 1;
            }
        }
        if chosen.is_none() && lo <= hi {
            for p in pool.free_from(lo, hi, pool.cursor) {
                if vetoes >= MAX_REJECTED {
                    break;
                }
                if ok(p) {
                    chosen = Some(p);
                    pool.cursor = if p >= hi { lo } else { p + 1 };
                    break;
                }
                vetoes += 1;
            }
        }
        let Some(p) = chosen else {
            if pool.n_used == 0 {
                self.pools.remove(&pk);
            }
            return None;
        };
        pool.mark(p, true);
        self.eim.insert(k, Eim { port: p, refs: 1 });
        Some(p)
    }

    /// One connection of mapping `k` (external port `port`) went; the
    /// mapping and its port go with the last one (then true). A release
    /// that matches no mapping (an entry restored without one) changes
    /// nothing.
    pub(crate) fn release(&mut self, k: &EimKey, port: u16) -> bool {
        let Some(e) = self.eim.get_mut(k) else {
            return false;
        };
        if e.port != port {
            return false;
        }
        e.refs = e.refs.saturating_sub(1);
        if e.refs > 0 {
            return false;
        }
        self.eim.remove(k);
        let pk = (k.external, k.proto);
        if let Some(pool) = self.pools.get_mut(&pk) {
            pool.mark(port, false);
            if pool.n_used == 0 {
                self.pools.remove(&pk);
            }
        }
        true
    }

    /// Counts a restored connection of mapping `k` on `port`; false when
    /// that contradicts what is registered (the mapping has another port,
    /// or the port belongs to another mapping).
    pub(crate) fn register(&mut self, k: EimKey, port: u16) -> bool {
        if let Some(e) = self.eim.get_mut(&k) {
            if e.port != port {
                return false;
            }
            e.refs = e.refs.saturating_add(1);
            return true;
        }
        let pk = (k.external, k.proto);
        let reserved = self.reserved.get(&pk).map_or(&[][..], Vec::as_slice);
        let share = self.share;
        let pool = self
            .pools
            .entry(pk)
            .or_insert_with(|| Pool::new(reserved, share));
        if bit(&pool.used, port) {
            return false;
        }
        // A reserved port is accepted: the connection predates the
        // forward (or the rules changed across the restart) and keeps it
        // until it ends, as across set_rules.
        pool.mark(port, true);
        self.eim.insert(k, Eim { port, refs: 1 });
        true
    }

    /// Every mapping, sorted.
    pub(crate) fn mappings(&self) -> Vec<MappingView> {
        let mut v: Vec<(EimKey, MappingView)> = self
            .eim
            .iter()
            .map(|(k, e)| {
                (
                    *k,
                    MappingView {
                        zone: k.zone,
                        proto: k.proto,
                        inside: SocketAddrV4::new(k.inside, k.port),
                        external: SocketAddrV4::new(k.external, e.port),
                        connections: e.refs,
                    },
                )
            })
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v.into_iter().map(|(_, m)| m).collect()
    }

    /// A pool's occupancy (an empty one when it holds nothing). `ports`
    /// and `reserved` count the whole range; `used` and `free` this
    /// NAT's share of it, so a striped set's views add up.
    pub(crate) fn pool_view(&self, external: Ipv4Addr, proto: u8, range: (u16, u16)) -> PoolView {
        let (lo, hi) = range;
        let in_range = if lo <= hi {
            u32::from(hi) - u32::from(lo) + 1
        } else {
            0
        };
        let reserved = self.reserved.get(&(external, proto)).map_or(0, |r| {
            r.iter().filter(|p| (lo..=hi).contains(*p)).count() as u32
        });
        let (used, free) = match self.pools.get(&(external, proto)) {
            Some(p) => (p.n_used, if lo <= hi { p.free_in(lo, hi) } else { 0 }),
            None if self.share == Share::WHOLE => (0, in_range.saturating_sub(reserved)),
            None => {
                let res = self.reserved.get(&(external, proto));
                let taken = |p: u16| res.is_some_and(|r| r.contains(&p));
                let own = (lo..=hi).filter(|&p| self.share.owns(p) && !taken(p));
                (0, own.count() as u32)
            }
        };
        PoolView {
            external,
            proto,
            range,
            ports: in_range,
            used,
            reserved,
            free,
        }
    }

    /// Addresses and protocols with a pool.
    pub(crate) fn pool_keys(&self) -> impl Iterator<Item = (Ipv4Addr, u8)> + '_ {
        self.pools.keys().copied()
    }
}

/// One endpoint-independent mapping, for display (`vswitchctl nat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingView {
    /// Tenant zone of the inside endpoint.
    pub zone: u32,
    /// IP protocol (6 TCP, 17 UDP, 1 ICMP: the "port" is the query
    /// identifier).
    pub proto: u8,
    /// Inside address and port.
    pub inside: SocketAddrV4,
    /// External address and port it leaves with, for every destination.
    pub external: SocketAddrV4,
    /// Tracked connections using it (it goes with the last one).
    pub connections: u32,
}

/// One external address's ports for one protocol, for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolView {
    /// External address (SNAT address or floating IP).
    pub external: Ipv4Addr,
    /// IP protocol (6, 17, or 1 for ICMP query identifiers).
    pub proto: u8,
    /// The allocation range ([`crate::Rules::ports`]).
    pub range: (u16, u16),
    /// Ports in the range.
    pub ports: u32,
    /// Ports held by mappings (including preserved ports outside the
    /// range).
    pub used: u32,
    /// Port-forward ports in the range (never allocated).
    pub reserved: u32,
    /// Ports of the range neither used nor reserved.
    pub free: u32,
}

/// The mapping an entry holds, derived from its keys (so that a snapshot
/// cannot make the two disagree): only outbound kinds with ports or
/// identifiers hold one. The external port is where the reply key carries
/// it: the destination port, or for ICMP queries the identifier (the
/// source port field).
pub(crate) fn eim_of(orig: &ConnKey, reply: &ConnKey, kind: MappingKind) -> Option<(EimKey, u16)> {
    if !matches!(kind, MappingKind::Snat | MappingKind::FloatingOut) {
        return None;
    }
    let (IpAddr::V4(inside), IpAddr::V4(external)) = (orig.src, reply.dst) else {
        return None;
    };
    let port = if orig.is_icmp() {
        reply.src_port
    } else if matches!(orig.proto, proto::TCP | proto::UDP) {
        reply.dst_port
    } else {
        return None;
    };
    Some((
        EimKey {
            zone: orig.zone,
            inside,
            port: orig.src_port,
            proto: orig.proto,
            external,
        },
        port,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> EimKey {
        EimKey {
            zone: 7,
            inside: Ipv4Addr::new(10, 0, 0, 1),
            port,
            proto: 17,
            external: Ipv4Addr::new(203, 0, 113, 2),
        }
    }

    #[test]
    fn free_ports_walk_next_fit_once() {
        let mut p = Pool::new(&[5], Share::WHOLE);
        p.mark(3, true);
        let v: Vec<u16> = p.free_from(1, 8, 4).collect();
        assert_eq!(v, vec![4, 6, 7, 8, 1, 2]);
        let v: Vec<u16> = p.free_from(1, 8, 1).collect();
        assert_eq!(v, vec![1, 2, 4, 6, 7, 8]);
        // Across words and up to 65535.
        let v: Vec<u16> = p.free_from(60, 65535, 65534).take(4).collect();
        assert_eq!(v, vec![65534, 65535, 60, 61]);
        let all = p.free_from(1, 65535, 30000).count();
        assert_eq!(all, 65535 - 2);
        // A start outside the range starts at lo.
        assert_eq!(p.free_from(10, 12, 3).collect::<Vec<_>>(), vec![10, 11, 12]);
    }

    #[test]
    fn allocate_preserve_next_fit_release() {
        let mut ports = Ports::default();
        let want = Want {
            range: (100, 103),
            preserve_any: false,
        };
        assert_eq!(ports.allocate(key(101), want, |_| true), Some(101));
        // Outside the range: next fit from the cursor (100).
        assert_eq!(ports.allocate(key(5), want, |_| true), Some(100));
        // A veto skips the candidate.
        assert_eq!(ports.allocate(key(6), want, |p| p != 102), Some(103));
        assert_eq!(ports.allocate(key(7), want, |_| true), Some(102));
        assert_eq!(ports.allocate(key(8), want, |_| true), None);
        assert_eq!(ports.existing(&key(5)), Some(100));
        ports.acquire(&key(5));
        ports.release(&key(5), 100);
        assert_eq!(ports.existing(&key(5)), Some(100));
        ports.release(&key(5), 999); // not its port: ignored
        ports.release(&key(5), 100);
        assert_eq!(ports.existing(&key(5)), None);
        assert_eq!(ports.allocate(key(8), want, |_| true), Some(100));
        for k in [101, 8, 6, 7] {
            let p = ports.existing(&key(k)).expect("mapped");
            ports.release(&key(k), p);
        }
        assert!(ports.pools.is_empty() && ports.eim.is_empty());
        // preserve_any keeps a port outside the range.
        let any = Want {
            range: (100, 103),
            preserve_any: true,
        };
        assert_eq!(ports.allocate(key(53), any, |_| true), Some(53));
    }

    #[test]
    fn reserved_ports_are_never_allocated_and_vetoes_are_bounded() {
        let ext = Ipv4Addr::new(203, 0, 113, 2);
        let mut r = HashMap::new();
        r.insert((ext, 17), vec![100, 101]);
        let mut ports = Ports::new(r, Share::WHOLE);
        let want = Want {
            range: (100, 102),
            preserve_any: false,
        };
        assert_eq!(ports.allocate(key(100), want, |_| true), Some(102));
        assert_eq!(ports.allocate(key(9), want, |_| true), None);
        // Bounded vetoes on a big range.
        let big = Want {
            range: (1, 65535),
            preserve_any: false,
        };
        let mut asked = 0;
        assert_eq!(
            ports.allocate(key(9), big, |_| {
                asked += 1;
                false
            }),
            None
        );
        assert_eq!(asked, MAX_REJECTED);
        // register() refuses contradictions.
        assert!(!ports.register(key(100), 5));
        assert!(ports.register(key(100), 102));
        assert!(!ports.register(key(50), 102));
        assert!(ports.register(key(50), 101)); // reserved, but restored
    }

    #[test]
    fn a_share_hands_out_only_its_ports() {
        assert_eq!(Share::new(3, 6), None);
        assert_eq!(Share::new(4, 4), None);
        let share = Share::new(1, 4).expect("share");
        assert_eq!(share.mask(), 0x2222_2222_2222_2222);
        let mut ports = Ports::new(HashMap::new(), share);
        let want = Want {
            range: (100, 120),
            preserve_any: false,
        };
        // 105 is the share's (105 % 4 == 1): kept; 106 is not: the next
        // free one of the share after the cursor instead.
        assert_eq!(ports.allocate(key(105), want, |_| true), Some(105));
        assert_eq!(ports.allocate(key(106), want, |_| true), Some(101));
        let got: Vec<u16> = (0..4)
            .filter_map(|i| ports.allocate(key(200 + i), want, |_| true))
            .collect();
        assert_eq!(got, vec![109, 113, 117]);
        let v = ports.pool_view(key(0).external, 17, want.range);
        assert_eq!((v.ports, v.used, v.free), (21, 5, 0));
        // A share with no pool yet counts its own ports only.
        let empty = Ports::new(HashMap::new(), Share::new(0, 4).expect("share"));
        let v = empty.pool_view(key(0).external, 17, want.range);
        assert_eq!((v.ports, v.used, v.free), (21, 0, 6));
    }
}
