//! Table limits and idle timeouts, with validation against the NAT
//! behavioural RFCs.

use serde::{Deserialize, Serialize};

/// Nanoseconds per second.
pub(crate) const NS: u64 = 1_000_000_000;

/// Longest timeout accepted: 7 days (keeps `now + timeout` far from
/// overflow and catches unit mistakes such as milliseconds for seconds).
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// Largest `max_entries`: slot numbers are 31-bit in the key index.
pub const MAX_ENTRIES_LIMIT: usize = (u32::MAX >> 1) as usize;

/// Idle timeouts in seconds, one per timeout class. An entry expires when no
/// packet of it was seen for its class's timeout; every tracked packet
/// restarts the timer (both directions refresh, which RFC 4787 REQ-6 and
/// RFC 5382 allow).
///
/// Defaults and the floors [`Timeouts::validate`] enforces:
///
/// | field | default | floor | why |
/// |---|---|---|---|
/// | `udp_unreplied_secs` | 120 | 120 | RFC 4787 REQ-5: a UDP mapping timer MUST NOT expire in less than 2 min; an unreplied flow is still a mapping (Linux's 30 s is not compliant) |
/// | `udp_assured_secs` | 300 | 120 | RFC 4787 REQ-5c recommends 5 min or more |
/// | `tcp_established_secs` | 7440 | 7440 | RFC 5382 REQ-5: established idle timeout MUST NOT be less than 2 h 4 min |
/// | `tcp_transitory_secs` | 240 | 240 | RFC 5382 REQ-5: transitory (partially open or closing: SYN_SENT, SYN_RECV, FIN_WAIT, CLOSE_WAIT, LAST_ACK) MUST NOT be less than 4 min |
/// | `tcp_time_wait_secs` | 120 | 1 | 2 MSL as in Linux; a SYN reopens a connection in TIME_WAIT anyway |
/// | `tcp_close_secs` | 240 | 1 | after an accepted RST; RFC 7857 section 2.2 asks NATs to hold a reset session for the 4 min transitory timeout (Linux: 10 s) |
/// | `icmp_secs` | 60 | 60 | RFC 5508 REQ-1: ICMP query mapping timeout MUST NOT be less than 60 s |
/// | `other_secs` | 600 | 1 | other IP protocols (GRE, ESP, SCTP, ...), as Linux's generic tracker |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// UDP flow that has seen no reply.
    pub udp_unreplied_secs: u64,
    /// UDP flow that has seen a reply.
    pub udp_assured_secs: u64,
    /// TCP ESTABLISHED.
    pub tcp_established_secs: u64,
    /// TCP SYN_SENT, SYN_RECV, FIN_WAIT, CLOSE_WAIT, LAST_ACK.
    pub tcp_transitory_secs: u64,
    /// TCP TIME_WAIT (both FINs acknowledged).
    pub tcp_time_wait_secs: u64,
    /// TCP CLOSE (after an accepted RST).
    pub tcp_close_secs: u64,
    /// ICMP / ICMPv6 query (echo, ...).
    pub icmp_secs: u64,
    /// Any other IP protocol.
    pub other_secs: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            udp_unreplied_secs: 120,
            udp_assured_secs: 300,
            tcp_established_secs: 7440,
            tcp_transitory_secs: 240,
            tcp_time_wait_secs: 120,
            tcp_close_secs: 240,
            icmp_secs: 60,
            other_secs: 600,
        }
    }
}

/// A configuration a user must fix; the message names the field, the rule
/// and what to set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A timeout below the floor the RFCs set.
    #[error(
        "conntrack timeouts.{field} = {secs} s is below {min} s ({rule}); set it to at least {min}"
    )]
    TimeoutTooShort {
        /// Field name.
        field: &'static str,
        /// Configured value.
        secs: u64,
        /// Floor.
        min: u64,
        /// Where the floor comes from.
        rule: &'static str,
    },
    /// A timeout above [`MAX_TIMEOUT_SECS`].
    #[error("conntrack timeouts.{field} = {secs} s is above the maximum {max} s (7 days); set a smaller value (seconds, not milliseconds)")]
    TimeoutTooLong {
        /// Field name.
        field: &'static str,
        /// Configured value.
        secs: u64,
        /// Ceiling.
        max: u64,
    },
    /// `max_entries` is 0 or above [`MAX_ENTRIES_LIMIT`].
    #[error("conntrack max_entries = {0} is out of range; set 1..={MAX_ENTRIES_LIMIT}")]
    MaxEntries(usize),
    /// `max_per_port` is 0.
    #[error("conntrack max_per_port = 0 would refuse every connection; set at least 1 (or max_entries for no per-port limit)")]
    MaxPerPortZero,
}

impl Timeouts {
    /// Every field with its floor and the rule behind it.
    fn fields(&self) -> [(&'static str, u64, u64, &'static str); 8] {
        [
            (
                "udp_unreplied_secs",
                self.udp_unreplied_secs,
                120,
                "RFC 4787 REQ-5",
            ),
            (
                "udp_assured_secs",
                self.udp_assured_secs,
                120,
                "RFC 4787 REQ-5",
            ),
            (
                "tcp_established_secs",
                self.tcp_established_secs,
                7440,
                "RFC 5382 REQ-5",
            ),
            (
                "tcp_transitory_secs",
                self.tcp_transitory_secs,
                240,
                "RFC 5382 REQ-5",
            ),
            (
                "tcp_time_wait_secs",
                self.tcp_time_wait_secs,
                1,
                "a timeout of 0 would drop the entry at once",
            ),
            (
                "tcp_close_secs",
                self.tcp_close_secs,
                1,
                "a timeout of 0 would drop the entry at once",
            ),
            ("icmp_secs", self.icmp_secs, 60, "RFC 5508 REQ-1"),
            (
                "other_secs",
                self.other_secs,
                1,
                "a timeout of 0 would drop the entry at once",
            ),
        ]
    }

    /// Checks every timeout against its floor (see the table on
    /// [`Timeouts`]) and [`MAX_TIMEOUT_SECS`]; the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, secs, min, rule) in self.fields() {
            if secs < min {
                return Err(ConfigError::TimeoutTooShort {
                    field,
                    secs,
                    min,
                    rule,
                });
            }
            if secs > MAX_TIMEOUT_SECS {
                return Err(ConfigError::TimeoutTooLong {
                    field,
                    secs,
                    max: MAX_TIMEOUT_SECS,
                });
            }
        }
        Ok(())
    }
}

/// Table configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Entries in the whole table (all zones and ports).
    pub max_entries: usize,
    /// Entries created by one port (the `port` given to `track`/`commit`).
    pub max_per_port: usize,
    /// Idle timeouts.
    pub timeouts: Timeouts,
}

impl Default for Config {
    /// 262,144 entries (Linux's `nf_conntrack_max` on a large host), 16,384
    /// per port, default timeouts.
    fn default() -> Self {
        Config {
            max_entries: 1 << 18,
            max_per_port: 1 << 14,
            timeouts: Timeouts::default(),
        }
    }
}

impl Config {
    /// Checks limits and timeouts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_entries == 0 || self.max_entries > MAX_ENTRIES_LIMIT {
            return Err(ConfigError::MaxEntries(self.max_entries));
        }
        if self.max_per_port == 0 {
            return Err(ConfigError::MaxPerPortZero);
        }
        self.timeouts.validate()
    }
}
