//! A set of IPv4 addresses stored as disjoint inclusive intervals, so a
//! /8 pool of never-used addresses costs one entry, not sixteen million.

use std::collections::BTreeMap;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct IntervalSet {
    /// start -> end (inclusive); intervals are disjoint and not adjacent.
    map: BTreeMap<u32, u32>,
}

impl IntervalSet {
    /// Builds from ranges that may overlap or touch.
    pub(crate) fn from_ranges(mut ranges: Vec<(u32, u32)>) -> Self {
        ranges.retain(|(a, b)| a <= b);
        ranges.sort_unstable();
        let mut map = BTreeMap::new();
        let mut cur: Option<(u32, u32)> = None;
        for (a, b) in ranges {
            cur = match cur {
                Some((s, e)) if a <= e.saturating_add(1) => Some((s, e.max(b))),
                Some((s, e)) => {
                    map.insert(s, e);
                    Some((a, b))
                }
                None => Some((a, b)),
            };
        }
        if let Some((s, e)) = cur {
            map.insert(s, e);
        }
        IntervalSet { map }
    }

    pub(crate) fn contains(&self, x: u32) -> bool {
        matches!(self.map.range(..=x).next_back(), Some((_, &e)) if e >= x)
    }

    pub(crate) fn first(&self) -> Option<u32> {
        self.map.keys().next().copied()
    }

    pub(crate) fn remove(&mut self, x: u32) -> bool {
        let Some((&s, &e)) = self.map.range(..=x).next_back() else {
            return false;
        };
        if e < x {
            return false;
        }
        self.map.remove(&s);
        if s < x {
            self.map.insert(s, x - 1);
        }
        if x < e {
            self.map.insert(x + 1, e);
        }
        true
    }

    pub(crate) fn insert(&mut self, x: u32) {
        if self.contains(x) {
            return;
        }
        let (mut s, mut e) = (x, x);
        if let Some((&ps, &pe)) = self.map.range(..x).next_back() {
            if pe.checked_add(1) == Some(x) {
                self.map.remove(&ps);
                s = ps;
            }
        }
        if let Some(next) = x.checked_add(1) {
            if let Some(ne) = self.map.remove(&next) {
                e = ne;
            }
        }
        self.map.insert(s, e);
    }

    /// Number of addresses (for tests and stats).
    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.map
            .iter()
            .map(|(s, e)| u64::from(*e) - u64::from(*s) + 1)
            .sum()
    }

    #[cfg(test)]
    pub(crate) fn intervals(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn merge_split_join() {
        let mut s = IntervalSet::from_ranges(vec![(10, 20), (21, 25), (30, 30), (5, 12)]);
        assert_eq!(s.intervals(), 2);
        assert_eq!(s.len(), 22);
        assert!(s.remove(15));
        assert_eq!(s.intervals(), 3);
        assert!(!s.contains(15));
        s.insert(15);
        assert_eq!(s.intervals(), 2);
        s.insert(26);
        s.insert(27);
        s.insert(28);
        s.insert(29);
        assert_eq!(s.intervals(), 1);
        assert_eq!(s.first(), Some(5));
        assert!(!s.remove(u32::MAX));
        s.insert(u32::MAX);
        assert!(s.contains(u32::MAX));
    }

    proptest! {
        #[test]
        fn behaves_like_a_set(ops in proptest::collection::vec((any::<bool>(), 0u32..64), 0..200)) {
            let mut s = IntervalSet::default();
            let mut model = BTreeSet::new();
            for (ins, x) in ops {
                if ins { s.insert(x); model.insert(x); } else {
                    prop_assert_eq!(s.remove(x), model.remove(&x));
                }
                prop_assert_eq!(s.first(), model.iter().next().copied());
                prop_assert_eq!(s.len(), model.len() as u64);
            }
            for x in 0..64 { prop_assert_eq!(s.contains(x), model.contains(&x)); }
        }
    }
}
