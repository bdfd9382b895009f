//! The per-network DHCPv4 server state machine (RFC 2131 §4.3).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use crate::config::{ConfigError, ServerConfig};
use crate::ipset::IntervalSet;
use crate::wire::{opt, Message, MessageType, ReplyBuilder, BOOTREQUEST};
use crate::{ClientKey, Mac};

const NS_PER_SEC: u64 = 1_000_000_000;
/// Smallest maximum message size a client may announce (RFC 2132 §9.10).
const MIN_MAX_MESSAGE: usize = 576;
/// We never build replies larger than an Ethernet frame's IP payload.
const MAX_MAX_MESSAGE: usize = 1500;
/// IPv4 + UDP headers, subtracted from option 57 to get the DHCP length.
const IP_UDP_HEADERS: usize = 28;
/// Expired addresses remembered per allowed binding (for "same address
/// again" and least-recently-expired reuse); older ones count as unused.
const HISTORY_PER_LEASE: usize = 4;
const BROADCAST_MAC: Mac = [0xff; 6];

fn secs(s: u32) -> u64 {
    u64::from(s) * NS_PER_SEC
}

/// A binding of an address to a client, as reported to the caller (for
/// persistence) and accepted back by [`Server::restore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Client identifier (option 61) or chaddr.
    pub key: ClientKey,
    /// The client's MAC (chaddr).
    pub mac: Mac,
    /// The leased address.
    pub ip: Ipv4Addr,
    /// Host name given to the client, or the one it sent (option 12).
    pub hostname: Option<String>,
    /// When the lease ends, in the caller's monotonic nanoseconds.
    pub expires_at: u64,
}

/// A change of durable state. The caller persists `Bound`, `Released`,
/// `Declined` (as a release) and `Expired` before sending the reply that
/// came with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseChange {
    /// A lease was granted or extended (DHCPACK).
    Bound(Lease),
    /// The client released it, or a reload made it invalid.
    Released(Lease),
    /// The client declined the address; it is quarantined.
    Declined(Lease),
    /// The lease ran out.
    Expired(Lease),
}

/// Where to send a reply (RFC 2131 §4.1, without relays).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// Destination IP (255.255.255.255 when broadcast).
    pub ip: Ipv4Addr,
    /// Destination MAC (ff:ff:ff:ff:ff:ff when broadcast).
    pub mac: Mac,
    /// Whether this is a broadcast.
    pub broadcast: bool,
}

impl ReplyTo {
    const BROADCAST: ReplyTo = ReplyTo {
        ip: Ipv4Addr::BROADCAST,
        mac: BROADCAST_MAC,
        broadcast: true,
    };
}

/// A reply for the caller to wrap in UDP 67 -> 68, IPv4 from the server
/// identifier, and Ethernet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The DHCP message (UDP payload).
    pub bytes: Vec<u8>,
    /// Where it goes.
    pub to: ReplyTo,
    /// OFFER, ACK or NAK.
    pub kind: MessageType,
}

/// Why a message got no reply. Small and `Copy` for per-port counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a decodable DHCP message, or a required option is missing.
    Malformed,
    /// op = BOOTREPLY: a server message arriving from a client port.
    BootReplyFromClient,
    /// chaddr differs from the frame's source MAC.
    ChaddrMismatch,
    /// The client identifier is bound to another MAC: refused, or a VM could
    /// take over (or release) another VM's lease by sending its identifier.
    ClientIdInUse,
    /// A message type a server does not accept (OFFER, ACK, ...).
    UnsupportedType,
    /// No free address left for a DISCOVER.
    PoolExhausted,
    /// The network already has `max_leases` bindings.
    LeaseLimit,
    /// REQUEST naming another server: our offer was withdrawn.
    OtherServer,
    /// INIT-REBOOT from a client we have no binding for: stay silent.
    UnknownClient,
    /// RELEASE or DECLINE from a client that does not own the address.
    NotOwner,
    /// INFORM from an address outside the subnet.
    WrongNetwork,
}

impl DropReason {
    /// Stable snake_case name for counters and captures.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "dhcp_malformed",
            Self::BootReplyFromClient => "dhcp_bootreply_from_client",
            Self::ChaddrMismatch => "dhcp_chaddr_mismatch",
            Self::ClientIdInUse => "dhcp_client_id_in_use",
            Self::UnsupportedType => "dhcp_unsupported_type",
            Self::PoolExhausted => "dhcp_pool_exhausted",
            Self::LeaseLimit => "dhcp_lease_limit",
            Self::OtherServer => "dhcp_other_server",
            Self::UnknownClient => "dhcp_unknown_client",
            Self::NotOwner => "dhcp_not_owner",
            Self::WrongNetwork => "dhcp_wrong_network",
        }
    }
}

/// What [`Server::handle`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The reply to send, if any.
    pub reply: Option<Reply>,
    /// Durable changes to persist before sending the reply (including
    /// leases that expired since the last call).
    pub changes: Vec<LeaseChange>,
    /// Why there is no reply (or why the message was ignored).
    pub drop: Option<DropReason>,
}

/// Per-network message counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Counters {
    pub discover: u64,
    pub offer: u64,
    pub request: u64,
    pub ack: u64,
    pub nak: u64,
    pub decline: u64,
    pub release: u64,
    pub release_not_owner: u64,
    pub inform: u64,
    pub chaddr_mismatch: u64,
    pub bootreply_from_client: u64,
    pub malformed: u64,
    pub unsupported_type: u64,
    pub pool_exhausted: u64,
    pub lease_limit: u64,
    pub other_server: u64,
    pub unknown_client: u64,
    pub client_id_in_use: u64,
    pub expired: u64,
}

/// Where the message came from, as the switch saw it.
#[derive(Debug, Clone, Copy)]
pub struct Ingress<'a> {
    /// Source MAC of the Ethernet frame.
    pub src_mac: Mac,
    /// Host name to give the client (the port name), unless a reservation
    /// sets one.
    pub hostname: Option<&'a str>,
}

/// State of an address in [`LeaseView`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Offered, waiting for the REQUEST.
    Offered,
    /// Acknowledged.
    Bound,
    /// Ran out or released; remembered for the same client.
    Expired,
    /// Declined by a client; out of use until `expires_at`.
    Declined,
}

/// One row of `vswitchctl leases`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    /// Client MAC.
    pub mac: Mac,
    /// Client identifier (option 61), if the client sent one.
    pub client_id: Option<Vec<u8>>,
    /// Address.
    pub ip: Ipv4Addr,
    /// Host name.
    pub hostname: Option<String>,
    /// State.
    pub state: LeaseState,
    /// Offered/Bound: end of the offer/lease; Expired: when it ended;
    /// Declined: end of the quarantine (monotonic ns).
    pub expires_at: u64,
    /// The address is a static reservation.
    pub reserved: bool,
}

/// What [`Server::restore`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Leases loaded.
    pub restored: usize,
    /// Leases refused: outside the pools, reserved for another MAC, address
    /// or client already bound, or over `max_leases`.
    pub rejected: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BindState {
    Offered,
    Bound,
}

#[derive(Debug, Clone)]
struct Binding {
    key: ClientKey,
    mac: Mac,
    hostname: Option<String>,
    state: BindState,
    expires_at: u64,
}

/// A free address remembered with its last holder.
#[derive(Debug, Clone)]
struct Past {
    key: Option<ClientKey>,
    mac: Mac,
    hostname: Option<String>,
    at: u64,
    was_bound: bool,
}

/// The DHCPv4 server of one network. See the crate docs.
///
/// Every pool address is in exactly one of: a binding (offered or bound),
/// quarantine, the expired history, or the never-used set.
#[derive(Debug)]
pub struct Server {
    cfg: ServerConfig,
    pools: IntervalSet,
    reserved_by_mac: HashMap<Mac, usize>,
    reserved_by_ip: HashMap<Ipv4Addr, usize>,
    bindings: BTreeMap<Ipv4Addr, Binding>,
    by_key: HashMap<ClientKey, Ipv4Addr>,
    /// One NIC, one address: the binding each MAC holds.
    by_mac: HashMap<Mac, Ipv4Addr>,
    expiries: BTreeSet<(u64, Ipv4Addr)>,
    quarantine: HashMap<Ipv4Addr, (u64, Mac)>,
    quarantine_timers: BTreeSet<(u64, Ipv4Addr)>,
    history: HashMap<Ipv4Addr, Past>,
    history_order: BTreeSet<(u64, Ipv4Addr)>,
    prev_by_key: HashMap<ClientKey, Ipv4Addr>,
    fresh: IntervalSet,
    counters: Counters,
}

impl Server {
    /// A server for one network.
    pub fn new(cfg: ServerConfig) -> Result<Server, ConfigError> {
        cfg.validate()?;
        let mut s = Server {
            cfg,
            pools: IntervalSet::default(),
            reserved_by_mac: HashMap::new(),
            reserved_by_ip: HashMap::new(),
            bindings: BTreeMap::new(),
            by_key: HashMap::new(),
            by_mac: HashMap::new(),
            expiries: BTreeSet::new(),
            quarantine: HashMap::new(),
            quarantine_timers: BTreeSet::new(),
            history: HashMap::new(),
            history_order: BTreeSet::new(),
            prev_by_key: HashMap::new(),
            fresh: IntervalSet::default(),
            counters: Counters::default(),
        };
        s.index_config();
        s.fresh = s.pools.clone();
        Ok(s)
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// Message counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Number of bindings (offered + bound).
    pub fn binding_count(&self) -> usize {
        self.bindings.len()
    }

    fn index_config(&mut self) {
        self.reserved_by_mac.clear();
        self.reserved_by_ip.clear();
        for (i, r) in self.cfg.reservations.iter().enumerate() {
            self.reserved_by_mac.insert(r.mac, i);
            self.reserved_by_ip.insert(r.ip, i);
        }
        let ranges = self
            .cfg
            .pools
            .iter()
            .map(|r| (u32::from(r.start), u32::from(r.end)))
            .collect();
        let mut pools = IntervalSet::from_ranges(ranges);
        pools.remove(u32::from(self.cfg.subnet.network()));
        pools.remove(u32::from(self.cfg.subnet.broadcast()));
        pools.remove(u32::from(self.cfg.server_ip));
        for r in &self.cfg.routers {
            pools.remove(u32::from(*r));
        }
        for ip in self.reserved_by_ip.keys() {
            pools.remove(u32::from(*ip));
        }
        self.pools = pools;
    }

    fn in_pool(&self, ip: Ipv4Addr) -> bool {
        self.pools.contains(u32::from(ip))
    }

    fn history_cap(&self) -> usize {
        self.cfg.max_leases.saturating_mul(HISTORY_PER_LEASE)
    }

    // ---- address bookkeeping -------------------------------------------

    /// Whether `ip` may be bound to this client now.
    fn available_for(&self, ip: Ipv4Addr, key: &ClientKey, mac: &Mac) -> bool {
        if !self.cfg.usable(ip) || ip == self.cfg.server_ip {
            return false;
        }
        let held_by_other = matches!(self.bindings.get(&ip), Some(b) if &b.key != key);
        if let Some(&i) = self.reserved_by_ip.get(&ip) {
            return self.cfg.reservations.get(i).is_some_and(|r| &r.mac == mac) && !held_by_other;
        }
        self.in_pool(ip)
            && !self.reserved_by_mac.contains_key(mac)
            && !self.quarantine.contains_key(&ip)
            && !held_by_other
    }

    /// Takes `ip` out of the free sets (never-used or history).
    fn claim(&mut self, ip: Ipv4Addr) {
        self.fresh.remove(u32::from(ip));
        if let Some(p) = self.history.remove(&ip) {
            self.history_order.remove(&(p.at, ip));
            if let Some(k) = p.key {
                if self.prev_by_key.get(&k) == Some(&ip) {
                    self.prev_by_key.remove(&k);
                }
            }
        }
    }

    /// Returns a no longer bound pool address to the history.
    fn retire(&mut self, ip: Ipv4Addr, past: Past) {
        if !self.in_pool(ip) {
            return;
        }
        self.claim(ip);
        if let Some(k) = &past.key {
            self.prev_by_key.insert(k.clone(), ip);
        }
        self.history_order.insert((past.at, ip));
        self.history.insert(ip, past);
        while self.history.len() > self.history_cap() {
            let Some((_, old)) = self.history_order.first().copied() else {
                break;
            };
            self.claim(old);
            self.fresh.insert(u32::from(old));
        }
    }

    fn set_binding(&mut self, ip: Ipv4Addr, b: Binding) {
        self.claim(ip);
        if let Some(old) = self.bindings.get(&ip) {
            self.expiries.remove(&(old.expires_at, ip));
        }
        self.expiries.insert((b.expires_at, ip));
        self.by_key.insert(b.key.clone(), ip);
        self.by_mac.insert(b.mac, ip);
        self.bindings.insert(ip, b);
    }

    fn remove_binding(&mut self, ip: Ipv4Addr) -> Option<Binding> {
        let b = self.bindings.remove(&ip)?;
        self.expiries.remove(&(b.expires_at, ip));
        if self.by_key.get(&b.key) == Some(&ip) {
            self.by_key.remove(&b.key);
        }
        if self.by_mac.get(&b.mac) == Some(&ip) {
            self.by_mac.remove(&b.mac);
        }
        Some(b)
    }

    /// A MAC is one NIC and holds one address in a network. A client that
    /// comes back under another identifier on the same MAC (udhcpc sends no
    /// option 61, dhcpcd sends a DUID) takes over the binding its MAC holds
    /// instead of getting a second address.
    fn adopt_binding_of_mac(&mut self, key: &ClientKey, mac: Mac) {
        if self.by_key.contains_key(key) {
            return;
        }
        let Some(&ip) = self.by_mac.get(&mac) else {
            return;
        };
        let Some(b) = self.bindings.get_mut(&ip) else {
            return;
        };
        let old = std::mem::replace(&mut b.key, key.clone());
        if self.by_key.get(&old) == Some(&ip) {
            self.by_key.remove(&old);
        }
        self.by_key.insert(key.clone(), ip);
    }

    fn lease_of(ip: Ipv4Addr, b: &Binding) -> Lease {
        Lease {
            key: b.key.clone(),
            mac: b.mac,
            ip,
            hostname: b.hostname.clone(),
            expires_at: b.expires_at,
        }
    }

    /// Drops a binding into the history; reports it if it was bound.
    fn unbind(&mut self, ip: Ipv4Addr, at: u64) -> Option<(Lease, bool)> {
        let b = self.remove_binding(ip)?;
        let lease = Self::lease_of(ip, &b);
        let was_bound = b.state == BindState::Bound;
        self.retire(
            ip,
            Past {
                key: Some(b.key),
                mac: b.mac,
                hostname: b.hostname,
                at,
                was_bound,
            },
        );
        Some((lease, was_bound))
    }

    fn quarantine_ip(&mut self, ip: Ipv4Addr, until: u64, mac: Mac) {
        if !self.in_pool(ip) {
            return;
        }
        self.claim(ip);
        if let Some((old, _)) = self.quarantine.insert(ip, (until, mac)) {
            self.quarantine_timers.remove(&(old, ip));
        }
        self.quarantine_timers.insert((until, ip));
    }

    // ---- timers ---------------------------------------------------------

    /// When [`Server::handle_timeout`] next has work (monotonic ns).
    pub fn poll_timeout(&self) -> Option<u64> {
        let a = self.expiries.first().map(|(t, _)| *t);
        let b = self.quarantine_timers.first().map(|(t, _)| *t);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Expires offers and leases and lifts quarantines due at `now`.
    pub fn handle_timeout(&mut self, now: u64) -> Vec<LeaseChange> {
        let mut changes = Vec::new();
        self.expire(now, &mut changes);
        changes
    }

    fn expire(&mut self, now: u64, changes: &mut Vec<LeaseChange>) {
        while let Some(&(t, ip)) = self.expiries.first() {
            if t > now {
                break;
            }
            self.expiries.pop_first();
            if let Some((lease, was_bound)) = self.unbind(ip, t) {
                if was_bound {
                    self.counters.expired += 1;
                    changes.push(LeaseChange::Expired(lease));
                }
            }
        }
        while let Some(&(t, ip)) = self.quarantine_timers.first() {
            if t > now {
                break;
            }
            self.quarantine_timers.pop_first();
            if let Some((_, mac)) = self.quarantine.remove(&ip) {
                self.retire(
                    ip,
                    Past {
                        key: None,
                        mac,
                        hostname: None,
                        at: t,
                        was_bound: false,
                    },
                );
            }
        }
    }

    // ---- messages -------------------------------------------------------

    /// Handles one DHCP message (UDP payload to port 67) from a port whose
    /// frame had source MAC `src_mac`. Never panics.
    pub fn handle(&mut self, now: u64, src_mac: Mac, payload: &[u8]) -> Outcome {
        self.handle_from(
            now,
            Ingress {
                src_mac,
                hostname: None,
            },
            payload,
        )
    }

    /// Like [`Server::handle`], with the port's host name.
    pub fn handle_from(&mut self, now: u64, ingress: Ingress<'_>, payload: &[u8]) -> Outcome {
        let mut out = Outcome::default();
        self.expire(now, &mut out.changes);
        let msg = match Message::decode(payload) {
            Ok(m) => m,
            Err(_) => return self.dropped(out, DropReason::Malformed),
        };
        if msg.op != BOOTREQUEST {
            return self.dropped(out, DropReason::BootReplyFromClient);
        }
        if msg.htype != 1 || msg.hlen != 6 {
            return self.dropped(out, DropReason::Malformed);
        }
        if msg.mac() != ingress.src_mac {
            return self.dropped(out, DropReason::ChaddrMismatch);
        }
        let Some(kind) = msg.message_type() else {
            return self.dropped(out, DropReason::Malformed);
        };
        let ctx = Ctx::new(&msg, ingress.hostname);
        // The MAC is authenticated (port security, chaddr check above); the
        // client identifier is not. An identifier bound to another NIC is
        // someone else's: refuse, whatever the message wants to do with it.
        if kind != MessageType::Inform {
            let foreign = self
                .by_key
                .get(&ctx.key)
                .and_then(|ip| self.bindings.get(ip))
                .is_some_and(|b| b.mac != ingress.src_mac);
            if foreign {
                return self.dropped(out, DropReason::ClientIdInUse);
            }
        }
        if matches!(kind, MessageType::Discover | MessageType::Request) {
            self.adopt_binding_of_mac(&ctx.key, ingress.src_mac);
        }
        match kind {
            MessageType::Discover => self.discover(now, &msg, &ctx, out),
            MessageType::Request => self.request(now, &msg, &ctx, out),
            MessageType::Decline => self.decline(now, &msg, &ctx, out),
            MessageType::Release => self.release(now, &msg, &ctx, out),
            MessageType::Inform => self.inform(&msg, &ctx, out),
            _ => self.dropped(out, DropReason::UnsupportedType),
        }
    }

    fn dropped(&mut self, mut out: Outcome, why: DropReason) -> Outcome {
        let c = &mut self.counters;
        match why {
            DropReason::Malformed => c.malformed += 1,
            DropReason::BootReplyFromClient => c.bootreply_from_client += 1,
            DropReason::ChaddrMismatch => c.chaddr_mismatch += 1,
            DropReason::ClientIdInUse => c.client_id_in_use += 1,
            DropReason::UnsupportedType => c.unsupported_type += 1,
            DropReason::PoolExhausted => c.pool_exhausted += 1,
            DropReason::LeaseLimit => c.lease_limit += 1,
            DropReason::OtherServer => c.other_server += 1,
            DropReason::UnknownClient => c.unknown_client += 1,
            DropReason::NotOwner => {}
            DropReason::WrongNetwork => {}
        }
        out.drop = Some(why);
        out
    }

    fn reservation(&self, mac: &Mac) -> Option<&crate::config::Reservation> {
        self.reserved_by_mac
            .get(mac)
            .and_then(|&i| self.cfg.reservations.get(i))
    }

    fn hostname_for(&self, ctx: &Ctx<'_>) -> Option<String> {
        self.reservation(&ctx.mac)
            .and_then(|r| r.hostname.clone())
            .or_else(|| ctx.port_hostname.map(str::to_owned))
    }

    fn lease_secs(&self, mac: &Mac) -> u32 {
        self.reservation(mac)
            .and_then(|r| r.lease_time)
            .unwrap_or(self.cfg.lease_time)
    }

    fn at_limit(&self, key: &ClientKey) -> bool {
        !self.by_key.contains_key(key) && self.bindings.len() >= self.cfg.max_leases
    }

    /// Picks the address to offer (RFC 2131 §4.3.1 order).
    fn choose(&self, ctx: &Ctx<'_>, requested: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        if let Some(r) = self.reservation(&ctx.mac) {
            return self.available_for(r.ip, &ctx.key, &ctx.mac).then_some(r.ip);
        }
        if let Some(&ip) = self.by_key.get(&ctx.key) {
            return Some(ip);
        }
        if let Some(&ip) = self.prev_by_key.get(&ctx.key) {
            if self.available_for(ip, &ctx.key, &ctx.mac) {
                return Some(ip);
            }
        }
        if let Some(ip) = requested {
            let unclaimed = self.fresh.contains(u32::from(ip))
                || self
                    .history
                    .get(&ip)
                    .is_some_and(|p| p.key.is_none() || p.key.as_ref() == Some(&ctx.key));
            if unclaimed && self.available_for(ip, &ctx.key, &ctx.mac) {
                return Some(ip);
            }
        }
        if let Some(ip) = self.fresh.first() {
            return Some(Ipv4Addr::from(ip));
        }
        self.history_order.first().map(|(_, ip)| *ip)
    }

    fn discover(&mut self, now: u64, msg: &Message, ctx: &Ctx<'_>, out: Outcome) -> Outcome {
        self.counters.discover += 1;
        if self.at_limit(&ctx.key) {
            return self.dropped(out, DropReason::LeaseLimit);
        }
        let Some(ip) = self.choose(ctx, msg.ip_option(opt::REQUESTED_IP)) else {
            return self.dropped(out, DropReason::PoolExhausted);
        };
        let mut out = out;
        self.drop_other_binding(now, &ctx.key, ip, &mut out.changes);
        let hostname = self
            .hostname_for(ctx)
            .or_else(|| ctx.client_hostname.clone());
        let lease_secs = self.lease_secs(&ctx.mac);
        let existing = self.bindings.get(&ip).filter(|b| b.key == ctx.key);
        let binding = match existing {
            // A bound client rediscovering keeps its lease until it expires.
            Some(b) if b.state == BindState::Bound => Binding {
                hostname,
                ..b.clone()
            },
            _ => Binding {
                key: ctx.key.clone(),
                mac: ctx.mac,
                hostname,
                state: BindState::Offered,
                expires_at: now.saturating_add(secs(self.cfg.offer_timeout)),
            },
        };
        self.set_binding(ip, binding);
        self.counters.offer += 1;
        let bytes = self.build(msg, ctx, MessageType::Offer, ip, Some(lease_secs));
        out.reply = Some(Reply {
            bytes,
            to: reply_to(msg, MessageType::Offer, ip),
            kind: MessageType::Offer,
        });
        out
    }

    /// A client holds one address: drop its binding on any other.
    fn drop_other_binding(
        &mut self,
        now: u64,
        key: &ClientKey,
        ip: Ipv4Addr,
        changes: &mut Vec<LeaseChange>,
    ) {
        if let Some(&old) = self.by_key.get(key) {
            if old != ip {
                if let Some((lease, true)) = self.unbind(old, now) {
                    changes.push(LeaseChange::Released(lease));
                }
            }
        }
    }

    fn request(&mut self, now: u64, msg: &Message, ctx: &Ctx<'_>, out: Outcome) -> Outcome {
        self.counters.request += 1;
        let requested = msg.ip_option(opt::REQUESTED_IP);
        let bound_ip = self.by_key.get(&ctx.key).copied();
        if let Some(sid) = msg.ip_option(opt::SERVER_ID) {
            // SELECTING.
            if sid != self.cfg.server_ip {
                if let Some(ip) = bound_ip {
                    if self.bindings.get(&ip).map(|b| b.state) == Some(BindState::Offered) {
                        self.unbind(ip, now);
                    }
                }
                return self.dropped(out, DropReason::OtherServer);
            }
            let Some(ip) = requested.or_else(|| nonzero(msg.ciaddr)) else {
                return self.nak(msg, ctx, out, "requested address missing");
            };
            if bound_ip.is_some_and(|b| b != ip) {
                return self.nak(msg, ctx, out, "requested address was not offered");
            }
            return self.commit(now, msg, ctx, ip, out);
        }
        if msg.ciaddr.is_unspecified() {
            // INIT-REBOOT.
            let Some(ip) = requested else {
                return self.dropped(out, DropReason::Malformed);
            };
            if !self.cfg.subnet.contains(&ip) {
                return self.nak(msg, ctx, out, "wrong network");
            }
            return match bound_ip {
                Some(b) if b == ip => self.commit(now, msg, ctx, ip, out),
                Some(_) => self.nak(msg, ctx, out, "wrong address"),
                None => {
                    if let Some(r) = self.reservation(&ctx.mac) {
                        if r.ip == ip {
                            self.commit(now, msg, ctx, ip, out)
                        } else {
                            self.nak(msg, ctx, out, "wrong address")
                        }
                    } else if self.prev_by_key.get(&ctx.key) == Some(&ip)
                        && self.available_for(ip, &ctx.key, &ctx.mac)
                    {
                        self.commit(now, msg, ctx, ip, out)
                    } else {
                        self.dropped(out, DropReason::UnknownClient)
                    }
                }
            };
        }
        // RENEWING (unicast) or REBINDING (broadcast): ciaddr is the address.
        let ip = msg.ciaddr;
        if !self.cfg.subnet.contains(&ip) {
            return self.nak(msg, ctx, out, "wrong network");
        }
        match bound_ip {
            Some(b) if b == ip => self.commit(now, msg, ctx, ip, out),
            Some(_) => self.nak(msg, ctx, out, "wrong address"),
            // No record (e.g. lost store): adopt the address if it is free
            // for this client, otherwise the client must start over.
            None => self.commit(now, msg, ctx, ip, out),
        }
    }

    /// Binds `ip` to the client and ACKs, or NAKs if it may not have it.
    fn commit(
        &mut self,
        now: u64,
        msg: &Message,
        ctx: &Ctx<'_>,
        ip: Ipv4Addr,
        mut out: Outcome,
    ) -> Outcome {
        if !self.available_for(ip, &ctx.key, &ctx.mac) {
            return self.nak(msg, ctx, out, "address not available");
        }
        if self.at_limit(&ctx.key) {
            return self.dropped(out, DropReason::LeaseLimit);
        }
        self.drop_other_binding(now, &ctx.key, ip, &mut out.changes);
        let lease_secs = self.lease_secs(&ctx.mac);
        let hostname = self
            .hostname_for(ctx)
            .or_else(|| ctx.client_hostname.clone());
        let binding = Binding {
            key: ctx.key.clone(),
            mac: ctx.mac,
            hostname,
            state: BindState::Bound,
            expires_at: now.saturating_add(secs(lease_secs)),
        };
        out.changes
            .push(LeaseChange::Bound(Self::lease_of(ip, &binding)));
        self.set_binding(ip, binding);
        self.counters.ack += 1;
        let bytes = self.build(msg, ctx, MessageType::Ack, ip, Some(lease_secs));
        out.reply = Some(Reply {
            bytes,
            to: reply_to(msg, MessageType::Ack, ip),
            kind: MessageType::Ack,
        });
        out
    }

    fn nak(&mut self, msg: &Message, ctx: &Ctx<'_>, mut out: Outcome, why: &str) -> Outcome {
        self.counters.nak += 1;
        let mut b = ReplyBuilder::new(
            msg,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            max_reply_len(msg),
        );
        b.option(opt::MESSAGE_TYPE, &[MessageType::Nak.as_u8()]);
        b.option(opt::SERVER_ID, &self.cfg.server_ip.octets());
        if let Some(id) = &ctx.client_id {
            b.option(opt::CLIENT_ID, id);
        }
        b.option(opt::MESSAGE, why.as_bytes());
        out.reply = Some(Reply {
            bytes: b.finish(),
            to: ReplyTo::BROADCAST,
            kind: MessageType::Nak,
        });
        out
    }

    fn decline(&mut self, now: u64, msg: &Message, ctx: &Ctx<'_>, out: Outcome) -> Outcome {
        self.counters.decline += 1;
        if msg
            .ip_option(opt::SERVER_ID)
            .is_some_and(|s| s != self.cfg.server_ip)
        {
            return self.dropped(out, DropReason::OtherServer);
        }
        let Some(ip) = msg.ip_option(opt::REQUESTED_IP) else {
            return self.dropped(out, DropReason::Malformed);
        };
        if self.by_key.get(&ctx.key) != Some(&ip) {
            return self.dropped(out, DropReason::NotOwner);
        }
        let mut out = out;
        if let Some(b) = self.remove_binding(ip) {
            out.changes
                .push(LeaseChange::Declined(Self::lease_of(ip, &b)));
        }
        let until = now.saturating_add(secs(self.cfg.decline_quarantine));
        self.quarantine_ip(ip, until, ctx.mac);
        out
    }

    fn release(&mut self, now: u64, msg: &Message, ctx: &Ctx<'_>, out: Outcome) -> Outcome {
        self.counters.release += 1;
        let ip = msg.ciaddr;
        let owner = self.bindings.get(&ip).is_some_and(|b| b.key == ctx.key);
        if !owner {
            self.counters.release_not_owner += 1;
            return self.dropped(out, DropReason::NotOwner);
        }
        let mut out = out;
        if let Some((lease, was_bound)) = self.unbind(ip, now) {
            if was_bound {
                out.changes.push(LeaseChange::Released(lease));
            }
        }
        out
    }

    fn inform(&mut self, msg: &Message, ctx: &Ctx<'_>, out: Outcome) -> Outcome {
        self.counters.inform += 1;
        if !msg.ciaddr.is_unspecified() && !self.cfg.subnet.contains(&msg.ciaddr) {
            return self.dropped(out, DropReason::WrongNetwork);
        }
        self.counters.ack += 1;
        let bytes = self.build(msg, ctx, MessageType::Ack, Ipv4Addr::UNSPECIFIED, None);
        let mut out = out;
        out.reply = Some(Reply {
            bytes,
            to: reply_to(msg, MessageType::Ack, Ipv4Addr::UNSPECIFIED),
            kind: MessageType::Ack,
        });
        out
    }

    /// Builds an OFFER or ACK. `lease` is None for an INFORM's ACK.
    fn build(
        &self,
        msg: &Message,
        ctx: &Ctx<'_>,
        kind: MessageType,
        yiaddr: Ipv4Addr,
        lease: Option<u32>,
    ) -> Vec<u8> {
        let cfg = &self.cfg;
        let ciaddr = if kind == MessageType::Ack {
            msg.ciaddr
        } else {
            Ipv4Addr::UNSPECIFIED
        };
        let mut b = ReplyBuilder::new(msg, ciaddr, yiaddr, max_reply_len(msg));
        // Mandatory (RFC 2131 table 3; client id echo per RFC 6842).
        b.option(opt::MESSAGE_TYPE, &[kind.as_u8()]);
        b.option(opt::SERVER_ID, &cfg.server_ip.octets());
        if let Some(l) = lease {
            b.option(opt::LEASE_TIME, &l.to_be_bytes());
        }
        if let Some(id) = &ctx.client_id {
            b.option(opt::CLIENT_ID, id);
        }
        // Sent whether asked for or not.
        let mut always: Vec<(u8, Vec<u8>)> = Vec::new();
        always.push((opt::SUBNET_MASK, cfg.subnet.netmask().octets().to_vec()));
        if !cfg.routers.is_empty() {
            always.push((opt::ROUTER, ip_list(&cfg.routers)));
        }
        if let Some(l) = lease {
            always.push((opt::RENEWAL_T1, cfg.t1_for(l).to_be_bytes().to_vec()));
            always.push((opt::REBINDING_T2, cfg.t2_for(l).to_be_bytes().to_vec()));
        }
        // Sent when asked for (or when there is no parameter request list).
        let mut optional: Vec<(u8, Vec<u8>)> = Vec::new();
        if !cfg.dns_servers.is_empty() {
            optional.push((opt::DNS, ip_list(&cfg.dns_servers)));
        }
        if let Some(h) = self.hostname_for(ctx) {
            optional.push((opt::HOST_NAME, h.into_bytes()));
        }
        if let Some(d) = &cfg.domain_name {
            optional.push((opt::DOMAIN_NAME, d.as_bytes().to_vec()));
        }
        if let Some(m) = cfg.mtu {
            optional.push((opt::MTU, m.to_be_bytes().to_vec()));
        }
        optional.push((opt::BROADCAST, cfg.subnet.broadcast().octets().to_vec()));
        if let Some(r) = classless_routes(cfg) {
            optional.push((opt::CLASSLESS_ROUTES, r));
        }
        for (code, data) in &always {
            b.option(*code, data);
        }
        match msg.options.get(&opt::PARAMETER_LIST) {
            Some(prl) => {
                // The client's order is its priority when space runs out.
                let mut seen = [false; 256];
                for &code in prl {
                    if std::mem::replace(&mut seen[usize::from(code)], true) {
                        continue;
                    }
                    if let Some((_, data)) = optional.iter().find(|(c, _)| *c == code) {
                        b.option(code, data);
                    }
                }
            }
            None => {
                for (code, data) in &optional {
                    b.option(*code, data);
                }
            }
        }
        b.finish()
    }

    // ---- state views and reload ----------------------------------------

    /// Every offered, bound, remembered-expired and declined address.
    pub fn leases(&self, now: u64) -> Vec<LeaseView> {
        let _ = now;
        let client_id = |k: &ClientKey| match k {
            ClientKey::ClientId(id) => Some(id.clone()),
            ClientKey::Mac(_) => None,
        };
        let mut v: Vec<LeaseView> = self
            .bindings
            .iter()
            .map(|(ip, b)| LeaseView {
                mac: b.mac,
                client_id: client_id(&b.key),
                ip: *ip,
                hostname: b.hostname.clone(),
                state: match b.state {
                    BindState::Offered => LeaseState::Offered,
                    BindState::Bound => LeaseState::Bound,
                },
                expires_at: b.expires_at,
                reserved: self.reserved_by_ip.contains_key(ip),
            })
            .collect();
        v.extend(
            self.history
                .iter()
                .filter(|(_, p)| p.was_bound)
                .map(|(ip, p)| LeaseView {
                    mac: p.mac,
                    client_id: p.key.as_ref().and_then(client_id),
                    ip: *ip,
                    hostname: p.hostname.clone(),
                    state: LeaseState::Expired,
                    expires_at: p.at,
                    reserved: false,
                }),
        );
        v.extend(self.quarantine.iter().map(|(ip, (until, mac))| LeaseView {
            mac: *mac,
            client_id: None,
            ip: *ip,
            hostname: None,
            state: LeaseState::Declined,
            expires_at: *until,
            reserved: false,
        }));
        v.sort_by_key(|l| l.ip);
        v
    }

    /// Loads bound leases (from the lease store) with their expiry in the
    /// caller's monotonic clock. Leases already past are expired at the next
    /// `handle`/`handle_timeout` and reported as `Expired` then.
    pub fn restore(&mut self, leases: impl IntoIterator<Item = Lease>) -> RestoreReport {
        let mut report = RestoreReport::default();
        for l in leases {
            let ok = self.available_for(l.ip, &l.key, &l.mac)
                && !self.by_key.contains_key(&l.key)
                && !self.by_mac.contains_key(&l.mac)
                && !self.bindings.contains_key(&l.ip)
                && self.bindings.len() < self.cfg.max_leases;
            if !ok {
                report.rejected += 1;
                continue;
            }
            self.set_binding(
                l.ip,
                Binding {
                    key: l.key,
                    mac: l.mac,
                    hostname: l.hostname,
                    state: BindState::Bound,
                    expires_at: l.expires_at,
                },
            );
            report.restored += 1;
        }
        report
    }

    /// Replaces the configuration (reload). Bindings still valid under the
    /// new one are kept; the others are dropped and reported as `Released`.
    pub fn set_config(&mut self, cfg: ServerConfig) -> Result<Vec<LeaseChange>, ConfigError> {
        cfg.validate()?;
        let bindings = std::mem::take(&mut self.bindings);
        let quarantine = std::mem::take(&mut self.quarantine);
        let mut history: Vec<(Ipv4Addr, Past)> =
            std::mem::take(&mut self.history).into_iter().collect();
        history.sort_by_key(|(ip, p)| (p.at, *ip));
        self.by_key.clear();
        self.by_mac.clear();
        self.expiries.clear();
        self.quarantine_timers.clear();
        self.history_order.clear();
        self.prev_by_key.clear();
        self.cfg = cfg;
        self.index_config();
        self.fresh = self.pools.clone();
        let mut changes = Vec::new();
        for (ip, b) in bindings {
            let ok = self.available_for(ip, &b.key, &b.mac)
                && !self.by_key.contains_key(&b.key)
                && !self.by_mac.contains_key(&b.mac)
                && self.bindings.len() < self.cfg.max_leases;
            if ok {
                self.set_binding(ip, b);
            } else if b.state == BindState::Bound {
                changes.push(LeaseChange::Released(Self::lease_of(ip, &b)));
            }
        }
        for (ip, (until, mac)) in quarantine {
            if self.fresh.contains(u32::from(ip)) {
                self.quarantine_ip(ip, until, mac);
            }
        }
        for (ip, p) in history {
            if self.fresh.contains(u32::from(ip)) {
                self.retire(ip, p);
            }
        }
        Ok(changes)
    }

    /// Checks the internal invariants (tests).
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        use std::collections::HashSet;
        assert_eq!(
            self.bindings.len(),
            self.by_key.len(),
            "one address per client"
        );
        for (k, ip) in &self.by_key {
            assert_eq!(&self.bindings[ip].key, k);
        }
        assert_eq!(
            self.by_mac.len(),
            self.bindings.len(),
            "one address per MAC"
        );
        for (m, ip) in &self.by_mac {
            assert_eq!(&self.bindings[ip].mac, m);
        }
        assert_eq!(self.expiries.len(), self.bindings.len());
        for (ip, b) in &self.bindings {
            assert!(self.expiries.contains(&(b.expires_at, *ip)));
            assert!(!self.fresh.contains(u32::from(*ip)));
            assert!(!self.history.contains_key(ip));
            assert!(!self.quarantine.contains_key(ip));
        }
        assert!(self.bindings.len() <= self.cfg.max_leases);
        assert_eq!(self.history.len(), self.history_order.len());
        assert!(self.history.len() <= self.history_cap());
        let mut seen = HashSet::new();
        for ip in self.history.keys() {
            assert!(!self.fresh.contains(u32::from(*ip)));
            assert!(!self.quarantine.contains_key(ip));
            seen.insert(*ip);
        }
        for (k, ip) in &self.prev_by_key {
            assert_eq!(self.history[ip].key.as_ref(), Some(k));
        }
        // Every pool address is accounted for exactly once (small pools).
        for r in &self.cfg.pools {
            for a in u32::from(r.start)..=u32::from(r.end) {
                let ip = Ipv4Addr::from(a);
                if !self.in_pool(ip) {
                    continue;
                }
                let n = usize::from(self.bindings.contains_key(&ip))
                    + usize::from(self.history.contains_key(&ip))
                    + usize::from(self.quarantine.contains_key(&ip))
                    + usize::from(self.fresh.contains(a));
                assert_eq!(n, 1, "{ip} accounted {n} times");
            }
        }
    }
}

/// What the server reads from every message.
#[derive(Debug)]
struct Ctx<'a> {
    key: ClientKey,
    mac: Mac,
    client_id: Option<Vec<u8>>,
    client_hostname: Option<String>,
    port_hostname: Option<&'a str>,
}

impl<'a> Ctx<'a> {
    fn new(msg: &Message, port_hostname: Option<&'a str>) -> Self {
        let mac = msg.mac();
        // RFC 2132 §9.14: at least two bytes.
        let client_id = msg
            .options
            .get(&opt::CLIENT_ID)
            .filter(|id| id.len() >= 2)
            .cloned();
        let key = match &client_id {
            Some(id) => ClientKey::ClientId(id.clone()),
            None => ClientKey::Mac(mac),
        };
        let client_hostname = msg
            .options
            .get(&opt::HOST_NAME)
            .and_then(|h| std::str::from_utf8(h).ok())
            .filter(|h| !h.is_empty() && h.len() <= 63)
            .map(str::to_owned);
        Ctx {
            key,
            mac,
            client_id,
            client_hostname,
            port_hostname,
        }
    }
}

fn nonzero(ip: Ipv4Addr) -> Option<Ipv4Addr> {
    (!ip.is_unspecified()).then_some(ip)
}

fn ip_list(ips: &[Ipv4Addr]) -> Vec<u8> {
    ips.iter().flat_map(|i| i.octets()).collect()
}

/// Option 121 (RFC 3442) with a default route via the first router added,
/// or None when there are no static routes.
fn classless_routes(cfg: &ServerConfig) -> Option<Vec<u8>> {
    if cfg.static_routes.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    let mut push = |dest: ipnet::Ipv4Net, gw: Ipv4Addr| {
        let width = dest.prefix_len();
        out.push(width);
        let n = usize::from(width).div_ceil(8);
        out.extend_from_slice(&dest.network().octets()[..n]);
        out.extend_from_slice(&gw.octets());
    };
    let has_default = cfg.static_routes.iter().any(|r| r.dest.prefix_len() == 0);
    if !has_default {
        if let Some(&gw) = cfg.routers.first() {
            push(ipnet::Ipv4Net::default(), gw);
        }
    }
    for r in &cfg.static_routes {
        push(r.dest, r.gateway);
    }
    Some(out)
}

/// The largest reply the client accepts (option 57, RFC 2132 §9.10).
fn max_reply_len(msg: &Message) -> usize {
    let announced = match msg.options.get(&opt::MAX_MESSAGE_SIZE).map(Vec::as_slice) {
        Some([a, b]) => usize::from(u16::from_be_bytes([*a, *b])),
        _ => MIN_MAX_MESSAGE,
    };
    announced.clamp(MIN_MAX_MESSAGE, MAX_MAX_MESSAGE) - IP_UDP_HEADERS
}

/// RFC 2131 §4.1 with giaddr = 0 (no relays inside a switch).
fn reply_to(msg: &Message, kind: MessageType, yiaddr: Ipv4Addr) -> ReplyTo {
    if kind == MessageType::Nak {
        return ReplyTo::BROADCAST;
    }
    if !msg.ciaddr.is_unspecified() {
        return ReplyTo {
            ip: msg.ciaddr,
            mac: msg.mac(),
            broadcast: false,
        };
    }
    if msg.broadcast() || yiaddr.is_unspecified() {
        return ReplyTo::BROADCAST;
    }
    ReplyTo {
        ip: yiaddr,
        mac: msg.mac(),
        broadcast: false,
    }
}
