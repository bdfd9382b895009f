//! The load balancer's services and connections, striped by tenant zone
//! ([`crate::stripes`]): one [`lb::Services`] per stripe holding the VIPs,
//! backends and balanced connections of the zones that live there. Every
//! packet the balancer sees is in one tenant's zone (a client's forward
//! and a backend's reply alike), so it locks that zone's stripe only, and
//! tenants balanced on different workers never meet on a lock. A port's
//! connections are all in its tenant's zone, so the per-port cap stays
//! exact; the global bound is the stripes' shared total.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddrV4;

use conntrack::Conntrack;
use lb::{BackendId, Forward, LbConn, Reply, ServiceStats, Services, VipKey, VipRule};
use packet::FlowKey;

use crate::stripes::{stripe_of, StripeTable, Stripes, STRIPES};

impl StripeTable for Services {
    type Ext = LbConn;

    fn table(&self) -> &Conntrack<LbConn> {
        self.conntrack()
    }

    fn table_mut(&mut self) -> &mut Conntrack<LbConn> {
        self.conntrack_mut()
    }

    fn expire(&mut self, now: u64, max: usize) -> usize {
        Services::expire(self, now, max)
    }
}

/// The host's load-balancer tables (see the module doc).
pub type LbTables = Stripes<Services>;

impl Stripes<Services> {
    /// Empty stripes with `cfg`'s timeouts and per-port cap; `cfg`'s
    /// `max_entries` bounds all stripes together.
    pub fn new_lb(cfg: conntrack::Config) -> Result<Self, conntrack::ConfigError> {
        Stripes::new(cfg.max_entries, || Services::new(cfg))
    }

    /// [`Services::forward`] in `zone`'s stripe, a new connection
    /// committed only under the global bound.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        zone: u32,
        port: u32,
        from_uplink: bool,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
        pick: impl FnOnce(u32, u64) -> Option<(BackendId, SocketAddrV4)>,
    ) -> Forward {
        self.sync_reserved(&mut self.lock(zone), |s, admit| {
            s.forward_admitting(
                zone,
                port,
                from_uplink,
                key,
                frame,
                partial,
                now,
                pick,
                admit,
            )
        })
    }

    /// [`Services::reply`] in `zone`'s stripe.
    pub fn reply(
        &self,
        zone: u32,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
    ) -> Reply {
        self.sync(&mut self.lock(zone), |s| {
            s.reply(zone, key, frame, partial, now)
        })
    }

    /// [`Services::preview_forward`] in `zone`'s stripe.
    pub fn preview_forward(
        &self,
        zone: u32,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
        pick: impl FnOnce(u32, u64) -> Option<(BackendId, SocketAddrV4)>,
    ) -> Forward {
        self.lock(zone)
            .preview_forward(zone, key, frame, partial, now, pick)
    }

    /// [`Services::preview_reply`] in `zone`'s stripe.
    pub fn preview_reply(
        &self,
        zone: u32,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
    ) -> Reply {
        self.lock(zone)
            .preview_reply(zone, key, frame, partial, now)
    }

    /// Replaces the VIPs and backend endpoints (reload): each stripe gets
    /// those of its zones, and keeps its connections (also those of VIPs
    /// and backends that are gone, as [`Services::set_rules`]).
    pub fn set_rules(
        &self,
        vips: HashMap<VipKey, VipRule>,
        backends: HashSet<(u32, SocketAddrV4, u8)>,
    ) {
        let mut v: Vec<HashMap<VipKey, VipRule>> = (0..STRIPES).map(|_| HashMap::new()).collect();
        let mut b: Vec<HashSet<(u32, SocketAddrV4, u8)>> =
            (0..STRIPES).map(|_| HashSet::new()).collect();
        for (k, r) in vips {
            if let Some(m) = v.get_mut(stripe_of(k.zone)) {
                m.insert(k, r);
            }
        }
        for e in backends {
            if let Some(m) = b.get_mut(stripe_of(e.0)) {
                m.insert(e);
            }
        }
        let mut i = 0;
        self.with_each(|s| {
            s.set_rules(std::mem::take(&mut v[i]), std::mem::take(&mut b[i]));
            i += 1;
        });
    }

    /// Every VIP, live and retired ones (`true`), of every stripe.
    pub fn all_vips(&self) -> Vec<(VipKey, VipRule, bool)> {
        let mut out = Vec::new();
        self.each(|s| {
            out.extend(s.vips().map(|(k, r)| (*k, *r, false)));
            out.extend(s.retired_vips().map(|(k, r)| (*k, *r, true)));
        });
        out
    }

    /// (zone, address, proto, port) of every backend, retired ones too.
    pub fn backend_endpoints(&self) -> Vec<(u32, std::net::Ipv4Addr, u8, u16)> {
        let mut out = Vec::new();
        self.each(|s| out.extend(s.backend_endpoints()));
        out
    }

    /// Open connections per (load balancer, backend), over all stripes.
    pub fn connections(&self, now: u64) -> BTreeMap<(u32, BackendId), usize> {
        let mut out = BTreeMap::new();
        self.each(|s| {
            for (k, n) in s.connections(now) {
                *out.entry(k).or_insert(0) += n;
            }
        });
        out
    }

    /// The balancer's counters, over all stripes.
    pub fn service_stats(&self) -> ServiceStats {
        let mut st = ServiceStats::default();
        self.each(|s| st.merge(s.stats()));
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const NOW: u64 = 1_000_000_000;
    const VIP: [u8; 4] = [10, 0, 1, 100];
    const BACKEND: [u8; 4] = [10, 0, 1, 20];

    fn udp(s: SocketAddrV4, d: SocketAddrV4) -> Vec<u8> {
        let mut out = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(s.ip().octets(), d.ip().octets(), 64)
            .udp(s.port(), d.port())
            .write(&mut out, &[7; 20])
            .unwrap();
        out
    }

    fn sa(a: [u8; 4], p: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(a), p)
    }

    /// The same VIP and backend (overlapping tenants) in each of `zones`,
    /// `max` connections in all.
    fn tables(zones: &[u32], max: usize) -> LbTables {
        let t = LbTables::new_lb(conntrack::Config {
            max_entries: max,
            ..conntrack::Config::default()
        })
        .unwrap();
        let mut vips = HashMap::new();
        let mut backends = HashSet::new();
        for &zone in zones {
            vips.insert(
                VipKey {
                    zone,
                    addr: sa(VIP, 53),
                    proto: 17,
                },
                VipRule {
                    lb: zone,
                    external: false,
                    hairpin_src: None,
                },
            );
            backends.insert((zone, sa(BACKEND, 5353), 17));
        }
        t.set_rules(vips, backends);
        t
    }

    fn send(t: &LbTables, zone: u32, port: u32, client: SocketAddrV4) -> Forward {
        let mut f = udp(client, sa(VIP, 53));
        let key = FlowKey::parse(&f).unwrap();
        t.forward(zone, port, false, &key, &mut f, false, NOW, |_, _| {
            Some((BackendId(0), sa(BACKEND, 5353)))
        })
    }

    #[test]
    fn zones_live_in_their_stripes_and_replies_find_them() {
        // Zones 1 and 2 are in different stripes, 1 and 65 in the same.
        let t = tables(&[1, 2, 65], 100);
        for zone in [1, 2, 65] {
            let c = sa([10, 0, 1, 10], 4000);
            assert!(matches!(
                send(&t, zone, zone, c),
                Forward::To { new: true, .. }
            ));
            // The backend's answer in the same zone comes back from the VIP.
            let mut r = udp(sa(BACKEND, 5353), c);
            let key = FlowKey::parse(&r).unwrap();
            let back = t.reply(zone, &key, &mut r, false, NOW);
            assert!(matches!(back, Reply::To { dst, .. } if dst == *c.ip()));
        }
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.lock(1).conntrack().len(),
            2,
            "zones 1 and 65 share a stripe"
        );
        assert_eq!(t.lock(2).conntrack().len(), 1);
        assert_eq!(t.service_stats().new, 3);
        assert_eq!(t.service_stats().replied, 3);
        assert_eq!(t.all_vips().len(), 3);
        let conns = t.connections(NOW);
        assert_eq!(conns.values().sum::<usize>(), 3);
        // Another tenant's reply never matches.
        let mut r = udp(sa(BACKEND, 5353), sa([10, 0, 1, 10], 4000));
        let key = FlowKey::parse(&r).unwrap();
        assert_eq!(t.reply(3, &key, &mut r, false, NOW), Reply::NotOurs);
    }

    #[test]
    fn the_global_bound_holds_across_stripes() {
        let t = tables(&[1, 2, 3], 5);
        let mut to = 0;
        for i in 0..12u16 {
            let zone = u32::from(i % 3) + 1;
            match send(&t, zone, zone, sa([10, 0, 1, 10], 4000 + i)) {
                Forward::To { new: true, .. } => to += 1,
                Forward::Drop(lb::LbDrop::Limit) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(to, 5);
        assert_eq!(t.len(), 5);
        assert_eq!(t.stats().refused_global, 7);
        // Established connections still flow at the bound.
        assert!(matches!(
            send(&t, 1, 1, sa([10, 0, 1, 10], 4000)),
            Forward::To { new: false, .. }
        ));
        // Expiry gives the places back.
        let later = NOW + 3_600 * 1_000_000_000;
        assert_eq!(t.expire(later, 100), 5);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn export_and_import_keep_each_zone_in_its_stripe() {
        let a = tables(&[1, 2], 100);
        for (i, zone) in [1u32, 2, 2].into_iter().enumerate() {
            send(&a, zone, zone, sa([10, 0, 1, 10], 4000 + i as u16));
        }
        let snap = a.export(NOW);
        assert_eq!(snap.entries.len(), 3);
        let b = tables(&[1, 2], 100);
        let rep = b.import(snap, NOW).unwrap();
        assert_eq!(rep.imported, 3);
        assert_eq!(b.len(), 3);
        assert_eq!(b.lock(2).conntrack().len(), 2);
        // An imported connection is established: no new pick.
        assert!(matches!(
            send(&b, 2, 2, sa([10, 0, 1, 10], 4001)),
            Forward::To { new: false, .. }
        ));
        // Into a smaller bound: the rest is refused and counted.
        let c = tables(&[1, 2], 2);
        let rep = c.import(a.export(NOW), NOW).unwrap();
        assert_eq!((rep.imported, rep.refused_global), (2, 1));
        assert_eq!(c.len(), 2);
    }
}
