//! The per-packet pipeline: pure decisions, no file descriptors.
//!
//! A worker reads a frame from a port, parses it once into a
//! [`packet::FlowKey`], and runs the stages in order (see
//! docs/architecture.md): [`port_security`] (the frame's MAC, IP and ARP
//! addresses must be the port's), [`arp`] (the switch answers ARP for the
//! addresses it knows), [`bridge`] (MAC learning and lookup), [`router`]
//! (frames to a gateway MAC), [`external`] (the uplink and NAT), and, as
//! they land, the stages of later network functions. The result is a
//! [`Verdict`]; every drop names a [`DropReason`], which counters, capture
//! and trace all read.

pub mod arp;
pub mod bridge;
pub mod dns_local;
pub mod external;
pub mod overlay;
pub mod port_security;
pub mod router;
pub mod security;

use std::collections::HashMap;
use std::net::Ipv4Addr;

use packet::MacAddr;

use crate::fdb::PortId;
pub use bridge::{Bridge, Ingress};

/// Who owns an IPv4 address in a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpOwner {
    /// The owner's MAC (for the gateway: the network's gateway MAC). MACs
    /// are unique within a network, so the MAC names the owning port.
    pub mac: MacAddr,
    /// The switch itself owns it (the gateway address).
    pub gateway: bool,
}

/// Addresses handed out by DHCP: IPv4 -> client MAC.
pub type Leased = HashMap<Ipv4Addr, MacAddr>;

/// A network's IPv4 address owners: what the ARP responder answers and
/// what port binding enforces. Static owners (ports' configured addresses,
/// the gateway) come from the directory with each snapshot; leased ones are
/// swapped in by the DHCP service as leases come and go, without a reload.
#[derive(Debug, Default)]
pub struct Addresses {
    /// From the directory.
    pub fixed: HashMap<Ipv4Addr, IpOwner>,
    /// From DHCP; shared across reloads.
    pub leased: std::sync::Arc<arc_swap::ArcSwap<Leased>>,
}

impl Addresses {
    /// Who owns `ip`, if anyone.
    #[inline]
    pub fn owner(&self, ip: &Ipv4Addr) -> Option<IpOwner> {
        if let Some(o) = self.fixed.get(ip) {
            return Some(*o);
        }
        self.leased.load().get(ip).map(|mac| IpOwner {
            mac: *mac,
            gateway: false,
        })
    }

    /// Whether `ip` belongs to the port whose MAC is `mac`.
    #[inline]
    pub fn owned_by(&self, ip: &Ipv4Addr, mac: &MacAddr) -> bool {
        self.owner(ip).is_some_and(|o| !o.gateway && o.mac == *mac)
    }
}

/// Why a frame was dropped. Small and `Copy`: it is counted per port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// Shorter than an Ethernet header.
    RuntFrame,
    /// The virtio-net header was malformed (unknown GSO type, zero gso_size,
    /// truncated).
    BadVnetHdr,
    /// Source MAC is multicast or all-zero.
    SrcMacInvalid,
    /// Port security: source MAC is not the port's configured MAC.
    SrcMacSpoofed,
    /// Source MAC is another port's configured MAC.
    SrcMacHijack,
    /// Destination is the port the frame came from.
    DstSamePort,
    /// Port binding: IPv4 source address is not the port's (nor 0.0.0.0 for
    /// DHCP).
    IpSrcSpoofed,
    /// Port binding: ARP sender MAC or IP is not the port's.
    ArpSpoofed,
    /// A VM sent a DHCP server message (UDP source port 67).
    DhcpServerFromVm,
    /// Port binding: an IPv4 or ARP frame too broken to check its source.
    L3Malformed,
    /// A local service (DHCP) has a full queue.
    LocalServiceBusy,
    /// A DHCP message whose chaddr is not the frame's source MAC.
    DhcpChaddrMismatch,
    /// A DNS message to the gateway that gets no answer (a response, or not
    /// parseable).
    DnsIgnored,
    /// Addressed to the gateway MAC but no local service takes it (routing
    /// comes with the gateway issue).
    ToGatewayUnhandled,
    /// Egress: the VM side of the tap is down (EIO).
    EgressDown,
    /// Egress: the tap's device is gone (its namespace was deleted).
    EgressDetached,
    /// Egress: the kernel would block (tap queue full).
    EgressBusy,
    /// Egress: any other write error.
    EgressError,
    /// Egress needs segmentation or checksum work that failed in software.
    OffloadFailed,
    /// Underlay: from an address that is not a configured peer (counted
    /// as the underlay's `rx_not_peer`; named so in drop captures).
    UnderlayNotPeer,
    /// Underlay: not a valid VXLAN header (no I flag, too short).
    UnderlayBadVxlan,
    /// Underlay: a VNI no local network uses.
    UnderlayUnknownVni,
    /// Underlay: the peer does not host the VNI's network.
    UnderlayNotMember,
    /// Underlay: a frame from one peer whose destination is another peer
    /// (the switch never relays between peers: split horizon).
    UnderlayNoTransit,
    /// Too big for the overlay MTU once encapsulated (the sender got ICMP
    /// "fragmentation needed" / "packet too big" when one applies).
    OverlayMtuExceeded,
    /// Router: no network of the tenant holds the destination (the sender
    /// got ICMP network unreachable when one applies).
    NoRoute,
    /// Router: TTL ran out (the sender got ICMP time exceeded when one
    /// applies).
    TtlExceeded,
    /// Router: the next hop's MAC is unknown; an ARP request went out and
    /// the packet was dropped.
    RouteArpPending,
    /// Router: a packet it does not route (IPv4 options, IPv6 for now).
    RouteUnsupported,
    /// NAT: no free external port for a new SNAT connection.
    NatPortsExhausted,
    /// Conntrack: the global or per-port connection cap refused a new
    /// connection.
    ConnLimit,
    /// Conntrack: a packet that claims a connection the table cannot
    /// accept it for (a TCP segment other than SYN with no entry, an ICMP
    /// error about nothing, ...).
    ConnInvalid,
    /// Uplink: IPv4 to the switch that no NAT connection or rule takes.
    NatNoMatch,
    /// Uplink: a frame not addressed to the switch (the switch routes on
    /// the uplink, it never bridges).
    UplinkNotForUs,
    /// Security groups: no egress rule of the source port allows the new
    /// connection.
    SgEgressDenied,
    /// Security groups: no ingress rule of the destination port allows the
    /// new connection.
    SgIngressDenied,
    /// Load balancer: a new connection to a VIP whose pool has no healthy
    /// backend with weight > 0 (the client got ICMP port unreachable).
    LbNoBackend,
    /// Load balancer: a hairpin whose rewritten tuple is taken.
    LbHairpin,
}

impl DropReason {
    /// Number of reasons (size of per-port counter arrays).
    pub const COUNT: usize = 38;

    /// Every reason, in counter order.
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::RuntFrame,
        DropReason::BadVnetHdr,
        DropReason::SrcMacInvalid,
        DropReason::SrcMacSpoofed,
        DropReason::SrcMacHijack,
        DropReason::DstSamePort,
        DropReason::IpSrcSpoofed,
        DropReason::ArpSpoofed,
        DropReason::DhcpServerFromVm,
        DropReason::L3Malformed,
        DropReason::LocalServiceBusy,
        DropReason::DhcpChaddrMismatch,
        DropReason::DnsIgnored,
        DropReason::ToGatewayUnhandled,
        DropReason::EgressDown,
        DropReason::EgressDetached,
        DropReason::EgressBusy,
        DropReason::EgressError,
        DropReason::OffloadFailed,
        DropReason::UnderlayNotPeer,
        DropReason::UnderlayBadVxlan,
        DropReason::UnderlayUnknownVni,
        DropReason::UnderlayNotMember,
        DropReason::UnderlayNoTransit,
        DropReason::OverlayMtuExceeded,
        DropReason::NoRoute,
        DropReason::TtlExceeded,
        DropReason::RouteArpPending,
        DropReason::RouteUnsupported,
        DropReason::NatPortsExhausted,
        DropReason::ConnLimit,
        DropReason::ConnInvalid,
        DropReason::NatNoMatch,
        DropReason::UplinkNotForUs,
        DropReason::SgEgressDenied,
        DropReason::SgIngressDenied,
        DropReason::LbNoBackend,
        DropReason::LbHairpin,
    ];

    /// Stable snake_case name (counters, JSON, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::RuntFrame => "runt_frame",
            DropReason::BadVnetHdr => "bad_vnet_hdr",
            DropReason::SrcMacInvalid => "src_mac_invalid",
            DropReason::SrcMacSpoofed => "src_mac_spoofed",
            DropReason::SrcMacHijack => "src_mac_hijack",
            DropReason::DstSamePort => "dst_same_port",
            DropReason::IpSrcSpoofed => "ip_src_spoofed",
            DropReason::ArpSpoofed => "arp_spoofed",
            DropReason::DhcpServerFromVm => "dhcp_server_from_vm",
            DropReason::L3Malformed => "l3_malformed",
            DropReason::LocalServiceBusy => "local_service_busy",
            DropReason::DhcpChaddrMismatch => "dhcp_chaddr_mismatch",
            DropReason::DnsIgnored => "dns_ignored",
            DropReason::ToGatewayUnhandled => "to_gateway_unhandled",
            DropReason::EgressDown => "egress_down",
            DropReason::EgressDetached => "egress_detached",
            DropReason::EgressBusy => "egress_busy",
            DropReason::EgressError => "egress_error",
            DropReason::OffloadFailed => "offload_failed",
            DropReason::UnderlayNotPeer => "underlay_not_peer",
            DropReason::UnderlayBadVxlan => "underlay_bad_vxlan",
            DropReason::UnderlayUnknownVni => "underlay_unknown_vni",
            DropReason::UnderlayNotMember => "underlay_not_member",
            DropReason::UnderlayNoTransit => "underlay_no_transit",
            DropReason::OverlayMtuExceeded => "overlay_mtu_exceeded",
            DropReason::NoRoute => "no_route",
            DropReason::TtlExceeded => "ttl_exceeded",
            DropReason::RouteArpPending => "route_arp_pending",
            DropReason::RouteUnsupported => "route_unsupported",
            DropReason::NatPortsExhausted => "nat_ports_exhausted",
            DropReason::ConnLimit => "conn_limit",
            DropReason::ConnInvalid => "conn_invalid",
            DropReason::NatNoMatch => "nat_no_match",
            DropReason::UplinkNotForUs => "uplink_not_for_us",
            DropReason::SgEgressDenied => "sg_egress_denied",
            DropReason::SgIngressDenied => "sg_ingress_denied",
            DropReason::LbNoBackend => "lb_no_backend",
            DropReason::LbHairpin => "lb_hairpin",
        }
    }

    /// Index into counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Drops counted by reason (relaxed atomics: statistics, not
/// synchronisation); ports and peers each have one.
#[derive(Debug)]
pub struct DropCounters([std::sync::atomic::AtomicU64; DropReason::COUNT]);

impl Default for DropCounters {
    fn default() -> Self {
        DropCounters(std::array::from_fn(|_| {
            std::sync::atomic::AtomicU64::new(0)
        }))
    }
}

impl DropCounters {
    /// Counts one drop for `r` (not a packet trace's synthetic packet).
    #[inline]
    pub fn count(&self, r: DropReason) {
        if crate::trace::dry_run() {
            return;
        }
        self.0[r.index()].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Drops counted for `r`.
    pub fn get(&self, r: DropReason) -> u64 {
        self.0[r.index()].load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Where a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// To one port.
    Forward(PortId),
    /// To every other port of the ingress port's network.
    Flood,
    /// Routed into network `net` (index in the snapshot): to `port` there
    /// (a local port or a peer's VTEP).
    ForwardIn {
        /// Destination network.
        net: usize,
        /// Port or VTEP pseudo-port.
        port: PortId,
    },
    /// To the peers hosting the ingress port's network, not to local ports
    /// (a VM's ARP answer to the gateway, which every host's router may be
    /// waiting for).
    ToPeers,
    /// Routed (or the router's ARP request) into network `net`: to every
    /// port of it, local and remote.
    FloodIn {
        /// Destination network.
        net: usize,
    },
    /// The buffer now holds the switch's answer (ARP reply, ...): send it
    /// back out of the ingress port.
    Reply,
    /// Taken by a local service (DHCP), which answers on its own.
    Consumed,
    /// Nowhere, and why.
    Drop(DropReason),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reason_table_is_consistent() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let names: std::collections::HashSet<_> =
            DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), DropReason::COUNT);
    }
}

/// Frames and tables shared by the stage tests.
#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use std::net::Ipv4Addr;

    pub const A: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    pub const B: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);
    pub const GW: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xfe]);
    pub const IP_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    pub const IP_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    pub const IP_GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);

    /// Port 1 owns A/10.0.0.1, port 2 owns B/10.0.0.2, the switch owns the gateway.
    pub fn owners() -> Addresses {
        let mut o = Addresses::default();
        o.fixed.insert(
            IP_A,
            IpOwner {
                mac: A,
                gateway: false,
            },
        );
        o.fixed.insert(
            IP_B,
            IpOwner {
                mac: B,
                gateway: false,
            },
        );
        o.fixed.insert(
            IP_GW,
            IpOwner {
                mac: GW,
                gateway: true,
            },
        );
        o
    }

    pub fn ingress(id: PortId, mac: MacAddr, port_security: bool) -> Ingress {
        Ingress {
            id,
            mac,
            port_security,
        }
    }

    /// An Ethernet/ARP frame (42 bytes, no padding).
    pub fn arp(eth_src: MacAddr, op: u16, sha: MacAddr, spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
        let mut f = Vec::with_capacity(42);
        f.extend_from_slice(&MacAddr::BROADCAST.0);
        f.extend_from_slice(&eth_src.0);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4]);
        f.extend_from_slice(&op.to_be_bytes());
        f.extend_from_slice(&sha.0);
        f.extend_from_slice(&spa.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&tpa.octets());
        f
    }

    /// An Ethernet/IPv4/UDP frame.
    pub fn udp(src_mac: MacAddr, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(src_mac.0, MacAddr::BROADCAST.0)
            .ipv4(src.octets(), dst.octets(), 64)
            .udp(sport, dport)
            .write(&mut f, &[1, 2, 3, 4])
            .unwrap();
        f
    }

    pub fn key(f: &[u8]) -> packet::FlowKey {
        packet::FlowKey::parse(f).unwrap()
    }
}
