//! Which NAT of a striped set holds a packet's connection.
//!
//! A striped set is `count` NATs (a power of two), stripe `i` owning the
//! external ports `p` with `p % count == i` ([`crate::Share`]). A
//! connection lives in one stripe, and each of its two keys must lead
//! there from the packet alone, so every key leads to exactly one stripe
//! (which also keeps keys unique across the set: two entries with one key
//! would be in the same table):
//!
//! * From a tenant, a packet comes from its inside endpoint: stripe
//!   `inside port % count`. Connections it starts get an external port of
//!   that stripe (the inside port itself when it is free, so port
//!   preservation still works), and the ones it accepts through a floating
//!   IP keep their port.
//! * From outside ([`EXTERNAL_ZONE`]) a packet is addressed to one of our
//!   ports (for ICMP queries, our identifier): stripe `port % count`;
//!   except a port forward's external port `P`, whose connections end at
//!   inside port `Q`: stripe `Q % count`, where the target's answers go.
//!   (Forward ports are never handed out, so no other connection has one.)
//! * An ICMP error goes where the packet it quotes went: from outside the
//!   quote is a packet we sent (its source is ours), from a tenant one
//!   the tenant received (its destination is the inside endpoint).
//!
//! Packets without ports (other protocols, later fragments, broken ones)
//! go to stripe 0, as do a set's address-only connections. A reload that
//! adds or removes a port forward moves its external port to another
//! stripe: connections that used that port before end (their packets no
//! longer find them).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use conntrack::ConnKey;
use packet::flow::{ethertype, proto};
use packet::{FlowKey, L4};

use crate::rewrite;
use crate::rules::Index;
use crate::{Rules, EXTERNAL_ZONE};

/// Most stripes a set may have.
pub const MAX_STRIPES: usize = 64;

/// The stripe chooser of a set of `count` NATs under one rule set (see the
/// module doc). Cheap to consult; rebuilt with the rules.
#[derive(Debug, Clone, Default)]
pub struct Steering {
    /// A power of two, at most [`MAX_STRIPES`]; 1: no striping.
    count: usize,
    owned: HashSet<Ipv4Addr>,
    /// Port forwards' (external address, protocol, port) -> their inside
    /// port.
    forwards: HashMap<(Ipv4Addr, u8, u16), u16>,
}

impl Steering {
    /// The chooser for `count` stripes under `rules` (`count` rounded
    /// down to a power of two, at least 1, at most [`MAX_STRIPES`]).
    pub fn new(rules: &Rules, count: usize) -> Steering {
        let count = match count.clamp(1, MAX_STRIPES) {
            c if c.is_power_of_two() => c,
            c => c.next_power_of_two() / 2,
        };
        let forwards = rules
            .forwards
            .iter()
            .map(|f| {
                let k = (*f.external.ip(), f.proto.number(), f.external.port());
                (k, f.inside.port())
            })
            .collect();
        Steering {
            count,
            owned: Index::build(rules).owned().clone(),
            forwards,
        }
    }

    /// Number of stripes.
    pub fn count(&self) -> usize {
        self.count.max(1)
    }

    /// Whether `ip` is one of the rules' external addresses (as
    /// [`crate::Nat::owns`]).
    pub fn owns(&self, ip: Ipv4Addr) -> bool {
        self.owned.contains(&ip)
    }

    fn class(&self, port: u16) -> usize {
        usize::from(port) & (self.count() - 1)
    }

    /// Stripe of our external endpoint `addr`:`port`.
    fn outside(&self, addr: IpAddr, proto: u8, port: u16) -> usize {
        let inside = match addr {
            IpAddr::V4(a) if !self.forwards.is_empty() => self.forwards.get(&(a, proto, port)),
            _ => None,
        };
        self.class(inside.copied().unwrap_or(port))
    }

    /// The stripe of a packet whose connection key is `k` (its zone is
    /// where the packet arrived).
    pub fn of_key(&self, k: &ConnKey) -> usize {
        if self.count() == 1 {
            return 0;
        }
        match (k.zone == EXTERNAL_ZONE, k.is_icmp()) {
            // ICMP queries: the identifier, in both directions and zones.
            (_, true) => self.class(k.src_port),
            (true, false) => self.outside(k.dst, k.proto, k.dst_port),
            (false, false) => self.class(k.src_port),
        }
    }

    /// The stripe of the packet `key` (parsed from `frame`) arriving in
    /// zone `from`.
    pub fn stripe(&self, from: u32, key: &FlowKey, frame: &[u8]) -> usize {
        if self.count() == 1 {
            return 0;
        }
        if let Some(k) = ConnKey::from_flow(from, key) {
            return self.of_key(&k);
        }
        let Some(q) = error_quote(key, frame) else {
            return 0;
        };
        match (from == EXTERNAL_ZONE, q.proto) {
            (_, proto::ICMP) => self.class(q.sport),
            // A packet we sent: our port is its source.
            (true, proto::TCP | proto::UDP) => self.outside(IpAddr::V4(q.src), q.proto, q.sport),
            // A packet the tenant received: the endpoint is its destination.
            (false, proto::TCP | proto::UDP) => self.class(q.dport),
            _ => 0,
        }
    }

    /// For an ICMP error about TCP or UDP, the stripe of the quote's other
    /// endpoint when it is not `at` ([`Steering::stripe`]'s): conntrack matches a
    /// quote as it arrived before it tries it reversed, so the error may
    /// be about a connection there (a packet sent to us from outside, or
    /// one a tenant sent, quoted back at it).
    pub fn error_alternative(
        &self,
        at: usize,
        from: u32,
        key: &FlowKey,
        frame: &[u8],
    ) -> Option<usize> {
        if self.count() == 1 {
            return None;
        }
        // Only ICMP errors have a quote: other packets stop here.
        let q = error_quote(key, frame)?;
        let alt = match (from == EXTERNAL_ZONE, q.proto) {
            (true, proto::TCP | proto::UDP) => self.outside(IpAddr::V4(q.dst), q.proto, q.dport),
            (false, proto::TCP | proto::UDP) => self.class(q.sport),
            _ => return None,
        };
        (alt != at).then_some(alt)
    }

    /// The stripe an entry with keys `orig` and `reply` belongs in: the
    /// one both lead to (`None`: they lead to two, as an entry saved by a
    /// set with another stripe count may).
    pub fn of_entry(&self, orig: &ConnKey, reply: &ConnKey) -> Option<usize> {
        let s = self.of_key(orig);
        (s == self.of_key(reply)).then_some(s)
    }
}

/// The quote of an IPv4 ICMP error frame.
fn error_quote(key: &FlowKey, frame: &[u8]) -> Option<rewrite::Quote> {
    if key.ethertype != ethertype::IPV4 || !matches!(key.l4, L4::Icmpv4 { .. }) {
        return None;
    }
    let (l3, l4) = (usize::from(key.l3_offset), usize::from(key.l4_offset));
    let end = rewrite::rd16(frame, l3 + 2).map(|n| l3 + usize::from(n))?;
    rewrite::quote(frame, l4, end)
}
