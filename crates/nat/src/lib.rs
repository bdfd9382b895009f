//! IPv4 NAT for vswitch, as a sans-IO library on top of [`conntrack`].
//!
//! # Model
//!
//! Every packet belongs to a *zone*: a tenant's zone (a nonzero id other
//! than [`EXTERNAL_ZONE`], chosen by the caller, stable across restarts)
//! when it comes from a VM through its network's gateway, or
//! [`EXTERNAL_ZONE`] when it comes from the uplink. A NAT connection is one
//! conntrack entry whose original key is the first packet as it arrived
//! (zone + 5-tuple) and whose reply key is what the answer carries on the
//! other side of the translation, in the other zone. A packet matching an
//! entry in direction `d` is rewritten to look like the reverse of the
//! other direction's key (Linux's scheme), so one entry translates both
//! ways and ICMP errors about it.
//!
//! * SNAT: a connection from a tenant zone whose source is in a [`Snat`]
//!   rule's prefix gets the rule's external address as source, with
//!   endpoint-independent mapping (RFC 4787 REQ-1: the same inside
//!   address:port keeps the same external port for every destination),
//!   port preservation when the inside port is free in the range,
//!   otherwise the next free port of [`Rules::ports`]; ICMP echo gets its
//!   identifier mapped the same way. No free port: [`NatDrop::PortsExhausted`],
//!   counted, existing connections untouched.
//! * Floating IP ([`FloatingIp`]): 1:1. Connections from the inside address
//!   leave with the floating address (ports preserved when free, as SNAT);
//!   connections from outside to the floating address go to the inside
//!   address, any protocol and port.
//! * Port forward ([`PortForward`]): connections from outside to
//!   external address:port (TCP or UDP) go to inside address:port.
//! * Hairpin: a packet translated into [`EXTERNAL_ZONE`] whose destination
//!   is one of this NAT's own external addresses is run again as if it had
//!   come from the uplink (at most once more), so a VM reaching its own or
//!   another VM's (even another tenant's) floating IP or port forward
//!   works without the packet leaving the host.
//! * ICMP errors (RFC 5508): an error about a NAT connection is translated
//!   too: outer destination, the quoted IPv4 header (addresses, header
//!   checksum) and quoted ports / echo identifier (and the quoted L4
//!   checksum when it is in the quote), and the ICMP checksum.
//! * Checksums are updated incrementally; a frame whose L4 checksum is left
//!   to offload (`partial_csum`) gets its pseudo-header sum updated instead,
//!   so TSO super-frames cross NAT whole.
//!
//! # How a caller uses it
//!
//! ```
//! use std::net::Ipv4Addr;
//! use nat::{Nat, Outcome, Rules, Snat, EXTERNAL_ZONE};
//! # let frame = |src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16| {
//! #     let mut f = Vec::new();
//! #     etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
//! #         .ipv4(src, dst, 64)
//! #         .udp(sp, dp)
//! #         .write(&mut f, &[0; 8])
//! #         .unwrap();
//! #     f
//! # };
//! let rules = Rules {
//!     snat: vec![Snat {
//!         zone: 7,
//!         inside: "10.0.1.0/24".parse().unwrap(),
//!         external: Ipv4Addr::new(203, 0, 113, 2),
//!     }],
//!     ..Rules::default()
//! };
//! let mut nat = Nat::new(conntrack::Config::default(), rules).unwrap();
//! let now = 1_000_000_000; // the caller's monotonic clock, ns
//! // A VM of zone 7 sends to the Internet (the caller routed it outside
//! // every network of the tenant).
//! let mut f = frame([10, 0, 1, 11], [198, 51, 100, 7], 5000, 53);
//! let key = packet::FlowKey::parse(&f).unwrap();
//! let out = nat.translate(7, 1, &key, &mut f, false, now);
//! assert_eq!(
//!     out,
//!     Outcome::Forward { zone: EXTERNAL_ZONE, dst: Ipv4Addr::new(198, 51, 100, 7), hairpin: false }
//! );
//! // The answer arrives on the uplink and goes back to the VM.
//! let mut r = frame([198, 51, 100, 7], [203, 0, 113, 2], 53, 5000);
//! let key = packet::FlowKey::parse(&r).unwrap();
//! let back = nat.translate(EXTERNAL_ZONE, 0, &key, &mut r, false, now);
//! assert_eq!(back, Outcome::Forward { zone: 7, dst: Ipv4Addr::new(10, 0, 1, 11), hairpin: false });
//! // From the control plane, now and then: bounded work, ports released.
//! nat.expire(now, 1024);
//! ```
//!
//! # Design
//!
//! * **One conntrack table is the NAT state.** A new connection is
//!   committed with [`conntrack::Conntrack::commit_with_reply`]: the reply
//!   key is the reverse of the translated packet, in the zone the packet
//!   goes to. Every later packet, in either direction, is one hash lookup
//!   and a rewrite to the reverse of the other direction's key; nothing
//!   else is per-connection. Connections that match no rule are never
//!   committed, so the table holds NAT connections only.
//! * **Endpoint-independent mapping** ([`MappingView`]): a map
//!   (zone, inside address, inside port, protocol, external address) ->
//!   external port with a count of the connections using it, and one
//!   bitmap of used ports per (external address, protocol) ([`PoolView`]).
//!   A fresh mapping keeps the inside port when it is free (for SNAT only
//!   inside [`Rules::ports`]; a floating IP belongs to one host, so any of
//!   its ports), otherwise takes the next free port after a next-fit
//!   cursor: at most 1024 bitmap words and [`MAX_REJECTED`] conntrack
//!   lookups per new connection. ICMP query identifiers are mapped the
//!   same way, from the same range, in a pool of their own. A candidate
//!   whose reply key is already in conntrack (an inbound connection, a
//!   hairpin, or a reply key equal to its own reverse) is skipped.
//!   Port-forward ports are reserved in their address's pools. Other IP
//!   protocols are translated by address only (one connection per
//!   (external address, remote address, protocol); a second one is
//!   [`NatDrop::PortsExhausted`]).
//! * **Releasing.** A mapping loses a connection whenever its conntrack
//!   entry leaves by any path: [`Nat::expire`] uses `expire_with`, and
//!   every other path (an expired entry met by a lookup, a reopened TCP
//!   connection, flushes, the reaping before a cap refuses, import) is
//!   queued by conntrack ([`conntrack::Conntrack::set_collect_removed`])
//!   and drained after each call into it. The mapping's port is free again
//!   with its last connection. The mapping is derived from the entry's
//!   keys (not stored beside them), so the two cannot disagree.
//! * **Rules** are indexed by hash (floating IPs by inside and external
//!   address, forwards by external address/protocol/port; SNAT rules stay
//!   an ordered list, first match wins). [`Nat::set_rules`] validates and
//!   swaps them; tracked connections keep translating with the mapping
//!   they were created with until they end, even when their rule is gone
//!   (as Linux does), and new connections follow the new rules. A mapping
//!   includes its external address, so an inside host that gets a floating
//!   IP starts new connections from it at once.
//! * **ICMP errors.** conntrack matches a quote as is, then reversed (the
//!   quote is the translated form of the packet). The error is rewritten
//!   so that the quote reads as the packet its sender sent: the quoted
//!   header becomes the untranslated key of that direction, the outer
//!   destination its sender. The outer source stays, except when it is the
//!   quoted packet's destination itself (the endpoint answered, not a
//!   router): it becomes that endpoint's address on the other side, as in
//!   any of its packets, so a VM's own port unreachable does not leak its
//!   private address.
//! * **Which packets are NAT's.** [`Outcome::NoMatch`] for everything that
//!   no connection and no rule concerns: IPv6, ARP, untracked ICMP, new
//!   connections no rule matches, and packets from the uplink whose
//!   source is one of our own addresses (only a hairpin makes those). A
//!   packet that does concern NAT (to one of our addresses from the
//!   uplink, from an inside address a rule covers, or of a tracked
//!   connection) but cannot be rewritten is dropped: IPv4 options, later
//!   fragments, broken headers ([`NatDrop::Malformed`]), and packets
//!   conntrack finds invalid ([`NatDrop::Invalid`]).
//! * **Restart.** [`Nat::export`] / [`Nat::import`] carry the conntrack
//!   snapshot with each entry's [`Mapping`]; import rebuilds the mappings
//!   and port bitmaps from the entries' keys, so established connections
//!   keep their ports and those ports stay taken.
//!
//! # What it is not
//!
//! IPv4 only (no NAT64, no NPTv6). No ALGs (FTP, SIP: payload is never
//! read), no IP reassembly (a first fragment is translated, later ones are
//! dropped), no endpoint-independent *filtering*: an inbound packet needs a
//! connection, a port forward or a floating IP (address-and-port-dependent
//! filtering, which RFC 4787 REQ-8 permits). No clock, sockets or locks: `now` comes with every call and a
//! `Nat` is one worker's or behind the caller's lock. [`Nat::pools`],
//! [`Nat::mappings`], [`Nat::flush_zone`] and import walk tables and
//! belong to the control plane. Every function takes untrusted frames,
//! never panics on them and never changes a frame's length.

#![forbid(unsafe_code)]

mod ports;
mod rewrite;
mod rules;
mod steer;
pub mod striped;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use conntrack::{ConnId, ConnKey, Conntrack, Dir, ImportReport, NewConn, Track};
use ipnet::Ipv4Net;
use packet::flow::{ethertype, proto, Frag};
use packet::{FlowKey, L3, L4};
use serde::{Deserialize, Serialize};

pub use ports::{MappingView, PoolView, Share, MAX_REJECTED};
pub use rules::RulesError;
pub use steer::{Steering, MAX_STRIPES};
pub use striped::NatStripes;

use ports::{eim_of, EimKey, Ports, Want};
use rewrite::{L4Kind, Tuple};
use rules::{Choice, Index};

/// The zone of the uplink side (the external network).
pub const EXTERNAL_ZONE: u32 = 0;

/// Default SNAT port range.
pub const DEFAULT_PORTS: (u16, u16) = (1024, 65535);

/// L4 protocol of a port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// Sources in `inside` of `zone` leave through `external`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snat {
    /// Tenant zone.
    pub zone: u32,
    /// Inside prefix (a tenant network's cidr).
    pub inside: Ipv4Net,
    /// External (uplink) address.
    pub external: Ipv4Addr,
}

/// 1:1 NAT between a VM address and an external address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloatingIp {
    /// Tenant zone.
    pub zone: u32,
    /// The VM's address.
    pub inside: Ipv4Addr,
    /// The floating (external) address.
    pub external: Ipv4Addr,
}

/// External address:port to a VM's address:port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    /// Tenant zone of the VM.
    pub zone: u32,
    /// TCP or UDP.
    pub proto: Proto,
    /// External address and port.
    pub external: SocketAddrV4,
    /// The VM's address and port.
    pub inside: SocketAddrV4,
}

/// Everything the NAT translates, replaced whole on reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rules {
    /// SNAT rules (the first matching one applies).
    pub snat: Vec<Snat>,
    /// Floating IPs (take precedence over SNAT for their inside address).
    pub floating: Vec<FloatingIp>,
    /// Port forwards.
    pub forwards: Vec<PortForward>,
    /// Ports SNAT may allocate, inclusive (port forwards' external ports
    /// on an SNAT address are never allocated).
    pub ports: (u16, u16),
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            snat: Vec::new(),
            floating: Vec::new(),
            forwards: Vec::new(),
            ports: DEFAULT_PORTS,
        }
    }
}

/// Why NAT dropped a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatDrop {
    /// No external port left for a new SNAT mapping, or the one external
    /// tuple a new connection could get is taken by another connection.
    PortsExhausted,
    /// A conntrack cap refused the new connection.
    Limit(conntrack::Limit),
    /// Conntrack found the packet invalid for its connection.
    Invalid(conntrack::Invalid),
    /// Not a packet NAT can rewrite (truncated headers, IPv4 options).
    Malformed,
}

/// What [`Nat::translate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The frame was rewritten; it now travels in `zone` ([`EXTERNAL_ZONE`]:
    /// out of the uplink; a tenant zone: to `dst` inside that tenant).
    Forward {
        /// Zone the packet is now in.
        zone: u32,
        /// Its (translated) destination address.
        dst: Ipv4Addr,
        /// It went out and came back in (hairpin).
        hairpin: bool,
    },
    /// No connection and no rule: not NAT's packet.
    NoMatch,
    /// Dropped.
    Drop(NatDrop),
}

/// Per-entry data kept in conntrack. The addresses and ports of both
/// sides are the entry's keys: the original key is the first packet as it
/// arrived, the reply key what the answer carries on the other side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// What kind of rule created the entry.
    pub kind: MappingKind,
}

/// The rule kind behind a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MappingKind {
    /// Source NAT to a shared address.
    Snat,
    /// Outbound through a floating IP.
    FloatingOut,
    /// Inbound to a floating IP.
    FloatingIn,
    /// Inbound through a port forward.
    Forward,
}

/// What a translation would do (see [`Nat::preview`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preview {
    /// No rule and no connection: not NAT's packet.
    NoMatch,
    /// A tracked connection's packet: it leaves as `src -> dst` into
    /// `zone` ([`EXTERNAL_ZONE`]: out of the uplink).
    Established {
        /// The rule kind that made the connection.
        kind: MappingKind,
        /// Where the packet goes.
        zone: u32,
        /// Source after translation.
        src: SocketAddrV4,
        /// Destination after translation.
        dst: SocketAddrV4,
    },
    /// A new connection a rule would take.
    New {
        /// The rule kind.
        kind: MappingKind,
        /// Where the packet goes.
        zone: u32,
        /// Source after translation.
        src: SocketAddrV4,
        /// Destination after translation.
        dst: SocketAddrV4,
    },
}

/// Counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatStats {
    /// Packets rewritten.
    pub translated: u64,
    /// New connections by kind.
    pub snat_new: u64,
    /// New outbound floating-IP connections.
    pub floating_out_new: u64,
    /// New inbound floating-IP connections.
    pub floating_in_new: u64,
    /// New port-forward connections.
    pub forward_new: u64,
    /// Packets that went out and back in.
    pub hairpin: u64,
    /// ICMP errors translated.
    pub icmp_errors: u64,
    /// New connections refused for want of a port.
    pub ports_exhausted: u64,
    /// New connections refused because the one tuple they could be given
    /// is another connection's (returned as [`NatDrop::PortsExhausted`]).
    pub tuple_taken: u64,
    /// New connections refused by a conntrack cap ([`NatDrop::Limit`]).
    pub refused: u64,
    /// Packets dropped as invalid or malformed.
    pub invalid: u64,
    /// Packets matching nothing.
    pub no_match: u64,
    /// Mappings whose last connection ended (their port is free again).
    pub mappings_released: u64,
}

impl NatStats {
    /// Adds `o`'s counters to these (the stripes of one NAT).
    pub fn merge(&mut self, o: &NatStats) {
        self.translated += o.translated;
        self.snat_new += o.snat_new;
        self.floating_out_new += o.floating_out_new;
        self.floating_in_new += o.floating_in_new;
        self.forward_new += o.forward_new;
        self.hairpin += o.hairpin;
        self.icmp_errors += o.icmp_errors;
        self.ports_exhausted += o.ports_exhausted;
        self.tuple_taken += o.tuple_taken;
        self.refused += o.refused;
        self.invalid += o.invalid;
        self.no_match += o.no_match;
        self.mappings_released += o.mappings_released;
    }
}

/// Format version of [`NatSnapshot`].
pub const NAT_SNAPSHOT_VERSION: u32 = 1;

/// The NAT's connections at one instant, for a restart
/// ([`Nat::export`] / [`Nat::import`]). Rules are not included: the
/// restarted process has its configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NatSnapshot {
    /// [`NAT_SNAPSHOT_VERSION`].
    pub version: u32,
    /// The connections with their mappings.
    pub conntrack: conntrack::Snapshot<Mapping>,
}

/// What [`Nat::import`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatImportReport {
    /// conntrack's report (imported, expired, conflicts, caps).
    pub conntrack: ImportReport,
    /// Imported entries removed again because they are not NAT
    /// connections (IPv6, or keys whose zones do not fit their kind).
    pub rejected: usize,
    /// Imported entries removed again because their external port belongs
    /// to another mapping.
    pub port_conflicts: usize,
}

impl NatImportReport {
    /// Adds `o`'s counts to these (imports into several stripes).
    pub fn merge(&mut self, o: &NatImportReport) {
        self.conntrack.merge(&o.conntrack);
        self.rejected += o.rejected;
        self.port_conflicts += o.port_conflicts;
    }
}

/// A snapshot that cannot be imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NatImportError {
    /// Written by another NAT snapshot format.
    #[error("NAT snapshot version {found} is not supported (expected {NAT_SNAPSHOT_VERSION}); start with no connections")]
    Version {
        /// Version in the snapshot.
        found: u32,
    },
    /// conntrack refused its part.
    #[error(transparent)]
    Conntrack(#[from] conntrack::ImportError),
}

/// The NAT: rules, the conntrack table with the mappings, port pools.
#[derive(Debug)]
pub struct Nat {
    ct: Conntrack<Mapping>,
    rules: Rules,
    index: Index,
    ports: Ports,
    stats: NatStats,
    /// The connection the current pass committed, if any (so a hairpin
    /// whose second pass drops can take the first pass's back).
    committed: Option<ConnId>,
    /// The external ports this NAT hands out (all, unless it is one
    /// stripe of a set).
    share: Share,
    /// The set's stripe chooser under the current rules.
    steer: Arc<Steering>,
}

/// Bytes of a frame a translation may rewrite: Ethernet with two VLAN tags,
/// an IPv4 header, and an ICMP error quoting at most 576 bytes. A hairpin
/// saves them before its first pass, to restore them if the second drops.
const REWRITE_SPAN: usize = 14 + 8 + 60 + 8 + 576;

/// Rewrites an IPv4 TCP/UDP frame (or ICMP query: `src`'s port is the
/// identifier) to `src` -> `dst` with incremental checksum updates, for
/// other translators on the same header code (the load balancer's DNAT).
/// `partial`: the L4 checksum holds a pseudo-header sum for offload.
/// `false` when the frame cannot be rewritten (not a clean IPv4 header
/// without options, a later fragment, truncated): nothing written then.
pub fn rewrite_tuple(
    key: &FlowKey,
    frame: &mut [u8],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    partial: bool,
) -> bool {
    if !rewritable(key, frame) {
        return false;
    }
    let kind = l4_kind(key);
    let to = Tuple {
        src: *src.ip(),
        dst: *dst.ip(),
        sport: src.port(),
        dport: dst.port(),
    };
    rewrite::rewrite(
        frame,
        usize::from(key.l3_offset),
        usize::from(key.l4_offset),
        kind,
        &to,
        partial,
    )
    .is_some()
}

/// The L4 header NAT rewrites for a flow key.
fn l4_kind(key: &FlowKey) -> L4Kind {
    match key.l4 {
        L4::Tcp { .. } => L4Kind::Tcp,
        L4::Udp { .. } => L4Kind::Udp,
        L4::Icmpv4 { ty, .. } if conntrack::icmp_query_counterpart(false, ty).is_some() => {
            L4Kind::IcmpQuery
        }
        _ => L4Kind::None,
    }
}

/// The source and destination of an IPv4 frame, from the key or, when the
/// header is too broken for the key to hold them, from the frame.
fn v4_addrs(key: &FlowKey, frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if let L3::Ipv4(ip) = &key.l3 {
        if let (IpAddr::V4(s), IpAddr::V4(d)) = (ip.src, ip.dst) {
            return Some((s, d));
        }
    }
    let l3 = usize::from(key.l3_offset);
    Some((
        rewrite::rd_addr(frame, l3 + 12)?,
        rewrite::rd_addr(frame, l3 + 16)?,
    ))
}

/// Whether NAT can rewrite this IPv4 frame: a clean parse, no options
/// (their contents, e.g. source routes, would need translating too), not a
/// later fragment, and the frame holds the L4 fields that get rewritten.
fn rewritable(key: &FlowKey, frame: &[u8]) -> bool {
    let L3::Ipv4(ip) = &key.l3 else { return false };
    let l3 = usize::from(key.l3_offset);
    let l4 = usize::from(key.l4_offset);
    let need = match key.l4 {
        L4::Tcp { .. } => 20,
        L4::Udp { .. } | L4::Icmpv4 { .. } => 8,
        _ => 0,
    };
    key.malformed.is_none()
        && ip.frag != Frag::Later
        && frame.get(l3).is_some_and(|b| b & 0x0f == 5)
        && l3 + 20 <= frame.len()
        && (need == 0 || l4 + need <= frame.len())
}

fn v4(a: IpAddr) -> Option<Ipv4Addr> {
    match a {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

/// What `key`'s packet is rewritten to.
fn tuple(k: &ConnKey) -> Option<Tuple> {
    Some(Tuple {
        src: v4(k.src)?,
        dst: v4(k.dst)?,
        sport: k.src_port,
        dport: k.dst_port,
    })
}

/// An entry's keys fit its kind: IPv4, outbound kinds from a tenant zone
/// to the external one, inbound kinds the other way.
fn consistent(orig: &ConnKey, reply: &ConnKey, kind: MappingKind) -> bool {
    let out = matches!(kind, MappingKind::Snat | MappingKind::FloatingOut);
    let zones = if out {
        orig.zone != EXTERNAL_ZONE && reply.zone == EXTERNAL_ZONE
    } else {
        orig.zone == EXTERNAL_ZONE && reply.zone != EXTERNAL_ZONE
    };
    zones && tuple(orig).is_some() && tuple(reply).is_some()
}

impl Nat {
    /// A NAT with `rules` over a conntrack table configured by `ct`.
    pub fn new(ct: conntrack::Config, rules: Rules) -> Result<Nat, RulesError> {
        Nat::new_stripe(ct, rules, Share::WHOLE)
    }

    /// One stripe of a set (see [`striped`]): it hands out only the
    /// external ports of `share`.
    pub fn new_stripe(
        ct: conntrack::Config,
        rules: Rules,
        share: Share,
    ) -> Result<Nat, RulesError> {
        rules::validate(&rules)?;
        let mut ct = Conntrack::new(ct).map_err(|e| RulesError::Invalid(e.to_string()))?;
        // Mappings hold ports: every removal must come back to release them.
        ct.set_collect_removed(true);
        let index = Index::build(&rules);
        let ports = Ports::new(index.reserved(), share);
        let steer = Arc::new(Steering::new(&rules, share.count()));
        Ok(Nat {
            ct,
            rules,
            index,
            ports,
            stats: NatStats::default(),
            committed: None,
            share,
            steer,
        })
    }

    /// Replaces the rules after validating them (nothing changes on
    /// error). Tracked connections keep their mappings and keep
    /// translating until they end, even if their rule is gone; new
    /// connections follow the new rules. New port forwards' ports are
    /// reserved at once; a mapping that already holds such a port keeps it
    /// until its connections end.
    pub fn set_rules(&mut self, rules: Rules) -> Result<(), RulesError> {
        rules::validate(&rules)?;
        self.index = Index::build(&rules);
        self.ports.set_reserved(self.index.reserved());
        self.steer = Arc::new(Steering::new(&rules, self.share.count()));
        self.rules = rules;
        Ok(())
    }

    /// The stripe chooser of this NAT's set under its current rules.
    pub fn steering(&self) -> Arc<Steering> {
        self.steer.clone()
    }

    /// The external ports this NAT hands out.
    pub fn share(&self) -> Share {
        self.share
    }

    /// The rules.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Whether `ip` is one of this NAT's external addresses (SNAT
    /// addresses, floating IPs, port-forward addresses): the switch answers
    /// ARP for these on the uplink.
    pub fn owns(&self, ip: Ipv4Addr) -> bool {
        self.index.owns(ip)
    }

    /// Translates the IPv4 packet in `frame` (an Ethernet frame parsed as
    /// `key`) that arrived in zone `from`, charging a new connection to
    /// `port`. `partial_csum`: the L4 checksum field holds a pseudo-header
    /// sum for offload to complete. Touches only L3/L4 bytes (never MACs or
    /// TTL) and never changes the frame's length.
    ///
    /// The caller calls this from a tenant zone for packets routed outside
    /// all of the tenant's networks, and from [`EXTERNAL_ZONE`] for IPv4
    /// packets from the uplink addressed to the switch. A packet rewritten
    /// into [`EXTERNAL_ZONE`] toward one of [`Nat::owns`]'s addresses is
    /// translated once more as if it came from the uplink (hairpin); if
    /// nothing there takes it, it stays as the first pass left it
    /// (`Forward` to the uplink, `hairpin: false`).
    pub fn translate(
        &mut self,
        from: u32,
        port: u32,
        key: &FlowKey,
        frame: &mut [u8],
        partial_csum: bool,
        now: u64,
    ) -> Outcome {
        let steer = self.steer.clone();
        striped::translate(self, &steer, from, port, key, frame, partial_csum, now)
    }

    /// Whether the ICMP error `key` (arrived in `from`) quotes a packet of
    /// a connection this NAT tracks, as it arrived or reversed.
    fn knows_quote(&self, from: u32, key: &FlowKey, frame: &[u8], now: u64) -> bool {
        let (l3, l4) = (usize::from(key.l3_offset), usize::from(key.l4_offset));
        let end = rewrite::rd16(frame, l3 + 2).map(|n| l3 + usize::from(n));
        let Some(q) = end.and_then(|end| rewrite::quote(frame, l4, end)) else {
            return false;
        };
        let qk = ConnKey {
            zone: from,
            src: IpAddr::V4(q.src),
            dst: IpAddr::V4(q.dst),
            proto: q.proto,
            src_port: q.sport,
            dst_port: q.dport,
        };
        self.ct.lookup(&qk, now).is_some() || self.ct.lookup(&qk.reverse(), now).is_some()
    }

    /// Counts a translation's final outcome.
    fn record(&mut self, out: &Outcome) {
        match out {
            Outcome::Forward { hairpin, .. } => {
                self.stats.translated += 1;
                if *hairpin {
                    self.stats.hairpin += 1;
                }
            }
            Outcome::NoMatch => self.stats.no_match += 1,
            Outcome::Drop(_) => {}
        }
    }

    /// One translation pass: conntrack, then the rules for a new
    /// connection. `hairpin`: the second pass of a packet we sent to
    /// ourselves.
    #[allow(clippy::too_many_arguments)]
    fn pass(
        &mut self,
        from: u32,
        port: u32,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
        hairpin: bool,
    ) -> Outcome {
        if key.ethertype != ethertype::IPV4 {
            return Outcome::NoMatch;
        }
        let Some((src, dst)) = v4_addrs(key, frame) else {
            return Outcome::NoMatch;
        };
        // Only a hairpin makes a packet with our own source arrive in the
        // external zone; from the uplink it is spoofed.
        if from == EXTERNAL_ZONE && !hairpin && self.index.owns(src) {
            return Outcome::NoMatch;
        }
        if !rewritable(key, frame) {
            let tracked =
                ConnKey::from_flow(from, key).is_some_and(|k| self.ct.lookup(&k, now).is_some());
            if tracked || self.relevant(from, src, dst) {
                return self.drop_invalid(NatDrop::Malformed);
            }
            return Outcome::NoMatch;
        }
        let t = self.ct.track(from, port, key, frame, now);
        self.release_removed();
        match t {
            Track::Established { id, dir } => self.established(id, dir, key, frame, partial, now),
            Track::Related { .. } => self.related(from, key, frame, partial, now),
            Track::New(nc) => self.new_conn(from, &nc, key, frame, partial, now),
            Track::Invalid(r) if self.relevant(from, src, dst) => {
                self.drop_invalid(NatDrop::Invalid(r))
            }
            Track::Refused(l) => {
                let applies =
                    ConnKey::from_flow(from, key).is_some_and(|k| self.choose(from, &k).is_some());
                if applies {
                    self.stats.refused += 1;
                    Outcome::Drop(NatDrop::Limit(l))
                } else {
                    Outcome::NoMatch
                }
            }
            Track::Invalid(_) | Track::Untracked(_) => Outcome::NoMatch,
        }
    }

    fn drop_invalid(&mut self, d: NatDrop) -> Outcome {
        self.stats.invalid += 1;
        Outcome::Drop(d)
    }

    /// Whether a packet NAT cannot use concerns NAT anyway: to one of our
    /// addresses from the uplink, or from an inside address a rule covers.
    fn relevant(&self, from: u32, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        if from == EXTERNAL_ZONE {
            self.index.owns(dst)
        } else {
            self.index.outbound(&self.rules, from, src).is_some()
        }
    }

    /// The rule a new connection with key `k` (arrived in `from`) gets.
    fn choose(&self, from: u32, k: &ConnKey) -> Option<Choice> {
        let (src, dst) = (v4(k.src)?, v4(k.dst)?);
        if from == EXTERNAL_ZONE {
            let dport = matches!(k.proto, proto::TCP | proto::UDP).then_some(k.dst_port);
            self.index.inbound(dst, k.proto, dport)
        } else {
            self.index.outbound(&self.rules, from, src)
        }
    }

    /// Removes a connection committed by this translation's first pass,
    /// with its mapping.
    pub(crate) fn undo_commit(&mut self, id: ConnId, now: u64) {
        let keys = self.ct.get(id, now).map(|v| (v.orig, v.reply, v.ext.kind));
        if self.ct.remove(id).is_some() {
            if let Some((ek, p)) = keys.and_then(|(o, r, k)| eim_of(&o, &r, k)) {
                if self.ports.release(&ek, p) {
                    self.stats.mappings_released += 1;
                }
            }
        }
        self.release_removed();
    }

    /// Releases the mappings of entries conntrack removed without handing
    /// them back.
    fn release_removed(&mut self) {
        for r in self.ct.drain_removed() {
            if let Some((k, p)) = eim_of(&r.orig, &r.reply, r.ext.kind) {
                if self.ports.release(&k, p) {
                    self.stats.mappings_released += 1;
                }
            }
        }
    }

    /// Rewrites `frame` to `to`.
    fn apply(&mut self, key: &FlowKey, frame: &mut [u8], to: &ConnKey, partial: bool) -> Outcome {
        let Some(t) = tuple(to) else {
            return Outcome::NoMatch;
        };
        let (l3, l4) = (usize::from(key.l3_offset), usize::from(key.l4_offset));
        match rewrite::rewrite(frame, l3, l4, l4_kind(key), &t, partial) {
            Some(_) => Outcome::Forward {
                zone: to.zone,
                dst: t.dst,
                hairpin: false,
            },
            None => self.drop_invalid(NatDrop::Malformed),
        }
    }

    /// A packet of a tracked connection becomes the reverse of the other
    /// direction's key.
    fn established(
        &mut self,
        id: ConnId,
        dir: Dir,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
    ) -> Outcome {
        let Some(e) = self.ct.get(id, now) else {
            return Outcome::NoMatch;
        };
        let to = match dir {
            Dir::Original => e.reply.reverse(),
            Dir::Reply => e.orig.reverse(),
        };
        self.apply(key, frame, &to, partial)
    }

    /// An ICMP error about a connection, quoting the translated form of
    /// one of its packets: rewritten to reach that packet's sender, quoting
    /// the packet as it sent it.
    fn related(
        &mut self,
        from: u32,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
    ) -> Outcome {
        let (l3, l4) = (usize::from(key.l3_offset), usize::from(key.l4_offset));
        let end = rewrite::rd16(frame, l3 + 2).map(|n| l3 + usize::from(n));
        let Some((end, q)) = end.and_then(|end| Some((end, rewrite::quote(frame, l4, end)?)))
        else {
            return self.drop_invalid(NatDrop::Malformed);
        };
        let qk = ConnKey {
            zone: from,
            src: IpAddr::V4(q.src),
            dst: IpAddr::V4(q.dst),
            proto: q.proto,
            src_port: q.sport,
            dst_port: q.dport,
        };
        // conntrack tries the quote as is first, which in a hairpin can be
        // the other half of the connection; the translated form is what
        // NAT needs. A quote found only as is was not translated: the
        // error is already in its sender's zone.
        let Some((id, y)) = self.ct.lookup(&qk.reverse(), now) else {
            return Outcome::NoMatch;
        };
        let Some(e) = self.ct.get(id, now) else {
            return Outcome::NoMatch;
        };
        // The quoted packet went direction y.flip(); as sent, it carried
        // that direction's key.
        let sent = match y {
            Dir::Reply => e.orig,
            Dir::Original => e.reply,
        };
        let (Some(inner), Some((osrc, _))) = (tuple(&sent), v4_addrs(key, frame)) else {
            return Outcome::NoMatch;
        };
        let outer_src = if osrc == q.dst { inner.dst } else { osrc };
        match rewrite::rewrite_icmp_error(
            frame, l3, l4, end, &q, outer_src, inner.src, &inner, partial,
        ) {
            Some(()) => {
                self.stats.icmp_errors += 1;
                Outcome::Forward {
                    zone: sent.zone,
                    dst: inner.src,
                    hairpin: false,
                }
            }
            None => self.drop_invalid(NatDrop::Malformed),
        }
    }

    /// The first packet of a connection: the rule, the translated tuple,
    /// commit, rewrite.
    fn new_conn(
        &mut self,
        from: u32,
        nc: &NewConn,
        key: &FlowKey,
        frame: &mut [u8],
        partial: bool,
        now: u64,
    ) -> Outcome {
        let k = *nc.key();
        let Some(choice) = self.choose(from, &k) else {
            return Outcome::NoMatch;
        };
        let (kind, to, eim) = match choice {
            Choice::Out { kind, external } => match self.outbound(from, &k, kind, external, now) {
                Ok((to, eim)) => (kind, to, eim),
                Err(o) => return o,
            },
            Choice::In {
                kind,
                zone,
                to,
                port,
            } => {
                let to = ConnKey {
                    zone,
                    dst: IpAddr::V4(to),
                    dst_port: port.unwrap_or(k.dst_port),
                    ..k
                };
                (kind, to, None)
            }
        };
        let reply = to.reverse();
        if reply == reply.reverse() && eim.is_none() {
            self.stats.tuple_taken += 1;
            return Outcome::Drop(NatDrop::PortsExhausted);
        }
        let committed = self.ct.commit_with_reply(nc, reply, now, Mapping { kind });
        if let Ok(id) = committed {
            self.committed = Some(id);
        }
        if let Err(e) = committed {
            if let Some((ek, p)) = eim {
                if self.ports.release(&ek, p) {
                    self.stats.mappings_released += 1;
                }
            }
            self.release_removed();
            return match e {
                conntrack::CommitError::Limit(l) => {
                    self.stats.refused += 1;
                    Outcome::Drop(NatDrop::Limit(l))
                }
                conntrack::CommitError::Exists(_) => {
                    self.stats.tuple_taken += 1;
                    Outcome::Drop(NatDrop::PortsExhausted)
                }
            };
        }
        self.release_removed();
        match kind {
            MappingKind::Snat => self.stats.snat_new += 1,
            MappingKind::FloatingOut => self.stats.floating_out_new += 1,
            MappingKind::FloatingIn => self.stats.floating_in_new += 1,
            MappingKind::Forward => self.stats.forward_new += 1,
        }
        self.apply(key, frame, &to, partial)
    }

    /// The translated key of a new outbound connection with source
    /// `external`, and the mapping it holds (acquired: released by the
    /// caller if the commit fails).
    #[allow(clippy::type_complexity)]
    fn outbound(
        &mut self,
        from: u32,
        k: &ConnKey,
        kind: MappingKind,
        external: Ipv4Addr,
        now: u64,
    ) -> Result<(ConnKey, Option<(EimKey, u16)>), Outcome> {
        let make = |p: u16| {
            let mut to = ConnKey {
                zone: EXTERNAL_ZONE,
                src: IpAddr::V4(external),
                ..*k
            };
            if to.is_icmp() || matches!(k.proto, proto::TCP | proto::UDP) {
                to.src_port = p;
            }
            to
        };
        // A candidate is usable if no live connection has its reply key,
        // and that key is not its own reverse (a connection from an address
        // and port to itself would match in both directions at once).
        let ct = &self.ct;
        let usable = |p: u16| {
            let r = make(p).reverse();
            r != r.reverse() && ct.lookup(&r, now).is_none()
        };
        let Some(inside) = v4(k.src) else {
            return Err(Outcome::NoMatch);
        };
        if !(k.is_icmp() || matches!(k.proto, proto::TCP | proto::UDP)) {
            // Address only: the tuple is checked by the commit.
            return Ok((make(0), None));
        }
        let ek = EimKey {
            zone: from,
            inside,
            port: k.src_port,
            proto: k.proto,
            external,
        };
        let port = match self.ports.existing(&ek) {
            Some(p) => {
                if !usable(p) {
                    self.stats.tuple_taken += 1;
                    return Err(Outcome::Drop(NatDrop::PortsExhausted));
                }
                self.ports.acquire(&ek);
                p
            }
            None => {
                let want = Want {
                    range: self.rules.ports,
                    preserve_any: kind == MappingKind::FloatingOut,
                };
                match self.ports.allocate(ek, want, usable) {
                    Some(p) => p,
                    None => {
                        self.stats.ports_exhausted += 1;
                        return Err(Outcome::Drop(NatDrop::PortsExhausted));
                    }
                }
            }
        };
        Ok((make(port), Some((ek, port))))
    }

    /// What [`Nat::translate`] would do with a packet that arrived in zone
    /// `from`, for a packet trace: the rule or tracked connection that
    /// takes it and the addresses it would leave with, with nothing
    /// tracked, allocated or counted. A new SNAT connection shows its
    /// source port as kept; the real translation keeps it when it is free
    /// in the pool and picks another otherwise.
    pub fn preview(&self, from: u32, key: &FlowKey, now: u64) -> Preview {
        let Some(k) = ConnKey::from_flow(from, key) else {
            return Preview::NoMatch;
        };
        let sock = |a: IpAddr, p: u16| v4(a).map(|a| SocketAddrV4::new(a, p));
        if let Some((id, dir)) = self.ct.lookup(&k, now) {
            let Some(e) = self.ct.get(id, now) else {
                return Preview::NoMatch;
            };
            // The packet leaves as the mirror of what the other side sends.
            let (other, to_zone) = match dir {
                Dir::Original => (e.reply, e.reply.zone),
                Dir::Reply => (e.orig, e.orig.zone),
            };
            return match (
                sock(other.dst, other.dst_port),
                sock(other.src, other.src_port),
            ) {
                (Some(src), Some(dst)) => Preview::Established {
                    kind: e.ext.kind,
                    zone: to_zone,
                    src,
                    dst,
                },
                _ => Preview::NoMatch,
            };
        }
        let (Some(src), Some(dst)) = (sock(k.src, k.src_port), sock(k.dst, k.dst_port)) else {
            return Preview::NoMatch;
        };
        match self.choose(from, &k) {
            None => Preview::NoMatch,
            Some(Choice::Out { kind, external }) => Preview::New {
                kind,
                zone: EXTERNAL_ZONE,
                src: SocketAddrV4::new(external, src.port()),
                dst,
            },
            Some(Choice::In {
                kind,
                zone,
                to,
                port,
            }) => Preview::New {
                kind,
                zone,
                src,
                dst: SocketAddrV4::new(to, port.unwrap_or(dst.port())),
            },
        }
    }

    /// Reaps up to `max` expired connections, releasing their ports.
    pub fn expire(&mut self, now: u64, max: usize) -> usize {
        let ports = &mut self.ports;
        let mut released = 0;
        let n = self.ct.expire_with(now, max, |r| {
            if let Some((k, p)) = eim_of(&r.orig, &r.reply, r.ext.kind) {
                if ports.release(&k, p) {
                    released += 1;
                }
            }
        });
        self.stats.mappings_released += released;
        self.release_removed();
        n
    }

    /// Removes every connection with a side in `zone` (a tenant deleted),
    /// releasing their ports; the number removed. O(table).
    pub fn flush_zone(&mut self, zone: u32) -> usize {
        let n = self.ct.flush_zone(zone);
        self.release_removed();
        n
    }

    /// Removes every connection created by `port` (charged to it in
    /// [`Nat::translate`]), releasing their ports. O(table).
    pub fn flush_port(&mut self, port: u32) -> usize {
        let n = self.ct.flush_port(port);
        self.release_removed();
        n
    }

    /// Every endpoint-independent mapping with its connection count.
    /// O(mappings).
    pub fn mappings(&self) -> Vec<MappingView> {
        self.ports.mappings()
    }

    /// Port usage of every SNAT address and floating IP (TCP, UDP, ICMP
    /// identifiers), and of any other address that still has mappings
    /// (its rule removed), sorted by address and protocol.
    pub fn pools(&self) -> Vec<PoolView> {
        let mut keys: Vec<(Ipv4Addr, u8)> = self
            .rules
            .snat
            .iter()
            .map(|s| s.external)
            .chain(self.rules.floating.iter().map(|f| f.external))
            .flat_map(|a| [proto::ICMP, proto::TCP, proto::UDP].map(|p| (a, p)))
            .chain(self.ports.pool_keys())
            .collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .map(|(a, p)| self.ports.pool_view(a, p, self.rules.ports))
            .collect()
    }

    /// The connections and their mappings, with times relative to `now`.
    pub fn export(&self, now: u64) -> NatSnapshot {
        NatSnapshot {
            version: NAT_SNAPSHOT_VERSION,
            conntrack: self.ct.export(now),
        }
    }

    /// Imports a snapshot (a restart: normally into a fresh `Nat`), then
    /// rebuilds every mapping and port bitmap from the table's entries, so
    /// imported connections keep translating with their ports and those
    /// ports stay taken. Entries that are not NAT connections or whose
    /// port another mapping holds are removed again (counted).
    pub fn import(
        &mut self,
        snap: NatSnapshot,
        now: u64,
    ) -> Result<NatImportReport, NatImportError> {
        if snap.version != NAT_SNAPSHOT_VERSION {
            return Err(NatImportError::Version {
                found: snap.version,
            });
        }
        let conntrack = self.ct.import(snap.conntrack, now)?;
        self.release_removed();
        let mut rep = NatImportReport {
            conntrack,
            ..NatImportReport::default()
        };
        // Rebuilt from every entry, expired ones not reaped included: they
        // hold their ports until they go, and will release them then.
        let mut ports = Ports::new(self.index.reserved(), self.share);
        let mut bad = Vec::new();
        for (id, orig, reply, m) in self.ct.all_keys() {
            if !consistent(&orig, &reply, m.kind) {
                rep.rejected += 1;
                bad.push(id);
            } else if let Some((k, p)) = eim_of(&orig, &reply, m.kind) {
                if !ports.register(k, p) {
                    rep.port_conflicts += 1;
                    bad.push(id);
                }
            }
        }
        self.ports = ports;
        for id in bad {
            // Not registered, so nothing to release.
            self.ct.remove(id);
        }
        Ok(rep)
    }

    /// The connection table (for `vswitchctl conntrack`).
    pub fn conntrack(&self) -> &Conntrack<Mapping> {
        &self.ct
    }

    /// Counters.
    pub fn stats(&self) -> &NatStats {
        &self.stats
    }
}
