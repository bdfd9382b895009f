//! Tuple-space search: the compiled form of one (group, direction, family)
//! slice of the rules, with a linear scan for small slices.
//!
//! Every rule becomes one or more *entries*: a value and a mask over the
//! packet fields the rules look at (protocol, remote address, and a 17-bit
//! "port field" holding the TCP/UDP destination port or the ICMP type and
//! code). Entries with the same mask (the same *shape*) live in one
//! [`Tuple`], a hash table from the masked key to the lowest rule index with
//! that key. A lookup masks the packet once per tuple and probes its table,
//! so it costs one hash probe per distinct shape, whatever the number of
//! rules. This is the scheme of Open vSwitch's classifier (Srinivasan et al.,
//! "Packet Classification Using Tuple Space Search", SIGCOMM 1999), reduced
//! to the fields and the first-match order security groups need.
//!
//! A probe costs about 5 ns (mask, hash, compare) and testing one rule's
//! predicate (prefix, protocol, port-field range) under 1 ns, and a few
//! dozen rules often spread over nearly as many shapes as rules (a port
//! range alone yields several): so a small table whose predicates are few
//! per tuple is scanned in rule order instead (see
//! [`crate::CompileOptions`]).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};

/// Bit 16 of the port field: set when the packet carries an ICMP type and
/// code. ICMP rules with a type include it in value and mask, so a packet
/// whose ICMP header was not parsed matches only ICMP rules without a type.
pub(crate) const ICMP_PRESENT: u32 = 1 << 16;

/// The largest port-field value (all 17 bits).
pub(crate) const FIELD_MAX: u32 = 0x1_ffff;

/// A masked lookup key. `[u32; 5]` rather than `(u128, u32, u8)` keeps an
/// entry (key + rule index) at 24 bytes with no padding, which is what
/// bounds the memory of large remote-group expansions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key([u32; 5]);

impl Key {
    /// `field` is the 17-bit port field; the protocol goes above it.
    #[inline]
    pub(crate) fn new(proto: u8, remote: u128, field: u32) -> Key {
        Key([
            (remote >> 96) as u32,
            (remote >> 64) as u32,
            (remote >> 32) as u32,
            remote as u32,
            (field & 0x1_ffff) | (u32::from(proto) << 24),
        ])
    }
}

impl Hash for Key {
    #[inline]
    fn hash<H: Hasher>(&self, h: &mut H) {
        let w = &self.0;
        h.write_u128(
            (u128::from(w[0]) << 96)
                | (u128::from(w[1]) << 64)
                | (u128::from(w[2]) << 32)
                | u128::from(w[3]),
        );
        h.write_u32(w[4]);
    }
}

/// Keyed hasher for [`Key`]s: a folded 64x64->128 multiply per word (the
/// construction of foldhash/ahash's fallback) with per-table random keys.
///
/// Why not std's SipHash: a lookup hashes once per tuple, dozens of times
/// per packet, and SipHash-1-3 is several times slower on 24-byte keys.
/// Why this is still safe enough: the keys in the tables come from the
/// tenant's own configuration (prefixes, ports, member addresses), never
/// from packets, and the random keys keep a tenant from computing
/// collisions offline; the worst a tenant could do is slow its own lookups.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyHash {
    k: [u64; 3],
}

impl Default for KeyHash {
    fn default() -> KeyHash {
        let rs = std::collections::hash_map::RandomState::new();
        KeyHash {
            k: [rs.hash_one(1u8), rs.hash_one(2u8), rs.hash_one(3u8)],
        }
    }
}

impl BuildHasher for KeyHash {
    type Hasher = FoldHasher;
    #[inline]
    fn build_hasher(&self) -> FoldHasher {
        FoldHasher { h: 0, k: self.k }
    }
}

#[inline]
fn folded_mul(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

/// See [`KeyHash`].
#[derive(Debug)]
pub(crate) struct FoldHasher {
    h: u64,
    k: [u64; 3],
}

impl Hasher for FoldHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than `Key` is hashed; correct,
        // not fast.
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            for (d, s) in w.iter_mut().zip(chunk) {
                *d = *s;
            }
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    #[inline]
    fn write_u64(&mut self, x: u64) {
        self.h = folded_mul(self.h ^ x ^ self.k[0], self.k[2]);
    }

    #[inline]
    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }

    /// 128 bits in one multiply: each half keyed, multiplied together
    /// (foldhash's way with 16-byte chunks).
    #[inline]
    fn write_u128(&mut self, x: u128) {
        let (lo, hi) = (x as u64, (x >> 64) as u64);
        self.h = folded_mul(lo ^ self.h ^ self.k[0], hi ^ self.k[1]);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // The last multiply's output is mixed in both halves already;
        // a rotate moves well-mixed middle bits to the top 7 bits, which
        // hashbrown uses for its control bytes.
        self.h.rotate_left(26)
    }
}

/// The mask shape of a tuple: which bits of each field its entries fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Shape {
    pub(crate) proto: u8,
    pub(crate) remote: u128,
    pub(crate) field: u32,
}

/// Entries sharing one [`Shape`].
#[derive(Debug)]
pub(crate) struct Tuple {
    shape: Shape,
    /// The lowest rule index in `map`; tuples are probed in this order so
    /// that a lookup can stop early.
    min_rule: u32,
    map: HashMap<Key, u32, KeyHash>,
}

/// One rule (one remote-group member of it) as a predicate, for scanning:
/// `remote & remote_mask == remote`, `proto & proto_mask == proto`,
/// `lo <= field <= hi`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pred {
    remote: u128,
    remote_mask: u128,
    proto: u8,
    proto_mask: u8,
    lo: u32,
    hi: u32,
    rule: u32,
}

impl Pred {
    #[inline]
    fn matches(&self, proto: u8, remote: u128, field: u32) -> bool {
        remote & self.remote_mask == self.remote
            && proto & self.proto_mask == self.proto
            && self.lo <= field
            && field <= self.hi
    }
}

/// How one table is searched.
#[derive(Debug)]
enum Kind {
    /// Predicates in rule order: the first match is the answer.
    Scan(Vec<Pred>),
    /// Tuples sorted by `min_rule`.
    Tuples(Vec<Tuple>),
}

/// The compiled rules of one (group, direction, family).
#[derive(Debug)]
pub(crate) struct Table {
    kind: Kind,
}

impl Default for Table {
    fn default() -> Table {
        Table {
            kind: Kind::Scan(Vec::new()),
        }
    }
}

impl Table {
    /// The lowest rule index matching the packet fields, if any.
    #[inline]
    pub(crate) fn lookup(&self, proto: u8, remote: u128, field: u32) -> Option<u32> {
        match &self.kind {
            Kind::Scan(preds) => preds
                .iter()
                .find(|p| p.matches(proto, remote, field))
                .map(|p| p.rule),
            Kind::Tuples(tuples) => lookup_tuples(tuples, proto, remote, field),
        }
    }

    /// Number of tuples (distinct shapes; 0 for a scanned table).
    pub(crate) fn tuples(&self) -> usize {
        match &self.kind {
            Kind::Scan(_) => 0,
            Kind::Tuples(t) => t.len(),
        }
    }

    /// Number of predicates of a scanned table (0 for tuples).
    pub(crate) fn scanned(&self) -> usize {
        match &self.kind {
            Kind::Scan(p) => p.len(),
            Kind::Tuples(_) => 0,
        }
    }

    /// Number of hash entries over all tuples.
    pub(crate) fn entries(&self) -> usize {
        match &self.kind {
            Kind::Scan(_) => 0,
            Kind::Tuples(t) => t.iter().map(|t| t.map.len()).sum(),
        }
    }
}

/// Probes tuples in increasing `min_rule`; once a match `best` is known, a
/// tuple whose lowest rule is not below `best` cannot improve it, and
/// neither can any later one, so the loop stops. Worst case (no match)
/// every tuple is probed once.
#[inline]
fn lookup_tuples(tuples: &[Tuple], proto: u8, remote: u128, field: u32) -> Option<u32> {
    let mut best: Option<u32> = None;
    for t in tuples {
        if best.is_some_and(|b| b <= t.min_rule) {
            break;
        }
        let s = &t.shape;
        let k = Key::new(proto & s.proto, remote & s.remote, field & s.field);
        if let Some(&r) = t.map.get(&k) {
            best = Some(best.map_or(r, |b| b.min(r)));
        }
    }
    best
}

/// Accumulates a table's rules, then picks scan or tuples.
#[derive(Debug)]
pub(crate) struct TableBuilder {
    /// The predicates while there are at most `scan_max` of them; `None`
    /// once past (the table will be tuples; no point keeping them).
    preds: Option<Vec<Pred>>,
    scan_max: usize,
    scan_per_tuple: usize,
    index: HashMap<Shape, usize>,
    tuples: Vec<Tuple>,
    hash: KeyHash,
}

impl TableBuilder {
    pub(crate) fn new(opts: &crate::CompileOptions) -> TableBuilder {
        TableBuilder {
            preds: Some(Vec::new()),
            scan_max: opts.scan_max,
            scan_per_tuple: opts.scan_per_tuple,
            index: HashMap::new(),
            tuples: Vec::new(),
            hash: KeyHash::default(),
        }
    }

    /// Adds rule `rule` for one remote prefix: protocol `proto` under
    /// `proto_mask`, remote `remote` under `remote_mask`, port field in
    /// `lo..=hi`, which `blocks` (from [`field_blocks`]) splits. Rules must
    /// be added in increasing index order (so the first insert of a key is
    /// the lowest, and predicates are in rule order).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add(
        &mut self,
        rule: u32,
        proto: u8,
        proto_mask: u8,
        remote: u128,
        remote_mask: u128,
        (lo, hi): (u32, u32),
        blocks: &[(u32, u32)],
    ) {
        if let Some(preds) = &mut self.preds {
            if preds.len() < self.scan_max {
                preds.push(Pred {
                    remote: remote & remote_mask,
                    remote_mask,
                    proto: proto & proto_mask,
                    proto_mask,
                    lo,
                    hi,
                    rule,
                });
            } else {
                self.preds = None;
            }
        }
        for &(value, mask) in blocks {
            let shape = Shape {
                proto: proto_mask,
                remote: remote_mask,
                field: mask,
            };
            self.insert(shape, proto, remote, value, rule);
        }
    }

    fn insert(&mut self, shape: Shape, proto: u8, remote: u128, field: u32, rule: u32) {
        let i = *self.index.entry(shape).or_insert_with(|| {
            self.tuples.push(Tuple {
                shape,
                min_rule: rule,
                map: HashMap::with_hasher(self.hash),
            });
            self.tuples.len() - 1
        });
        let Some(t) = self.tuples.get_mut(i) else {
            return;
        };
        let k = Key::new(
            proto & shape.proto,
            remote & shape.remote,
            field & shape.field,
        );
        t.map.entry(k).or_insert(rule);
        t.min_rule = t.min_rule.min(rule);
    }

    pub(crate) fn finish(mut self) -> Table {
        if let Some(preds) = self.preds.take() {
            // The cost model of `CompileOptions`: scan while the predicates
            // cost less than probing every tuple would.
            if preds.len() <= self.scan_per_tuple.saturating_mul(self.tuples.len()) {
                return Table {
                    kind: Kind::Scan(preds),
                };
            }
        }
        self.tuples.sort_by_key(|t| t.min_rule);
        for t in &mut self.tuples {
            t.map.shrink_to_fit();
        }
        Table {
            kind: Kind::Tuples(self.tuples),
        }
    }
}

/// Mask of the top `plen` bits of a `bits`-wide address held in the low
/// bits of a `u128` (IPv4: 32, IPv6: 128).
pub(crate) fn prefix_mask(bits: u8, plen: u8) -> u128 {
    let plen = plen.min(bits);
    let full = if bits >= 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    // `checked_shl` is `None` for a shift of 128 (plen 0): no bits fixed.
    full & full.checked_shl(u32::from(bits - plen)).unwrap_or(0)
}

/// Splits the inclusive range `lo..=hi` of the 17-bit port field into the
/// fewest aligned power-of-two blocks, as `(value, mask)` pairs; appends
/// them to `out`. At most 32 blocks (2 * 17 - 2), at most 30 for a range of
/// 16-bit ports. An inverted range gives none.
pub(crate) fn field_blocks(lo: u32, hi: u32, out: &mut Vec<(u32, u32)>) {
    let (mut lo, hi) = (lo.min(FIELD_MAX), hi.min(FIELD_MAX));
    while lo <= hi {
        // The largest block that starts at `lo` (alignment) ...
        let mut size: u32 = if lo == 0 {
            FIELD_MAX + 1
        } else {
            1 << lo.trailing_zeros()
        };
        // ... and ends by `hi`.
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo, FIELD_MAX & !(size - 1)));
        lo += size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(lo: u16, hi: u16) -> Vec<(u32, u32)> {
        let mut v = Vec::new();
        field_blocks(u32::from(lo), u32::from(hi), &mut v);
        v
    }

    #[test]
    fn port_blocks_cover_exactly() {
        let cases = [
            (0, 65535),
            (0, 0),
            (65535, 65535),
            (1, 65535),
            (0, 65534),
            (1, 65534),
            (80, 80),
            (1024, 2047),
            (1000, 2000),
            (8000, 8100),
            (3, 5),
        ];
        for (lo, hi) in cases {
            let b = blocks(lo, hi);
            assert!(b.len() <= 30, "{lo}-{hi}: {} blocks", b.len());
            for p in 0..=u16::MAX {
                let p = u32::from(p);
                let n = b.iter().filter(|(v, m)| p & m == *v).count();
                let inside = u32::from(lo) <= p && p <= u32::from(hi);
                assert_eq!(n, usize::from(inside), "{lo}-{hi} port {p}: {b:?}");
            }
        }
        assert_eq!(blocks(0, 65535), vec![(0, 0x1_0000)]);
        assert_eq!(blocks(80, 80), vec![(80, 0x1_ffff)]);
        assert_eq!(blocks(1, 65534).len(), 30);
        assert!(blocks(5, 4).is_empty());
        let mut v = Vec::new();
        field_blocks(0, FIELD_MAX, &mut v);
        assert_eq!(v, vec![(0, 0)]);
        v.clear();
        field_blocks(ICMP_PRESENT | 0x0800, ICMP_PRESENT | 0x08ff, &mut v);
        assert_eq!(v, vec![(ICMP_PRESENT | 0x0800, 0x1_ff00)]);
        v.clear();
        field_blocks(1, FIELD_MAX - 1, &mut v);
        assert_eq!(v.len(), 32);
    }

    #[test]
    fn prefix_masks() {
        assert_eq!(prefix_mask(32, 0), 0);
        assert_eq!(prefix_mask(32, 32), 0xffff_ffff);
        assert_eq!(prefix_mask(32, 24), 0xffff_ff00);
        assert_eq!(prefix_mask(32, 99), 0xffff_ffff);
        assert_eq!(prefix_mask(128, 0), 0);
        assert_eq!(prefix_mask(128, 128), u128::MAX);
        assert_eq!(prefix_mask(128, 1), 1 << 127);
    }

    #[test]
    fn hasher_spreads_v4_keys() {
        // Sequential host addresses (a remote group's members) must not
        // pile up in a few buckets: look at the low 10 bits.
        let h = KeyHash::default();
        let mut seen = std::collections::HashSet::new();
        for a in 0u32..1024 {
            seen.insert(h.hash_one(Key::new(6, u128::from(0x0a00_0000 | a), 80)) & 1023);
        }
        assert!(seen.len() > 550, "{}", seen.len());
    }
}
