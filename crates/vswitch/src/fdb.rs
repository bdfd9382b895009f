//! The forwarding database (MAC table) of one bridge domain.
//!
//! Pure logic: no locks, no clock. The data path holds it behind a
//! read-write lock and calls [`Fdb::check_src`] and [`Fdb::lookup`] under the
//! read side for every frame; only a new or moved MAC takes the write side
//! ([`Fdb::learn`]). Refreshing a known MAC's last-seen time is an atomic store
//! under the read lock, so steady traffic never writes the table.
//!
//! Bounds: at most `cap` entries. When a new MAC arrives at a full table the
//! port holding the most learned entries loses its oldest learned entry
//! (insertion order), so one port flooding random source MACs evicts mostly
//! its own entries and cannot push out everybody else's. Static entries (the
//! MACs configured on ports) are never evicted, aged or moved by traffic.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use packet::MacAddr;

use crate::clock::Timestamp;

/// Index of a port in the switch.
pub type PortId = u32;

/// Re-stamping a MAC's last-seen time more often than this is wasted
/// cache-line traffic; aging works in whole seconds.
const REFRESH_GRANULARITY_NS: u64 = 1_000_000_000;

/// How an entry got into the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// From the config: the port's own MAC.
    Static,
    /// Learned from a frame's source address.
    Dynamic,
}

#[derive(Debug)]
struct Entry {
    port: PortId,
    kind: EntryKind,
    last_seen: AtomicU64,
    /// Identifies this incarnation in the port's insertion-order queue.
    seq: u64,
}

#[derive(Debug, Default)]
struct PortBucket {
    /// Learned MACs in insertion order; may hold stale pairs whose entry was
    /// since removed or re-learned (skipped by `seq`).
    order: VecDeque<(MacAddr, u64)>,
    /// Live learned entries of this port.
    live: usize,
}

/// Counters of table events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FdbStats {
    /// New MACs learned.
    pub learned: u64,
    /// Learned MACs that moved to another port.
    pub moved: u64,
    /// Learned MACs removed by aging.
    pub aged: u64,
    /// Learned MACs removed to make room (fair eviction).
    pub evicted: u64,
    /// Frames from a port claiming another port's configured MAC.
    pub hijack_refused: u64,
    /// New MACs not learned because the table held only static entries.
    pub table_full: u64,
}

/// What the read-only source check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SrcCheck {
    /// Already known on this port (last-seen refreshed).
    Known,
    /// New or moving: call [`Fdb::learn`] under the write lock.
    NeedsLearn,
    /// The MAC is configured on another port.
    Hijack,
}

/// What [`Fdb::learn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// A new entry.
    New,
    /// A new entry, after evicting a learned entry of `victim_port`.
    NewAfterEviction {
        /// Whose entry went.
        victim_port: PortId,
    },
    /// Already there (another thread learned it first).
    Refreshed,
    /// Moved from another port.
    Moved {
        /// Where it was.
        from: PortId,
    },
    /// Refused: it is another port's configured MAC.
    HijackRefused,
    /// Refused: the table holds only static entries.
    TableFull,
}

/// One row for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryView {
    /// The MAC.
    pub mac: MacAddr,
    /// Where it lives.
    pub port: PortId,
    /// Static or learned.
    pub kind: EntryKind,
    /// Time since last seen (zero for static entries).
    pub age: Duration,
}

/// The MAC table of one network.
#[derive(Debug)]
pub struct Fdb {
    map: HashMap<MacAddr, Entry>,
    buckets: HashMap<PortId, PortBucket>,
    cap: usize,
    aging_ns: u64,
    next_seq: u64,
    stats: FdbStats,
}

impl Fdb {
    /// An empty table holding at most `cap` entries; learned entries unseen
    /// for `aging` are removed by [`Fdb::expire`].
    pub fn new(cap: usize, aging: Duration) -> Fdb {
        Fdb {
            map: HashMap::with_capacity(cap.min(16_384)),
            buckets: HashMap::new(),
            cap: cap.max(1),
            aging_ns: u64::try_from(aging.as_nanos()).unwrap_or(u64::MAX),
            next_seq: 0,
            stats: FdbStats::default(),
        }
    }

    /// Changes the limits (reload). Shrinking the cap evicts fairly until the
    /// table fits.
    pub fn set_limits(&mut self, cap: usize, aging: Duration) {
        self.cap = cap.max(1);
        self.aging_ns = u64::try_from(aging.as_nanos()).unwrap_or(u64::MAX);
        while self.map.len() > self.cap {
            if self.evict_one().is_none() {
                break;
            }
        }
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Entries in the table.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Event counters.
    pub fn stats(&self) -> FdbStats {
        self.stats
    }

    /// Where `mac` lives, if known.
    #[inline]
    pub fn lookup(&self, mac: &MacAddr) -> Option<PortId> {
        self.map.get(mac).map(|e| e.port)
    }

    /// Read-only check of a frame's source MAC arriving on `port`.
    #[inline]
    pub fn check_src(&self, mac: &MacAddr, port: PortId, now: Timestamp) -> SrcCheck {
        match self.map.get(mac) {
            Some(e) if e.port == port => {
                if e.kind == EntryKind::Dynamic {
                    let last = e.last_seen.load(Ordering::Relaxed);
                    if now.0.saturating_sub(last) >= REFRESH_GRANULARITY_NS {
                        e.last_seen.store(now.0, Ordering::Relaxed);
                    }
                }
                SrcCheck::Known
            }
            Some(e) if e.kind == EntryKind::Static => SrcCheck::Hijack,
            _ => SrcCheck::NeedsLearn,
        }
    }

    /// Counts a hijack attempt seen by [`Fdb::check_src`] (write lock).
    pub fn count_hijack(&mut self) {
        self.stats.hijack_refused += 1;
    }

    /// Learns `mac` on `port`.
    pub fn learn(&mut self, mac: MacAddr, port: PortId, now: Timestamp) -> Learned {
        if let Some(e) = self.map.get_mut(&mac) {
            if e.port == port {
                e.last_seen.store(now.0, Ordering::Relaxed);
                return Learned::Refreshed;
            }
            if e.kind == EntryKind::Static {
                self.stats.hijack_refused += 1;
                return Learned::HijackRefused;
            }
            let from = e.port;
            self.remove(&mac);
            self.insert_dynamic(mac, port, now);
            self.stats.moved += 1;
            return Learned::Moved { from };
        }
        let mut outcome = Learned::New;
        if self.map.len() >= self.cap {
            match self.evict_one() {
                Some(victim_port) => outcome = Learned::NewAfterEviction { victim_port },
                None => {
                    self.stats.table_full += 1;
                    return Learned::TableFull;
                }
            }
        }
        self.insert_dynamic(mac, port, now);
        self.stats.learned += 1;
        outcome
    }

    /// Adds (or replaces with) a configured MAC of `port`, evicting a learned
    /// entry if the table is full. Static entries alone may exceed the cap
    /// (the config bounds them; validation keeps them below it).
    pub fn add_static(&mut self, mac: MacAddr, port: PortId) {
        self.remove(&mac);
        self.next_seq += 1;
        self.map.insert(
            mac,
            Entry {
                port,
                kind: EntryKind::Static,
                last_seen: AtomicU64::new(0),
                seq: self.next_seq,
            },
        );
        while self.map.len() > self.cap && self.evict_one().is_some() {}
    }

    /// Removes the configured entry of `mac` if it points at `port`; true if
    /// it did.
    pub fn remove_static(&mut self, mac: &MacAddr, port: PortId) -> bool {
        let hit = self
            .map
            .get(mac)
            .is_some_and(|e| e.kind == EntryKind::Static && e.port == port);
        if hit {
            self.remove(mac);
        }
        hit
    }

    /// Removes every entry, static or learned, that points at `port`.
    pub fn flush_port(&mut self, port: PortId) -> usize {
        let before = self.map.len();
        self.map.retain(|_, e| e.port != port);
        self.buckets.remove(&port);
        before - self.map.len()
    }

    /// Removes learned entries unseen for the aging time. Scans the table:
    /// called from the control plane about once a second, never per packet.
    pub fn expire(&mut self, now: Timestamp) -> usize {
        let aging = self.aging_ns;
        let mut gone = Vec::new();
        for (mac, e) in &self.map {
            if e.kind == EntryKind::Dynamic
                && now.0.saturating_sub(e.last_seen.load(Ordering::Relaxed)) >= aging
            {
                gone.push(*mac);
            }
        }
        for mac in &gone {
            self.remove(mac);
        }
        self.stats.aged += gone.len() as u64;
        gone.len()
    }

    /// All entries, for display.
    pub fn entries(&self, now: Timestamp) -> Vec<EntryView> {
        let mut v: Vec<EntryView> = self
            .map
            .iter()
            .map(|(mac, e)| EntryView {
                mac: *mac,
                port: e.port,
                kind: e.kind,
                age: match e.kind {
                    EntryKind::Static => Duration::ZERO,
                    EntryKind::Dynamic => now.since(Timestamp(e.last_seen.load(Ordering::Relaxed))),
                },
            })
            .collect();
        v.sort_by_key(|e| (e.port, e.mac));
        v
    }

    /// Learned entries held by `port`.
    pub fn learned_on(&self, port: PortId) -> usize {
        self.buckets.get(&port).map_or(0, |b| b.live)
    }

    fn insert_dynamic(&mut self, mac: MacAddr, port: PortId, now: Timestamp) {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.map.insert(
            mac,
            Entry {
                port,
                kind: EntryKind::Dynamic,
                last_seen: AtomicU64::new(now.0),
                seq,
            },
        );
        let b = self.buckets.entry(port).or_default();
        b.order.push_back((mac, seq));
        b.live += 1;
        // Stale pairs pile up when MACs move or age; keep the queue bounded.
        if b.order.len() > 2 * b.live + 64 {
            let map = &self.map;
            b.order
                .retain(|(m, s)| map.get(m).is_some_and(|e| e.seq == *s && e.port == port));
        }
    }

    /// Removes `mac`, keeping per-port counts right.
    fn remove(&mut self, mac: &MacAddr) {
        if let Some(e) = self.map.remove(mac) {
            if e.kind == EntryKind::Dynamic {
                if let Some(b) = self.buckets.get_mut(&e.port) {
                    b.live = b.live.saturating_sub(1);
                    if b.live == 0 {
                        self.buckets.remove(&e.port);
                    }
                }
            }
        }
    }

    /// Evicts the oldest learned entry of the port with the most learned
    /// entries; returns that port, or `None` if nothing is evictable.
    fn evict_one(&mut self) -> Option<PortId> {
        let victim_port = self
            .buckets
            .iter()
            .filter(|(_, b)| b.live > 0)
            .max_by_key(|(p, b)| (b.live, std::cmp::Reverse(**p)))
            .map(|(p, _)| *p)?;
        loop {
            let (mac, seq) = self.buckets.get_mut(&victim_port)?.order.pop_front()?;
            let current = self.map.get(&mac).is_some_and(|e| {
                e.seq == seq && e.port == victim_port && e.kind == EntryKind::Dynamic
            });
            if current {
                self.remove(&mac);
                self.stats.evicted += 1;
                return Some(victim_port);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mac(n: u32) -> MacAddr {
        let b = n.to_be_bytes();
        MacAddr([0x02, 0xaa, b[0], b[1], b[2], b[3]])
    }

    const SEC: Duration = Duration::from_secs(1);

    fn t(secs: u64) -> Timestamp {
        Timestamp::ZERO + SEC * secs as u32
    }

    #[test]
    fn learn_lookup_move() {
        let mut f = Fdb::new(16, SEC * 300);
        assert_eq!(f.check_src(&mac(1), 1, t(0)), SrcCheck::NeedsLearn);
        assert_eq!(f.learn(mac(1), 1, t(0)), Learned::New);
        assert_eq!(f.lookup(&mac(1)), Some(1));
        assert_eq!(f.check_src(&mac(1), 1, t(1)), SrcCheck::Known);
        assert_eq!(f.check_src(&mac(1), 2, t(1)), SrcCheck::NeedsLearn);
        assert_eq!(f.learn(mac(1), 2, t(1)), Learned::Moved { from: 1 });
        assert_eq!(f.lookup(&mac(1)), Some(2));
        assert_eq!(f.learned_on(1), 0);
        assert_eq!(f.learned_on(2), 1);
        assert_eq!(f.stats().moved, 1);
    }

    #[test]
    fn static_mac_cannot_be_hijacked() {
        let mut f = Fdb::new(16, SEC * 300);
        f.add_static(mac(7), 1);
        assert_eq!(f.check_src(&mac(7), 2, t(0)), SrcCheck::Hijack);
        assert_eq!(f.learn(mac(7), 2, t(0)), Learned::HijackRefused);
        assert_eq!(f.lookup(&mac(7)), Some(1));
        assert_eq!(f.stats().hijack_refused, 1);
        // Static entries never age.
        assert_eq!(f.expire(t(100_000)), 0);
        assert_eq!(f.lookup(&mac(7)), Some(1));
    }

    #[test]
    fn aging_with_test_clock() {
        let mut f = Fdb::new(16, SEC * 300);
        f.learn(mac(1), 1, t(0));
        f.learn(mac(2), 1, t(0));
        // mac(2) keeps talking; refreshes are granular to a second.
        assert_eq!(f.check_src(&mac(2), 1, t(200)), SrcCheck::Known);
        assert_eq!(f.expire(t(299)), 0);
        assert_eq!(f.expire(t(300)), 1);
        assert_eq!(f.lookup(&mac(1)), None);
        assert_eq!(f.lookup(&mac(2)), Some(1));
        assert_eq!(f.expire(t(499)), 0);
        assert_eq!(f.expire(t(500)), 1);
        assert!(f.is_empty());
        assert_eq!(f.stats().aged, 2);
        assert_eq!(f.learned_on(1), 0);
    }

    #[test]
    fn full_table_evicts_from_the_biggest_port_oldest_first() {
        let mut f = Fdb::new(10, SEC * 300);
        f.add_static(mac(1000), 9);
        // Port 1 holds 3 learned MACs, port 2 floods.
        for i in 0..3 {
            f.learn(mac(i), 1, t(0));
        }
        for i in 100..106 {
            f.learn(mac(i), 2, t(1));
        }
        assert_eq!(f.len(), 10);
        // Table full: the next new MAC from the flooder evicts its own oldest.
        assert_eq!(
            f.learn(mac(200), 2, t(2)),
            Learned::NewAfterEviction { victim_port: 2 }
        );
        assert_eq!(f.lookup(&mac(100)), None);
        // A new MAC on port 1 also evicts from port 2 (it holds the most).
        assert_eq!(
            f.learn(mac(3), 1, t(3)),
            Learned::NewAfterEviction { victim_port: 2 }
        );
        assert_eq!(f.lookup(&mac(101)), None);
        for i in 0..4 {
            assert_eq!(f.lookup(&mac(i)), Some(1));
        }
        assert_eq!(f.lookup(&mac(1000)), Some(9));
        assert_eq!(f.len(), 10);
        assert_eq!(f.stats().evicted, 2);
    }

    #[test]
    fn only_static_entries_means_table_full() {
        let mut f = Fdb::new(2, SEC * 300);
        f.add_static(mac(1), 1);
        f.add_static(mac(2), 2);
        assert_eq!(f.learn(mac(3), 3, t(0)), Learned::TableFull);
        assert_eq!(f.stats().table_full, 1);
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn flush_port_removes_everything_of_it() {
        let mut f = Fdb::new(16, SEC * 300);
        f.add_static(mac(1), 1);
        f.learn(mac(2), 1, t(0));
        f.learn(mac(3), 2, t(0));
        assert_eq!(f.flush_port(1), 2);
        assert_eq!(f.len(), 1);
        assert_eq!(f.learned_on(1), 0);
        // Learning on the flushed port starts clean.
        f.learn(mac(2), 1, t(1));
        assert_eq!(f.learned_on(1), 1);
    }

    #[test]
    fn shrinking_cap_evicts() {
        let mut f = Fdb::new(100, SEC * 300);
        for i in 0..50 {
            f.learn(mac(i), i % 3, t(0));
        }
        f.set_limits(20, SEC * 300);
        assert_eq!(f.len(), 20);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Learn(u8, u8, u8),
        Static(u8, u8),
        Flush(u8),
        Tick(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (any::<u8>(), 0u8..6, 0u8..4).prop_map(|(m, p, dt)| Op::Learn(m, p, dt)),
            1 => (any::<u8>(), 0u8..6).prop_map(|(m, p)| Op::Static(m, p)),
            1 => (0u8..6).prop_map(Op::Flush),
            1 => (0u16..400).prop_map(Op::Tick),
        ]
    }

    proptest! {
        /// Whatever happens, learned entries never push the table past its
        /// cap, per-port counts match the map, and statics stay put.
        #[test]
        fn invariants_hold(ops in proptest::collection::vec(op(), 1..400), cap in 4usize..40) {
            let mut f = Fdb::new(cap, SEC * 300);
            let mut now = t(0);
            let mut statics: HashMap<MacAddr, PortId> = HashMap::new();
            for o in ops {
                match o {
                    Op::Learn(m, p, dt) => {
                        now = now + SEC * u32::from(dt);
                        f.learn(mac(u32::from(m)), u32::from(p), now);
                    }
                    Op::Static(m, p) => {
                        // Statics are bounded by the config; keep them below cap.
                        if statics.len() < cap / 2 {
                            statics.retain(|k, _| *k != mac(u32::from(m) + 1000));
                            f.add_static(mac(u32::from(m) + 1000), u32::from(p));
                            statics.insert(mac(u32::from(m) + 1000), u32::from(p));
                        }
                    }
                    Op::Flush(p) => {
                        f.flush_port(u32::from(p));
                        statics.retain(|_, sp| *sp != u32::from(p));
                    }
                    Op::Tick(s) => {
                        now = now + SEC * u32::from(s);
                        f.expire(now);
                    }
                }
                prop_assert!(f.len() <= cap.max(statics.len()));
                let learned: usize = (0..6).map(|p| f.learned_on(p)).sum();
                prop_assert_eq!(learned + statics.len(), f.len());
                for (m, p) in &statics {
                    prop_assert_eq!(f.lookup(m), Some(*p));
                }
            }
        }
    }
}
