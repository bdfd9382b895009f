//! The host's NAT, striped so that workers translating different
//! connections take different locks: no lock shared by every packet.
//!
//! [`NatTables`] holds the stripes of a [`nat::striped`] set, each behind
//! its own mutex on its own cache line, and the set's [`nat::Steering`]
//! (swapped whole with the rules, read without a lock). A packet locks the
//! one stripe its connection is in (a hairpin, one and then another,
//! never two at once); control-plane walks lock the stripes in turn.
//!
//! The stripe count is fixed when the switch starts: up to 8 (a few times
//! the workers of the hosts this runs on, so that two workers rarely meet
//! on a lock), fewer when the SNAT port range is small, so that every
//! stripe keeps at least 1024 ports of it ([`stripes_for`]). Changing it
//! would move connections between stripes; a restart carries them over
//! ([`NatTables::import`] places each saved connection by its keys).

use arc_swap::ArcSwap;
use nat::{
    MappingView, Nat, NatImportError, NatImportReport, NatSnapshot, NatStats, NatStripes, Outcome,
    PoolView, Preview, Rules, RulesError, Steering,
};
use packet::FlowKey;
use parking_lot::Mutex;
use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::stripes::Padded;

/// Most NAT stripes.
pub const MAX_NAT_STRIPES: usize = 8;

/// Fewest ports of the SNAT range a stripe keeps.
const MIN_PORTS_PER_STRIPE: usize = 1024;

/// The stripe count for SNAT range `ports`: the largest power of two up to
/// [`MAX_NAT_STRIPES`] that leaves each stripe 1024 ports, at least 1.
pub fn stripes_for(ports: (u16, u16)) -> usize {
    let (lo, hi) = ports;
    let n = (usize::from(hi) + 1).saturating_sub(usize::from(lo));
    let mut count = MAX_NAT_STRIPES;
    while count > 1 && n / count < MIN_PORTS_PER_STRIPE {
        count /= 2;
    }
    count
}

/// The striped NAT (see the module doc).
#[derive(Debug)]
pub struct NatTables {
    stripes: Box<[Padded<Mutex<Nat>>]>,
    steer: ArcSwap<Steering>,
    /// The whole table's bound (the stripes' caps added up).
    max_entries: usize,
}

/// The stripes as [`NatStripes`]: each locked for one call.
struct Locked<'a>(&'a NatTables);

impl NatStripes for Locked<'_> {
    fn count(&self) -> usize {
        self.0.stripes.len()
    }

    fn with_stripe<R>(&mut self, i: usize, f: impl FnOnce(&mut Nat) -> R) -> R {
        let s = &self.0.stripes;
        f(&mut s[i % s.len()].0.lock())
    }
}

impl NatTables {
    /// `count` stripes (see [`stripes_for`]) sharing `ct`'s caps, with no
    /// rules yet.
    pub fn new(ct: conntrack::Config, count: usize) -> Result<NatTables, RulesError> {
        let (nats, steer) = nat::striped::new_set(ct, &Rules::default(), count)?;
        let max_entries = nats
            .iter()
            .map(|n| n.conntrack().config().max_entries)
            .sum();
        Ok(NatTables {
            stripes: nats.into_iter().map(|n| Padded(Mutex::new(n))).collect(),
            steer: ArcSwap::from_pointee(steer),
            max_entries,
        })
    }

    /// Number of stripes.
    pub fn count(&self) -> usize {
        self.stripes.len()
    }

    /// Replaces the rules of every stripe after validating them (nothing
    /// changes on error); tracked connections keep their mappings.
    pub fn set_rules(&self, rules: Rules) -> Result<(), RulesError> {
        for (i, s) in self.stripes.iter().enumerate() {
            // All stripes validate alike: only the first can refuse.
            let r = s.0.lock().set_rules(rules.clone());
            if i == 0 {
                r?;
            }
        }
        self.steer
            .store(Arc::new(Steering::new(&rules, self.count())));
        Ok(())
    }

    /// Whether `ip` is one of the NAT's external addresses (no lock).
    pub fn owns(&self, ip: Ipv4Addr) -> bool {
        self.steer.load().owns(ip)
    }

    /// [`Nat::translate`], in the packet's stripe.
    pub fn translate(
        &self,
        from: u32,
        port: u32,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
    ) -> Outcome {
        let steer = self.steer.load();
        nat::striped::translate(
            &mut Locked(self),
            &steer,
            from,
            port,
            key,
            frame,
            partial,
            now,
        )
    }

    /// [`Nat::preview`], in the packet's stripe.
    pub fn preview(&self, from: u32, key: &FlowKey, frame: &[u8], now: u64) -> Preview {
        let steer = self.steer.load();
        nat::striped::preview(&mut Locked(self), &steer, from, key, frame, now)
    }

    /// Reaps up to `max` expired connections over all stripes.
    pub fn expire(&self, now: u64, max: usize) -> usize {
        let share = max.div_ceil(self.count());
        self.stripes
            .iter()
            .map(|s| s.0.lock().expire(now, share))
            .sum()
    }

    /// Removes the connections created by `port`; how many.
    pub fn flush_port(&self, port: u32) -> usize {
        self.stripes
            .iter()
            .map(|s| s.0.lock().flush_port(port))
            .sum()
    }

    /// Connections in all stripes (expired ones not reaped yet included).
    pub fn len(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.0.lock().conntrack().len())
            .sum()
    }

    /// True when no stripe holds a connection.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bound on connections (the stripes' caps added up).
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// Calls `f` with every live connection, stripe by stripe.
    pub fn for_each_entry(
        &self,
        now: u64,
        mut f: impl FnMut(&conntrack::EntryView<'_, nat::Mapping>),
    ) {
        for s in self.stripes.iter() {
            for e in s.0.lock().conntrack().entries(now) {
                f(&e);
            }
        }
    }

    /// The stripes' conntrack counters summed.
    pub fn conntrack_stats(&self) -> conntrack::Stats {
        let mut st = conntrack::Stats::default();
        for s in self.stripes.iter() {
            st.merge(s.0.lock().conntrack().stats());
        }
        st
    }

    /// NAT counters of all stripes.
    pub fn stats(&self) -> NatStats {
        nat::striped::stats(&mut Locked(self))
    }

    /// Every mapping.
    pub fn mappings(&self) -> Vec<MappingView> {
        nat::striped::mappings(&mut Locked(self))
    }

    /// Every pool, the stripes' shares added up.
    pub fn pools(&self) -> Vec<PoolView> {
        nat::striped::pools(&mut Locked(self))
    }

    /// All connections as one snapshot.
    pub fn export(&self, now: u64) -> NatSnapshot {
        nat::striped::export(&mut Locked(self), now)
    }

    /// Imports a snapshot, each connection into its stripe.
    pub fn import(&self, snap: NatSnapshot, now: u64) -> Result<NatImportReport, NatImportError> {
        let steer = self.steer.load();
        nat::striped::import(&mut Locked(self), &steer, snap, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripe_counts_leave_each_stripe_a_thousand_ports() {
        assert_eq!(stripes_for((1024, 65535)), 8);
        assert_eq!(stripes_for((20000, 29999)), 8);
        assert_eq!(stripes_for((20000, 23999)), 2);
        assert_eq!(stripes_for((40000, 40003)), 1);
        assert_eq!(stripes_for((1, 65535)), 8);
    }

    fn udp(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16) -> Vec<u8> {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(src, dst, 64)
            .udp(sp, dp)
            .write(&mut f, &[0; 8])
            .expect("frame");
        f
    }

    fn rules() -> Rules {
        Rules {
            snat: vec![nat::Snat {
                zone: 7,
                inside: "10.0.1.0/24".parse().expect("net"),
                external: Ipv4Addr::new(203, 0, 113, 2),
            }],
            ..Rules::default()
        }
    }

    /// Workers translating at once: every connection ends up in one
    /// stripe, answers come back, and the counts add up.
    #[test]
    fn concurrent_workers_translate_through_their_stripes() {
        let t = Arc::new(NatTables::new(conntrack::Config::default(), 8).expect("tables"));
        let ext = Ipv4Addr::new(203, 0, 113, 2);
        t.set_rules(rules()).expect("rules");
        assert!(t.owns(ext));
        let workers: Vec<_> = (0..2u8)
            .map(|w| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for p in 0..2000u16 {
                        let mut f = udp([10, 0, 1, 10 + w], [198, 51, 100, 7], 20000 + p, 53);
                        let k = FlowKey::parse(&f).expect("key");
                        let out = t.translate(7, 1, &k, &mut f, false, 1);
                        assert!(matches!(out, Outcome::Forward { zone: 0, .. }), "{out:?}");
                        let k = FlowKey::parse(&f).expect("key");
                        let packet::L4::Udp { src_port: sp, .. } = k.l4 else {
                            panic!("not UDP: {k:?}");
                        };
                        let mut r = udp([198, 51, 100, 7], ext.octets(), 53, sp);
                        let k = FlowKey::parse(&r).expect("key");
                        let back = t.translate(0, 0, &k, &mut r, false, 1);
                        assert_eq!(
                            back,
                            Outcome::Forward {
                                zone: 7,
                                dst: Ipv4Addr::new(10, 0, 1, 10 + w),
                                hairpin: false
                            }
                        );
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("worker");
        }
        assert_eq!(t.len(), 4000);
        assert_eq!(t.stats().snat_new, 4000);
        assert_eq!(t.mappings().len(), 4000);
        let pool = t.pools().into_iter().find(|p| p.proto == 17).expect("pool");
        assert_eq!(pool.used, 4000);
        // A restart carries them over, each into its stripe.
        let again = NatTables::new(conntrack::Config::default(), 8).expect("tables");
        again.set_rules(rules()).expect("rules");
        let rep = again.import(t.export(1), 1).expect("import");
        assert_eq!((rep.conntrack.imported, rep.rejected), (4000, 0));
        assert_eq!(again.pools(), t.pools());
    }
}
