//! Rule validation, display, and the lookup index built from a rule set.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

use packet::flow::proto;

use crate::{FloatingIp, MappingKind, PortForward, Proto, Rules, Snat, EXTERNAL_ZONE};

/// Why a rule set is refused. Every message names the rule and says what
/// to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    /// The conntrack configuration is invalid (conntrack's message).
    #[error("{0}")]
    Invalid(String),
    /// The SNAT port range is empty or starts at 0.
    #[error("SNAT port range {lo}-{hi} is empty or includes port 0: give a range lo-hi with 1 <= lo <= hi (default 1024-65535)")]
    EmptyPortRange {
        /// First port.
        lo: u16,
        /// Last port.
        hi: u16,
    },
    /// A tenant rule names the external zone.
    #[error(
        "{rule}: zone {EXTERNAL_ZONE} is the external (uplink) zone; use the tenant's own zone id"
    )]
    ExternalZone {
        /// The rule.
        rule: String,
    },
    /// An external address that cannot be one host's address.
    #[error("{rule}: external address {addr} is not a unicast address; use an address of the uplink network")]
    NotUnicast {
        /// The rule.
        rule: String,
        /// The address.
        addr: Ipv4Addr,
    },
    /// A port forward with port 0.
    #[error("{rule}: port 0 cannot be forwarded; give both ports (1-65535)")]
    ZeroPort {
        /// The rule.
        rule: String,
    },
    /// A floating IP that is also an SNAT address.
    #[error("{floating}: {addr} is also the address of `{snat}`; a floating IP needs an address of its own (inbound traffic to it goes to one VM)")]
    FloatingIsSnat {
        /// The floating IP rule.
        floating: String,
        /// The SNAT rule.
        snat: String,
        /// The address.
        addr: Ipv4Addr,
    },
    /// Two floating IPs with the same external address.
    #[error("{second}: {addr} is already the floating IP of `{first}`; give each floating IP its own address")]
    DuplicateFloating {
        /// The first rule.
        first: String,
        /// The second rule.
        second: String,
        /// The address.
        addr: Ipv4Addr,
    },
    /// Two floating IPs for the same inside address of a zone.
    #[error("{second}: zone {zone} address {inside} already has a floating IP (`{first}`); an inside address gets at most one")]
    DuplicateFloatingInside {
        /// The first rule.
        first: String,
        /// The second rule.
        second: String,
        /// Zone.
        zone: u32,
        /// Inside address.
        inside: Ipv4Addr,
    },
    /// Two port forwards of the same external address, port and protocol.
    #[error("{second}: {external} ({proto}) is already forwarded by `{first}`; remove one or use another external port")]
    DuplicateForward {
        /// The first rule.
        first: String,
        /// The second rule.
        second: String,
        /// Protocol.
        proto: &'static str,
        /// External address and port.
        external: SocketAddrV4,
    },
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => proto::TCP,
            Proto::Udp => proto::UDP,
        }
    }

    /// `"tcp"` / `"udp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Snat {
    /// `snat zone 7 10.0.1.0/24 -> 203.0.113.2`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "snat zone {} {} -> {}",
            self.zone, self.inside, self.external
        )
    }
}

impl fmt::Display for FloatingIp {
    /// `floating zone 7 10.0.1.11 <-> 203.0.113.10`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "floating zone {} {} <-> {}",
            self.zone, self.inside, self.external
        )
    }
}

impl fmt::Display for PortForward {
    /// `forward tcp 203.0.113.2:8080 -> zone 7 10.0.1.11:80`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "forward {} {} -> zone {} {}",
            self.proto.as_str(),
            self.external,
            self.zone,
            self.inside
        )
    }
}

fn unicast(a: Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_broadcast() || a.is_multicast())
}

/// Checks a rule set; the first problem found.
pub(crate) fn validate(r: &Rules) -> Result<(), RulesError> {
    let (lo, hi) = r.ports;
    if lo == 0 || lo > hi {
        return Err(RulesError::EmptyPortRange { lo, hi });
    }
    let tenant = |zone: u32, rule: String, ext: Ipv4Addr| {
        if zone == EXTERNAL_ZONE {
            Err(RulesError::ExternalZone { rule })
        } else if !unicast(ext) {
            Err(RulesError::NotUnicast { rule, addr: ext })
        } else {
            Ok(())
        }
    };
    for s in &r.snat {
        tenant(s.zone, s.to_string(), s.external)?;
    }
    let mut by_ext: HashMap<Ipv4Addr, &FloatingIp> = HashMap::new();
    let mut by_inside: HashMap<(u32, Ipv4Addr), &FloatingIp> = HashMap::new();
    for f in &r.floating {
        tenant(f.zone, f.to_string(), f.external)?;
        if let Some(s) = r.snat.iter().find(|s| s.external == f.external) {
            return Err(RulesError::FloatingIsSnat {
                floating: f.to_string(),
                snat: s.to_string(),
                addr: f.external,
            });
        }
        if let Some(first) = by_ext.insert(f.external, f) {
            return Err(RulesError::DuplicateFloating {
                first: first.to_string(),
                second: f.to_string(),
                addr: f.external,
            });
        }
        if let Some(first) = by_inside.insert((f.zone, f.inside), f) {
            return Err(RulesError::DuplicateFloatingInside {
                first: first.to_string(),
                second: f.to_string(),
                zone: f.zone,
                inside: f.inside,
            });
        }
    }
    let mut fwd: HashMap<(SocketAddrV4, Proto), &PortForward> = HashMap::new();
    for p in &r.forwards {
        tenant(p.zone, p.to_string(), *p.external.ip())?;
        if p.external.port() == 0 || p.inside.port() == 0 {
            return Err(RulesError::ZeroPort {
                rule: p.to_string(),
            });
        }
        if let Some(first) = fwd.insert((p.external, p.proto), p) {
            return Err(RulesError::DuplicateForward {
                first: first.to_string(),
                second: p.to_string(),
                proto: p.proto.as_str(),
                external: p.external,
            });
        }
    }
    Ok(())
}

/// What a new connection's first packet gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choice {
    /// From a tenant: leave with source `external`.
    Out {
        kind: MappingKind,
        external: Ipv4Addr,
    },
    /// From outside: go to `to` (and `port`, for a forward) in `zone`.
    In {
        kind: MappingKind,
        zone: u32,
        to: Ipv4Addr,
        port: Option<u16>,
    },
}

/// Hash lookups over a validated rule set (SNAT rules stay a list: they
/// are few, and the first match wins).
#[derive(Debug, Default)]
pub(crate) struct Index {
    owned: HashSet<Ipv4Addr>,
    floating_out: HashMap<(u32, Ipv4Addr), Ipv4Addr>,
    floating_in: HashMap<Ipv4Addr, (u32, Ipv4Addr)>,
    forwards: HashMap<(Ipv4Addr, u8, u16), (u32, SocketAddrV4)>,
}

impl Index {
    pub(crate) fn build(r: &Rules) -> Index {
        let mut ix = Index::default();
        ix.owned.extend(r.snat.iter().map(|s| s.external));
        ix.owned.extend(r.floating.iter().map(|f| f.external));
        ix.owned.extend(r.forwards.iter().map(|f| *f.external.ip()));
        for f in &r.floating {
            ix.floating_out.insert((f.zone, f.inside), f.external);
            ix.floating_in.insert(f.external, (f.zone, f.inside));
        }
        for p in &r.forwards {
            ix.forwards.insert(
                (*p.external.ip(), p.proto.number(), p.external.port()),
                (p.zone, p.inside),
            );
        }
        ix
    }

    /// Port-forward ports per (external address, protocol).
    pub(crate) fn reserved(&self) -> HashMap<(Ipv4Addr, u8), Vec<u16>> {
        let mut m: HashMap<(Ipv4Addr, u8), Vec<u16>> = HashMap::new();
        for &(ip, p, port) in self.forwards.keys() {
            m.entry((ip, p)).or_default().push(port);
        }
        m
    }

    pub(crate) fn owned(&self) -> &HashSet<Ipv4Addr> {
        &self.owned
    }

    pub(crate) fn owns(&self, ip: Ipv4Addr) -> bool {
        self.owned.contains(&ip)
    }

    /// The rule for a new connection from tenant `zone` with source `src`.
    pub(crate) fn outbound(&self, r: &Rules, zone: u32, src: Ipv4Addr) -> Option<Choice> {
        if zone == EXTERNAL_ZONE {
            return None;
        }
        if let Some(&external) = self.floating_out.get(&(zone, src)) {
            return Some(Choice::Out {
                kind: MappingKind::FloatingOut,
                external,
            });
        }
        r.snat
            .iter()
            .find(|s| s.zone == zone && s.inside.contains(&src))
            .map(|s| Choice::Out {
                kind: MappingKind::Snat,
                external: s.external,
            })
    }

    /// The rule for a new connection from outside to `dst`:`dport`
    /// (`dport` only for TCP and UDP).
    pub(crate) fn inbound(&self, dst: Ipv4Addr, proto: u8, dport: Option<u16>) -> Option<Choice> {
        if let Some(&(zone, inside)) = dport.and_then(|p| self.forwards.get(&(dst, proto, p))) {
            return Some(Choice::In {
                kind: MappingKind::Forward,
                zone,
                to: *inside.ip(),
                port: Some(inside.port()),
            });
        }
        self.floating_in.get(&dst).map(|&(zone, to)| Choice::In {
            kind: MappingKind::FloatingIn,
            zone,
            to,
            port: None,
        })
    }
}
