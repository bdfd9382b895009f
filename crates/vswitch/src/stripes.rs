//! Connection tables striped by conntrack zone, so workers carrying
//! different zones' packets take different locks instead of one global
//! lock on the packet path.
//!
//! [`Stripes`] holds [`STRIPES`] values (a conntrack table, or the load
//! balancer's services with theirs), each behind its own mutex on its own
//! cache line; a zone lives in stripe `zone % STRIPES`, and every key of a
//! zone's connections carries that zone, so no lookup ever needs another
//! stripe. Per-port caps stay exact as long as a port's connections are
//! all in one zone (true of the security groups' per-port zones and of
//! the load balancer's tenant zones). The global bound of the single table
//! this replaced is kept by one atomic total of all stripes: a commit
//! reserves its place first (compare-and-swap), so concurrent commits in
//! other stripes never overshoot it; every other change is applied to the
//! total from the stripe's length before and after, under its lock.
//!
//! Packets of one zone on several workers still share its stripe; striping
//! further would take a symmetric flow hash with per-port counts kept
//! outside the stripes.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use conntrack::{Conntrack, EntryView, ImportError, ImportReport, Snapshot, Stats};
use parking_lot::{Mutex, MutexGuard};

/// Number of stripes. Fixed rather than derived from the core count so a
/// zone's stripe is the same on every host; 64 is at least 4x the workers
/// of the hosts this runs on (few zones then collide), and zones are small
/// and dense (port ids + 1, tenant numbers), so the first 64 never share a
/// lock. Empty stripes allocate nothing but their padded lock.
pub const STRIPES: usize = 64;

/// Fewest expired entries [`Stripes::expire`] offers each stripe per call.
const EXPIRE_MIN_PER_STRIPE: usize = 16;

/// A value alone on its cache line (128 bytes: two 64-byte lines, as the
/// adjacent-line prefetcher pairs them), so workers writing one never
/// invalidate another's.
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct Padded<T>(pub(crate) T);

/// What a stripe holds: a conntrack table, alone or inside something
/// that keeps more per zone.
pub trait StripeTable {
    /// The table's per-entry user data.
    type Ext: Clone;
    /// The connection table.
    fn table(&self) -> &Conntrack<Self::Ext>;
    /// The connection table, mutable.
    fn table_mut(&mut self) -> &mut Conntrack<Self::Ext>;
    /// Reaps up to `max` expired entries (and whatever goes with them).
    fn expire(&mut self, now: u64, max: usize) -> usize {
        self.table_mut().expire(now, max)
    }
}

impl<E: Clone> StripeTable for Conntrack<E> {
    type Ext = E;

    fn table(&self) -> &Conntrack<E> {
        self
    }

    fn table_mut(&mut self) -> &mut Conntrack<E> {
        self
    }
}

/// [`STRIPES`] tables under one global bound (see the module doc).
#[derive(Debug)]
pub struct Stripes<T> {
    stripes: Box<[Padded<Mutex<T>>]>,
    /// Entries in all stripes (expired ones not reaped included, as a
    /// table's `len`), plus commits in flight that reserved a place: never
    /// above `max_entries`.
    total: Padded<AtomicUsize>,
    /// The global bound (the single table's `max_entries`).
    max_entries: usize,
    /// New connections refused by the global bound; the stripes never see
    /// it (each one's own cap is the whole bound), so it is counted here
    /// and added to [`Stripes::stats`].
    refused_global: AtomicU64,
    /// Stripe [`Stripes::expire`] starts with, so a small `max` reaches
    /// every stripe in turn.
    expire_from: AtomicUsize,
}

/// Applies a stripe's size change (`before` -> `after`) to the total.
fn apply(total: &AtomicUsize, before: usize, after: usize) {
    if after > before {
        total.fetch_add(after - before, Ordering::Relaxed);
    } else if before > after {
        total.fetch_sub(before - after, Ordering::Relaxed);
    }
}

/// The stripe of `zone` (STRIPES is a power of two: its low bits).
pub fn stripe_of(zone: u32) -> usize {
    zone as usize & (STRIPES - 1)
}

impl<T: StripeTable> Stripes<T> {
    /// Stripes made by `make` (each table's own cap should be the whole
    /// bound); `max_entries` bounds all of them together.
    pub fn new<E>(max_entries: usize, mut make: impl FnMut() -> Result<T, E>) -> Result<Self, E> {
        let stripes = (0..STRIPES)
            .map(|_| make().map(|t| Padded(Mutex::new(t))))
            .collect::<Result<Box<[_]>, _>>()?;
        Ok(Stripes {
            stripes,
            total: Padded(AtomicUsize::new(0)),
            max_entries,
            refused_global: AtomicU64::new(0),
            expire_from: AtomicUsize::new(0),
        })
    }

    /// The mutex of `zone`'s stripe.
    pub(crate) fn stripe(&self, zone: u32) -> &Mutex<T> {
        &self.stripes[stripe_of(zone)].0
    }

    /// Locks `zone`'s stripe for reading (a change made through it must go
    /// through [`Stripes::sync`]).
    pub(crate) fn lock(&self, zone: u32) -> MutexGuard<'_, T> {
        self.stripe(zone).lock()
    }

    /// Runs `f` on a locked stripe, keeping the total exact. `f` must not
    /// commit new entries except through [`Stripes::sync_reserved`].
    pub(crate) fn sync<R>(&self, t: &mut T, f: impl FnOnce(&mut T) -> R) -> R {
        let before = t.table().len();
        let r = f(t);
        apply(&self.total.0, before, t.table().len());
        r
    }

    /// As [`Stripes::sync`], for `f` that may commit: `f` gets `admit`, to
    /// call just before it commits a new entry; `admit` reserves a place
    /// under the global bound (false: the bound is reached, do not
    /// commit) and the reserved place stands for the entry afterwards.
    pub(crate) fn sync_reserved<R>(
        &self,
        t: &mut T,
        f: impl FnOnce(&mut T, &mut dyn FnMut() -> bool) -> R,
    ) -> R {
        let before = t.table().len();
        let mut reserved = 0;
        let r = f(t, &mut || {
            if self.reserve() {
                reserved += 1;
                true
            } else {
                self.refused_global.fetch_add(1, Ordering::Relaxed);
                false
            }
        });
        apply(&self.total.0, before + reserved, t.table().len());
        r
    }

    /// Counts a new connection refused by the global bound.
    pub(crate) fn count_refused(&self) {
        self.refused_global.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `f` on every stripe in turn, each under its lock (control
    /// paths). `f` may remove entries; it must not add any (the global
    /// bound is checked only by reservations and [`Stripes::import`]).
    pub fn with_each(&self, mut f: impl FnMut(&mut T)) {
        for s in self.stripes.iter() {
            self.sync(&mut s.0.lock(), &mut f);
        }
    }

    /// Entries in all stripes (as a table's `len`: expired ones not reaped
    /// yet included).
    pub fn len(&self) -> usize {
        self.total.0.load(Ordering::Relaxed)
    }

    /// True when no stripe holds an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The global bound.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// Whether a new entry fits under the global bound now.
    pub(crate) fn has_room(&self) -> bool {
        self.len() < self.max_entries
    }

    /// The stripes' counters summed, with the global bound's refusals.
    pub fn stats(&self) -> Stats {
        let mut st = Stats::default();
        for s in self.stripes.iter() {
            st.merge(s.0.lock().table().stats());
        }
        st.refused_global += self.refused_global.load(Ordering::Relaxed);
        st
    }

    /// Calls `f` with every live entry, stripe by stripe (each under its
    /// lock in turn, so not one instant for the whole table).
    pub fn for_each_entry(&self, now: u64, mut f: impl FnMut(&EntryView<'_, T::Ext>)) {
        for s in self.stripes.iter() {
            for e in s.0.lock().table().entries(now) {
                f(&e);
            }
        }
    }

    /// Runs `f` on every stripe in turn, read-only.
    pub fn each(&self, mut f: impl FnMut(&T)) {
        for s in self.stripes.iter() {
            f(&s.0.lock());
        }
    }

    /// Removes `zone`'s entries; how many.
    pub fn flush_zone(&self, zone: u32) -> usize {
        self.sync(&mut self.lock(zone), |t| t.table_mut().flush_zone(zone))
    }

    /// Reaps up to `max` expired entries over all stripes: a fair share
    /// each (at least [`EXPIRE_MIN_PER_STRIPE`] while `max` lasts), then
    /// what is left of `max` to the stripes that used their whole share.
    pub fn expire(&self, now: u64, max: usize) -> usize {
        let share = (max / STRIPES).max(EXPIRE_MIN_PER_STRIPE);
        let start = self.expire_from.fetch_add(1, Ordering::Relaxed);
        let order = || (0..STRIPES).filter_map(|i| self.stripes.get((start + i) % STRIPES));
        let mut left = max;
        let mut busy = Vec::new();
        for s in order() {
            if left == 0 {
                break;
            }
            let n = share.min(left);
            let done = self.sync(&mut s.0.lock(), |t| t.expire(now, n));
            left -= done;
            if done == n {
                busy.push(s);
            }
        }
        for s in busy {
            if left == 0 {
                break;
            }
            left -= self.sync(&mut s.0.lock(), |t| t.expire(now, left));
        }
        max - left
    }

    /// The live entries of all stripes as one snapshot (soonest expiry
    /// first, as a single table's export).
    pub fn export(&self, now: u64) -> Snapshot<T::Ext> {
        let mut entries = Vec::new();
        for s in self.stripes.iter() {
            entries.extend(s.0.lock().table().export(now).entries);
        }
        entries.sort_by_key(|e| e.remaining_ns());
        Snapshot {
            version: conntrack::SNAPSHOT_VERSION,
            entries,
        }
    }

    /// Imports a snapshot (of [`Stripes::export`] or of a single table),
    /// each entry into its zone's stripe, under the global bound. When the
    /// bound is reached part-way, the entries left (the longest-lived, as
    /// a single table refuses them) are counted as expired or refused by
    /// the bound without further checks.
    pub fn import(&self, snap: Snapshot<T::Ext>, now: u64) -> Result<ImportReport, ImportError> {
        if snap.version != conntrack::SNAPSHOT_VERSION {
            return Err(ImportError::Version {
                found: snap.version,
            });
        }
        let mut entries = snap.entries;
        entries.sort_by_key(|e| e.remaining_ns());
        let mut rep = ImportReport::default();
        let one = |entries: Vec<_>| Snapshot {
            version: conntrack::SNAPSHOT_VERSION,
            entries,
        };
        if entries.len() <= self.max_entries.saturating_sub(self.len()) {
            // Room for all: one import per stripe (exact expiry order
            // within each).
            let mut by_stripe: Vec<Vec<_>> = (0..STRIPES).map(|_| Vec::new()).collect();
            for e in entries {
                if let Some(v) = by_stripe.get_mut(stripe_of(e.orig().zone)) {
                    v.push(e);
                }
            }
            for (s, v) in self.stripes.iter().zip(by_stripe) {
                if !v.is_empty() {
                    let r = self.sync(&mut s.0.lock(), |t| t.table_mut().import(one(v), now));
                    rep.merge(&r?);
                }
            }
            return Ok(rep);
        }
        // Perhaps too many: entry by entry, each reserving its place.
        for e in entries {
            if !self.reserve() {
                if e.remaining_ns() == 0 {
                    rep.expired += 1;
                } else {
                    rep.refused_global += 1;
                }
                continue;
            }
            let mut t = self.lock(e.orig().zone);
            let before = t.table().len();
            let r = t.table_mut().import(one(vec![e]), now);
            // The reserved place stands for the entry.
            apply(&self.total.0, before + 1, t.table().len());
            rep.merge(&r?);
        }
        Ok(rep)
    }

    /// Takes a place under the global bound, if there is one.
    pub(crate) fn reserve(&self) -> bool {
        self.total
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t < self.max_entries).then_some(t + 1)
            })
            .is_ok()
    }

    /// Gives back a place [`Stripes::reserve`] took for an entry that was
    /// not committed (`before` -> `after`: the stripe's length around the
    /// attempt).
    pub(crate) fn settle_reserved(&self, before: usize, after: usize) {
        apply(&self.total.0, before + 1, after);
    }
}
