//! What `track` and `commit` return, and the counters.

use serde::{Deserialize, Serialize};

use crate::key::{ConnKey, Dir};
use crate::state::ProtoState;

/// Handle of an entry: a slot and the generation that slot had when the
/// entry was created, so a handle kept after its entry went never reaches
/// a newer entry in the same slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub(crate) slot: u32,
    pub(crate) gen: u32,
}

impl ConnId {
    /// Slot number (stable while the entry lives; for display).
    pub fn slot(&self) -> u32 {
        self.slot
    }
}

/// Which cap refused a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Limit {
    /// The table holds `max_entries`.
    Global,
    /// The creating port holds `max_per_port`.
    Port,
}

impl Limit {
    /// Short stable name for counters.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Global => "limit_global",
            Limit::Port => "limit_port",
        }
    }
}

macro_rules! reasons {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $v,)*
        }

        impl $name {
            /// Every reason, in counter order.
            pub const ALL: &'static [$name] = &[$($name::$v,)*];
            /// Number of reasons.
            pub const COUNT: usize = Self::ALL.len();

            /// Short stable name for counters and traces.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$v => $s,)*
                }
            }

            /// Position in [`Self::ALL`].
            pub fn index(self) -> usize {
                self as usize
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

reasons! {
    /// Why a packet is invalid: it claims to belong to a connection the
    /// table cannot accept it for. Security groups drop these.
    Invalid {
        /// An L3/L4 header is broken ([`packet::FlowKey::malformed`]), or the
        /// frame does not match its flow key.
        Malformed => "malformed",
        /// TCP flag combination no stack sends (no flags, FIN without ACK,
        /// SYN+FIN, SYN+RST, ...).
        TcpBadFlags => "tcp_bad_flags",
        /// A TCP packet other than a plain SYN with no entry: not the start
        /// of a connection ("invalid new"; no mid-stream pick-up).
        TcpNotSyn => "tcp_not_syn",
        /// SYN or SYN-ACK that does not fit the entry's state.
        TcpUnexpectedSyn => "tcp_unexpected_syn",
        /// SYN-ACK whose acknowledgment number is not the SYN's ISN + 1.
        TcpSynAckMismatch => "tcp_synack_mismatch",
        /// A segment before the handshake allows it (ACK or FIN while only
        /// the SYN was seen).
        TcpOutOfState => "tcp_out_of_state",
        /// RST whose sequence number is outside the loose window.
        TcpRstOutOfWindow => "tcp_rst_out_of_window",
        /// ICMP query reply (echo reply, ...) with no matching request.
        IcmpReplyNoRequest => "icmp_reply_no_request",
        /// ICMP error whose quoted header matches no entry.
        IcmpErrorNoMatch => "icmp_error_no_match",
        /// ICMP error whose quoted header is unreadable, is itself an ICMP
        /// error, or is a later fragment.
        IcmpErrorBadQuote => "icmp_error_bad_quote",
        /// ICMP error not addressed to the sender of the quoted packet.
        IcmpErrorAddrMismatch => "icmp_error_addr_mismatch",
    }
}

reasons! {
    /// Why a packet is not tracked at all (no verdict on its state): the
    /// caller applies stateless policy (ARP, neighbour discovery) or its own
    /// handling (later fragments need reassembly first).
    Untracked {
        /// Not IPv4/IPv6.
        NotIp => "not_ip",
        /// A non-first IP fragment (no L4 header to key on).
        Fragment => "fragment",
        /// ICMP(v6) that is neither a query nor an error: neighbour
        /// discovery, MLD, router solicitation/advertisement, ...
        IcmpOther => "icmp_other",
    }
}

/// A connection `track` saw starting and did not insert: hand it to
/// [`crate::Conntrack::commit`] if policy allows it. Carries the key and
/// the initial protocol state derived from the first packet, so commit
/// neither re-parses nor re-decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewConn {
    pub(crate) key: ConnKey,
    pub(crate) port: u32,
    pub(crate) state: ProtoState,
    pub(crate) ip_len: u32,
}

impl NewConn {
    /// Original key (the packet's orientation).
    pub fn key(&self) -> &ConnKey {
        &self.key
    }

    /// Port the connection would be charged to.
    pub fn port(&self) -> u32 {
        self.port
    }
}

/// Outcome of [`crate::Conntrack::track`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Track {
    /// The first packet of a connection with no entry. Nothing was
    /// inserted: evaluate policy, then [`crate::Conntrack::commit`] to
    /// insert (OVS `ct(commit)`).
    New(NewConn),
    /// A packet of a committed connection (in any protocol state: a
    /// retransmitted SYN, data, a FIN, an accepted RST); the entry's state,
    /// counters and timer were updated.
    Established {
        /// Entry.
        id: ConnId,
        /// Direction of this packet.
        dir: Dir,
    },
    /// An ICMP/ICMPv6 error about a committed connection (its quoted
    /// header matches the entry). The entry is not refreshed.
    Related {
        /// Entry the error is about.
        id: ConnId,
        /// Direction the error travels (opposite to the quoted packet's).
        dir: Dir,
    },
    /// Claims to belong to a connection but cannot; nothing changed.
    Invalid(Invalid),
    /// Not trackable; nothing changed.
    Untracked(Untracked),
    /// A new connection that a cap refuses right now (checked here so that
    /// policy is not evaluated for a connection that cannot be committed).
    Refused(Limit),
}

/// Why [`crate::Conntrack::commit`] did not insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// A cap is reached (counted).
    #[error("connection refused: {}", .0.as_str())]
    Limit(Limit),
    /// One of the connection's keys already has a live entry (another
    /// commit won, or the `NewConn` is stale).
    #[error("connection already tracked")]
    Exists(ConnId),
}

/// Table counters. Monotonic; never reset by the table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Entries inserted by commit (import not included).
    pub created: u64,
    /// Entries removed by a timeout (by `expire` or found expired).
    pub expired: u64,
    /// Entries removed by `remove`, `flush_*` or replaced by a reopening
    /// SYN (TIME_WAIT/CLOSE).
    pub removed: u64,
    /// Entries inserted by `import`.
    pub imported: u64,
    /// New connections refused by `max_entries`.
    pub refused_global: u64,
    /// New connections refused by `max_per_port`.
    pub refused_port: u64,
    /// Commits that found a live entry for the key.
    pub commit_exists: u64,
    /// ICMP errors matched to an entry.
    pub related: u64,
    /// Invalid packets by [`Invalid`] reason (index with
    /// [`Invalid::index`]).
    pub invalid: [u64; Invalid::COUNT],
    /// Untracked packets by [`Untracked`] reason.
    pub untracked: [u64; Untracked::COUNT],
}

impl Stats {
    /// Invalid packets for one reason.
    pub fn invalid(&self, r: Invalid) -> u64 {
        self.invalid.get(r.index()).copied().unwrap_or(0)
    }

    /// Untracked packets for one reason.
    pub fn untracked(&self, r: Untracked) -> u64 {
        self.untracked.get(r.index()).copied().unwrap_or(0)
    }

    /// Refused by one cap.
    pub fn refused(&self, l: Limit) -> u64 {
        match l {
            Limit::Global => self.refused_global,
            Limit::Port => self.refused_port,
        }
    }

    /// Every counter as (name, value), for display and metrics.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        [
            ("created", self.created),
            ("expired", self.expired),
            ("removed", self.removed),
            ("imported", self.imported),
            ("refused_global", self.refused_global),
            ("refused_port", self.refused_port),
            ("commit_exists", self.commit_exists),
            ("related", self.related),
        ]
        .into_iter()
        .chain(Invalid::ALL.iter().map(|r| (r.as_str(), self.invalid(*r))))
        .chain(
            Untracked::ALL
                .iter()
                .map(|r| (r.as_str(), self.untracked(*r))),
        )
    }

    /// Adds `other`'s counters to these (the totals of a table kept in
    /// several parts).
    pub fn merge(&mut self, other: &Stats) {
        self.created += other.created;
        self.expired += other.expired;
        self.removed += other.removed;
        self.imported += other.imported;
        self.refused_global += other.refused_global;
        self.refused_port += other.refused_port;
        self.commit_exists += other.commit_exists;
        self.related += other.related;
        for (a, b) in self.invalid.iter_mut().zip(other.invalid.iter()) {
            *a += b;
        }
        for (a, b) in self.untracked.iter_mut().zip(other.untracked.iter()) {
            *a += b;
        }
    }

    pub(crate) fn count_invalid(&mut self, r: Invalid) {
        if let Some(c) = self.invalid.get_mut(r.index()) {
            *c += 1;
        }
    }

    pub(crate) fn count_untracked(&mut self, r: Untracked) {
        if let Some(c) = self.untracked.get_mut(r.index()) {
            *c += 1;
        }
    }
}
