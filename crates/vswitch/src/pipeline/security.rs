//! Security groups as a pipeline stage: stateful allow-lists per port.
//!
//! Each filtered port has its own conntrack zone in the switch's security
//! group table (as OVN gives every logical port a zone), so a connection
//! is judged twice, independently: by the source port's egress rules when
//! it leaves the source VM (on the source's host) and by the destination
//! port's ingress rules when it is delivered (on the destination's host,
//! after VXLAN, routing and NAT). A connection's first packet is evaluated
//! against the port's groups (`firewall` crate) and committed only when a
//! rule allows it; later packets of either direction and related ICMP
//! errors match the entry and skip the rules. Non-IP frames, neighbour
//! discovery and later IP fragments are untracked and pass (port security
//! already bound their addresses). Frames the switch itself makes (DHCP,
//! ARP and DNS answers, ICMP errors from the router) are not judged.
//!
//! The table ([`SgTables`]) is striped by zone: [`SG_SHARDS`] conntrack
//! tables, each behind its own lock on its own cache line, a zone living in
//! shard `zone % SG_SHARDS`. A port's connections are all in its own zone
//! (committed with the port as creator), so no lookup ever needs another
//! shard, and workers judging different ports take different locks instead
//! of one global lock on the packet path. A port's per-port cap stays exact
//! (its shard's count for it is its count), and the global bound of the
//! single table it replaced is kept by one atomic total of all shards.
//! Packets of one port on several workers still share that port's stripe;
//! the next step would be striping by a symmetric flow hash, with per-port
//! counts kept outside the shards.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use conntrack::{
    CommitError, ConnId, Conntrack, EntryView, ImportError, ImportReport, Limit, NewConn, Snapshot,
    Stats, Track,
};
use firewall::{Direction, Firewall, GroupId, Packet, RuleRef};
use packet::FlowKey;
use parking_lot::{Mutex, MutexGuard};
use serde::{Deserialize, Serialize};

use super::DropReason;
use crate::clock::Timestamp;
use crate::fdb::PortId;
use crate::trace;

/// What the security-group table keeps per connection: the rule that
/// allowed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SgConn {
    /// The allowing rule.
    pub rule: RuleRef,
    /// The direction it was allowed in.
    pub dir: Direction,
}

/// Number of shards of [`SgTables`]. Fixed rather than derived from the
/// core count so a zone's shard is the same on every host; 64 is at least
/// 4x the workers of the hosts this runs on (few ports then collide), and
/// port ids are small and dense, so the first 64 ports (zones `id + 1`)
/// never share a lock. Empty shards allocate nothing but their padded
/// lock.
pub const SG_SHARDS: usize = 64;

/// Fewest expired entries [`SgTables::expire`] offers each shard per call.
const EXPIRE_MIN_PER_SHARD: usize = 16;

/// A value alone on its cache line (128 bytes: two 64-byte lines, as the
/// adjacent-line prefetcher pairs them), so workers writing one never
/// invalidate another's.
#[repr(align(128))]
#[derive(Debug)]
struct Padded<T>(T);

/// The switch's security-group connection table (all filtered ports; one
/// zone per port), striped by zone over [`SG_SHARDS`] locks (see the module
/// doc).
#[derive(Debug)]
pub struct SgTables {
    shards: Box<[Padded<Mutex<Conntrack<SgConn>>>]>,
    /// Entries in all shards (expired ones not reaped included, as a
    /// table's `len`), plus commits in flight that reserved a place: never
    /// above `max_entries`.
    total: Padded<AtomicUsize>,
    /// The global bound (the single table's `max_entries`).
    max_entries: usize,
    /// New connections refused by the global bound; the shards never
    /// see it (each one's own cap is the whole bound), so it is counted
    /// here and added to [`SgTables::stats`].
    refused_global: AtomicU64,
    /// Shard [`SgTables::expire`] starts with, so a small `max` reaches
    /// every shard in turn.
    expire_from: AtomicUsize,
}

/// Applies a shard's size change (`before` -> `after`) to the total.
fn apply(total: &AtomicUsize, before: usize, after: usize) {
    if after > before {
        total.fetch_add(after - before, Ordering::Relaxed);
    } else if before > after {
        total.fetch_sub(before - after, Ordering::Relaxed);
    }
}

impl SgTables {
    /// Empty shards with `cfg`'s timeouts and per-port cap; `cfg`'s
    /// `max_entries` bounds all shards together.
    pub fn new(cfg: conntrack::Config) -> Result<Self, conntrack::ConfigError> {
        let max_entries = cfg.max_entries;
        let shards = (0..SG_SHARDS)
            .map(|_| Conntrack::new(cfg).map(|ct| Padded(Mutex::new(ct))))
            .collect::<Result<Box<[_]>, _>>()?;
        Ok(SgTables {
            shards,
            total: Padded(AtomicUsize::new(0)),
            max_entries,
            refused_global: AtomicU64::new(0),
            expire_from: AtomicUsize::new(0),
        })
    }

    fn shard(&self, zone: u32) -> &Mutex<Conntrack<SgConn>> {
        // SG_SHARDS is a power of two: the low bits of the zone.
        &self.shards[zone as usize & (SG_SHARDS - 1)].0
    }

    /// Runs `f` on a locked shard, keeping the total exact.
    fn sync<R>(
        &self,
        ct: &mut Conntrack<SgConn>,
        f: impl FnOnce(&mut Conntrack<SgConn>) -> R,
    ) -> R {
        let before = ct.len();
        let r = f(ct);
        apply(&self.total.0, before, ct.len());
        r
    }

    /// Locks `zone`'s shard: the packet path's access.
    pub fn lock_zone(&self, zone: u32) -> ZoneGuard<'_> {
        ZoneGuard {
            ct: self.shard(zone).lock(),
            tables: self,
        }
    }

    /// Runs `f` on every shard in turn, each under its lock (control
    /// paths). `f` may remove entries; it must not add any (the global
    /// bound is checked only by [`ZoneGuard::commit`] and
    /// [`SgTables::import`]).
    pub fn with_each(&self, mut f: impl FnMut(&mut Conntrack<SgConn>)) {
        for s in self.shards.iter() {
            self.sync(&mut s.0.lock(), &mut f);
        }
    }

    /// Entries in all shards (as a table's `len`: expired ones not reaped
    /// yet included).
    pub fn len(&self) -> usize {
        self.total.0.load(Ordering::Relaxed)
    }

    /// True when no shard holds an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The global bound.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// Entries charged to `port` in `zone`'s shard: all of the port's when
    /// `zone` is its zone ([`zone_of`]).
    pub fn port_count(&self, zone: u32, port: u32) -> usize {
        self.shard(zone).lock().port_count(port)
    }

    /// The shards' counters summed, with the global bound's refusals.
    pub fn stats(&self) -> Stats {
        let mut st = Stats::default();
        for s in self.shards.iter() {
            st.merge(s.0.lock().stats());
        }
        st.refused_global += self.refused_global.load(Ordering::Relaxed);
        st
    }

    /// Calls `f` with every live entry, shard by shard (each under its
    /// lock in turn, so not one instant for the whole table).
    pub fn for_each_entry(&self, now: u64, mut f: impl FnMut(&EntryView<'_, SgConn>)) {
        for s in self.shards.iter() {
            for e in s.0.lock().entries(now) {
                f(&e);
            }
        }
    }

    /// Removes `zone`'s entries; how many.
    pub fn flush_zone(&self, zone: u32) -> usize {
        self.sync(&mut self.shard(zone).lock(), |ct| ct.flush_zone(zone))
    }

    /// Reaps up to `max` expired entries over all shards: a fair share
    /// each (at least [`EXPIRE_MIN_PER_SHARD`] while `max` lasts), then
    /// what is left of `max` to the shards that used their whole share.
    pub fn expire(&self, now: u64, max: usize) -> usize {
        let share = (max / SG_SHARDS).max(EXPIRE_MIN_PER_SHARD);
        let start = self.expire_from.fetch_add(1, Ordering::Relaxed);
        let order = || (0..SG_SHARDS).filter_map(|i| self.shards.get((start + i) % SG_SHARDS));
        let mut left = max;
        let mut busy = Vec::new();
        for s in order() {
            if left == 0 {
                break;
            }
            let n = share.min(left);
            let done = self.sync(&mut s.0.lock(), |ct| ct.expire(now, n));
            left -= done;
            if done == n {
                busy.push(s);
            }
        }
        for s in busy {
            if left == 0 {
                break;
            }
            left -= self.sync(&mut s.0.lock(), |ct| ct.expire(now, left));
        }
        max - left
    }

    /// The live entries of all shards as one snapshot (soonest expiry
    /// first, as a single table's export).
    pub fn export(&self, now: u64) -> Snapshot<SgConn> {
        let mut entries = Vec::new();
        for s in self.shards.iter() {
            entries.extend(s.0.lock().export(now).entries);
        }
        entries.sort_by_key(|e| e.remaining_ns());
        Snapshot {
            version: conntrack::SNAPSHOT_VERSION,
            entries,
        }
    }

    /// Imports a snapshot (of [`SgTables::export`] or of a single table),
    /// each entry into its zone's shard, under the global bound. When the
    /// bound is reached part-way, the entries left (the longest-lived, as
    /// a single table refuses them) are counted as expired or refused by
    /// the bound without further checks.
    pub fn import(&self, snap: Snapshot<SgConn>, now: u64) -> Result<ImportReport, ImportError> {
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
            // Room for all: one import per shard (exact expiry order
            // within each).
            let mut by_shard: Vec<Vec<_>> = (0..SG_SHARDS).map(|_| Vec::new()).collect();
            for e in entries {
                if let Some(v) = by_shard.get_mut(e.orig().zone as usize & (SG_SHARDS - 1)) {
                    v.push(e);
                }
            }
            for (s, v) in self.shards.iter().zip(by_shard) {
                if !v.is_empty() {
                    rep.merge(&self.sync(&mut s.0.lock(), |ct| ct.import(one(v), now))?);
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
            let mut ct = self.shard(e.orig().zone).lock();
            let before = ct.len();
            let r = ct.import(one(vec![e]), now);
            // The reserved place stands for the entry.
            apply(&self.total.0, before + 1, ct.len());
            rep.merge(&r?);
        }
        Ok(rep)
    }

    /// Takes a place under the global bound, if there is one.
    fn reserve(&self) -> bool {
        self.total
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t < self.max_entries).then_some(t + 1)
            })
            .is_ok()
    }
}

/// A zone's shard, locked ([`SgTables::lock_zone`]). Reads go to the
/// shard's table; the calls that change it are the guard's own, which keep
/// the total exact and the global bound.
#[derive(Debug)]
pub struct ZoneGuard<'a> {
    ct: MutexGuard<'a, Conntrack<SgConn>>,
    tables: &'a SgTables,
}

impl Deref for ZoneGuard<'_> {
    type Target = Conntrack<SgConn>;

    fn deref(&self) -> &Conntrack<SgConn> {
        &self.ct
    }
}

impl ZoneGuard<'_> {
    /// [`Conntrack::track`]; a new connection is refused
    /// ([`Track::Refused`]) when all shards together hold the global bound
    /// (after reaping up to [`conntrack::REAP_ON_LIMIT`] expired entries of
    /// this shard), so policy is not evaluated in vain.
    pub fn track(&mut self, zone: u32, port: u32, key: &FlowKey, frame: &[u8], now: u64) -> Track {
        let t = self
            .tables
            .sync(&mut self.ct, |ct| ct.track(zone, port, key, frame, now));
        if matches!(t, Track::New(_)) && !self.room(now) {
            self.tables.refused_global.fetch_add(1, Ordering::Relaxed);
            return Track::Refused(Limit::Global);
        }
        t
    }

    /// [`Conntrack::commit`] under the global bound: a place is reserved
    /// first, so concurrent commits in other shards never overshoot it.
    pub fn commit(&mut self, new: &NewConn, now: u64, ext: SgConn) -> Result<ConnId, CommitError> {
        let reserved = self.tables.reserve() || {
            self.reap(now);
            self.tables.reserve()
        };
        if !reserved {
            // As a full single table: a live entry for the key wins.
            for k in [*new.key(), new.key().reverse()] {
                if let Some((id, _)) = self.ct.lookup(&k, now) {
                    return Err(CommitError::Exists(id));
                }
            }
            self.tables.refused_global.fetch_add(1, Ordering::Relaxed);
            return Err(CommitError::Limit(Limit::Global));
        }
        let before = self.ct.len();
        let r = self.ct.commit(new, now, ext);
        // The reserved place stands for the new entry.
        apply(&self.tables.total.0, before + 1, self.ct.len());
        r
    }

    /// Whether a new connection fits under the global bound now, after
    /// reaping this shard a little if not.
    fn room(&mut self, now: u64) -> bool {
        let free = |g: &Self| g.tables.len() < g.tables.max_entries;
        if free(self) {
            return true;
        }
        self.reap(now);
        free(self)
    }

    /// Reaps up to [`conntrack::REAP_ON_LIMIT`] expired entries of this
    /// shard (what a single table does before refusing).
    fn reap(&mut self, now: u64) {
        self.tables.sync(&mut self.ct, |ct| {
            ct.expire(now, conntrack::REAP_ON_LIMIT);
        });
    }
}

/// A filtered port's policy.
#[derive(Debug)]
pub struct PortSg {
    /// The tenant's compiled groups (with hit counters).
    pub fw: Arc<Firewall>,
    /// The port's groups in `fw`.
    pub groups: Vec<GroupId>,
    /// The port's conntrack zone.
    pub zone: u32,
    /// Most tracked connections of the port.
    pub max_connections: usize,
    /// The table (all filtered ports').
    pub table: Arc<SgTables>,
}

/// The conntrack zone of port `id` in the security-group table.
pub fn zone_of(id: PortId) -> u32 {
    id.wrapping_add(1)
}

impl PortSg {
    /// Judges the frame `key` (parsed from `frame`) crossing port `port` in
    /// `dir`: `Ok` to let it pass, or the drop reason.
    pub fn admit(
        &self,
        port: PortId,
        dir: Direction,
        key: &FlowKey,
        frame: &[u8],
        now: Timestamp,
    ) -> Result<(), DropReason> {
        if trace::active() {
            return self.admit_traced(port, dir, key, frame, now);
        }
        self.admit_inner(port, dir, key, frame, now)
    }

    fn admit_inner(
        &self,
        port: PortId,
        dir: Direction,
        key: &FlowKey,
        frame: &[u8],
        now: Timestamp,
    ) -> Result<(), DropReason> {
        let mut ct = self.table.lock_zone(self.zone);
        match ct.track(self.zone, port, key, frame, now.0) {
            Track::Established { .. } | Track::Related { .. } | Track::Untracked(_) => Ok(()),
            Track::Invalid(_) => Err(DropReason::ConnInvalid),
            Track::Refused(_) => Err(DropReason::ConnLimit),
            Track::New(new) => {
                let Some(pkt) = Packet::from_flow(key, dir) else {
                    return Ok(());
                };
                let Some(rule) = self.fw.evaluate(&self.groups, dir, &pkt) else {
                    return Err(denied(dir));
                };
                if ct.port_count(port) >= self.max_connections {
                    return Err(DropReason::ConnLimit);
                }
                match ct.commit(&new, now.0, SgConn { rule, dir }) {
                    Ok(_) | Err(CommitError::Exists(_)) => Ok(()),
                    Err(CommitError::Limit(_)) => Err(DropReason::ConnLimit),
                }
            }
        }
    }

    /// [`PortSg::admit`] under a packet trace: says which connection or
    /// rule decided; a dry run only looks the table up and classifies
    /// (no state advanced, nothing committed, no hit counted).
    #[cold]
    fn admit_traced(
        &self,
        port: PortId,
        dir: Direction,
        key: &FlowKey,
        frame: &[u8],
        now: Timestamp,
    ) -> Result<(), DropReason> {
        let way = match dir {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        };
        let known = {
            let ct = self.table.lock_zone(self.zone);
            let ext = ct
                .lookup_flow(self.zone, key, now.0)
                .and_then(|(id, _)| ct.get(id, now.0).map(|e| *e.ext));
            ext
        };
        if let Some(c) = known {
            trace::note("sg", || {
                format!(
                    "security groups {way}: tracked connection, allowed when it began by {}",
                    self.rule_name(c.rule)
                )
            });
            return if trace::dry_run() {
                Ok(())
            } else {
                self.admit_inner(port, dir, key, frame, now)
            };
        }
        let pkt = Packet::from_flow(key, dir);
        let first = match Conntrack::<SgConn>::first_packet(self.zone, key, frame) {
            Some(Track::Untracked(u)) => Some(Ok(u)),
            Some(Track::Invalid(i)) => Some(Err(i)),
            _ => None,
        };
        let matched = pkt.and_then(|p| self.fw.classify(&self.groups, dir, &p));
        let verdict = if trace::dry_run() {
            match (first, pkt, matched) {
                (Some(Ok(_)), ..) | (_, None, _) => Ok(()),
                (Some(Err(_)), ..) => Err(DropReason::ConnInvalid),
                (_, Some(_), None) => Err(denied(dir)),
                (_, Some(_), Some(_)) => Ok(()),
            }
        } else {
            self.admit_inner(port, dir, key, frame, now)
        };
        trace::note("sg", || match (first, pkt, matched, verdict) {
            (Some(Ok(u)), ..) => {
                format!("security groups {way}: not tracked ({u:?}), passes")
            }
            (_, None, ..) => format!("security groups {way}: not judged (not an IP flow), passes"),
            (Some(Err(i)), ..) => format!(
                "security groups {way}: no tracked connection and it cannot start one ({i:?})"
            ),
            (_, _, Some(r), Ok(())) => format!(
                "security groups {way}: new connection, {} allows",
                self.rule_name(r)
            ),
            (_, _, Some(r), Err(e)) => format!(
                "security groups {way}: {} allows, but {}",
                self.rule_name(r),
                e.as_str()
            ),
            (_, _, None, _) => format!(
                "security groups {way}: no rule of {} allows it",
                self.group_names()
            ),
        });
        verdict
    }

    /// `group web rule 2 (ingress ipv4 tcp 80 from any)`.
    fn rule_name(&self, r: RuleRef) -> String {
        let g = self.fw.group_name(r.group).unwrap_or("?");
        match self.fw.rule(r) {
            Some(spec) => format!("group {g} rule {} ({spec})", r.rule + 1),
            None => format!("group {g} rule {}", r.rule + 1),
        }
    }

    /// The port's groups, `web, ssh`.
    fn group_names(&self) -> String {
        let names: Vec<&str> = self
            .groups
            .iter()
            .filter_map(|&g| self.fw.group_name(g))
            .collect();
        if names.is_empty() {
            "its groups (none)".into()
        } else {
            format!("groups {}", names.join(", "))
        }
    }
}

fn denied(dir: Direction) -> DropReason {
    match dir {
        Direction::Egress => DropReason::SgEgressDenied,
        Direction::Ingress => DropReason::SgIngressDenied,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use firewall::{Family, GroupSpec, Proto, Remote, RuleSpec};

    fn tcp(
        src: std::net::Ipv4Addr,
        dst: std::net::Ipv4Addr,
        sp: u16,
        dp: u16,
        flags: u8,
    ) -> Vec<u8> {
        let mut f = Vec::new();
        let b = etherparse::PacketBuilder::ethernet2(A.0, B.0)
            .ipv4(src.octets(), dst.octets(), 64)
            .tcp(sp, dp, 1000, 64000);
        let b = if flags & 0x02 != 0 { b.syn() } else { b };
        let b = if flags & 0x10 != 0 { b.ack(1001) } else { b };
        b.write(&mut f, &[]).unwrap();
        f
    }

    fn sg(table: &Arc<SgTables>, zone: u32, groups: &[GroupSpec], names: &[&str]) -> PortSg {
        let fw = Firewall::compile(groups, &Default::default()).unwrap();
        let groups = names.iter().map(|n| fw.group_id(n).unwrap()).collect();
        PortSg {
            fw: Arc::new(fw),
            groups,
            zone,
            max_connections: 2,
            table: table.clone(),
        }
    }

    fn rule(direction: Direction, proto: Proto, ports: Option<(u16, u16)>) -> RuleSpec {
        RuleSpec {
            direction,
            family: Family::V4,
            proto,
            ports,
            icmp_type: None,
            icmp_code: None,
            remote: Remote::Any,
        }
    }

    #[test]
    fn stateful_per_port_zones_and_limits() {
        let table = Arc::new(SgTables::new(conntrack::Config::default()).unwrap());
        let web = GroupSpec {
            name: "web".into(),
            rules: vec![
                rule(Direction::Ingress, Proto::Tcp, Some((80, 80))),
                rule(Direction::Egress, Proto::Any, None),
            ],
        };
        let client = GroupSpec {
            name: "client".into(),
            rules: vec![rule(Direction::Egress, Proto::Any, None)],
        };
        let groups = [web, client];
        let (a, b) = (
            sg(&table, 1, &groups, &["client"]),
            sg(&table, 2, &groups, &["web"]),
        );
        let now = Timestamp(1);
        let syn = tcp(IP_A, IP_B, 40000, 80, 0x02);
        let k = key(&syn);
        // A's egress allows it; B's ingress allows port 80.
        assert_eq!(a.admit(1, Direction::Egress, &k, &syn, now), Ok(()));
        assert_eq!(b.admit(2, Direction::Ingress, &k, &syn, now), Ok(()));
        // The reply passes both without an ingress rule on A.
        let synack = tcp(IP_B, IP_A, 80, 40000, 0x12);
        let k2 = key(&synack);
        assert_eq!(b.admit(2, Direction::Egress, &k2, &synack, now), Ok(()));
        assert_eq!(a.admit(1, Direction::Ingress, &k2, &synack, now), Ok(()));
        // Port 22 is not allowed into B; nothing is committed for it.
        let ssh = tcp(IP_A, IP_B, 40001, 22, 0x02);
        let k3 = key(&ssh);
        assert_eq!(a.admit(1, Direction::Egress, &k3, &ssh, now), Ok(()));
        assert_eq!(
            b.admit(2, Direction::Ingress, &k3, &ssh, now),
            Err(DropReason::SgIngressDenied)
        );
        // A mid-stream segment nobody tracked is invalid.
        let ack = tcp(IP_A, IP_B, 40002, 80, 0x10);
        assert_eq!(
            a.admit(1, Direction::Egress, &key(&ack), &ack, now),
            Err(DropReason::ConnInvalid)
        );
        // A's limit is 2: the third new connection is refused.
        let third = tcp(IP_A, IP_B, 40003, 80, 0x02);
        assert_eq!(
            a.admit(1, Direction::Egress, &key(&third), &third, now),
            Err(DropReason::ConnLimit)
        );
        // ARP is not judged.
        let arp_f = arp(A, 1, A, IP_A, IP_B);
        assert_eq!(
            b.admit(2, Direction::Ingress, &key(&arp_f), &arp_f, now),
            Ok(())
        );
        // Hits: B's port-80 rule once (the SYN; the reply skipped the
        // rules); A's egress rule for each new connection it allowed.
        let hits = |s: &PortSg| s.fw.rule_hits().map(|(_, h)| h).sum::<u64>();
        assert_eq!(hits(&b), 1);
        assert!(hits(&a) >= 2);
    }
    fn tables(max_entries: usize) -> Arc<SgTables> {
        Arc::new(
            SgTables::new(conntrack::Config {
                max_entries,
                max_per_port: usize::MAX,
                ..conntrack::Config::default()
            })
            .unwrap(),
        )
    }

    fn egress_any() -> [GroupSpec; 1] {
        [GroupSpec {
            name: "out".into(),
            rules: vec![rule(Direction::Egress, Proto::Any, None)],
        }]
    }

    /// Port `id`'s filter (zone [`zone_of`]) allowing any egress, with a
    /// cap of `max`.
    fn port(table: &Arc<SgTables>, id: PortId, max: usize) -> PortSg {
        let mut s = sg(table, zone_of(id), &egress_any(), &["out"]);
        s.max_connections = max;
        s
    }

    /// A SYN from port `sp` of A.
    fn syn(sp: u16) -> Vec<u8> {
        tcp(IP_A, IP_B, sp, 80, 0x02)
    }

    fn open(p: &PortSg, id: PortId, sp: u16, now: Timestamp) -> Result<(), DropReason> {
        let f = syn(sp);
        p.admit(id, Direction::Egress, &key(&f), &f, now)
    }

    #[test]
    fn ports_in_different_stripes_are_independent() {
        let t = tables(1 << 10);
        // Zones 1 and 2: different shards; the same flow in each.
        let (a, b) = (port(&t, 0, 2), port(&t, 1, 2));
        assert_ne!(a.zone as usize % SG_SHARDS, b.zone as usize % SG_SHARDS);
        let now = Timestamp(1);
        // Holding A's shard does not block B (a global lock would).
        let held = t.lock_zone(a.zone);
        assert_eq!(open(&b, 1, 40000, now), Ok(()));
        drop(held);
        assert_eq!(open(&a, 0, 40000, now), Ok(()));
        assert_eq!(open(&a, 0, 40001, now), Ok(()));
        // A's cap is its own: B's entry does not count against it.
        assert_eq!(open(&a, 0, 40002, now), Err(DropReason::ConnLimit));
        assert_eq!(open(&b, 1, 40001, now), Ok(()));
        assert_eq!(t.port_count(a.zone, 0), 2);
        assert_eq!(t.port_count(b.zone, 1), 2);
        assert_eq!(t.len(), 4);
        assert_eq!(t.stats().created, 4);
    }

    #[test]
    fn global_bound_spans_shards() {
        let t = tables(3);
        let ps: Vec<PortSg> = (0..4).map(|id| port(&t, id, 10)).collect();
        let now = Timestamp(1);
        // Port 3's first packet, tracked while there is room.
        let f = syn(40001);
        let k = key(&f);
        let Track::New(new) = t.lock_zone(ps[3].zone).track(ps[3].zone, 3, &k, &f, now.0) else {
            panic!("not a new connection");
        };
        for (id, p) in ps.iter().enumerate().take(3) {
            assert_eq!(open(p, id as PortId, 40000, now), Ok(()));
        }
        assert_eq!(t.len(), 3);
        // A fourth port, in a shard of its own, is refused by the total:
        // by track, and by a commit decided before the bound was reached.
        assert_eq!(open(&ps[3], 3, 40000, now), Err(DropReason::ConnLimit));
        let ext = SgConn {
            rule: RuleRef { group: 0, rule: 0 },
            dir: Direction::Egress,
        };
        assert_eq!(
            t.lock_zone(ps[3].zone).commit(&new, now.0, ext),
            Err(CommitError::Limit(Limit::Global))
        );
        assert_eq!(t.stats().refused_global, 2);
        assert_eq!(t.len(), 3);
        // Once the others' entries expire and are reaped, it fits.
        let later = Timestamp(now.0 + 86_400 * 1_000_000_000);
        assert_eq!(t.expire(later.0, 1024), 3);
        assert!(t.is_empty());
        assert_eq!(open(&ps[3], 3, 40000, later), Ok(()));
        assert_eq!(t.len(), 1);
    }

    /// Opens `n` connections on each of ports `ids`.
    fn fill(t: &Arc<SgTables>, ids: &[PortId], n: u16) {
        for &id in ids {
            let p = port(t, id, 100);
            for i in 0..n {
                assert_eq!(open(&p, id, 40000 + i, Timestamp(1)), Ok(()));
            }
        }
    }

    /// Entries per zone.
    fn zones(t: &SgTables) -> std::collections::BTreeMap<u32, usize> {
        let mut m = std::collections::BTreeMap::new();
        t.for_each_entry(2, |e| {
            assert_eq!(e.orig.zone, e.reply.zone);
            *m.entry(e.orig.zone).or_default() += 1;
        });
        m
    }

    #[test]
    fn export_import_restores_every_zone_in_its_shard() {
        // Ports 0 and 64 share a shard (zones 1 and 65); 1 and 5 do not.
        let ids = [0, 1, 5, 64];
        let t = tables(1 << 10);
        fill(&t, &ids, 3);
        let snap = t.export(2);
        assert_eq!(snap.entries.len(), 12);
        let fresh = tables(1 << 10);
        let rep = fresh.import(snap.clone(), 2).unwrap();
        assert_eq!(rep.imported, 12);
        assert_eq!(fresh.len(), 12);
        assert_eq!(zones(&fresh), zones(&t));
        for &id in &ids {
            // Each port's entries are where its packets look.
            assert_eq!(fresh.port_count(zone_of(id), id), 3);
            let f = syn(40000);
            let g = fresh.lock_zone(zone_of(id));
            assert!(g.lookup_flow(zone_of(id), &key(&f), 2).is_some());
        }
        assert_eq!(fresh.stats().imported, 12);
        // Past the bound: the longest-lived are refused.
        let small = tables(5);
        let rep = small.import(snap, 2).unwrap();
        assert_eq!((rep.imported, rep.refused_global), (5, 7));
        assert_eq!(small.len(), 5);
        let placed: usize = ids
            .iter()
            .map(|&id| small.port_count(zone_of(id), id))
            .sum();
        assert_eq!(placed, 5);
    }

    #[test]
    fn flush_zone_empties_only_that_zone() {
        // Zones 1 and 65 share a shard; 2 has its own.
        let t = tables(1 << 10);
        fill(&t, &[0, 1, 64], 2);
        assert_eq!(t.flush_zone(zone_of(0)), 2);
        assert_eq!(t.len(), 4);
        let m = zones(&t);
        assert_eq!(m.get(&zone_of(0)), None);
        assert_eq!(m.get(&zone_of(1)), Some(&2));
        assert_eq!(m.get(&zone_of(64)), Some(&2));
        assert_eq!(t.port_count(zone_of(64), 64), 2);
        assert_eq!(t.stats().removed, 2);
    }
}
