//! The key index: each connection key -> the slot holding the connection
//! and the direction the key is.
//!
//! A `HashMap<ConnKey, Ref>` stored every key a second time (the slot
//! holds both directions' keys already): 53 bytes per bucket, two keys per
//! connection, about 220 bytes per connection at a million. This index
//! stores 4 bytes per key (slot number and direction bit) and compares a
//! probe with the key kept in the slot. Hashing stays keyed and random per
//! table (`RandomState`, SipHash): keys come from hostile traffic.

use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

use crate::key::{ConnKey, Dir};

/// Where a key lives: a slot and the direction the key is in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ref {
    pub(crate) slot: u32,
    pub(crate) dir: Dir,
}

impl Ref {
    fn pack(self) -> u32 {
        (self.slot << 1) | u32::from(self.dir == Dir::Reply)
    }

    fn unpack(v: u32) -> Ref {
        Ref {
            slot: v >> 1,
            dir: if v & 1 == 1 {
                Dir::Reply
            } else {
                Dir::Original
            },
        }
    }
}

/// The index. Every method that may look at stored keys takes `key_of`:
/// the key a [`Ref`] points at in the table's slots (`None` only for a
/// slot that holds nothing, which the table never leaves indexed).
#[derive(Debug, Default)]
pub(crate) struct Index {
    table: HashTable<u32>,
    hasher: RandomState,
}

impl Index {
    /// Number of keys (the table's invariant checks).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    fn hash(&self, key: &ConnKey) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Where `key` lives.
    pub(crate) fn get(
        &self,
        key: &ConnKey,
        key_of: impl Fn(Ref) -> Option<ConnKey>,
    ) -> Option<Ref> {
        self.table
            .find(self.hash(key), |&v| {
                key_of(Ref::unpack(v)).as_ref() == Some(key)
            })
            .map(|&v| Ref::unpack(v))
    }

    /// Indexes `key` at `r`; a stale mapping of the same key is replaced.
    /// `r`'s slot must already hold `key` (growing rehashes every key).
    pub(crate) fn insert(
        &mut self,
        key: &ConnKey,
        r: Ref,
        key_of: impl Fn(Ref) -> Option<ConnKey>,
    ) {
        let h = self.hash(key);
        let hasher = &self.hasher;
        match self.table.find_mut(h, |&v| {
            let other = Ref::unpack(v);
            other != r && key_of(other).as_ref() == Some(key)
        }) {
            Some(v) => *v = r.pack(),
            None => {
                self.table.insert_unique(h, r.pack(), |&v| {
                    key_of(Ref::unpack(v)).map_or(0, |k| hasher.hash_one(k))
                });
            }
        }
    }

    /// Removes the mapping of `key` to exactly `r` (the slot may already
    /// be empty). `false` when there was none.
    pub(crate) fn remove(&mut self, key: &ConnKey, r: Ref) -> bool {
        let packed = r.pack();
        match self.table.find_entry(self.hash(key), |&v| v == packed) {
            Ok(e) => {
                e.remove();
                true
            }
            Err(_) => false,
        }
    }

    /// Room for `additional` more keys.
    pub(crate) fn reserve(&mut self, additional: usize, key_of: impl Fn(Ref) -> Option<ConnKey>) {
        let hasher = &self.hasher;
        self.table.reserve(additional, |&v| {
            key_of(Ref::unpack(v)).map_or(0, |k| hasher.hash_one(k))
        });
    }
}
