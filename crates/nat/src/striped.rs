//! A NAT kept in several stripes, so that workers translating different
//! connections take different locks (the caller's) instead of one.
//!
//! A set is `count` [`Nat`]s with the same rules, stripe `i` made with
//! [`Share`] `i` of `count`: it hands out only external ports `p` with
//! `p % count == i`, and [`Steering`] finds a packet's stripe from the
//! packet alone (see its module doc). A connection lives in one stripe,
//! with its mapping; a hairpin's two passes may use two stripes, one after
//! the other, never both at once. What a set gives up against one table:
//! each stripe has `1 / count` of the ports of every pool and of the
//! connection caps, so endpoints whose source ports all fall in one
//! stripe find less room.
//!
//! The functions here take the set as [`NatStripes`]: a slice of `Nat`s,
//! one `Nat` (a set of one), or the caller's stripes behind locks.

use conntrack::{Snapshot, SNAPSHOT_VERSION};
use packet::FlowKey;

use crate::{
    v4_addrs, MappingView, Nat, NatImportError, NatImportReport, NatSnapshot, NatStats, Outcome,
    PoolView, Preview, Rules, RulesError, Share, Steering, EXTERNAL_ZONE, NAT_SNAPSHOT_VERSION,
    REWRITE_SPAN,
};

/// Access to the stripes of a set, one at a time.
pub trait NatStripes {
    /// Number of stripes (the steering's count).
    fn count(&self) -> usize;
    /// Runs `f` on stripe `i` (`i < count`).
    fn with_stripe<R>(&mut self, i: usize, f: impl FnOnce(&mut Nat) -> R) -> R;
}

impl NatStripes for Nat {
    fn count(&self) -> usize {
        1
    }

    fn with_stripe<R>(&mut self, _: usize, f: impl FnOnce(&mut Nat) -> R) -> R {
        f(self)
    }
}

impl NatStripes for [Nat] {
    fn count(&self) -> usize {
        self.len()
    }

    /// # Panics
    ///
    /// On an empty slice (a set has at least one stripe).
    fn with_stripe<R>(&mut self, i: usize, f: impl FnOnce(&mut Nat) -> R) -> R {
        let n = self.len();
        f(&mut self[i % n])
    }
}

/// `count` stripes under `rules` (rounded down to a power of two, at most
/// [`crate::MAX_STRIPES`]), each with `1 / count` of `ct`'s caps (rounded
/// up), and their steering.
pub fn new_set(
    ct: conntrack::Config,
    rules: &Rules,
    count: usize,
) -> Result<(Vec<Nat>, Steering), RulesError> {
    let steer = Steering::new(rules, count);
    let n = steer.count();
    let part = conntrack::Config {
        max_entries: ct.max_entries.div_ceil(n),
        max_per_port: ct.max_per_port.div_ceil(n),
        ..ct
    };
    let nats = (0..n)
        .map(|i| {
            let share = Share::new(i, n).unwrap_or(Share::WHOLE);
            Nat::new_stripe(part, rules.clone(), share)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((nats, steer))
}

/// [`Nat::translate`] over a set: the packet's stripe, then for a hairpin
/// the second pass in the stripe of the packet as it comes back in (the
/// first stripe let go before the second is taken).
#[allow(clippy::too_many_arguments)]
pub fn translate<S: NatStripes + ?Sized>(
    s: &mut S,
    steer: &Steering,
    from: u32,
    port: u32,
    key: &FlowKey,
    frame: &mut [u8],
    partial: bool,
    now: u64,
) -> Outcome {
    // From a tenant only the source is rewritten, so a packet that will
    // hairpin is one to our own address already: only those pay for
    // saving the bytes a dropped second pass must restore.
    let saved: Option<Vec<u8>> = (from != EXTERNAL_ZONE
        && v4_addrs(key, frame).is_some_and(|(_, d)| steer.owns(d)))
    .then(|| frame[..frame.len().min(REWRITE_SPAN)].to_vec());
    let hairpins = |o: &Outcome| matches!(o, Outcome::Forward { zone: EXTERNAL_ZONE, dst, .. } if steer.owns(*dst));
    let at = pick(s, steer, from, key, frame, now);
    let (first, commit) = s.with_stripe(at, |n| {
        n.committed = None;
        let out = n.pass(from, port, key, frame, partial, now, false);
        if !hairpins(&out) {
            n.record(&out);
        }
        (out, n.committed.take())
    });
    if !hairpins(&first) {
        return first;
    }
    let Ok(k2) = FlowKey::parse(frame) else {
        s.with_stripe(at, |n| n.record(&first));
        return first;
    };
    let back = pick(s, steer, EXTERNAL_ZONE, &k2, frame, now);
    let out = s.with_stripe(back, |n| {
        let out = match n.pass(EXTERNAL_ZONE, port, &k2, frame, partial, now, true) {
            Outcome::Forward { zone, dst, .. } => Outcome::Forward {
                zone,
                dst,
                hairpin: true,
            },
            // Nothing takes it: out of the uplink as the first pass left it.
            Outcome::NoMatch => first,
            drop @ Outcome::Drop(_) => drop,
        };
        n.record(&out);
        out
    });
    if let Outcome::Drop(_) = out {
        // Dropped as a whole: the frame as it came (captures show what the
        // VM sent) and no half connection holding a port until it times
        // out.
        if let Some(b) = &saved {
            frame[..b.len()].copy_from_slice(b);
        }
        if let Some(id) = commit {
            s.with_stripe(at, |n| n.undo_commit(id, now));
        }
    }
    out
}

/// [`Nat::preview`] over a set.
pub fn preview<S: NatStripes + ?Sized>(
    s: &mut S,
    steer: &Steering,
    from: u32,
    key: &FlowKey,
    frame: &[u8],
    now: u64,
) -> Preview {
    let at = pick(s, steer, from, key, frame, now);
    s.with_stripe(at, |n| n.preview(from, key, now))
}

/// The packet's stripe; for an ICMP error whose quote that stripe does not
/// know, the other endpoint's stripe when that one does (see
/// [`Steering::error_alternative`]).
fn pick<S: NatStripes + ?Sized>(
    s: &mut S,
    steer: &Steering,
    from: u32,
    key: &FlowKey,
    frame: &[u8],
    now: u64,
) -> usize {
    let at = steer.stripe(from, key, frame);
    match steer.error_alternative(at, from, key, frame) {
        Some(alt)
            if !s.with_stripe(at, |n| n.knows_quote(from, key, frame, now))
                && s.with_stripe(alt, |n| n.knows_quote(from, key, frame, now)) =>
        {
            alt
        }
        _ => at,
    }
}

/// The stripes' counters summed.
pub fn stats<S: NatStripes + ?Sized>(s: &mut S) -> NatStats {
    let mut st = NatStats::default();
    for i in 0..s.count() {
        s.with_stripe(i, |n| st.merge(n.stats()));
    }
    st
}

/// Every mapping of every stripe, sorted as one NAT's.
pub fn mappings<S: NatStripes + ?Sized>(s: &mut S) -> Vec<MappingView> {
    let mut v = Vec::new();
    for i in 0..s.count() {
        v.extend(s.with_stripe(i, |n| n.mappings()));
    }
    v.sort_by_key(|m| {
        (
            m.zone,
            *m.inside.ip(),
            m.inside.port(),
            m.proto,
            *m.external.ip(),
        )
    });
    v
}

/// The pools of every stripe, each address and protocol's shares added up.
pub fn pools<S: NatStripes + ?Sized>(s: &mut S) -> Vec<PoolView> {
    let mut all: Vec<PoolView> = Vec::new();
    for i in 0..s.count() {
        all.extend(s.with_stripe(i, |n| n.pools()));
    }
    all.sort_by_key(|p| (p.external, p.proto));
    let mut out: Vec<PoolView> = Vec::new();
    for p in all {
        match out.last_mut() {
            Some(q) if (q.external, q.proto) == (p.external, p.proto) => {
                q.used += p.used;
                q.free += p.free;
            }
            _ => out.push(p),
        }
    }
    out
}

/// The connections of every stripe as one snapshot (soonest expiry
/// first, as one NAT's export).
pub fn export<S: NatStripes + ?Sized>(s: &mut S, now: u64) -> NatSnapshot {
    let mut entries = Vec::new();
    for i in 0..s.count() {
        entries.extend(s.with_stripe(i, |n| n.export(now).conntrack.entries));
    }
    entries.sort_by_key(|e| e.remaining_ns());
    NatSnapshot {
        version: NAT_SNAPSHOT_VERSION,
        conntrack: Snapshot {
            version: SNAPSHOT_VERSION,
            entries,
        },
    }
}

/// Imports a snapshot (of a set of any size, or of one NAT), each entry
/// into the stripe both of its keys lead to. An entry whose keys lead to
/// two (saved by a set of another size or under other forwards) is
/// counted as rejected.
pub fn import<S: NatStripes + ?Sized>(
    s: &mut S,
    steer: &Steering,
    snap: NatSnapshot,
    now: u64,
) -> Result<NatImportReport, NatImportError> {
    if snap.version != NAT_SNAPSHOT_VERSION {
        return Err(NatImportError::Version {
            found: snap.version,
        });
    }
    if snap.conntrack.version != SNAPSHOT_VERSION {
        return Err(conntrack::ImportError::Version {
            found: snap.conntrack.version,
        }
        .into());
    }
    let count = s.count();
    let mut parts: Vec<Vec<_>> = (0..count).map(|_| Vec::new()).collect();
    let mut rep = NatImportReport::default();
    for e in snap.conntrack.entries {
        match steer
            .of_entry(e.orig(), e.reply())
            .and_then(|i| parts.get_mut(i))
        {
            Some(p) => p.push(e),
            None => rep.rejected += 1,
        }
    }
    for (i, entries) in parts.into_iter().enumerate() {
        let part = NatSnapshot {
            version: NAT_SNAPSHOT_VERSION,
            conntrack: Snapshot {
                version: SNAPSHOT_VERSION,
                entries,
            },
        };
        let r = s.with_stripe(i, |n| n.import(part, now))?;
        rep.merge(&r);
    }
    Ok(rep)
}
