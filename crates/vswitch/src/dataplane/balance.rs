//! The snapshot's load-balancer path: VIPs (DNAT to a backend picked by
//! the pool's Maglev table, committed to the balancer's conntrack), the
//! replies of balanced connections (back from the VIP), and the frames of
//! this host's probers. Decisions in `lb::service`; pools and probers in
//! [`crate::balancer`].
//!
//! Stages, for a packet from a VM: port security, the switch's services,
//! security-group egress, then this stage (a VIP: balanced and routed to
//! the backend; a backend's reply: rewritten to come from the VIP), then
//! the router or the bridge. The backend's ingress security groups judge
//! the balanced packet on its way out, as any other.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use lb::service::tuple4;
use packet::{FlowKey, MacAddr, PacketBuf};

use super::{transmit_with, NetworkRt, PortRt, Scratch, Snapshot};
use crate::clock::Timestamp;
use crate::config::NetKey;
use crate::pipeline::router;
use crate::pipeline::{arp, DropReason, Ingress, Verdict};
use crate::trace;
use crate::underlay::is_vtep;

/// What the data path checks without taking the balancer's lock: is this
/// packet possibly the balancer's?
#[derive(Debug, Default)]
pub struct LbGate {
    /// (zone, VIP, proto, port).
    pub vips: HashSet<(u32, Ipv4Addr, u8, u16)>,
    /// (zone, VIP): ARP and ICMP toward these belong to the switch.
    pub vip_addrs: HashSet<(u32, Ipv4Addr)>,
    /// (zone, backend, proto, port): where replies come from.
    pub backends: HashSet<(u32, Ipv4Addr, u8, u16)>,
    /// (zone, service address): where hairpin replies go.
    pub hairpin: HashSet<(u32, Ipv4Addr)>,
}

impl LbGate {
    /// No load balancer on this host.
    pub fn is_empty(&self) -> bool {
        self.vips.is_empty() && self.backends.is_empty()
    }

    /// A packet in `zone` from `src`:`sport` to `dst` may be the reply of
    /// a balanced connection: from a backend, or to a hairpin source.
    fn may_be_reply(&self, zone: u32, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, sport: u16) -> bool {
        self.backends.contains(&(zone, src, proto, sport)) || self.hairpin.contains(&(zone, dst))
    }
}

/// This host's prober in a network.
#[derive(Debug, Clone, Copy)]
pub struct ServiceRt {
    /// Its MAC.
    pub mac: MacAddr,
    /// The service address.
    pub ip: Ipv4Addr,
}

impl Snapshot {
    /// The load-balancer stage for a frame from local port `ingress`:
    /// `None` when the packet is not the balancer's (the pipeline goes on).
    pub(super) fn lb_stage(
        &self,
        ingress: &PortRt,
        net: &NetworkRt,
        key: &FlowKey,
        buf: &mut PacketBuf,
        now: Timestamp,
    ) -> Option<Verdict> {
        let (src, dst, p, sport, dport) = tuple4(key)?;
        let zone = net.ct_zone;
        let to_gw = net.gateway.is_some_and(|(_, m)| m == key.dst_mac);
        if to_gw && self.lb_gate.vips.contains(&(zone, dst, p, dport)) {
            return Some(self.lb_forward(ingress, net, key, buf, now));
        }
        if self.lb_gate.may_be_reply(zone, src, dst, p, sport) {
            let partial = buf.offload.csum.is_some();
            let out = if trace::dry_run() {
                self.lb
                    .preview_reply(zone, key, buf.frame_mut(), partial, now.0)
            } else {
                self.lb.reply(zone, key, buf.frame_mut(), partial, now.0)
            };
            match out {
                lb::Reply::NotOurs => return None,
                lb::Reply::To { dst, external } => {
                    trace::note("lb", || {
                        format!("load balancer: reply of a balanced connection, source rewritten to the VIP, to client {dst}")
                    });
                    if external {
                        return Some(self.out_uplink(ingress, dst, key, buf, now));
                    }
                    // Sent to the gateway (routed) or to the service
                    // address (hairpin): route it to the client. Sent on
                    // the link to the client: the bridge carries it.
                    let to_svc = net.service.is_some_and(|s| s.mac == key.dst_mac);
                    if to_gw || to_svc {
                        return Some(self.deliver_to_tenant(ingress, zone, dst, key, buf, now));
                    }
                    return None;
                }
            }
        }
        None
    }

    /// A packet to a VIP: balanced, then routed to the backend.
    fn lb_forward(
        &self,
        ingress: &PortRt,
        net: &NetworkRt,
        key: &FlowKey,
        buf: &mut PacketBuf,
        now: Timestamp,
    ) -> Verdict {
        if key.ip().is_some_and(|ip| ip.ttl <= 1) {
            // The router answers with time exceeded.
            return self.route(ingress, net, key, buf, now);
        }
        let out = self.lb_balance(net.ct_zone, ingress, false, key, buf, now);
        match out {
            lb::Forward::To { dst, .. } => {
                self.deliver_to_tenant(ingress, net.ct_zone, dst, key, buf, now)
            }
            lb::Forward::NotVip => self.route(ingress, net, key, buf, now),
            lb::Forward::Reject(_) => match &net.router {
                Some(r) => {
                    ingress.counters.count_drop(DropReason::LbNoBackend);
                    let routed = router::port_unreachable(r, ingress.net, key, buf);
                    self.routed_verdict(ingress, routed)
                }
                None => Verdict::Drop(DropReason::LbNoBackend),
            },
            lb::Forward::Drop(d) => Verdict::Drop(lb_drop_reason(d)),
        }
    }

    /// A frame from the uplink to an external VIP: balanced into the
    /// tenant; `None` when the packet is not for a VIP.
    pub(super) fn lb_from_uplink(
        &self,
        ingress: &PortRt,
        key: &FlowKey,
        buf: &mut PacketBuf,
        now: Timestamp,
    ) -> Option<Verdict> {
        let (_, dst, p, _, dport) = tuple4(key)?;
        if !self.lb_external.contains(&dst) {
            return None;
        }
        let &(zone, ..) = self
            .lb_gate
            .vips
            .iter()
            .find(|(_, ip, pr, port)| *ip == dst && *pr == p && *port == dport)?;
        let out = self.lb_balance(zone, ingress, true, key, buf, now);
        Some(match out {
            lb::Forward::To { dst, .. } => {
                self.deliver_to_tenant(ingress, zone, dst, key, buf, now)
            }
            lb::Forward::NotVip => return None,
            // No ICMP back out of the uplink from here: counted.
            lb::Forward::Reject(_) => Verdict::Drop(DropReason::LbNoBackend),
            lb::Forward::Drop(d) => Verdict::Drop(lb_drop_reason(d)),
        })
    }

    /// Balances a packet to a VIP in `zone` (under a dry-run trace: the
    /// preview, nothing committed) and says so when traced.
    fn lb_balance(
        &self,
        zone: u32,
        ingress: &PortRt,
        from_uplink: bool,
        key: &FlowKey,
        buf: &mut PacketBuf,
        now: Timestamp,
    ) -> lb::Forward {
        let partial = buf.offload.csum.is_some();
        let pick = |lb_id, hash| self.balancers.pick(lb_id, hash);
        let out = if trace::dry_run() {
            self.lb
                .preview_forward(zone, key, buf.frame_mut(), partial, now.0, pick)
        } else {
            self.lb.forward(
                zone,
                ingress.id,
                from_uplink,
                key,
                buf.frame_mut(),
                partial,
                now.0,
                pick,
            )
        };
        trace::note("lb", || {
            let vip = tuple4(key).map_or("-".into(), |(_, d, _, _, dp)| format!("{d}:{dp}"));
            match out {
                lb::Forward::To { dst, lb, new } => {
                    let to = FlowKey::parse(buf.frame())
                        .ok()
                        .and_then(|k| tuple4(&k))
                        .map_or(dst.to_string(), |(_, d, _, _, dp)| format!("{d}:{dp}"));
                    format!(
                        "load balancer {}: VIP {vip}, {} -> backend {to}",
                        self.balancers.name(lb).unwrap_or_else(|| format!("#{lb}")),
                        if new {
                            "new connection, Maglev picks"
                        } else {
                            "tracked connection"
                        }
                    )
                }
                lb::Forward::NotVip => format!("load balancer: {vip} is not a live VIP"),
                lb::Forward::Reject(lb) => format!(
                    "load balancer {}: VIP {vip} has no healthy backend: rejected",
                    self.balancers.name(lb).unwrap_or_else(|| format!("#{lb}"))
                ),
                lb::Forward::Drop(d) => format!("load balancer: {}", lb_drop_reason(d).as_str()),
            }
        });
        out
    }

    /// Hands a frame for this host's prober in `net` to the health thread.
    pub(super) fn to_prober(&self, net: &NetworkRt, frame: &[u8]) -> Verdict {
        trace::note("lb", || {
            format!(
                "to this host's health-check prober in network {}",
                net.cfg.name
            )
        });
        if trace::dry_run() {
            return Verdict::Consumed;
        }
        if self.balancers.deliver(&net.cfg.key(), frame) {
            Verdict::Consumed
        } else {
            Verdict::Drop(DropReason::LocalServiceBusy)
        }
    }

    /// Whether `ip` is an external VIP this host balances.
    pub fn owns_external_vip(&self, ip: Ipv4Addr) -> bool {
        self.lb_external.contains(&ip)
    }

    /// The reply of a balanced connection decapsulated from a peer (the
    /// backend lives there, the connection here): a rewritten copy when it
    /// is one. Frames the gate rules out are neither copied nor locked.
    pub(super) fn lb_remote_reply(
        &self,
        net: &NetworkRt,
        b: &PacketBuf,
        now: Timestamp,
    ) -> Option<PacketBuf> {
        let key = FlowKey::parse(b.frame()).ok()?;
        let (src, dst, p, sport, _) = tuple4(&key)?;
        let zone = net.ct_zone;
        if !self.lb_gate.may_be_reply(zone, src, dst, p, sport) {
            return None;
        }
        let mut c = PacketBuf::from_frame(b.frame());
        c.offload = b.offload;
        let partial = c.offload.csum.is_some();
        match self.lb.reply(zone, &key, c.frame_mut(), partial, now.0) {
            lb::Reply::To { .. } => Some(c),
            lb::Reply::NotOurs => None,
        }
    }
}

/// The drop reason for a balancer refusal.
pub fn lb_drop_reason(d: lb::LbDrop) -> DropReason {
    match d {
        lb::LbDrop::Limit => DropReason::ConnLimit,
        lb::LbDrop::Invalid => DropReason::ConnInvalid,
        lb::LbDrop::Malformed => DropReason::L3Malformed,
        lb::LbDrop::Hairpin => DropReason::LbHairpin,
    }
}

/// Buffers of the health thread.
#[derive(Default)]
pub struct ServiceScratch(Option<Scratch>);

impl std::fmt::Debug for ServiceScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceScratch")
    }
}

/// Sends a frame of network `net`'s prober on this host into the network,
/// like a frame from a port: an ARP request is answered from the
/// network's address table when it can be (the answers come back to hand
/// to the prober) or flooded; anything else goes where the MAC table says.
pub fn inject_service(
    snap: &Snapshot,
    net_key: &NetKey,
    frame: &[u8],
    sc: &mut ServiceScratch,
) -> Vec<Vec<u8>> {
    let sc = sc.0.get_or_insert_with(Scratch::new);
    let Some(net) = snap.networks.iter().find(|n| &n.cfg.key() == net_key) else {
        return Vec::new();
    };
    let Some(svc) = net.service else {
        return Vec::new();
    };
    sc.buf = PacketBuf::from_frame(frame);
    sc.buf.offload = packet::Offload::NONE;
    let Ok(key) = FlowKey::parse(sc.buf.frame()) else {
        return Vec::new();
    };
    if key.src_mac != svc.mac {
        return Vec::new();
    }
    let ing = Ingress {
        id: u32::MAX,
        mac: svc.mac,
        port_security: false,
    };
    if arp::respond(&ing, &key, &net.addrs, sc.buf.frame_mut()) {
        return vec![sc.buf.frame().to_vec()];
    }
    let target = if key.dst_mac.is_multicast() {
        None
    } else {
        net.bridge.fdb().read().lookup(&key.dst_mac)
    };
    match target {
        Some(id) if is_vtep(id) => super::overlay::flood_to_peer(snap, net, id, sc),
        Some(id) => {
            if let Some(p) = snap.port(id) {
                transmit_with(p, &sc.buf.offload, sc.buf.frame());
            }
        }
        None => {
            for &id in &net.ports {
                if let Some(p) = snap.port(id) {
                    transmit_with(p, &sc.buf.offload, sc.buf.frame());
                }
            }
            for &id in &net.vteps {
                super::overlay::flood_to_peer(snap, net, id, sc);
            }
        }
    }
    Vec::new()
}
