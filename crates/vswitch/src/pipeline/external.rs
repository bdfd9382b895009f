//! The external side: the uplink port and NAT.
//!
//! A host's uplink is a port on the external network with the host's
//! address on it (the SNAT address). On the uplink the switch is a router
//! interface, not a bridge: it answers ARP for its own external addresses
//! (the uplink address, floating IPs, port-forward addresses), learns its
//! next hops' MACs from ARP replies into a bounded neighbour cache, and
//! takes IPv4 sent to its MAC. Anything else arriving on the uplink is
//! dropped (`uplink_not_for_us`); the switch never bridges between the
//! external network and a tenant network.
//!
//! Order of stages for a packet leaving a tenant: port security, router
//! (the destination is outside every network of the tenant, TTL checked),
//! NAT (conntrack lookup; SNAT or floating IP for a new connection), then
//! out of the uplink toward the next hop (the destination when it is on the
//! uplink's subnet, else the uplink's gateway), TTL - 1. For a packet
//! arriving on the uplink: ARP or IPv4 to the uplink MAC, ICMP echo to the
//! uplink address answered, NAT (reply of a tracked connection, or a new
//! connection to a floating IP or port forward), then the tenant's router
//! delivers it into the network holding the translated destination.

use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use packet::{FlowKey, MacAddr, L3};

use super::router::Neighbours;
use super::DropReason;
use crate::clock::Timestamp;
use crate::fdb::PortId;

/// This host's uplink as the data path sees it.
#[derive(Debug, Clone)]
pub struct UplinkRt {
    /// Its port id (a regular port slot: counters, capture).
    pub port: PortId,
    /// The switch's MAC on the external network.
    pub mac: MacAddr,
    /// The switch's address and the external prefix.
    pub addr: Ipv4Net,
    /// Default next hop.
    pub gateway: Option<Ipv4Addr>,
    /// Next hops' MACs learned from ARP; kept across reloads.
    pub neighbours: Arc<Neighbours>,
}

impl UplinkRt {
    /// The address to resolve for a packet to `dst`: `dst` itself when it
    /// is on the uplink's subnet, else the gateway; `None` without one.
    pub fn next_hop(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        if self.addr.contains(&dst) {
            Some(dst)
        } else {
            self.gateway
        }
    }
}

/// What an ARP frame on the uplink asks of the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UplinkArp {
    /// A request for one of the switch's addresses: answer it.
    Answer,
    /// A reply to the switch (or a gratuitous announcement) from a
    /// neighbour on the subnet: learn it.
    Learn(Ipv4Addr, MacAddr),
    /// Not for the switch.
    Ignore,
}

/// Classifies an ARP frame received on the uplink. `owns` says whether an
/// address is one of the switch's external addresses.
pub fn classify_arp(key: &FlowKey, up: &UplinkRt, owns: impl Fn(Ipv4Addr) -> bool) -> UplinkArp {
    let L3::Arp(a) = key.l3 else {
        return UplinkArp::Ignore;
    };
    if !a.sha.is_unicast() || a.sha != key.src_mac || a.sha == up.mac {
        return UplinkArp::Ignore;
    }
    match a.op {
        1 if a.spa != a.tpa && owns(a.tpa) => UplinkArp::Answer,
        2 if key.dst_mac == up.mac
            && a.tpa == up.addr.addr()
            && up.addr.contains(&a.spa)
            && !owns(a.spa) =>
        {
            UplinkArp::Learn(a.spa, a.sha)
        }
        _ => UplinkArp::Ignore,
    }
}

/// The MAC of next hop `ip` if known.
pub fn neighbour(up: &UplinkRt, ip: Ipv4Addr, now: Timestamp) -> Option<MacAddr> {
    up.neighbours.get(&ip, now)
}

/// The drop reason for a NAT refusal.
pub fn nat_drop_reason(d: nat::NatDrop) -> DropReason {
    match d {
        nat::NatDrop::PortsExhausted => DropReason::NatPortsExhausted,
        nat::NatDrop::Limit(_) => DropReason::ConnLimit,
        nat::NatDrop::Invalid(_) => DropReason::ConnInvalid,
        nat::NatDrop::Malformed => DropReason::L3Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn up() -> UplinkRt {
        UplinkRt {
            port: 9,
            mac: MacAddr([2, 0, 0, 0, 0, 0x99]),
            addr: "203.0.113.2/24".parse().unwrap(),
            gateway: Some(Ipv4Addr::new(203, 0, 113, 1)),
            neighbours: Arc::default(),
        }
    }

    #[test]
    fn next_hop_is_on_link_or_the_gateway() {
        let u = up();
        let on = Ipv4Addr::new(203, 0, 113, 50);
        assert_eq!(u.next_hop(on), Some(on));
        assert_eq!(
            u.next_hop(Ipv4Addr::new(198, 51, 100, 1)),
            Some(Ipv4Addr::new(203, 0, 113, 1))
        );
        let no_gw = UplinkRt {
            gateway: None,
            ..up()
        };
        assert_eq!(no_gw.next_hop(Ipv4Addr::new(198, 51, 100, 1)), None);
    }

    #[test]
    fn arp_on_the_uplink() {
        let u = up();
        let ext = MacAddr([2, 0, 0, 0, 0, 0x77]);
        let me = u.addr.addr();
        let fip = Ipv4Addr::new(203, 0, 113, 10);
        let owns = |ip: Ipv4Addr| ip == me || ip == fip;
        let peer = Ipv4Addr::new(203, 0, 113, 1);
        // Requests for the uplink address and a floating IP are answered.
        for t in [me, fip] {
            let f = arp(ext, 1, ext, peer, t);
            assert_eq!(classify_arp(&key(&f), &u, owns), UplinkArp::Answer);
        }
        // Not for another address, not a probe for our own address.
        let f = arp(ext, 1, ext, peer, Ipv4Addr::new(203, 0, 113, 77));
        assert_eq!(classify_arp(&key(&f), &u, owns), UplinkArp::Ignore);
        let f = arp(ext, 1, ext, fip, fip);
        assert_eq!(classify_arp(&key(&f), &u, owns), UplinkArp::Ignore);
        // Replies to us are learned; spoofing one of our addresses is not.
        let mut f = arp(ext, 2, ext, peer, me);
        f[0..6].copy_from_slice(&u.mac.0);
        assert_eq!(
            classify_arp(&key(&f), &u, owns),
            UplinkArp::Learn(peer, ext)
        );
        let mut f = arp(ext, 2, ext, fip, me);
        f[0..6].copy_from_slice(&u.mac.0);
        assert_eq!(classify_arp(&key(&f), &u, owns), UplinkArp::Ignore);
        // A sender MAC that is not the frame's source.
        let f = arp(ext, 1, A, peer, me);
        assert_eq!(classify_arp(&key(&f), &u, owns), UplinkArp::Ignore);
    }
}
