//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, section 3.4), with weights.
//!
//! # Population
//!
//! Every backend gets a permutation of the `M` slots (`M` prime) from two
//! independent hashes of its [`BackendId`]: `offset = h1 % M`,
//! `skip = h2 % (M - 1) + 1`, and its `j`-th preferred slot is
//! `(offset + j * skip) % M`. Because `M` is prime and `1 <= skip < M`,
//! the permutation visits every slot. Population goes in rounds; in a
//! round each backend whose turn it is takes its next preferred slot that
//! is still empty, until the table is full. Without weights every backend
//! takes one turn per round, so when the table fills every backend holds
//! either `floor(M/N)` or `ceil(M/N)` slots.
//!
//! # Weights
//!
//! With weights, a backend of weight `w` takes a turn in round `r` iff
//! `floor((r + 1) * w / W) > floor(r * w / W)`, `W` being the largest
//! weight: the heaviest backends take a turn every round, a backend of
//! half their weight every other round, and so on. After `R` rounds a
//! backend holds `floor(R * w / W)` or one more slot, so its share is
//! `w / sum(w)` to within `N / M` of the table. Weight 0 never takes a turn
//! (drain: no new connections). This is the paper's "backends take turns
//! proportionally to their weights"; equal weights reduce to plain Maglev.
//!
//! # Determinism
//!
//! Backends are populated in increasing [`BackendId`] order whatever order
//! the caller passes them in, and the hashes are fixed
//! ([`crate::hash::siphash24`] under the constant keys below, over the id's
//! four big-endian bytes). Two hosts with the same backend ids, weights and
//! table size build the same table.
//!
//! # Cost
//!
//! Building takes `O(M log M)` slot probes (the paper's bound for equal
//! weights) plus `O(M log N)` for scheduling the turns with a heap, so
//! skewed weights cost no more than equal ones: a few milliseconds for a
//! 65537-slot table, 3 or 655 backends alike (release build). Memory is
//! `4 * M` bytes (plus `4 * M` while building). A lookup is one modulo and
//! one load.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use serde::{Deserialize, Serialize};

use crate::hash::siphash24;

/// Default table size: the paper's 65537 (prime).
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;

/// A table must have at least this many slots per backend, so every
/// backend's share is accurate to within about 1 % (issue 7).
pub const SLOTS_PER_BACKEND: u32 = 100;

/// Largest table accepted: 4 Mi slots (16 MiB), which allows 41943
/// backends. Bounds the memory a config can ask for.
pub const MAX_TABLE_SIZE: u32 = 1 << 22;

/// Key of the offset hash: ASCII "mglv-off", "set-key1". Changing a key
/// moves every flow of every pool on upgrade; don't.
const OFFSET_KEY: (u64, u64) = (0x6d67_6c76_2d6f_6666, 0x7365_742d_6b65_7931);
/// Key of the skip hash: ASCII "mglv-ski", "p-key2!!"; different from
/// the offset key, so the two hashes are independent.
const SKIP_KEY: (u64, u64) = (0x6d67_6c76_2d73_6b69, 0x702d_6b65_7932_2121);

/// A backend's stable identity. It feeds the Maglev permutation, so it
/// must be the same on every host for the same backend: derive it from the
/// tenant config (an index that never changes meaning, or
/// [`BackendId::from_name`]), never from the order of discovery.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct BackendId(pub u32);

impl BackendId {
    /// Id from a stable name (for example `"web-1"` or `"10.0.0.5:80"`):
    /// the low 32 bits of SipHash-2-4 under a fixed key. Two names may
    /// collide (about `n^2 / 2^33` for `n` names); a table refuses
    /// duplicate ids, so a collision is reported, never silently merged.
    pub fn from_name(name: &str) -> BackendId {
        // ASCII "backend-", "id-key-3".
        BackendId(siphash24(
            0x6261_636b_656e_642d,
            0x6964_2d6b_6579_2d33,
            name.as_bytes(),
        ) as u32)
    }
}

impl std::fmt::Display for BackendId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "backend {}", self.0)
    }
}

/// Why a table cannot be built; every message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    /// The size is not prime, so some permutations would not visit every
    /// slot.
    #[error("Maglev table size {size} is not prime; use a prime such as {suggestion}")]
    NotPrime {
        /// Requested size.
        size: u32,
        /// The smallest prime above it (within [`MAX_TABLE_SIZE`]).
        suggestion: u32,
    },
    /// Fewer than [`SLOTS_PER_BACKEND`] slots per backend.
    #[error(
        "Maglev table size {size} is too small for {backends} backends (needs at least \
         {SLOTS_PER_BACKEND} slots per backend); use a prime >= {min} such as {suggestion}, \
         or fewer backends"
    )]
    TooSmall {
        /// Requested size.
        size: u32,
        /// Number of backends.
        backends: usize,
        /// `SLOTS_PER_BACKEND * backends`.
        min: u64,
        /// The smallest prime >= `min`, or 0 when none fits under
        /// [`MAX_TABLE_SIZE`].
        suggestion: u32,
    },
    /// Above [`MAX_TABLE_SIZE`].
    #[error("Maglev table size {size} is above the maximum {MAX_TABLE_SIZE}; use a smaller prime such as 65537")]
    TooLarge {
        /// Requested size.
        size: u32,
    },
    /// The same id twice.
    #[error("{0} is listed twice; backend ids must be unique")]
    DuplicateBackend(BackendId),
}

/// A populated lookup table. Immutable: a change of backends or weights
/// builds a new one ([`Maglev::new`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Maglev {
    size: u32,
    /// Slot -> backend; empty when no backend has a positive weight.
    table: Vec<BackendId>,
    /// The configuration it was built from, sorted by id.
    backends: Vec<(BackendId, u32)>,
}

impl std::fmt::Debug for Maglev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The table itself is 65537 entries: show its shape only.
        f.debug_struct("Maglev")
            .field("size", &self.size)
            .field("backends", &self.backends)
            .field("populated", &!self.table.is_empty())
            .finish()
    }
}

impl Maglev {
    /// Builds the table for `backends` (id, weight) with `size` slots.
    ///
    /// `size` must be prime, at most [`MAX_TABLE_SIZE`] and at least
    /// [`SLOTS_PER_BACKEND`] times the number of backends (weight-0
    /// backends included, so draining one does not make a valid config
    /// invalid). No backends, or only weight-0 ones, give an empty table
    /// whose [`lookup`](Self::lookup) is `None`.
    pub fn new(backends: &[(BackendId, u32)], size: u32) -> Result<Maglev, MaglevError> {
        check_size(size, backends.len())?;
        let mut sorted = backends.to_vec();
        sorted.sort_unstable_by_key(|&(id, _)| id);
        if let Some(w) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(MaglevError::DuplicateBackend(w[0].0));
        }
        let table = populate(&sorted, size);
        Ok(Maglev {
            size,
            table,
            backends: sorted,
        })
    }

    /// The backend for a flow hash ([`crate::flow_hash`]); `None` when no
    /// backend has a positive weight.
    #[inline]
    pub fn lookup(&self, hash: u64) -> Option<BackendId> {
        if self.table.is_empty() {
            return None;
        }
        // `table.len() == size` when populated.
        self.table
            .get((hash % u64::from(self.size)) as usize)
            .copied()
    }

    /// Number of slots `M`.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Whether every lookup gives `None`.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The (id, weight) pairs the table was built from, sorted by id.
    pub fn backends(&self) -> &[(BackendId, u32)] {
        &self.backends
    }

    /// Slot -> backend (empty when no backend has a positive weight); for
    /// diagnostics and for measuring disruption between two tables.
    pub fn slots(&self) -> &[BackendId] {
        &self.table
    }

    /// Slots held by each backend that holds any.
    pub fn slot_counts(&self) -> BTreeMap<BackendId, usize> {
        let mut counts = BTreeMap::new();
        for id in &self.table {
            *counts.entry(*id).or_insert(0) += 1;
        }
        counts
    }
}

/// Checks that `size` is a valid table size for `backends` backends (the
/// rules of [`Maglev::new`]), without building anything.
pub fn check_size(size: u32, backends: usize) -> Result<(), MaglevError> {
    if size > MAX_TABLE_SIZE {
        return Err(MaglevError::TooLarge { size });
    }
    if !is_prime(size) {
        return Err(MaglevError::NotPrime {
            size,
            suggestion: next_prime(u64::from(size).max(2)).unwrap_or(DEFAULT_TABLE_SIZE),
        });
    }
    let min = u64::from(SLOTS_PER_BACKEND) * backends as u64;
    if u64::from(size) < min {
        return Err(MaglevError::TooSmall {
            size,
            backends,
            min,
            suggestion: next_prime(min).unwrap_or(0),
        });
    }
    Ok(())
}

/// Fraction of slots whose backend differs between two tables of the same
/// size (1.0 when the sizes differ or exactly one is empty).
pub fn disruption(a: &Maglev, b: &Maglev) -> f64 {
    if a.size != b.size || a.table.len() != b.table.len() {
        return 1.0;
    }
    if a.table.is_empty() {
        return 0.0;
    }
    let moved = a.table.iter().zip(&b.table).filter(|(x, y)| x != y).count();
    moved as f64 / a.table.len() as f64
}

/// Per-backend population state.
struct Cursor {
    id: BackendId,
    weight: u64,
    /// Next slot of the permutation to try.
    pos: u64,
    skip: u64,
    /// Slots taken so far.
    turns: u64,
}

fn populate(sorted: &[(BackendId, u32)], size: u32) -> Vec<BackendId> {
    let m = u64::from(size);
    let mut cursors: Vec<Cursor> = sorted
        .iter()
        .filter(|&&(_, w)| w > 0)
        .map(|&(id, w)| {
            let bytes = id.0.to_be_bytes();
            let offset = siphash24(OFFSET_KEY.0, OFFSET_KEY.1, &bytes) % m;
            // size >= 2 here (prime), so m - 1 >= 1.
            let skip = siphash24(SKIP_KEY.0, SKIP_KEY.1, &bytes) % (m - 1) + 1;
            Cursor {
                id,
                weight: u64::from(w),
                pos: offset,
                skip,
                turns: 0,
            }
        })
        .collect();
    let Some(max_weight) = cursors.iter().map(|c| c.weight).max() else {
        return Vec::new();
    };

    const EMPTY: u32 = u32::MAX;
    // Index into `cursors` per slot while populating (ids may be u32::MAX,
    // indices cannot: there are at most size / 100 backends).
    let mut slots = vec![EMPTY; size as usize];
    // Turns in (round, backend index) order, as the round-robin of the
    // module doc takes them, but without visiting backends whose turn it
    // is not: a min-heap of each backend's next turn. Its t-th turn (from
    // 1) comes in round ceil(t * W / w) - 1.
    let turn_round = |t: u64, w: u64| (t * max_weight).div_ceil(w) - 1;
    let mut turns: BinaryHeap<Reverse<(u64, usize)>> = cursors
        .iter()
        .enumerate()
        .map(|(i, c)| Reverse((turn_round(1, c.weight), i)))
        .collect();
    let mut filled: u64 = 0;
    while filled < m {
        let Some(Reverse((_, i))) = turns.pop() else {
            break;
        };
        let Some(c) = cursors.get_mut(i) else {
            break;
        };
        // The permutation visits every slot and the table is not full,
        // so this finds an empty one.
        while slots[c.pos as usize] != EMPTY {
            c.pos = (c.pos + c.skip) % m;
        }
        slots[c.pos as usize] = i as u32;
        c.pos = (c.pos + c.skip) % m;
        c.turns += 1;
        filled += 1;
        // t <= M + 1 <= 2^22 + 1 and W < 2^32: no overflow.
        turns.push(Reverse((turn_round(c.turns + 1, c.weight), i)));
    }
    slots
        .into_iter()
        .map(|i| cursors.get(i as usize).map_or(BackendId(0), |c| c.id))
        .collect()
}

/// Deterministic primality test by trial division: at most ~1000 odd
/// divisors for table sizes (up to 2^22), 32768 for any `u32`.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n & 1 == 0 {
        return n == 2;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

/// The smallest prime `>= n` that is at most [`MAX_TABLE_SIZE`].
pub fn next_prime(n: u64) -> Option<u32> {
    let mut c = n.max(2);
    while c <= u64::from(MAX_TABLE_SIZE) {
        if is_prime(c as u32) {
            return Some(c as u32);
        }
        c += 1;
    }
    None
}

#[cfg(test)]
mod tests;
