//! The load balancer's data path, sans-IO: which addresses are VIPs, the
//! connections the balancer made (a conntrack table of its own), and the
//! rewrites in both directions.
//!
//! * **Client to VIP** ([`Services::forward`]): a packet to a VIP's
//!   address, protocol and port. Its connection's first packet asks the
//!   caller's `pick` (the pool's Maglev table) for a backend, is DNATed to
//!   it, and the connection is committed with the backend's answer as its
//!   reply key; every later packet follows the entry, so pool changes never
//!   move an established connection. When the backend *is* the client
//!   (hairpin: a backend reaching its own VIP) the source is also
//!   rewritten, to the VIP's service address, or the backend would answer
//!   itself directly and the client would see a reply from the wrong
//!   address.
//! * **Backend to client** ([`Services::reply`]): a packet from a backend
//!   endpoint (or to a service address) that is the reply of such a
//!   connection gets the VIP back as its source (and the client as its
//!   destination after a hairpin). Anything else is not the balancer's and
//!   passes untouched.
//!
//! Zones are the tenants' conntrack zones, so overlapping tenants never
//! share a VIP or a connection. IPv4, TCP and UDP.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use conntrack::{ConnKey, Conntrack, Dir, Track};
use packet::flow::proto;
use packet::{FlowKey, L3, L4};
use serde::{Deserialize, Serialize};

use crate::hash::{flow_hash, FlowTuple};
use crate::maglev::BackendId;

/// Seed of the connection hash: the same on every host, so every host's
/// Maglev table sends a given connection to the same backend.
pub const FLOW_SEED: u64 = 0x766c_625f_666c_6f77;

/// A VIP as the data path matches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// The tenant's conntrack zone.
    pub zone: u32,
    /// Address and port.
    pub addr: SocketAddrV4,
    /// `6` TCP or `17` UDP.
    pub proto: u8,
}

/// What a VIP leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VipRule {
    /// The load balancer (the caller's index, handed back to `pick`).
    pub lb: u32,
    /// An address on the uplink (its replies leave through the uplink).
    pub external: bool,
    /// Source for hairpinned connections (the service address).
    pub hairpin_src: Option<Ipv4Addr>,
}

/// Per-connection data kept in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbConn {
    /// Load balancer index.
    pub lb: u32,
    /// The backend chosen.
    pub backend: BackendId,
    /// The client came from the uplink (its replies leave through it).
    pub external: bool,
}

/// What [`Services::forward`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// Not addressed to a VIP.
    NotVip,
    /// Rewritten to the backend: deliver to `dst`.
    To {
        /// The backend's address.
        dst: Ipv4Addr,
        /// The load balancer.
        lb: u32,
        /// A new connection was committed.
        new: bool,
    },
    /// A new connection with no backend to take it: reject it.
    Reject(u32),
    /// Dropped.
    Drop(LbDrop),
}

/// What [`Services::reply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Not the reply of a balanced connection; untouched.
    NotOurs,
    /// Rewritten (source: the VIP): deliver to `dst`.
    To {
        /// The client.
        dst: Ipv4Addr,
        /// Reached through an external VIP: out of the uplink.
        external: bool,
    },
}

/// Why the balancer dropped a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbDrop {
    /// The table (or the port's share) is full.
    Limit,
    /// Conntrack finds the packet invalid for its connection (a TCP
    /// segment other than a SYN without an entry, say).
    Invalid,
    /// The frame cannot be rewritten (IPv4 options, truncated, fragment).
    Malformed,
    /// A hairpin with no service address to rewrite the source to, or its
    /// rewritten tuple is taken.
    Hairpin,
}

/// Counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStats {
    /// New connections balanced.
    pub new: u64,
    /// Packets rewritten toward a backend.
    pub forwarded: u64,
    /// Packets rewritten back toward a client.
    pub replied: u64,
    /// New connections rejected for want of a backend.
    pub rejected: u64,
    /// Hairpinned new connections.
    pub hairpin: u64,
    /// Packets dropped.
    pub dropped: u64,
}

impl ServiceStats {
    /// Adds `o`'s counters to these (tables of one host kept apart).
    pub fn merge(&mut self, o: &ServiceStats) {
        self.new += o.new;
        self.forwarded += o.forwarded;
        self.replied += o.replied;
        self.rejected += o.rejected;
        self.hairpin += o.hairpin;
        self.dropped += o.dropped;
    }
}

/// VIPs and the balanced connections of one host.
#[derive(Debug)]
pub struct Services {
    ct: Conntrack<LbConn>,
    vips: HashMap<VipKey, VipRule>,
    /// (zone, address, proto, port) of every backend: where replies come
    /// from.
    backends: HashSet<(u32, Ipv4Addr, u8, u16)>,
    /// (zone, address) of hairpin sources: where hairpin replies go.
    hairpin: HashSet<(u32, Ipv4Addr)>,
    /// VIPs and backends removed from the config while connections of
    /// theirs may live: those connections keep flowing, new ones are not
    /// balanced. Pruned by [`Services::expire`] once their last
    /// connection is gone.
    retired_vips: HashMap<VipKey, VipRule>,
    retired_backends: HashSet<(u32, Ipv4Addr, u8, u16)>,
    stats: ServiceStats,
}

impl Services {
    /// An empty table with conntrack `cfg`.
    pub fn new(cfg: conntrack::Config) -> Result<Services, conntrack::ConfigError> {
        Ok(Services {
            ct: Conntrack::new(cfg)?,
            vips: HashMap::new(),
            backends: HashSet::new(),
            hairpin: HashSet::new(),
            retired_vips: HashMap::new(),
            retired_backends: HashSet::new(),
            stats: ServiceStats::default(),
        })
    }

    /// Replaces the VIPs and backend endpoints (reload). Connections
    /// already tracked keep flowing until they end or time out, also those
    /// of a VIP or backend that is gone.
    pub fn set_rules(
        &mut self,
        vips: HashMap<VipKey, VipRule>,
        backends: HashSet<(u32, SocketAddrV4, u8)>,
    ) {
        let backends: HashSet<(u32, Ipv4Addr, u8, u16)> = backends
            .into_iter()
            .map(|(z, a, p)| (z, *a.ip(), p, a.port()))
            .collect();
        for (k, r) in self.vips.drain() {
            if !vips.contains_key(&k) {
                self.retired_vips.insert(k, r);
            }
        }
        self.retired_vips.retain(|k, _| !vips.contains_key(k));
        for b in self.backends.drain() {
            if !backends.contains(&b) {
                self.retired_backends.insert(b);
            }
        }
        self.retired_backends.retain(|b| !backends.contains(b));
        self.hairpin = vips
            .iter()
            .chain(self.retired_vips.iter())
            .filter_map(|(k, r)| Some((k.zone, r.hairpin_src?)))
            .collect();
        self.vips = vips;
        self.backends = backends;
    }

    /// The VIPs.
    pub fn vips(&self) -> impl Iterator<Item = (&VipKey, &VipRule)> + '_ {
        self.vips.iter()
    }

    /// VIPs removed from the config whose connections may still live.
    pub fn retired_vips(&self) -> impl Iterator<Item = (&VipKey, &VipRule)> + '_ {
        self.retired_vips.iter()
    }

    /// (zone, address, proto, port) of every backend, retired ones too.
    pub fn backend_endpoints(&self) -> impl Iterator<Item = (u32, Ipv4Addr, u8, u16)> + '_ {
        self.backends
            .iter()
            .chain(self.retired_backends.iter())
            .copied()
    }

    /// Whether `ip` is a VIP of `zone` (any port): the switch answers ARP
    /// for it.
    pub fn is_vip_addr(&self, zone: u32, ip: Ipv4Addr) -> bool {
        self.vips
            .keys()
            .any(|k| k.zone == zone && *k.addr.ip() == ip)
    }

    /// The VIP rule a parsed packet in `zone` is addressed to, and
    /// whether that VIP is retired (removed from the config; only its
    /// existing connections flow).
    pub fn vip_of(&self, zone: u32, key: &FlowKey) -> Option<(VipKey, VipRule, bool)> {
        let (_, dst, p, _, dport) = tuple4(key)?;
        let k = VipKey {
            zone,
            addr: SocketAddrV4::new(dst, dport),
            proto: p,
        };
        if let Some(r) = self.vips.get(&k) {
            return Some((k, *r, false));
        }
        self.retired_vips.get(&k).map(|r| (k, *r, true))
    }

    /// Whether a packet in `zone` may be the reply of a balanced
    /// connection: from a backend endpoint, or to a hairpin source. Cheap
    /// (two set lookups), so the caller asks it for every packet of a
    /// network with backends before paying for [`Services::reply`].
    pub fn may_be_reply(&self, zone: u32, key: &FlowKey) -> bool {
        let Some((src, dst, p, sport, _)) = tuple4(key) else {
            return false;
        };
        let ep = (zone, src, p, sport);
        self.backends.contains(&ep)
            || self.hairpin.contains(&(zone, dst))
            || (!self.retired_backends.is_empty() && self.retired_backends.contains(&ep))
    }

    /// A packet in `zone` from port `port` (charged for new connections):
    /// balanced if it is addressed to a VIP. `from_uplink`: the client is
    /// on the external network (not a VM of the tenant). `pick(lb, hash)`
    /// chooses the backend (address and port) of a new connection.
    /// `partial`: the L4 checksum is a pseudo-header sum for offload.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        zone: u32,
        port: u32,
        from_uplink: bool,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
        pick: impl FnOnce(u32, u64) -> Option<(BackendId, SocketAddrV4)>,
    ) -> Forward {
        self.forward_admitting(
            zone,
            port,
            from_uplink,
            key,
            frame,
            partial,
            now,
            pick,
            &mut || true,
        )
    }

    /// [`Services::forward`] for a table that is one of several under a
    /// shared bound: `admit` is asked just before a new connection would
    /// be committed (after its backend is chosen); `false` drops it as
    /// [`LbDrop::Limit`] and commits nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_admitting(
        &mut self,
        zone: u32,
        port: u32,
        from_uplink: bool,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
        pick: impl FnOnce(u32, u64) -> Option<(BackendId, SocketAddrV4)>,
        admit: &mut dyn FnMut() -> bool,
    ) -> Forward {
        let Some((vip, rule, retired)) = self.vip_of(zone, key) else {
            return Forward::NotVip;
        };
        // A corrupt header is never forwarded with its checksum patched.
        if !header_ok(key, frame) {
            self.stats.dropped += 1;
            return Forward::Drop(LbDrop::Malformed);
        }
        let out = self.forward_inner(
            zone,
            port,
            from_uplink,
            vip,
            rule,
            retired,
            key,
            frame,
            partial,
            now,
            pick,
            admit,
        );
        match out {
            Forward::To { new, .. } => {
                self.stats.forwarded += 1;
                if new {
                    self.stats.new += 1;
                }
            }
            Forward::Reject(_) => self.stats.rejected += 1,
            Forward::Drop(_) => self.stats.dropped += 1,
            Forward::NotVip => {}
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_inner(
        &mut self,
        zone: u32,
        port: u32,
        from_uplink: bool,
        vip: VipKey,
        rule: VipRule,
        retired: bool,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
        pick: impl FnOnce(u32, u64) -> Option<(BackendId, SocketAddrV4)>,
        admit: &mut dyn FnMut() -> bool,
    ) -> Forward {
        let Some((src, _, p, sport, dport)) = tuple4(key) else {
            return Forward::NotVip;
        };
        match self.ct.track(zone, port, key, frame, now) {
            Track::Established {
                id,
                dir: Dir::Original,
            } => {
                let Some(e) = self.ct.get(id, now) else {
                    return Forward::Drop(LbDrop::Invalid);
                };
                let (lb, reply) = (e.ext.lb, e.reply);
                // Toward the backend: the reverse of what it answers with.
                let (Some(to_src), Some(to_dst)) = (
                    sock(reply.dst, reply.dst_port),
                    sock(reply.src, reply.src_port),
                ) else {
                    return Forward::Drop(LbDrop::Malformed);
                };
                if !nat::rewrite_tuple(key, frame, to_src, to_dst, partial) {
                    return Forward::Drop(LbDrop::Malformed);
                }
                Forward::To {
                    dst: *to_dst.ip(),
                    lb,
                    new: false,
                }
            }
            Track::New(_) if retired => Forward::NotVip,
            Track::New(nc) => {
                let (backend, from, ep) =
                    match choose_backend(vip, rule, (src, p, sport, dport), pick) {
                        Ok(c) => c,
                        Err(f) => return f,
                    };
                let reply = ConnKey {
                    zone,
                    src: IpAddr::V4(*ep.ip()),
                    dst: IpAddr::V4(*from.ip()),
                    proto: p,
                    src_port: ep.port(),
                    dst_port: from.port(),
                };
                let ext = LbConn {
                    lb: rule.lb,
                    backend,
                    external: from_uplink,
                };
                if !admit() {
                    return Forward::Drop(LbDrop::Limit);
                }
                let id = match self.ct.commit_with_reply(&nc, reply, now, ext) {
                    Ok(id) => id,
                    Err(e) => {
                        return Forward::Drop(match e {
                            conntrack::CommitError::Exists(_) => LbDrop::Hairpin,
                            _ => LbDrop::Limit,
                        })
                    }
                };
                if !nat::rewrite_tuple(key, frame, from, ep, partial) {
                    // Nothing written; no half connection left behind.
                    self.ct.remove(id);
                    return Forward::Drop(LbDrop::Malformed);
                }
                if from.ip() != &src {
                    self.stats.hairpin += 1;
                }
                Forward::To {
                    dst: *ep.ip(),
                    lb: rule.lb,
                    new: true,
                }
            }
            Track::Refused(_) => Forward::Drop(LbDrop::Limit),
            Track::Established { .. }
            | Track::Invalid(_)
            | Track::Related { .. }
            | Track::Untracked(_) => Forward::Drop(LbDrop::Invalid),
        }
    }

    /// A packet in `zone` that [`Services::may_be_reply`] admitted: if it
    /// is the reply of a balanced connection, rewritten to come from the
    /// VIP.
    pub fn reply(
        &mut self,
        zone: u32,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
    ) -> Reply {
        if !header_ok(key, frame) {
            return Reply::NotOurs;
        }
        let Track::Established {
            id,
            dir: Dir::Reply,
        } = self.ct.track(zone, 0, key, frame, now)
        else {
            return Reply::NotOurs;
        };
        let Some(e) = self.ct.get(id, now) else {
            return Reply::NotOurs;
        };
        let (orig, external) = (e.orig, e.ext.external);
        let (Some(to_src), Some(to_dst)) =
            (sock(orig.dst, orig.dst_port), sock(orig.src, orig.src_port))
        else {
            return Reply::NotOurs;
        };
        if !nat::rewrite_tuple(key, frame, to_src, to_dst, partial) {
            return Reply::NotOurs;
        }
        self.stats.replied += 1;
        Reply::To {
            dst: *to_dst.ip(),
            external,
        }
    }

    /// What [`Services::forward`] would do with a packet, for a packet
    /// trace: the same decision and the same rewrite of `frame`, but
    /// nothing committed, tracked or counted (the connection table only
    /// looked up).
    #[allow(clippy::too_many_arguments)]
    pub fn preview_forward(
        &self,
        zone: u32,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
        pick: impl FnOnce(u32, u64) -> Option<(BackendId, SocketAddrV4)>,
    ) -> Forward {
        let Some((vip, rule, retired)) = self.vip_of(zone, key) else {
            return Forward::NotVip;
        };
        if !header_ok(key, frame) {
            return Forward::Drop(LbDrop::Malformed);
        }
        let Some((src, _, p, sport, dport)) = tuple4(key) else {
            return Forward::NotVip;
        };
        let (to_src, to_dst, lb, new) = match self.ct.lookup_flow(zone, key, now) {
            Some((id, Dir::Original)) => {
                let Some(e) = self.ct.get(id, now) else {
                    return Forward::Drop(LbDrop::Invalid);
                };
                let (Some(s), Some(d)) = (
                    sock(e.reply.dst, e.reply.dst_port),
                    sock(e.reply.src, e.reply.src_port),
                ) else {
                    return Forward::Drop(LbDrop::Malformed);
                };
                (s, d, e.ext.lb, false)
            }
            Some((_, Dir::Reply)) => return Forward::Drop(LbDrop::Invalid),
            None if retired => return Forward::NotVip,
            None => match choose_backend(vip, rule, (src, p, sport, dport), pick) {
                Ok((_, from, ep)) => (from, ep, rule.lb, true),
                Err(f) => return f,
            },
        };
        if !nat::rewrite_tuple(key, frame, to_src, to_dst, partial) {
            return Forward::Drop(LbDrop::Malformed);
        }
        Forward::To {
            dst: *to_dst.ip(),
            lb,
            new,
        }
    }

    /// What [`Services::reply`] would do, for a packet trace: the same
    /// rewrite, nothing tracked or counted.
    pub fn preview_reply(
        &self,
        zone: u32,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
    ) -> Reply {
        if !header_ok(key, frame) {
            return Reply::NotOurs;
        }
        let Some((id, Dir::Reply)) = self.ct.lookup_flow(zone, key, now) else {
            return Reply::NotOurs;
        };
        let Some(e) = self.ct.get(id, now) else {
            return Reply::NotOurs;
        };
        let (Some(to_src), Some(to_dst)) = (
            sock(e.orig.dst, e.orig.dst_port),
            sock(e.orig.src, e.orig.src_port),
        ) else {
            return Reply::NotOurs;
        };
        if !nat::rewrite_tuple(key, frame, to_src, to_dst, partial) {
            return Reply::NotOurs;
        }
        Reply::To {
            dst: *to_dst.ip(),
            external: e.ext.external,
        }
    }

    /// Reaps up to `max` expired connections.
    pub fn expire(&mut self, now: u64, max: usize) -> usize {
        let n = self.ct.expire(now, max);
        if !self.retired_vips.is_empty() || !self.retired_backends.is_empty() {
            // O(table), only while something is retired.
            let mut live_lbs = HashSet::new();
            let mut live_eps = HashSet::new();
            for e in self.ct.entries(now) {
                live_lbs.insert(e.ext.lb);
                if let (IpAddr::V4(a), p) = (e.reply.src, e.reply.proto) {
                    live_eps.insert((e.reply.zone, a, p, e.reply.src_port));
                }
            }
            self.retired_vips.retain(|_, r| live_lbs.contains(&r.lb));
            self.retired_backends.retain(|b| live_eps.contains(b));
            let hairpin: HashSet<(u32, Ipv4Addr)> = self
                .vips
                .iter()
                .chain(self.retired_vips.iter())
                .filter_map(|(k, r)| Some((k.zone, r.hairpin_src?)))
                .collect();
            self.hairpin = hairpin;
        }
        n
    }

    /// Open connections per (load balancer, backend), for display: TCP
    /// ones not yet closed (TIME_WAIT and reset ones are not counted),
    /// UDP ones until they time out.
    pub fn connections(&self, now: u64) -> BTreeMap<(u32, BackendId), usize> {
        let mut out = BTreeMap::new();
        for e in self.ct.entries(now) {
            if matches!(
                e.state,
                conntrack::ConnState::Tcp(
                    conntrack::TcpState::TimeWait | conntrack::TcpState::Close
                )
            ) {
                continue;
            }
            *out.entry((e.ext.lb, e.ext.backend)).or_insert(0) += 1;
        }
        out
    }

    /// The connection table (for `vswitchctl conntrack`, save/restore).
    pub fn conntrack(&self) -> &Conntrack<LbConn> {
        &self.ct
    }

    /// The connection table, mutable (import on restart, flushes).
    pub fn conntrack_mut(&mut self) -> &mut Conntrack<LbConn> {
        &mut self.ct
    }

    /// Counters.
    pub fn stats(&self) -> &ServiceStats {
        &self.stats
    }
}

/// (src, dst, proto, sport, dport) of an IPv4 TCP/UDP packet: what the
/// balancer matches on.
pub fn tuple4(key: &FlowKey) -> Option<(Ipv4Addr, Ipv4Addr, u8, u16, u16)> {
    let L3::Ipv4(ip) = &key.l3 else { return None };
    let (IpAddr::V4(s), IpAddr::V4(d)) = (ip.src, ip.dst) else {
        return None;
    };
    match key.l4 {
        L4::Tcp {
            src_port, dst_port, ..
        } => Some((s, d, proto::TCP, src_port, dst_port)),
        L4::Udp { src_port, dst_port } => Some((s, d, proto::UDP, src_port, dst_port)),
        _ => None,
    }
}

/// An IPv4 header without options whose checksum verifies.
/// A new connection's backend: `pick` by the flow's hash, and the source
/// the backend will see (the service address when the backend is the
/// client: it must see the packet come from elsewhere, or it answers
/// itself). `Err`: the verdict instead (no backend, hairpin impossible).
fn choose_backend(
    vip: VipKey,
    rule: VipRule,
    (src, p, sport, dport): (Ipv4Addr, u8, u16, u16),
    pick: impl FnOnce(u32, u64) -> Option<(BackendId, SocketAddrV4)>,
) -> Result<(BackendId, SocketAddrV4, SocketAddrV4), Forward> {
    let flow = FlowTuple {
        src: IpAddr::V4(src),
        dst: IpAddr::V4(*vip.addr.ip()),
        proto: p,
        src_port: sport,
        dst_port: dport,
    };
    let (backend, ep) =
        pick(rule.lb, flow_hash(FLOW_SEED, &flow)).ok_or(Forward::Reject(rule.lb))?;
    let from = if *ep.ip() == src {
        SocketAddrV4::new(
            rule.hairpin_src.ok_or(Forward::Drop(LbDrop::Hairpin))?,
            sport,
        )
    } else {
        SocketAddrV4::new(src, sport)
    };
    Ok((backend, from, ep))
}

fn header_ok(key: &FlowKey, frame: &[u8]) -> bool {
    let l3 = usize::from(key.l3_offset);
    frame
        .get(l3..l3 + 20)
        .is_some_and(|h| h[0] == 0x45 && packet::checksum::verify(h))
}

fn sock(a: IpAddr, port: u16) -> Option<SocketAddrV4> {
    match a {
        IpAddr::V4(a) => Some(SocketAddrV4::new(a, port)),
        IpAddr::V6(_) => None,
    }
}

#[cfg(test)]
mod tests;
