//! The snapshot's external path: frames arriving on the uplink, and routed
//! packets leaving a tenant for the outside, both through NAT (decisions in
//! [`crate::pipeline::external`] and the `nat` crate).

use std::net::{IpAddr, Ipv4Addr};

use packet::{FlowKey, Offload, PacketBuf, L3, L4};

use super::{NetworkRt, PortRt, Snapshot};
use crate::clock::Timestamp;
use crate::pipeline::external::{classify_arp, nat_drop_reason, neighbour, UplinkArp};
use crate::pipeline::router::{self, Router};
use crate::pipeline::{arp, DropReason, Verdict};
use crate::trace;

impl Snapshot {
    /// Whether `ip` is one of this host's external addresses.
    pub fn owns_external(&self, ip: Ipv4Addr) -> bool {
        self.uplink.as_ref().is_some_and(|u| u.addr.addr() == ip)
            || self.owns_external_vip(ip)
            || self.nat.owns(ip)
    }

    /// A frame received on the uplink (see `pipeline::external`).
    pub(super) fn process_uplink(
        &self,
        ingress: &PortRt,
        buf: &mut PacketBuf,
        now: Timestamp,
    ) -> Verdict {
        let Some(up) = &self.uplink else {
            return Verdict::Drop(DropReason::UplinkNotForUs);
        };
        trace::note("port", || {
            format!(
                "from uplink port {} (external network {})",
                ingress.name, up.addr
            )
        });
        let Ok(key) = FlowKey::parse(buf.frame()) else {
            return Verdict::Drop(DropReason::RuntFrame);
        };
        if let L3::Arp(_) = key.l3 {
            return match classify_arp(&key, up, |ip| self.owns_external(ip)) {
                UplinkArp::Answer => {
                    if arp::answer_with(&key, up.mac, buf.frame_mut()) {
                        buf.offload = Offload::NONE;
                        Verdict::Reply
                    } else {
                        Verdict::Drop(DropReason::L3Malformed)
                    }
                }
                UplinkArp::Learn(ip, mac) => {
                    trace::note("uplink", || format!("ARP: learns {ip} is at {mac}"));
                    if !trace::dry_run() {
                        up.neighbours.learn(ip, mac, now);
                    }
                    Verdict::Consumed
                }
                UplinkArp::Ignore => Verdict::Drop(DropReason::UplinkNotForUs),
            };
        }
        let L3::Ipv4(ip) = key.l3 else {
            return Verdict::Drop(DropReason::UplinkNotForUs);
        };
        if key.dst_mac != up.mac {
            return Verdict::Drop(DropReason::UplinkNotForUs);
        }
        let IpAddr::V4(dst) = ip.dst else {
            return Verdict::Drop(DropReason::L3Malformed);
        };
        if let Err(r) = check_ipv4(&key, buf) {
            return Verdict::Drop(r);
        }
        if dst == up.addr.addr() && matches!(key.l4, L4::Icmpv4 { ty: 8, .. }) {
            return if router::echo_reply(buf, &key, up.mac) {
                Verdict::Reply
            } else {
                Verdict::Drop(DropReason::L3Malformed)
            };
        }
        if ip.ttl <= 1 {
            return Verdict::Drop(DropReason::TtlExceeded);
        }
        if !self.lb_external.is_empty() {
            if let Some(v) = self.lb_from_uplink(ingress, &key, buf, now) {
                return v;
            }
        }
        let out = self.nat_translate(nat::EXTERNAL_ZONE, ingress, &key, buf, now);
        match out {
            nat::Outcome::Forward { zone, dst, .. } if zone != nat::EXTERNAL_ZONE => {
                self.deliver_to_tenant(ingress, zone, dst, &key, buf, now)
            }
            nat::Outcome::Forward { .. } | nat::Outcome::NoMatch => {
                Verdict::Drop(DropReason::NatNoMatch)
            }
            nat::Outcome::Drop(d) => Verdict::Drop(nat_drop_reason(d)),
        }
    }

    /// A packet the router found outside every network of the tenant
    /// (TTL checked): NAT, then out of the uplink or, hairpinned, back into
    /// a tenant; without NAT, ICMP network unreachable.
    pub(super) fn to_outside(
        &self,
        ingress: &PortRt,
        net: &NetworkRt,
        router: &Router,
        key: &FlowKey,
        buf: &mut PacketBuf,
        now: Timestamp,
    ) -> Verdict {
        let out = self.nat_translate(net.ct_zone, ingress, key, buf, now);
        match out {
            nat::Outcome::NoMatch => {
                let r = router::unreachable(router, ingress.net, key, buf);
                self.routed_verdict(ingress, r)
            }
            nat::Outcome::Drop(d) => Verdict::Drop(nat_drop_reason(d)),
            nat::Outcome::Forward { zone, dst, .. } if zone == nat::EXTERNAL_ZONE => {
                self.out_uplink(ingress, dst, key, buf, now)
            }
            nat::Outcome::Forward { zone, dst, .. } => {
                self.deliver_to_tenant(ingress, zone, dst, key, buf, now)
            }
        }
    }

    /// NAT of a packet that arrived in zone `from` (a tenant's, or
    /// [`nat::EXTERNAL_ZONE`]). Under a dry-run trace: the preview, applied
    /// to the synthetic frame, nothing committed.
    fn nat_translate(
        &self,
        from: u32,
        ingress: &PortRt,
        key: &FlowKey,
        buf: &mut PacketBuf,
        now: Timestamp,
    ) -> nat::Outcome {
        let partial = buf.offload.csum.is_some();
        if trace::active() {
            if let Some(dry) = self.nat_traced(from, key, buf, now) {
                return dry;
            }
        }
        self.nat
            .translate(from, ingress.id, key, buf.frame_mut(), partial, now.0)
    }

    /// Under a trace: says what NAT does with the packet (its preview);
    /// in a dry run also answers in its place, the preview's rewrite
    /// applied to the synthetic frame (`None`: translate for real).
    #[cold]
    fn nat_traced(
        &self,
        from: u32,
        key: &FlowKey,
        buf: &mut PacketBuf,
        now: Timestamp,
    ) -> Option<nat::Outcome> {
        let (kind, zone, src, dst, new) = match self.nat.preview(from, key, buf.frame(), now.0) {
            nat::Preview::NoMatch => {
                trace::note("nat", || "NAT: no rule or connection takes it".into());
                return trace::dry_run().then_some(nat::Outcome::NoMatch);
            }
            nat::Preview::Established {
                kind,
                zone,
                src,
                dst,
            } => (kind, zone, src, dst, false),
            nat::Preview::New {
                kind,
                zone,
                src,
                dst,
            } => (kind, zone, src, dst, true),
        };
        trace::note("nat", || {
            let to = if zone == nat::EXTERNAL_ZONE {
                "out of the uplink".to_string()
            } else {
                format!("into tenant {}", self.zone_tenant(zone))
            };
            format!(
                "NAT ({}): {}, leaves as {src} -> {dst} {to}{}",
                kind_name(kind),
                if new {
                    "new connection"
                } else {
                    "tracked connection"
                },
                if new && kind == nat::MappingKind::Snat {
                    " (source port kept if free in the pool)"
                } else {
                    ""
                }
            )
        });
        if !trace::dry_run() {
            return None;
        }
        let partial = buf.offload.csum.is_some();
        Some(
            if nat::rewrite_tuple(key, buf.frame_mut(), src, dst, partial) {
                nat::Outcome::Forward {
                    zone,
                    dst: *dst.ip(),
                    hairpin: false,
                }
            } else {
                nat::Outcome::Drop(nat::NatDrop::Malformed)
            },
        )
    }

    /// The tenant whose conntrack zone is `zone`.
    pub(super) fn zone_tenant(&self, zone: u32) -> String {
        self.networks
            .iter()
            .find(|n| n.ct_zone == zone)
            .map_or_else(|| format!("zone {zone}"), |n| n.cfg.tenant.clone())
    }

    /// Routes a translated packet into tenant `zone` toward `dst`.
    pub(super) fn deliver_to_tenant(
        &self,
        ingress: &PortRt,
        zone: u32,
        dst: Ipv4Addr,
        key: &FlowKey,
        buf: &mut PacketBuf,
        now: Timestamp,
    ) -> Verdict {
        let Some(leg) = self.routers.get(&zone).and_then(|r| r.leg_for(dst)) else {
            return Verdict::Drop(DropReason::NoRoute);
        };
        let r = router::forward_to(
            leg,
            dst,
            buf,
            usize::from(key.l3_offset),
            now,
            |i| self.networks.get(i).map(|n| &n.addrs),
            |i| self.networks.get(i).map(|n| &*n.neighbours),
        );
        self.routed_verdict(ingress, r)
    }

    /// Sends a translated packet out of the uplink toward `dst`: next hop,
    /// its MAC (or an ARP request for it, the packet dropped), TTL - 1.
    pub(super) fn out_uplink(
        &self,
        ingress: &PortRt,
        dst: Ipv4Addr,
        key: &FlowKey,
        buf: &mut PacketBuf,
        now: Timestamp,
    ) -> Verdict {
        let Some(up) = &self.uplink else {
            return Verdict::Drop(DropReason::NoRoute);
        };
        let Some(hop) = up.next_hop(dst) else {
            return Verdict::Drop(DropReason::NoRoute);
        };
        let Some(mac) = neighbour(up, hop, now) else {
            trace::note("uplink", || {
                format!("next hop {hop} not resolved: ARP request out of the uplink, this packet is dropped (route_arp_pending)")
            });
            router::arp_request(buf, up.mac, up.addr.addr(), hop);
            ingress.counters.count_drop(DropReason::RouteArpPending);
            return Verdict::Forward(up.port);
        };
        trace::note("uplink", || {
            format!("out of the uplink toward {dst} via next hop {hop} ({mac})")
        });
        if router::rewrite(buf, usize::from(key.l3_offset), up.mac, mac) {
            Verdict::Forward(up.port)
        } else {
            Verdict::Drop(DropReason::L3Malformed)
        }
    }
}

/// What the router checks before touching an IPv4 header: parsed whole, no
/// options, a valid header checksum.
fn check_ipv4(key: &FlowKey, buf: &PacketBuf) -> Result<(), DropReason> {
    if key.malformed.is_some() {
        return Err(DropReason::L3Malformed);
    }
    let l3 = usize::from(key.l3_offset);
    let hdr = buf
        .frame()
        .get(l3..l3 + 20)
        .ok_or(DropReason::L3Malformed)?;
    if hdr[0] & 0x0f != 5 {
        return Err(DropReason::RouteUnsupported);
    }
    if !packet::checksum::verify(hdr) {
        return Err(DropReason::L3Malformed);
    }
    Ok(())
}

/// How a trace names a NAT rule kind.
fn kind_name(k: nat::MappingKind) -> &'static str {
    match k {
        nat::MappingKind::Snat => "SNAT",
        nat::MappingKind::FloatingOut => "floating IP, outbound",
        nat::MappingKind::FloatingIn => "floating IP, inbound",
        nat::MappingKind::Forward => "port forward",
    }
}
