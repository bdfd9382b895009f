//! DHCPv4 server for vswitch networks: a sans-IO state machine per network,
//! the IP/MAC mapping table behind it, and the lease store record format.
//!
//! # What it is
//!
//! - [`Server`]: one per network. The caller hands it the UDP payload of a
//!   message sent to port 67, the frame's source MAC and `now` (monotonic
//!   nanoseconds, the switch's `Timestamp.0`), and gets an [`Outcome`]: the
//!   reply bytes with a [`ReplyTo`] (where to send them, RFC 2131 §4.1), the
//!   [`LeaseChange`]s to persist *before* sending the reply, and a
//!   [`DropReason`] when there is no reply. Timers (offer and lease expiry,
//!   decline quarantine) run through [`Server::poll_timeout`] /
//!   [`Server::handle_timeout`], driven from a time-ordered set, so no call
//!   scans the whole table.
//! - RFC 2131/2132 behaviour: DISCOVER/OFFER, REQUEST in SELECTING,
//!   INIT-REBOOT, RENEWING and REBINDING, DECLINE (quarantine), RELEASE (by
//!   the owner only), INFORM; client identifier (option 61) keys bindings;
//!   parameter request list (55) and maximum message size (57) are honoured;
//!   option overload (52) and split options (RFC 3396) are parsed.
//! - Address table: static reservations (MAC → IP, excluded from pools) and
//!   dynamic pools. A client holds at most one address, an address at most
//!   one client. New addresses come from never-used ones first, then from the
//!   least recently expired; a returning client gets its previous address if
//!   it is still free. Bindings per network are capped (`max_leases`).
//! - [`store`]: self-delimiting, CRC-checked lease records, a replay that
//!   survives corrupt records and a torn tail, and compaction.
//!
//! # What it is not
//!
//! No sockets, files, threads or clock reads: the `vswitch` crate owns I/O,
//! the lease file and the clock. No relay agent support (giaddr is ignored
//! for addressing: there are no relays inside a switch), no DHCPv6, no
//! BOOTP-only clients (option 53 is required), no failover, no DNS updates.
//!
//! # Why not `dhcproto` for the wire format
//!
//! `dhcproto` 0.15 was evaluated: it does not apply option overload (option
//! 52 is decoded as a plain byte, options in `sname`/`file` are never read),
//! keeps options in a map keyed by code (repeated options are overwritten on
//! decode), silently stops at the first option it cannot parse, and does not
//! check the magic cookie; controlling which options fit in the client's
//! maximum message size would mean re-encoding per option. It also needs Rust
//! 1.87 / edition 2024 (this workspace declares 1.80) and pulls in
//! `hickory-proto` and a second `rand`. The subset a server needs is a fixed
//! 236-byte header plus TLV options, so [`wire`] does that in ~250 lines with
//! every read bounds-checked. `dhcproto` is still used in the tests, as an
//! independent encoder of client messages and decoder of our replies.

#![forbid(unsafe_code)]

pub mod config;
mod ipset;
mod server;
pub mod store;
pub mod wire;

#[cfg(test)]
mod tests;

use std::fmt;

pub use config::{ConfigError, IpRange, Reservation, ServerConfig, StaticRoute};
pub use server::{
    Counters, DropReason, Ingress, Lease, LeaseChange, LeaseState, LeaseView, Outcome, Reply,
    ReplyTo, RestoreReport, Server,
};
pub use wire::MessageType;

/// An Ethernet MAC address.
pub type Mac = [u8; 6];

/// What identifies a client: its client identifier (option 61) when it
/// sends one, otherwise its hardware address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientKey {
    /// Option 61 contents (type byte included).
    ClientId(Vec<u8>),
    /// chaddr.
    Mac(Mac),
}

impl fmt::Display for ClientKey {
    /// `id:01020304...` or `mac:aa:bb:cc:dd:ee:ff`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientKey::ClientId(id) => {
                f.write_str("id:")?;
                for b in id {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
            ClientKey::Mac(m) => write!(f, "mac:{}", fmt_mac(m)),
        }
    }
}

impl std::str::FromStr for ClientKey {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        if let Some(hex) = s.strip_prefix("id:") {
            parse_hex(hex).map(ClientKey::ClientId)
        } else if let Some(mac) = s.strip_prefix("mac:") {
            parse_mac(mac).map(ClientKey::Mac)
        } else {
            Err(ParseError)
        }
    }
}

/// A MAC address or client key that does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expected `aa:bb:cc:dd:ee:ff`, `mac:aa:bb:cc:dd:ee:ff` or `id:<hex>`")]
pub struct ParseError;

/// `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(m: &Mac) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<Mac, ParseError> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        let p = parts.next().ok_or(ParseError)?;
        if p.len() != 2 {
            return Err(ParseError);
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| ParseError)?;
    }
    if parts.next().is_some() {
        return Err(ParseError);
    }
    Ok(m)
}

fn parse_hex(s: &str) -> Result<Vec<u8>, ParseError> {
    if s.len() & 1 == 1 || !s.is_ascii() {
        return Err(ParseError);
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| ParseError))
        .collect()
}
