//! Export and import of the table, for a restart without losing
//! connections (the daemon serializes a [`Snapshot`] with serde, e.g. as
//! JSON, and imports it in the new process).
//!
//! Times are stored relative to the export's `now` (age and remaining
//! timeout), because the monotonic clock of the next process starts
//! elsewhere. Protocol state (TCP sequence facts included) and the user's
//! data `E` are kept; entry handles ([`crate::ConnId`]) are not.

use serde::{Deserialize, Serialize};

use crate::key::ConnKey;
use crate::outcome::Limit;
use crate::state::ProtoState;
use crate::table::{Conntrack, DirStats, RestoreError};

/// Format version written by [`Conntrack::export`].
pub const SNAPSHOT_VERSION: u32 = 1;

/// One saved entry (fields private: the format is for `import` only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedEntry<E> {
    orig: ConnKey,
    reply: ConnKey,
    port: u32,
    state: ProtoState,
    age_ns: u64,
    remaining_ns: u64,
    stats: [DirStats; 2],
    ext: E,
}

impl<E> SavedEntry<E> {
    /// Original key.
    pub fn orig(&self) -> &ConnKey {
        &self.orig
    }

    /// Reply key.
    pub fn reply(&self) -> &ConnKey {
        &self.reply
    }

    /// Nanoseconds the entry had left at export.
    pub fn remaining_ns(&self) -> u64 {
        self.remaining_ns
    }
}

/// The table's contents at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot<E> {
    /// [`SNAPSHOT_VERSION`].
    pub version: u32,
    /// Entries, soonest expiry first.
    pub entries: Vec<SavedEntry<E>>,
}

/// What [`Conntrack::import`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportReport {
    /// Entries inserted.
    pub imported: usize,
    /// Entries skipped because their remaining time was 0.
    pub expired: usize,
    /// Entries skipped because a key already has a live entry.
    pub conflicts: usize,
    /// Entries skipped by `max_entries`.
    pub refused_global: usize,
    /// Entries skipped by `max_per_port`.
    pub refused_port: usize,
    /// Entries skipped as inconsistent (keys of different protocols or
    /// families, protocol state not matching the protocol). Keys of
    /// different zones are fine: NAT gives the reply key another zone.
    pub rejected: usize,
}

impl ImportReport {
    /// Adds `other`'s counts to these (imports into a table kept in
    /// several parts).
    pub fn merge(&mut self, other: &ImportReport) {
        self.imported += other.imported;
        self.expired += other.expired;
        self.conflicts += other.conflicts;
        self.refused_global += other.refused_global;
        self.refused_port += other.refused_port;
        self.rejected += other.rejected;
    }
}

/// A snapshot that cannot be imported at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// Written by another format version.
    #[error("conntrack snapshot version {found} is not supported (expected {SNAPSHOT_VERSION}); start with an empty table")]
    Version {
        /// Version in the snapshot.
        found: u32,
    },
}

fn consistent<E>(s: &SavedEntry<E>) -> bool {
    let (o, r) = (&s.orig, &s.reply);
    let same_family = o.src.is_ipv6() == o.dst.is_ipv6()
        && r.src.is_ipv6() == r.dst.is_ipv6()
        && o.is_v6() == r.is_v6();
    let proto_ok = match s.state {
        ProtoState::Tcp(_) => o.proto == packet::flow::proto::TCP,
        ProtoState::Udp { .. } => o.proto == packet::flow::proto::UDP,
        ProtoState::Icmp { .. } => o.is_icmp(),
        ProtoState::Other { .. } => {
            !o.is_icmp() && !matches!(o.proto, packet::flow::proto::TCP | packet::flow::proto::UDP)
        }
    };
    o.proto == r.proto && same_family && proto_ok
}

impl<E: Clone> Conntrack<E> {
    /// The live (not expired) entries, with times relative to `now`.
    pub fn export(&self, now: u64) -> Snapshot<E> {
        let mut entries: Vec<SavedEntry<E>> = self
            .live_entries(now)
            .map(|e| SavedEntry {
                orig: e.orig,
                reply: self.reply_of(e),
                port: e.port,
                state: e.state,
                age_ns: now.saturating_sub(e.created),
                remaining_ns: e.deadline.saturating_sub(now),
                stats: e.stats,
                ext: e.ext.clone(),
            })
            .collect();
        entries.sort_by_key(|e| e.remaining_ns);
        Snapshot {
            version: SNAPSHOT_VERSION,
            entries,
        }
    }
}

impl<E> Conntrack<E> {
    /// Inserts a snapshot's entries with deadlines `now + remaining`
    /// (clamped to the current timeouts), under the current caps. Into an
    /// empty table (a restart) expiry order is exact; into a non-empty one
    /// an imported entry may be reaped late (lookups stay exact).
    pub fn import(&mut self, snap: Snapshot<E>, now: u64) -> Result<ImportReport, ImportError> {
        if snap.version != SNAPSHOT_VERSION {
            return Err(ImportError::Version {
                found: snap.version,
            });
        }
        let mut entries = snap.entries;
        entries.sort_by_key(|e| e.remaining_ns);
        let mut rep = ImportReport::default();
        for s in entries {
            if !consistent(&s) {
                rep.rejected += 1;
                continue;
            }
            if s.remaining_ns == 0 {
                rep.expired += 1;
                continue;
            }
            match self.restore(
                s.orig,
                s.reply,
                s.port,
                s.state,
                s.age_ns,
                s.remaining_ns,
                s.stats,
                s.ext,
                now,
            ) {
                Ok(()) => rep.imported += 1,
                Err(RestoreError::Exists) => rep.conflicts += 1,
                Err(RestoreError::Limit(Limit::Global)) => rep.refused_global += 1,
                Err(RestoreError::Limit(Limit::Port)) => rep.refused_port += 1,
            }
        }
        Ok(rep)
    }
}
