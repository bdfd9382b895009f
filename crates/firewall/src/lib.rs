//! Security groups for vswitch, as a sans-IO library.
//!
//! A security group is a named allow-list of rules; a port has some
//! groups; a packet is allowed in a direction if any rule of any of the
//! port's groups for that direction matches it. Statefulness (replies,
//! related ICMP errors, established traffic skipping the rules) is the
//! caller's, through `conntrack`: this crate only answers "which rule, if
//! any, allows this new connection".
//!
//! # How a caller uses it
//!
//! ```
//! use std::collections::HashMap;
//! use std::net::IpAddr;
//! use firewall::{Direction, Family, Firewall, GroupSpec, Packet, Proto, Remote, RuleRef, RuleSpec};
//!
//! let web = GroupSpec {
//!     name: "web".into(),
//!     rules: vec![RuleSpec {
//!         direction: Direction::Ingress,
//!         family: Family::V4,
//!         proto: Proto::Tcp,
//!         ports: Some((443, 443)),
//!         icmp_type: None,
//!         icmp_code: None,
//!         remote: Remote::Group("lb".into()),
//!     }],
//! };
//! let lb = GroupSpec { name: "lb".into(), rules: vec![] };
//! let lb_addr: IpAddr = "10.0.0.5".parse().unwrap();
//! let members = HashMap::from([("lb".to_string(), vec![lb_addr])]);
//! let fw = Firewall::compile(&[web, lb], &members).unwrap();
//!
//! // A new connection to a port in group "web" (the caller's conntrack
//! // said New; `Packet::from_flow` builds this from a parsed frame).
//! let port_groups = [fw.group_id("web").unwrap()];
//! let syn = Packet { family: Family::V4, proto: 6, remote: lb_addr, dst_port: 443, icmp: None };
//! let allowed = fw.evaluate(&port_groups, Direction::Ingress, &syn);
//! assert_eq!(allowed, Some(RuleRef { group: 0, rule: 0 }));
//! assert_eq!(fw.hits(RuleRef { group: 0, rule: 0 }), 1);
//! let other = Packet { remote: "10.0.0.6".parse().unwrap(), ..syn };
//! assert_eq!(fw.evaluate(&port_groups, Direction::Ingress, &other), None);
//!
//! // Membership changed: recompile off the data path, keep the counters.
//! let fw2 = Firewall::compile_with_previous(fw.groups(), &HashMap::new(), Some(&fw)).unwrap();
//! assert_eq!(fw2.hits(RuleRef { group: 0, rule: 0 }), 1);
//! assert_eq!(fw2.evaluate(&port_groups, Direction::Ingress, &syn), None);
//! ```
//!
//! # Design
//!
//! [`Firewall::compile`] validates a tenant's [`GroupSpec`]s and compiles
//! each (group, direction, family) into a tuple-space classifier, the
//! scheme of Open vSwitch's classifier (lib/classifier.c, after
//! Srinivasan et al., "Packet Classification Using Tuple Space Search"):
//!
//! * A rule is a value and a mask over three packet fields: the IP
//!   protocol (fixed, or wildcarded by [`Proto::Any`]), the remote address
//!   (a prefix; `/0` for [`Remote::Any`], a host route for each member of a
//!   [`Remote::Group`], resolved at compile time) and a 17-bit port field
//!   (TCP/UDP destination port, or ICMP `type << 8 | code` plus a "header
//!   present" bit, so an ICMP rule with a type never matches a packet whose
//!   ICMP header was not parsed).
//! * A port range becomes the fewest aligned power-of-two blocks (at most
//!   30), each a (value, mask) pair; an ICMP rule fixes type and code, the
//!   type only (mask `0x1ff00`), or nothing.
//! * Entries with the same mask triple (shape) share a *tuple*: a hash
//!   table from the masked key to the lowest rule index with that key.
//! * A lookup masks the packet with each tuple's shape and probes its table
//!   once. Tuples are probed in order of their lowest rule index, and the
//!   probe stops as soon as the best match so far is below the next
//!   tuple's lowest index, so "first matching rule" costs no more than
//!   "any matching rule".
//! * Small tables are scanned instead: when a table has few predicates
//!   (rules; a remote-group rule once per member) per tuple, testing them
//!   in rule order is cheaper than probing (a realistic 10-rule set has 16
//!   shapes). [`CompileOptions`] holds the cost model and its bound.
//!
//! The first rule that allows a packet is the one in the lowest position of
//! the port's group list, then the lowest index in that group; it gets a
//! hit on its counter (relaxed atomics, readable at any time with
//! [`Firewall::hits`] and [`Firewall::rule_hits`], carried over a
//! recompile for unchanged rules by [`Firewall::compile_with_previous`]).
//!
//! [`evaluate_linear`] is the same policy evaluated rule by rule over the
//! specs: the reference the classifier is tested against (differential
//! property tests, both search methods), and the baseline of the benchmark.
//!
//! # Complexity
//!
//! * Lookup: per group of the port, one hash probe per tuple of its
//!   (direction, family), stopping early on a match; or, for a small
//!   table, at most [`CompileOptions::scan_max`] predicate tests. The
//!   number of tuples is the number of distinct shapes, bounded by prefix
//!   lengths (33 or 129) times port-field masks (18: the 17 block sizes of
//!   a range and "any"; ICMP's masks are among them) times 2 (protocol
//!   fixed or not) and in practice a few dozen at
//!   most (30 for 10,000 random rules with /32, /24 and /16 remotes and
//!   random ranges): it does not grow with the number of rules. Measured:
//!   about 150-180 ns per packet at 1,000 and 10,000 rules, against 27-29 us
//!   for the rule-by-rule reference at 10,000. No allocation, no locks.
//! * Compile: linear in the number of entries (rules times port blocks
//!   times remote-group members of the rule's family).
//! * Memory: about 24-60 bytes per entry (24-byte entries in `HashMap`s at
//!   their load factor), capped by [`MAX_ENTRIES`]; [`MAX_RULES`],
//!   [`MAX_MEMBERS`] and [`MAX_GROUPS`] bound the input. Exceeding a cap is
//!   a [`CompileError`], never a truncation.
//!
//! # What it is not
//!
//! * Not stateful: replies and related traffic are `conntrack`'s.
//! * No deny rules and no priorities: allow-lists, with first-match order
//!   only to attribute hits.
//! * Not incremental: a rule or membership change means a recompile (the
//!   caller builds a new `Firewall` off the data path and swaps it in).
//! * No source-port, TCP-flag, fragment or L2 matching: later fragments and
//!   broken L4 headers reach the rules with port 0 and no ICMP fields (see
//!   [`Packet::from_flow`]); deciding what to do with them is the caller's.
//! * No conjunctive matches: a remote-group rule with a port range costs
//!   members x blocks entries (OVS's `conjunction` would avoid that), which
//!   [`MAX_ENTRIES`] bounds.

#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

mod linear;
mod tuple;

pub use linear::evaluate_linear;

use tuple::{Table, TableBuilder, FIELD_MAX, ICMP_PRESENT};

/// Most rules over all groups of one [`Firewall`].
pub const MAX_RULES: usize = 100_000;
/// Most member addresses of a group referenced as a [`Remote::Group`].
pub const MAX_MEMBERS: usize = 1_000_000;
/// Most groups in one [`Firewall`].
pub const MAX_GROUPS: usize = 100_000;
/// Most classifier entries (rules x port blocks x remote-group members) of
/// one [`Firewall`]: about 50-120 MB at the cap.
pub const MAX_ENTRIES: usize = 2_000_000;

/// IANA protocol numbers the rules name.
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// Which way a packet crosses the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Toward the VM (rules match the packet's source as remote).
    Ingress,
    /// From the VM (rules match the packet's destination as remote).
    Egress,
}

/// IP family a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// Address width in bits.
    fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

/// Protocol a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// Every IP protocol (ports and ICMP fields are not looked at).
    Any,
    /// TCP, optionally a destination port range.
    Tcp,
    /// UDP, optionally a destination port range.
    Udp,
    /// ICMP (IPv4), optionally a type and code.
    Icmp,
    /// ICMPv6, optionally a type and code.
    Icmpv6,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Any => "any",
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Icmpv6 => "icmpv6",
        })
    }
}

/// Who the other end of the packet may be.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Remote {
    /// Any address of the rule's family.
    Any,
    /// Addresses in a prefix (host bits, if any, are ignored).
    Cidr(IpNet),
    /// The current addresses of a group's member ports (those of the
    /// rule's family).
    Group(String),
}

/// One allow rule as configured.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RuleSpec {
    /// Ingress or egress.
    pub direction: Direction,
    /// IPv4 or IPv6.
    pub family: Family,
    /// Protocol.
    pub proto: Proto,
    /// TCP/UDP destination port range, inclusive (`None`: all ports).
    /// Port 0 is a port like any other (later fragments carry it, see
    /// [`Packet::from_flow`]).
    pub ports: Option<(u16, u16)>,
    /// ICMP/ICMPv6 type (`None`: all types).
    pub icmp_type: Option<u8>,
    /// ICMP/ICMPv6 code (`None`: all codes; needs a type).
    pub icmp_code: Option<u8>,
    /// The other end.
    pub remote: Remote,
}

impl fmt::Display for RuleSpec {
    /// `ingress tcp 80 from 10.0.0.0/24`, `egress any to any`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (dir, way) = match self.direction {
            Direction::Ingress => ("ingress", "from"),
            Direction::Egress => ("egress", "to"),
        };
        write!(f, "{dir} {} {}", self.family, self.proto)?;
        match self.ports {
            Some((a, b)) if a == b => write!(f, " {a}")?,
            Some((a, b)) => write!(f, " {a}-{b}")?,
            None => {}
        }
        if let Some(t) = self.icmp_type {
            write!(f, " type {t}")?;
        }
        if let Some(c) = self.icmp_code {
            write!(f, " code {c}")?;
        }
        match &self.remote {
            Remote::Any => write!(f, " {way} any"),
            Remote::Cidr(n) => write!(f, " {way} {n}"),
            Remote::Group(g) => write!(f, " {way} group {g}"),
        }
    }
}

/// A security group as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSpec {
    /// Name, unique in its tenant.
    pub name: String,
    /// Allow rules, in file order (rule numbers start at 1).
    pub rules: Vec<RuleSpec>,
}

/// A group's index in a compiled [`Firewall`] (its position in the slice
/// given to [`Firewall::compile`]).
pub type GroupId = u32;

/// Which rule allowed a packet: group and rule index (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RuleRef {
    /// Group.
    pub group: GroupId,
    /// Rule index within the group.
    pub rule: u32,
}

/// What a rule is matched against: one direction's view of a packet.
///
/// `remote` must be of `family`; a packet where it is not (only possible
/// when built by hand) is allowed by no rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// IP family.
    pub family: Family,
    /// IP protocol number.
    pub proto: u8,
    /// The other end (source for ingress, destination for egress).
    pub remote: IpAddr,
    /// TCP/UDP destination port (0 otherwise).
    pub dst_port: u16,
    /// ICMP/ICMPv6 type and code (for ICMP only).
    pub icmp: Option<(u8, u8)>,
}

impl Packet {
    /// The view of a parsed frame in `dir`, or `None` when the frame is not
    /// IP (security groups do not judge ARP and the like) or its IP header
    /// did not parse.
    ///
    /// `proto` is the IPv4 protocol or the IPv6 next header after the
    /// extension headers. When the L4 header is absent (a later fragment)
    /// or broken (`key.malformed` says which), the packet still comes back,
    /// with `dst_port` 0 and `icmp` `None`: rules that ignore ports and ICMP
    /// fields, and port ranges that include 0, can match it. The switch
    /// drops malformed frames before the firewall, so this is a definition
    /// rather than a path the data plane takes.
    pub fn from_flow(key: &packet::FlowKey, dir: Direction) -> Option<Packet> {
        let (family, ip) = match &key.l3 {
            packet::L3::Ipv4(ip) => (Family::V4, ip),
            packet::L3::Ipv6(ip) => (Family::V6, ip),
            _ => return None,
        };
        let remote = match dir {
            Direction::Ingress => ip.src,
            Direction::Egress => ip.dst,
        };
        let (dst_port, icmp) = match key.l4 {
            packet::L4::Tcp { dst_port, .. } | packet::L4::Udp { dst_port, .. } => (dst_port, None),
            packet::L4::Icmpv4 { ty, code, .. } | packet::L4::Icmpv6 { ty, code, .. } => {
                (0, Some((ty, code)))
            }
            packet::L4::None => (0, None),
        };
        Some(Packet {
            family,
            proto: ip.proto,
            remote,
            dst_port,
            icmp,
        })
    }

    /// The remote address as classifier bits and the port field, or `None`
    /// when `remote` is not of `family`.
    #[inline]
    fn fields(&self) -> Option<(u128, u32)> {
        let remote = match (self.family, self.remote) {
            (Family::V4, IpAddr::V4(a)) => u128::from(u32::from(a)),
            (Family::V6, IpAddr::V6(a)) => u128::from(a),
            _ => return None,
        };
        let field = match self.proto {
            TCP | UDP => u32::from(self.dst_port),
            ICMP | ICMPV6 => self.icmp.map_or(0, |(t, c)| {
                ICMP_PRESENT | (u32::from(t) << 8) | u32::from(c)
            }),
            _ => 0,
        };
        Some((remote, field))
    }
}

/// Why a group set does not compile. Rule numbers are 1-based, as in the
/// configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// Two groups share a name.
    #[error("security group {group:?} is defined twice; merge the two or rename one")]
    DuplicateGroup {
        /// The name.
        group: String,
    },
    /// `icmp_code` without `icmp_type`.
    #[error("security group {group:?}, rule {rule}: icmp_code needs an icmp_type; add icmp_type or remove icmp_code")]
    IcmpCodeWithoutType {
        /// Group name.
        group: String,
        /// Rule number (1-based).
        rule: usize,
    },
    /// `ports` on a rule that is not TCP or UDP.
    #[error("security group {group:?}, rule {rule}: ports need proto tcp or udp, not {proto}; remove ports or change proto")]
    PortsNeedTcpUdp {
        /// Group name.
        group: String,
        /// Rule number (1-based).
        rule: usize,
        /// The rule's protocol.
        proto: Proto,
    },
    /// `icmp_type`/`icmp_code` on a rule that is not ICMP or ICMPv6.
    #[error("security group {group:?}, rule {rule}: icmp_type and icmp_code need proto icmp or icmpv6, not {proto}; remove them or change proto")]
    IcmpFieldsNeedIcmp {
        /// Group name.
        group: String,
        /// Rule number (1-based).
        rule: usize,
        /// The rule's protocol.
        proto: Proto,
    },
    /// A port range whose start is above its end.
    #[error(
        "security group {group:?}, rule {rule}: port range {lo}-{hi} is inverted; write {hi}-{lo}"
    )]
    InvertedPortRange {
        /// Group name.
        group: String,
        /// Rule number (1-based).
        rule: usize,
        /// Start as given.
        lo: u16,
        /// End as given.
        hi: u16,
    },
    /// ICMP with IPv6 or ICMPv6 with IPv4: the rule could never match.
    #[error("security group {group:?}, rule {rule}: proto {proto} does not exist in {family}; use icmp with ipv4 and icmpv6 with ipv6")]
    ProtoFamily {
        /// Group name.
        group: String,
        /// Rule number (1-based).
        rule: usize,
        /// The rule's protocol.
        proto: Proto,
        /// The rule's family.
        family: Family,
    },
    /// A CIDR remote of the other family than the rule's.
    #[error("security group {group:?}, rule {rule}: remote {cidr} is not an {family} prefix; use an {family} prefix or change the rule's family")]
    CidrFamily {
        /// Group name.
        group: String,
        /// Rule number (1-based).
        rule: usize,
        /// The prefix.
        cidr: IpNet,
        /// The rule's family.
        family: Family,
    },
    /// A remote group that is not among the compiled groups.
    #[error("security group {group:?}, rule {rule}: remote group {remote:?} is not a security group of this set; define it or fix the name")]
    UnknownRemoteGroup {
        /// Group name.
        group: String,
        /// Rule number (1-based).
        rule: usize,
        /// The missing group.
        remote: String,
    },
    /// More than [`MAX_GROUPS`] groups.
    #[error("{count} security groups, over the limit of {limit}; merge groups")]
    TooManyGroups {
        /// Groups given.
        count: usize,
        /// [`MAX_GROUPS`].
        limit: usize,
    },
    /// More than [`MAX_RULES`] rules over all groups.
    #[error("security group {group:?}, rule {rule}: more than {limit} rules in total; merge rules (wider prefixes, port ranges, remote groups)")]
    TooManyRules {
        /// Group of the first rule over the limit.
        group: String,
        /// Its number (1-based).
        rule: usize,
        /// [`MAX_RULES`].
        limit: usize,
    },
    /// A remote group with more than [`MAX_MEMBERS`] addresses.
    #[error("security group {group:?}, rule {rule}: remote group {remote:?} has {count} member addresses, over the limit of {limit}; use a CIDR remote")]
    TooManyMembers {
        /// Group name.
        group: String,
        /// Rule number (1-based).
        rule: usize,
        /// The remote group.
        remote: String,
        /// Its member addresses.
        count: usize,
        /// [`MAX_MEMBERS`].
        limit: usize,
    },
    /// The compiled classifier would exceed [`MAX_ENTRIES`].
    #[error("security group {group:?}, rule {rule}: the rules compile to more than {limit} classifier entries (port range blocks x remote group members); use CIDR remotes instead of large remote groups, or fewer, power-of-two aligned port ranges")]
    TooManyEntries {
        /// Group of the rule that crossed the limit.
        group: String,
        /// Its number (1-based).
        rule: usize,
        /// [`MAX_ENTRIES`].
        limit: usize,
    },
}

/// Tuning of [`Firewall::compile_with`]: when a (group, direction, family)
/// table is scanned rule by rule instead of searched by tuples. The
/// defaults suit the data path; tests and benchmarks use the knobs to force
/// one method.
///
/// Measured (benches/classify.rs, one core of the 2-core bench machine): a
/// tuple probe costs about 5 ns, a predicate test under 1 ns. Realistic
/// rule mixes spread 10 rules over 16 shapes and 64 over about 25, where a
/// scan is 3-4x faster; 64 rules of one shape (1 tuple) are the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompileOptions {
    /// Never scan more than this many predicates (rules, a remote-group
    /// rule counting once per member of its family), so the scan's worst
    /// case stays bounded. 0: always tuples.
    pub scan_max: usize,
    /// Scan only when predicates <= this times the number of tuples (the
    /// cost ratio of a probe to a predicate test). `usize::MAX`: whenever
    /// `scan_max` allows.
    pub scan_per_tuple: usize,
}

impl Default for CompileOptions {
    fn default() -> CompileOptions {
        CompileOptions {
            scan_max: 128,
            scan_per_tuple: 6,
        }
    }
}

/// Size of a compiled [`Firewall`], for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Groups.
    pub groups: usize,
    /// Rules over all groups.
    pub rules: usize,
    /// Tuples over all (group, direction, family) tables.
    pub tuples: usize,
    /// Predicates of the tables that are scanned rather than searched by
    /// tuples.
    pub scanned: usize,
    /// The most tuples of one table: the most hash probes one group costs.
    pub max_tuples: usize,
    /// Hash entries of the tuples.
    pub entries: usize,
}

/// Index of the table of (direction, family) in a group's four.
#[inline]
fn slot(dir: Direction, family: Family) -> usize {
    let d = match dir {
        Direction::Ingress => 0,
        Direction::Egress => 2,
    };
    d + match family {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

/// Compiled security groups of one tenant, with per-rule hit counters.
///
/// `Send + Sync`: lookups take `&self` (counters are atomics), so one
/// compiled set is shared by every worker.
#[derive(Default)]
pub struct Firewall {
    groups: Vec<GroupSpec>,
    names: HashMap<String, GroupId>,
    /// Per group, the tables of [`slot`].
    tables: Vec<[Table; 4]>,
    /// Per group, the index in `hits` of its rule 0.
    rule_base: Vec<usize>,
    hits: Box<[AtomicU64]>,
}

impl fmt::Debug for Firewall {
    // The tables can hold millions of entries: show their size only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Firewall")
            .field(
                "groups",
                &self.groups.iter().map(|g| &g.name).collect::<Vec<_>>(),
            )
            .field("stats", &self.stats())
            .finish()
    }
}

impl Firewall {
    /// Compiles `groups`; `members` gives each group's member addresses
    /// (for rules with [`Remote::Group`]; a group missing from `members`
    /// has none). Hit counters start at 0.
    pub fn compile(
        groups: &[GroupSpec],
        members: &HashMap<String, Vec<IpAddr>>,
    ) -> Result<Firewall, CompileError> {
        Firewall::compile_with_previous(groups, members, None)
    }

    /// [`Firewall::compile`], then each rule starts with the hit count of
    /// an equal rule (same group name, same [`RuleSpec`]) of `prev`: the
    /// first equal one not already taken, so duplicates keep their counts
    /// in order. Rules that are new or changed start at 0.
    pub fn compile_with_previous(
        groups: &[GroupSpec],
        members: &HashMap<String, Vec<IpAddr>>,
        prev: Option<&Firewall>,
    ) -> Result<Firewall, CompileError> {
        Firewall::compile_with(groups, members, prev, &CompileOptions::default())
    }

    /// [`Firewall::compile_with_previous`] with explicit tuning.
    pub fn compile_with(
        groups: &[GroupSpec],
        members: &HashMap<String, Vec<IpAddr>>,
        prev: Option<&Firewall>,
        opts: &CompileOptions,
    ) -> Result<Firewall, CompileError> {
        let names = validate(groups)?;
        let mut tables = Vec::with_capacity(groups.len());
        let mut rule_base = Vec::with_capacity(groups.len());
        let mut entries = 0usize;
        let mut total_rules = 0usize;
        let mut blocks = Vec::with_capacity(32);
        for g in groups {
            rule_base.push(total_rules);
            total_rules += g.rules.len();
            let mut builders: [TableBuilder; 4] = std::array::from_fn(|_| TableBuilder::new(opts));
            for (i, r) in g.rules.iter().enumerate() {
                // `validate` capped the rule count, so `i` fits.
                let idx = u32::try_from(i).unwrap_or(u32::MAX);
                let b = &mut builders[slot(r.direction, r.family)];
                compile_rule(g, i, idx, r, members, b, &mut blocks, &mut entries)?;
            }
            tables.push(builders.map(TableBuilder::finish));
        }
        let hits: Box<[AtomicU64]> = (0..total_rules).map(|_| AtomicU64::new(0)).collect();
        let fw = Firewall {
            groups: groups.to_vec(),
            names,
            tables,
            rule_base,
            hits,
        };
        if let Some(prev) = prev {
            fw.carry_hits(prev);
        }
        Ok(fw)
    }

    fn carry_hits(&self, prev: &Firewall) {
        let mut pool: HashMap<(&str, &RuleSpec), VecDeque<u64>> = HashMap::new();
        for (r, n) in prev.rule_hits() {
            if let Some(spec) = prev.rule(r) {
                let name = prev.group_name(r.group).unwrap_or_default();
                pool.entry((name, spec)).or_default().push_back(n);
            }
        }
        for (g, spec) in self.groups.iter().enumerate() {
            let base = self.rule_base.get(g).copied().unwrap_or(0);
            for (i, r) in spec.rules.iter().enumerate() {
                let carried = pool
                    .get_mut(&(spec.name.as_str(), r))
                    .and_then(VecDeque::pop_front);
                if let (Some(n), Some(c)) = (carried, self.hits.get(base + i)) {
                    c.store(n, Ordering::Relaxed);
                }
            }
        }
    }

    /// The id of group `name`.
    pub fn group_id(&self, name: &str) -> Option<GroupId> {
        self.names.get(name).copied()
    }

    /// The name of group `id`.
    pub fn group_name(&self, id: GroupId) -> Option<&str> {
        self.groups.get(id as usize).map(|g| g.name.as_str())
    }

    /// The groups as compiled (ids are positions).
    pub fn groups(&self) -> &[GroupSpec] {
        &self.groups
    }

    /// The spec of a rule.
    pub fn rule(&self, r: RuleRef) -> Option<&RuleSpec> {
        self.groups
            .get(r.group as usize)?
            .rules
            .get(r.rule as usize)
    }

    /// The first rule (lowest position in `groups`, then lowest rule index)
    /// of `groups` that allows `pkt` in `dir`, counting a hit on it; `None`
    /// when no rule allows it. Ids that are not groups of this firewall are
    /// skipped.
    #[inline]
    pub fn evaluate(&self, groups: &[GroupId], dir: Direction, pkt: &Packet) -> Option<RuleRef> {
        let r = self.classify(groups, dir, pkt)?;
        if let Some(c) = self.counter(r) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        Some(r)
    }

    /// [`Firewall::evaluate`] without counting the hit (a packet trace
    /// asks what would match).
    pub fn classify(&self, groups: &[GroupId], dir: Direction, pkt: &Packet) -> Option<RuleRef> {
        let (remote, field) = pkt.fields()?;
        let s = slot(dir, pkt.family);
        for &g in groups {
            let Some(t) = self.tables.get(g as usize).and_then(|t| t.get(s)) else {
                continue;
            };
            if let Some(rule) = t.lookup(pkt.proto, remote, field) {
                return Some(RuleRef { group: g, rule });
            }
        }
        None
    }

    fn counter(&self, r: RuleRef) -> Option<&AtomicU64> {
        let base = *self.rule_base.get(r.group as usize)?;
        if r.rule as usize >= self.groups.get(r.group as usize)?.rules.len() {
            return None;
        }
        self.hits.get(base + r.rule as usize)
    }

    /// Packets [`Firewall::evaluate`] attributed to rule `r` (0 for a rule
    /// that does not exist).
    pub fn hits(&self, r: RuleRef) -> u64 {
        self.counter(r).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Every rule with its hit count, by group then rule index.
    pub fn rule_hits(&self) -> impl Iterator<Item = (RuleRef, u64)> + '_ {
        self.groups.iter().enumerate().flat_map(move |(g, spec)| {
            let group = GroupId::try_from(g).unwrap_or(GroupId::MAX);
            (0..spec.rules.len()).filter_map(move |i| {
                let r = RuleRef {
                    group,
                    rule: u32::try_from(i).ok()?,
                };
                Some((r, self.hits(r)))
            })
        })
    }

    /// Size of the compiled classifier.
    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            groups: self.groups.len(),
            rules: self.hits.len(),
            ..Stats::default()
        };
        for t in self.tables.iter().flatten() {
            s.tuples += t.tuples();
            s.scanned += t.scanned();
            s.max_tuples = s.max_tuples.max(t.tuples());
            s.entries += t.entries();
        }
        s
    }
}

fn too_many_entries(g: &GroupSpec, i: usize) -> CompileError {
    CompileError::TooManyEntries {
        group: g.name.clone(),
        rule: i + 1,
        limit: MAX_ENTRIES,
    }
}

/// Checks every rule (all but member counts and entry totals, which
/// compilation checks as it expands) and indexes the names.
fn validate(groups: &[GroupSpec]) -> Result<HashMap<String, GroupId>, CompileError> {
    if groups.len() > MAX_GROUPS {
        return Err(CompileError::TooManyGroups {
            count: groups.len(),
            limit: MAX_GROUPS,
        });
    }
    let mut names = HashMap::with_capacity(groups.len());
    for (id, g) in groups.iter().enumerate() {
        let id = GroupId::try_from(id).unwrap_or(GroupId::MAX);
        if names.insert(g.name.clone(), id).is_some() {
            return Err(CompileError::DuplicateGroup {
                group: g.name.clone(),
            });
        }
    }
    let mut total = 0usize;
    for g in groups {
        for (i, r) in g.rules.iter().enumerate() {
            total += 1;
            if total > MAX_RULES {
                return Err(CompileError::TooManyRules {
                    group: g.name.clone(),
                    rule: i + 1,
                    limit: MAX_RULES,
                });
            }
            validate_rule(g, i, r, &names)?;
        }
    }
    Ok(names)
}

fn validate_rule(
    g: &GroupSpec,
    i: usize,
    r: &RuleSpec,
    names: &HashMap<String, GroupId>,
) -> Result<(), CompileError> {
    let group = || g.name.clone();
    let rule = i + 1;
    match (r.proto, r.family) {
        (Proto::Icmp, Family::V6) | (Proto::Icmpv6, Family::V4) => {
            return Err(CompileError::ProtoFamily {
                group: group(),
                rule,
                proto: r.proto,
                family: r.family,
            })
        }
        _ => {}
    }
    let tcp_udp = matches!(r.proto, Proto::Tcp | Proto::Udp);
    let icmp = matches!(r.proto, Proto::Icmp | Proto::Icmpv6);
    if r.ports.is_some() && !tcp_udp {
        return Err(CompileError::PortsNeedTcpUdp {
            group: group(),
            rule,
            proto: r.proto,
        });
    }
    if (r.icmp_type.is_some() || r.icmp_code.is_some()) && !icmp {
        return Err(CompileError::IcmpFieldsNeedIcmp {
            group: group(),
            rule,
            proto: r.proto,
        });
    }
    if r.icmp_code.is_some() && r.icmp_type.is_none() {
        return Err(CompileError::IcmpCodeWithoutType {
            group: group(),
            rule,
        });
    }
    if let Some((lo, hi)) = r.ports {
        if lo > hi {
            return Err(CompileError::InvertedPortRange {
                group: group(),
                rule,
                lo,
                hi,
            });
        }
    }
    match &r.remote {
        Remote::Any => {}
        Remote::Cidr(net) => {
            if Family::of(&net.addr()) != r.family {
                return Err(CompileError::CidrFamily {
                    group: group(),
                    rule,
                    cidr: *net,
                    family: r.family,
                });
            }
        }
        Remote::Group(name) => {
            if !names.contains_key(name) {
                return Err(CompileError::UnknownRemoteGroup {
                    group: group(),
                    rule,
                    remote: name.clone(),
                });
            }
        }
    }
    Ok(())
}

/// An address as classifier bits, if it is of `family`.
fn addr_bits(addr: &IpAddr, family: Family) -> Option<u128> {
    match (addr, family) {
        (IpAddr::V4(a), Family::V4) => Some(u128::from(u32::from(*a))),
        (IpAddr::V6(a), Family::V6) => Some(u128::from(*a)),
        _ => None,
    }
}

/// The protocol value and mask of a rule.
fn proto_match(p: Proto) -> (u8, u8) {
    match p {
        Proto::Any => (0, 0),
        Proto::Tcp => (TCP, 0xff),
        Proto::Udp => (UDP, 0xff),
        Proto::Icmp => (ICMP, 0xff),
        Proto::Icmpv6 => (ICMPV6, 0xff),
    }
}

/// The range of the port field a (validated) rule allows.
fn field_range(r: &RuleSpec) -> (u32, u32) {
    match (r.proto, r.ports, r.icmp_type, r.icmp_code) {
        // 0-65535 is "all ports": the same shape as no range.
        (Proto::Tcp | Proto::Udp, Some((0, u16::MAX)), _, _) => (0, FIELD_MAX),
        (Proto::Tcp | Proto::Udp, Some((lo, hi)), _, _) => (u32::from(lo), u32::from(hi)),
        (Proto::Icmp | Proto::Icmpv6, _, Some(t), c) => {
            let v = ICMP_PRESENT | (u32::from(t) << 8);
            match c {
                Some(c) => (v | u32::from(c), v | u32::from(c)),
                None => (v, v | 0xff),
            }
        }
        _ => (0, FIELD_MAX),
    }
}

/// Adds rule `i` (validated) of group `g` to `b`.
#[allow(clippy::too_many_arguments)]
fn compile_rule(
    g: &GroupSpec,
    i: usize,
    idx: u32,
    r: &RuleSpec,
    members: &HashMap<String, Vec<IpAddr>>,
    b: &mut TableBuilder,
    blocks: &mut Vec<(u32, u32)>,
    entries: &mut usize,
) -> Result<(), CompileError> {
    let (proto, proto_mask) = proto_match(r.proto);
    let range = field_range(r);
    blocks.clear();
    tuple::field_blocks(range.0, range.1, blocks);
    let bits = r.family.bits();
    let empty = Vec::new();
    let (hosts, prefix): (&[IpAddr], Option<(u128, u8)>) = match &r.remote {
        Remote::Any => (&[], Some((0, 0))),
        Remote::Cidr(net) => {
            let a = addr_bits(&net.addr(), r.family).unwrap_or(0);
            (&[], Some((a, net.prefix_len())))
        }
        Remote::Group(name) => {
            let m = members.get(name).unwrap_or(&empty);
            if m.len() > MAX_MEMBERS {
                return Err(CompileError::TooManyMembers {
                    group: g.name.clone(),
                    rule: i + 1,
                    remote: name.clone(),
                    count: m.len(),
                    limit: MAX_MEMBERS,
                });
            }
            (m.as_slice(), None)
        }
    };
    // Check the cap before inserting so a rejected set never allocates
    // past it. Members of the other family are counted too: an upper bound.
    let remotes = if prefix.is_some() { 1 } else { hosts.len() };
    *entries = entries.saturating_add(remotes.saturating_mul(blocks.len()));
    if *entries > MAX_ENTRIES {
        return Err(too_many_entries(g, i));
    }
    match prefix {
        Some((a, plen)) => {
            let mask = tuple::prefix_mask(bits, plen);
            b.add(idx, proto, proto_mask, a, mask, range, blocks);
        }
        None => {
            let mask = tuple::prefix_mask(bits, bits);
            for a in hosts.iter().filter_map(|h| addr_bits(h, r.family)) {
                b.add(idx, proto, proto_mask, a, mask, range, blocks);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
