use super::*;
use proptest::prelude::*;

fn equal(n: u32) -> Vec<(BackendId, u32)> {
    (1..=n).map(|i| (BackendId(i), 1)).collect()
}

fn build(backends: &[(BackendId, u32)]) -> Maglev {
    Maglev::new(backends, DEFAULT_TABLE_SIZE).unwrap()
}

/// Fraction of slots that changed owner other than those the removed
/// (or, read the other way, added) backend owned.
fn extra_moves(before: &Maglev, after: &Maglev, changed: BackendId) -> f64 {
    let moved = before
        .slots()
        .iter()
        .zip(after.slots())
        .filter(|(a, b)| a != b && **a != changed && **b != changed)
        .count();
    moved as f64 / f64::from(before.size())
}

#[test]
fn equal_weights_spread_is_floor_or_ceil() {
    let m = DEFAULT_TABLE_SIZE as usize;
    for n in 1..=20u32 {
        let t = build(&equal(n));
        let counts = t.slot_counts();
        assert_eq!(counts.len(), n as usize, "n = {n}");
        let min = counts.values().min().copied().unwrap();
        let max = counts.values().max().copied().unwrap();
        assert!(max - min <= 1, "n = {n}: min {min} max {max}");
        assert!(min >= m / n as usize && max <= m.div_ceil(n as usize));
        assert_eq!(counts.values().sum::<usize>(), m);
    }
}

#[test]
fn removing_one_backend_moves_about_one_nth() {
    for n in [5u32, 10, 50] {
        let before = build(&equal(n));
        // Remove a few different backends: the bound must hold for each.
        for gone in [1, n / 2 + 1, n] {
            let rest: Vec<_> = equal(n)
                .into_iter()
                .filter(|&(id, _)| id.0 != gone)
                .collect();
            let after = build(&rest);
            let d = disruption(&before, &after);
            let bound = 1.0 / f64::from(n) + 0.01;
            assert!(d <= bound, "n = {n}, removed {gone}: {d:.4} > {bound:.4}");
            // Everything the removed backend had moved, of course.
            assert!(!after.slot_counts().contains_key(&BackendId(gone)));
            let extra = extra_moves(&before, &after, BackendId(gone));
            assert!(
                extra <= 0.01,
                "n = {n}: {extra:.4} of slots moved between survivors"
            );
        }
    }
}

#[test]
fn adding_one_backend_moves_about_one_nth() {
    for n in [5u32, 10, 50] {
        let before = build(&equal(n));
        let after = build(&equal(n + 1));
        let d = disruption(&before, &after);
        let bound = 1.0 / f64::from(n + 1) + 0.01;
        assert!(d <= bound, "n = {n}: {d:.4} > {bound:.4}");
        let extra = extra_moves(&before, &after, BackendId(n + 1));
        assert!(extra <= 0.01, "n = {n}: {extra:.4}");
    }
}

#[test]
fn weights_are_proportional_within_one_percent() {
    let cases: [&[u32]; 4] = [
        &[1, 2, 3, 4],
        &[1, 10, 100],
        &[5, 5, 10],
        &[3, 7, 11, 13, 17, 19],
    ];
    for weights in cases {
        let backends: Vec<_> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| (BackendId(i as u32 + 1), w))
            .collect();
        let t = build(&backends);
        let counts = t.slot_counts();
        let total: u32 = weights.iter().sum();
        for &(id, w) in &backends {
            let want = f64::from(DEFAULT_TABLE_SIZE) * f64::from(w) / f64::from(total);
            let got = counts[&id] as f64;
            assert!(
                (got - want).abs() <= want * 0.01,
                "weights {weights:?}: {id} got {got}, want {want:.1}"
            );
        }
    }
}

#[test]
fn equal_weights_other_than_one_behave_like_one() {
    let ones = build(&equal(7));
    let sevens: Vec<_> = equal(7).into_iter().map(|(id, _)| (id, 7)).collect();
    assert_eq!(ones.slots(), build(&sevens).slots());
}

#[test]
fn weight_zero_gets_nothing() {
    let t = build(&[(BackendId(1), 1), (BackendId(2), 0), (BackendId(3), 1)]);
    let counts = t.slot_counts();
    assert!(!counts.contains_key(&BackendId(2)));
    assert_eq!(counts.len(), 2);
    // Draining a backend (weight 0) moves the same slots as removing it.
    let removed = build(&[(BackendId(1), 1), (BackendId(3), 1)]);
    assert_eq!(t.slots(), removed.slots());
}

#[test]
fn empty_and_all_zero_give_none() {
    let empty = build(&[]);
    assert!(empty.is_empty());
    assert_eq!(empty.lookup(12345), None);
    let zero = build(&[(BackendId(1), 0), (BackendId(2), 0)]);
    assert!(zero.is_empty());
    assert_eq!(zero.lookup(0), None);
    assert_eq!(zero.lookup(u64::MAX), None);
}

#[test]
fn lookup_maps_every_hash_to_a_listed_backend() {
    let t = build(&equal(3));
    for h in [0u64, 1, 65536, 65537, u64::MAX, 0xdead_beef] {
        let id = t.lookup(h).unwrap();
        assert!((1..=3).contains(&id.0));
        assert_eq!(Some(t.slots()[(h % 65537) as usize]), t.lookup(h));
    }
}

#[test]
fn order_of_backends_does_not_matter() {
    let a = build(&[(BackendId(3), 2), (BackendId(1), 1), (BackendId(2), 5)]);
    let b = build(&[(BackendId(2), 5), (BackendId(3), 2), (BackendId(1), 1)]);
    assert_eq!(a, b);
}

#[test]
fn table_is_pinned_across_releases() {
    // Every host (and every release) must agree on the table: pin a few
    // slots of a small config. If this fails, the hash or the population
    // changed, which would move flows on upgrade.
    let t = Maglev::new(&equal(3), 307).unwrap();
    let head: Vec<u32> = t.slots()[..12].iter().map(|id| id.0).collect();
    assert_eq!(head, PINNED_HEAD);
}

/// The population of the module doc, spelled out: rounds, every backend
/// in id order checking whether it is its turn. `populate` schedules the
/// same turns with a heap; the tables must be identical.
fn reference_table(backends: &[(BackendId, u32)], size: u32) -> Vec<BackendId> {
    let m = u64::from(size);
    let mut sorted: Vec<_> = backends.iter().filter(|b| b.1 > 0).copied().collect();
    sorted.sort();
    let Some(max_w) = sorted.iter().map(|b| u64::from(b.1)).max() else {
        return Vec::new();
    };
    let mut cur: Vec<(u64, u64)> = sorted
        .iter()
        .map(|(id, _)| {
            let bytes = id.0.to_be_bytes();
            let offset = siphash24(OFFSET_KEY.0, OFFSET_KEY.1, &bytes) % m;
            let skip = siphash24(SKIP_KEY.0, SKIP_KEY.1, &bytes) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut slots: Vec<Option<BackendId>> = vec![None; size as usize];
    let mut filled = 0;
    let mut round = 0u64;
    while filled < m {
        for (i, &(id, w)) in sorted.iter().enumerate() {
            let w = u64::from(w);
            if filled == m || (round + 1) * w / max_w == round * w / max_w {
                continue;
            }
            let (pos, skip) = &mut cur[i];
            while slots[*pos as usize].is_some() {
                *pos = (*pos + *skip) % m;
            }
            slots[*pos as usize] = Some(id);
            *pos = (*pos + *skip) % m;
            filled += 1;
        }
        round += 1;
    }
    slots.into_iter().map(Option::unwrap).collect()
}

#[test]
fn heap_schedule_matches_the_round_robin() {
    let cases: [&[u32]; 6] = [
        &[1],
        &[1, 1, 1],
        &[1, 2, 3, 4],
        &[0, 5, 0, 7],
        &[1_000_000, 1, 1, 3],
        &[u32::MAX, 1, u32::MAX / 3],
    ];
    for weights in cases {
        let backends: Vec<_> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| (BackendId(i as u32 * 7 + 1), w))
            .collect();
        let t = Maglev::new(&backends, 1009).unwrap();
        assert_eq!(t.slots(), reference_table(&backends, 1009), "{weights:?}");
    }
}

const PINNED_HEAD: [u32; 12] = [2, 1, 2, 3, 1, 3, 1, 2, 3, 2, 3, 2];

#[test]
fn size_validation_names_the_fix() {
    let e = Maglev::new(&equal(2), 65536).unwrap_err();
    assert_eq!(
        e,
        MaglevError::NotPrime {
            size: 65536,
            suggestion: 65537
        }
    );
    assert!(e.to_string().contains("65537"));
    let e = Maglev::new(&equal(2), 199).unwrap_err();
    assert_eq!(
        e,
        MaglevError::TooSmall {
            size: 199,
            backends: 2,
            min: 200,
            suggestion: 211
        }
    );
    assert!(e.to_string().contains("211"), "{e}");
    assert!(Maglev::new(&equal(2), 211).is_ok());
    assert!(matches!(
        Maglev::new(&[], MAX_TABLE_SIZE + 1),
        Err(MaglevError::TooLarge { .. })
    ));
    assert!(matches!(
        Maglev::new(&[], 0),
        Err(MaglevError::NotPrime { .. })
    ));
    assert!(matches!(
        Maglev::new(&[], 1),
        Err(MaglevError::NotPrime { .. })
    ));
    let e = Maglev::new(&[(BackendId(4), 1), (BackendId(4), 2)], 65537).unwrap_err();
    assert_eq!(e, MaglevError::DuplicateBackend(BackendId(4)));
    // Too many backends for any allowed table.
    let many: Vec<_> = (0..50_000).map(|i| (BackendId(i), 1)).collect();
    let e = Maglev::new(&many, 65537).unwrap_err();
    assert!(
        matches!(e, MaglevError::TooSmall { suggestion: 0, .. }),
        "{e}"
    );
}

#[test]
fn primes() {
    let primes: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
    assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
    assert!(is_prime(65537));
    assert!(!is_prime(65535));
    assert_eq!(next_prime(100), Some(101));
    assert_eq!(next_prime(0), Some(2));
    assert_eq!(next_prime(u64::from(MAX_TABLE_SIZE) + 1), None);
}

#[test]
fn backend_id_from_name_is_stable() {
    assert_eq!(BackendId::from_name("web-1"), BackendId::from_name("web-1"));
    assert_ne!(BackendId::from_name("web-1"), BackendId::from_name("web-2"));
}

fn backend_sets() -> impl Strategy<Value = (Vec<(BackendId, u32)>, u32)> {
    (
        proptest::collection::btree_map(any::<u32>(), 0u32..20, 0..30),
        prop::sample::select(vec![3011u32, 4099, 10007]),
    )
        .prop_map(|(m, size)| {
            (
                m.into_iter().map(|(id, w)| (BackendId(id), w)).collect(),
                size,
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn maglev_invariants((backends, size) in backend_sets(), hash in any::<u64>()) {
        let t = Maglev::new(&backends, size).unwrap();
        let live: Vec<_> = backends.iter().filter(|&&(_, w)| w > 0).collect();
        prop_assert_eq!(t.is_empty(), live.is_empty());
        prop_assert_eq!(t.lookup(hash).is_none(), live.is_empty());
        let counts = t.slot_counts();
        // Only positive-weight backends hold slots, and all of them do
        // (each is owed at least size / (100 * 20) slots).
        prop_assert_eq!(counts.len(), live.len());
        for (id, _) in &live {
            prop_assert!(counts.contains_key(id));
        }
        if !live.is_empty() {
            prop_assert_eq!(counts.values().sum::<usize>(), size as usize);
            // Shares follow weights to within one slot per backend plus
            // the last partial round.
            let total: u64 = live.iter().map(|&&(_, w)| u64::from(w)).sum();
            for &&(id, w) in &live {
                let want = f64::from(size) * w as f64 / total as f64;
                let got = counts[&id] as f64;
                prop_assert!((got - want).abs() <= live.len() as f64 + 1.0,
                    "{} got {} want {:.1}", id, got, want);
            }
            // Equal weights: floor or ceil.
            if live.iter().all(|&&(_, w)| w == live[0].1) {
                let min = counts.values().min().copied().unwrap_or(0);
                let max = counts.values().max().copied().unwrap_or(0);
                prop_assert!(max - min <= 1);
            }
        }
        let reference = reference_table(&backends, size);
        prop_assert_eq!(t.slots(), reference.as_slice());
        // Any order builds the same table.
        let mut reversed = backends.clone();
        reversed.reverse();
        prop_assert_eq!(Maglev::new(&reversed, size).unwrap(), t);
    }
}
