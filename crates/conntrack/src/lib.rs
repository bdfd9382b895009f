//! Connection tracking for vswitch, as a sans-IO library: the table that
//! NAT, security groups and the load balancer share.
//!
//! # What it is
//!
//! * [`Conntrack`]: a table of connections keyed by zone and 5-tuple
//!   ([`ConnKey`], built from a parsed [`packet::FlowKey`]), tracking both
//!   directions: a reply-direction packet finds the same entry and is
//!   reported as [`Dir::Reply`].
//! * Protocol state: TCP (SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT,
//!   CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE; simultaneous open and close;
//!   RST checked loosely against the sequence window; the rules are on
//!   [`TcpState`]), UDP (unreplied / assured), ICMP and ICMPv6
//!   queries (echo; for ICMPv4 also timestamp, information, address mask:
//!   the identifier replaces the ports and the type is paired, so a reply
//!   maps to its request), and any other IP protocol by addresses alone.
//!   ICMP errors whose quoted header matches an entry are
//!   [`Track::Related`] (IPv4 and IPv6).
//! * Timeouts per state class ([`Timeouts`]) with defaults and floors from
//!   RFC 4787 (UDP >= 2 min, default 5 min assured), RFC 5382 (TCP
//!   established >= 2 h 4 min, transitory >= 4 min) and RFC 5508 (ICMP >=
//!   60 s).
//! * Caps: a global one and one per creating port; refusals name the cap
//!   ([`Limit`]) and are counted ([`Stats`]).
//! * Export/import of the table ([`Snapshot`], serde) for restarts.
//!
//! # How a caller uses it
//!
//! ```
//! use conntrack::{Config, Conntrack, Track};
//! # let frame = {
//! #     let mut f = Vec::new();
//! #     etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
//! #         .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
//! #         .udp(5000, 53)
//! #         .write(&mut f, &[0; 8])
//! #         .unwrap();
//! #     f
//! # };
//! let mut ct: Conntrack = Conntrack::new(Config::default()).unwrap();
//! let key = packet::FlowKey::parse(&frame).unwrap();
//! let now = 1_000_000_000; // the caller's monotonic clock, in ns
//! match ct.track(7, 1, &key, &frame, now) {
//!     // First packet: evaluate policy, and insert only if allowed.
//!     Track::New(new) => {
//!         let id = ct.commit(&new, now, ()).unwrap();
//!         assert_eq!(ct.len(), 1);
//!         # let _ = id;
//!     }
//!     Track::Established { .. } | Track::Related { .. } => { /* allowed by state */ }
//!     Track::Invalid(_) | Track::Refused(_) => { /* drop, counted */ }
//!     Track::Untracked(_) => { /* stateless policy */ }
//! }
//! // From the control plane, now and then: bounded work.
//! ct.expire(now, 1024);
//! ```
//!
//! **track vs commit.** [`Conntrack::track`] looks a packet up and advances
//! its entry's state, but never inserts: a connection's first packet gives
//! [`Track::New`] carrying a [`NewConn`], and [`Conntrack::commit`] inserts
//! it. Security groups evaluate their rules only for `New` and commit only
//! when the rules allow, so denied traffic never takes table space (OVS's
//! `ct()` / `ct(commit)`). `track` already reports [`Track::Refused`] when a
//! cap would refuse the commit, so policy is not evaluated in vain; commit
//! checks again.
//!
//! **Invalid vs untracked.** A packet that claims a connection the table
//! cannot accept it for (a TCP segment other than a SYN with no entry, an
//! out-of-window RST, an echo reply without request, an ICMP error about
//! nothing) is [`Track::Invalid`] with a reason; security groups drop those.
//! A packet conntrack has no opinion on (ARP, neighbour discovery, later IP
//! fragments) is [`Track::Untracked`]; the caller applies stateless policy.
//!
//! # Design
//!
//! * **Keys and index.** Every entry has two keys, the original one (the
//!   first packet's orientation, the canonical one) and the reply one
//!   ([`ConnKey::reverse`]); both go into one `HashMap<ConnKey, (slot,
//!   dir)>`, so a lookup of either direction is one hash probe and yields
//!   the direction. Two keys rather than a direction-free canonical key
//!   because NAT gives entries a reply key that is not the reverse of
//!   the original. The hasher is std's SipHash-1-3 with per-table random
//!   keys: keys come from tenants, and a table of a million entries must
//!   not be open to hash flooding.
//! * **Entries** live in a slab (`Vec`) with a free list; [`ConnId`] is
//!   slot + generation, so a stale handle never reaches a newer entry.
//! * **Expiry without scanning.** Each timeout class (UDP unreplied, UDP
//!   assured, TCP transitory, TCP established, TIME_WAIT, CLOSE, ICMP,
//!   other) has one fixed timeout and one intrusive doubly-linked list
//!   (indices in a parallel `Vec`) ordered by when the entry was last moved
//!   to the tail. A packet sets the entry's deadline to `now + timeout`
//!   and moves it to the tail only when its class changed or its last move
//!   is at least `min(1 s, timeout/16)` old, so a busy flow costs one relink
//!   per second, not one per packet, and no queue grows with traffic.
//!   [`Conntrack::expire`] repeatedly takes the list head with the earliest
//!   deadline while it is due: bounded by `max`, never scanning. Lookups
//!   compare the deadline exactly (an expired entry is absent and is
//!   removed by `track`/`commit`); `expire` may reap up to one granularity
//!   (1 s) late. When a cap is hit, up to [`REAP_ON_LIMIT`] expired entries
//!   are reaped before refusing.
//! * **User data.** `Conntrack<E>` stores an `E` per entry, given at commit
//!   (`()` by default): NAT can keep its mapping and the load balancer its
//!   backend in the entry without a second table. [`Conntrack::ext_mut`]
//!   changes it; [`Conntrack::expire_with`] hands it back when an entry is
//!   reaped and [`Conntrack::remove`] returns it. Entries also leave by
//!   paths that cannot hand anything back (an expired entry met by a
//!   lookup, a TCP entry reopened by a SYN, `flush_*`, `clear`, the reaping
//!   before a cap refuses): with [`Conntrack::set_collect_removed`] those
//!   are queued and [`Conntrack::drain_removed`] takes them, so a user
//!   whose `E` holds resources (NAT's ports) releases them whichever way an
//!   entry went. A queue rather than a callback stored in the table: the
//!   user releases into its own state, which it cannot lend the table
//!   while calling it.
//! * **Translated reply keys.** [`Conntrack::commit_with_reply`] inserts an
//!   entry whose reply key is not the reverse of the original (NAT: other
//!   zone, addresses, ports). An ICMP error quoting a packet *after* its
//!   translation quotes the reverse of one of the entry's keys;
//!   `track` looks the quote up as is, then reversed, so such errors are
//!   [`Track::Related`] with the direction they travel.
//!
//! # What it is not
//!
//! No sockets, threads or clock reads: `now` (monotonic nanoseconds) comes
//! with every call. No locking: one table per worker or the caller's lock.
//! No IP reassembly (later fragments are untracked), no full TCP window
//! tracking (only RST is checked, loosely), no mid-stream pick-up of TCP
//! connections, no helpers (FTP, SIP), no expectations, no packet
//! rewriting (the `nat` crate does it with a translated reply key).
//! `flush_port`, `flush_zone`, `entries` and `all_keys` walk the table and
//! belong to the control plane. Every function takes untrusted
//! frames and never panics on them.

#![forbid(unsafe_code)]

mod config;
mod index;
mod key;
mod outcome;
mod parse;
mod snapshot;
mod state;
mod table;

#[cfg(test)]
mod tests;

pub use config::{Config, ConfigError, Timeouts, MAX_ENTRIES_LIMIT, MAX_TIMEOUT_SECS};
pub use key::{icmp_is_request, icmp_query_counterpart, proto_name, ConnKey, Dir};
pub use outcome::{CommitError, ConnId, Invalid, Limit, NewConn, Stats, Track, Untracked};
pub use snapshot::{ImportError, ImportReport, SavedEntry, Snapshot, SNAPSHOT_VERSION};
pub use state::{ConnState, TcpState};
pub use table::{
    Conntrack, DirStats, EntryView, Removed, MAX_REFRESH_GRANULARITY_NS, REAP_ON_LIMIT,
};
