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
//! The table ([`SgTables`]) is striped by zone ([`crate::stripes`]): a
//! port's connections are all in its own zone (committed with the port as
//! creator), so workers judging different ports take different locks
//! instead of one global lock on the packet path, and a port's per-port
//! cap stays exact.

use std::ops::Deref;
use std::sync::Arc;

use conntrack::{CommitError, ConnId, Conntrack, Limit, NewConn, Track};
use firewall::{Direction, Firewall, GroupId, Packet, RuleRef};
use packet::FlowKey;
use parking_lot::MutexGuard;
use serde::{Deserialize, Serialize};

use super::DropReason;
use crate::clock::Timestamp;
use crate::fdb::PortId;
use crate::stripes::Stripes;
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

/// Number of shards of [`SgTables`].
pub const SG_SHARDS: usize = crate::stripes::STRIPES;

/// The switch's security-group connection table (all filtered ports; one
/// zone per port), striped by zone (see [`crate::stripes`]).
pub type SgTables = Stripes<Conntrack<SgConn>>;

impl Stripes<Conntrack<SgConn>> {
    /// Empty shards with `cfg`'s timeouts and per-port cap; `cfg`'s
    /// `max_entries` bounds all shards together.
    pub fn new_sg(cfg: conntrack::Config) -> Result<Self, conntrack::ConfigError> {
        Stripes::new(cfg.max_entries, || Conntrack::new(cfg))
    }

    /// Locks `zone`'s shard: the packet path's access.
    pub fn lock_zone(&self, zone: u32) -> ZoneGuard<'_> {
        ZoneGuard {
            ct: self.lock(zone),
            tables: self,
        }
    }

    /// Entries charged to `port` in `zone`'s shard: all of the port's when
    /// `zone` is its zone ([`zone_of`]).
    pub fn port_count(&self, zone: u32, port: u32) -> usize {
        self.lock(zone).port_count(port)
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
            self.tables.count_refused();
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
            self.tables.count_refused();
            return Err(CommitError::Limit(Limit::Global));
        }
        let before = self.ct.len();
        let r = self.ct.commit(new, now, ext);
        // The reserved place stands for the new entry.
        self.tables.settle_reserved(before, self.ct.len());
        r
    }

    /// Whether a new connection fits under the global bound now, after
    /// reaping this shard a little if not.
    fn room(&mut self, now: u64) -> bool {
        let free = |g: &Self| g.tables.has_room();
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
        let table = Arc::new(SgTables::new_sg(conntrack::Config::default()).unwrap());
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
            SgTables::new_sg(conntrack::Config {
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
