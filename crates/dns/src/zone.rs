//! One tenant's names: host names to IPv4 addresses and the reverse map.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// Longest name in presentation form without the trailing dot (RFC 1035: 255
/// octets on the wire).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;

/// Why a name or a domain cannot go into a [`Zone`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Nothing left once the trailing dot is removed.
    #[error("DNS name is empty; give a host name such as \"vm1\"")]
    Empty,
    /// The name, with the zone's domain appended, is over 253 characters.
    #[error(
        "DNS name {name:?} is longer than {max} characters with the domain; use a shorter name"
    )]
    TooLong {
        /// The name as given.
        name: String,
        /// The limit it broke.
        max: usize,
    },
    /// A label is empty (`a..b`, `.a`) or longer than 63 characters.
    #[error("DNS name {name:?} has an empty label or a label over 63 characters; use labels of 1-63 characters separated by single dots")]
    BadLabel {
        /// The name as given.
        name: String,
    },
    /// A character outside `A-Z a-z 0-9 - _` and the dots between labels.
    #[error("DNS name {name:?} has the character {ch:?}; use only A-Z a-z 0-9 - _ and dots between labels")]
    BadChar {
        /// The name as given.
        name: String,
        /// The first character that is not allowed.
        ch: char,
    },
    /// The name is the zone's domain itself, or falls under `arpa`, which the
    /// responder keeps for reverse lookups.
    #[error("DNS name {name:?} is the zone's domain or under \"arpa\"; give a host name inside the domain")]
    Reserved {
        /// The name as given.
        name: String,
    },
    /// The zone holds [`Zone::MAX_ENTRIES`] name/address pairs already.
    #[error("DNS zone is full ({max} name/address pairs); remove stale names first")]
    Full {
        /// The cap.
        max: usize,
    },
}

/// The names of one tenant network: `name -> {IPv4}` and `IPv4 -> {name}`.
///
/// Names are stored relative to the zone's domain, lowercased and without a
/// trailing dot: inserting `VM1`, `vm1.` or `vm1.acme.internal` (in a zone for
/// `acme.internal`) stores `vm1`. A name may have several addresses and an
/// address several names (a port name and a DHCP host name, say); the caller
/// decides whether a DHCP host name may shadow a port name (see
/// [`Zone::addrs_of`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Zone {
    /// Lowercase, no trailing dot.
    domain: Option<String>,
    /// Relative lowercase name -> its addresses (never an empty set).
    names: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    /// Address -> relative lowercase names (never an empty set).
    addrs: BTreeMap<Ipv4Addr, BTreeSet<String>>,
    /// Proper suffixes of multi-label names (`1` for `web.1`) -> how many
    /// names have them: these exist in the DNS tree without records (empty
    /// non-terminals), so they answer NODATA, not NXDOMAIN (RFC 8020).
    parents: BTreeMap<String, usize>,
    /// Number of name/address pairs.
    entries: usize,
}

/// What a question's name is in a zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup<'z> {
    /// A host name with these addresses.
    Host(&'z BTreeSet<Ipv4Addr>),
    /// A reverse name (`d.c.b.a.in-addr.arpa`) of an address with these
    /// names (relative, see [`Zone::fqdn`]).
    Reverse(&'z BTreeSet<String>),
    /// A name in the zone without records: the domain apex or an empty
    /// non-terminal.
    NoData,
    /// Under the zone's domain but not there.
    NxDomain,
    /// Not ours to answer.
    Refused,
}

impl Zone {
    /// Most name/address pairs a zone holds: DHCP host names come from VMs,
    /// so the table has a cap.
    pub const MAX_ENTRIES: usize = 65_536;

    /// An empty zone. With a domain (`acme.internal`), names also resolve as
    /// `name.acme.internal` and unknown names under the domain get NXDOMAIN.
    pub fn new(domain: Option<&str>) -> Result<Zone, NameError> {
        let domain = match domain {
            None => None,
            Some(d) => {
                let d = normalize(d)?;
                if d.len() > MAX_NAME_LEN - 2 {
                    // Leave room for at least a one-character host label.
                    return Err(NameError::TooLong {
                        name: d,
                        max: MAX_NAME_LEN - 2,
                    });
                }
                Some(d)
            }
        };
        Ok(Zone {
            domain,
            ..Zone::default()
        })
    }

    /// The zone's domain, lowercase and without the trailing dot.
    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    /// Add `name -> ip` (and `ip -> name`). Adding a pair that is there
    /// already is a no-op.
    pub fn insert(&mut self, name: &str, ip: Ipv4Addr) -> Result<(), NameError> {
        let rel = self.relative(name)?;
        let addrs = self.names.get(&rel);
        if addrs.is_some_and(|a| a.contains(&ip)) {
            return Ok(());
        }
        if self.entries >= Self::MAX_ENTRIES {
            return Err(NameError::Full {
                max: Self::MAX_ENTRIES,
            });
        }
        if addrs.is_none() {
            for parent in proper_suffixes(&rel) {
                *self.parents.entry(parent.to_owned()).or_insert(0) += 1;
            }
        }
        self.names.entry(rel.clone()).or_default().insert(ip);
        self.addrs.entry(ip).or_default().insert(rel);
        self.entries += 1;
        Ok(())
    }

    /// Remove `name -> ip`; true if it was there.
    pub fn remove(&mut self, name: &str, ip: Ipv4Addr) -> bool {
        let Ok(rel) = self.relative(name) else {
            return false;
        };
        self.remove_pair(&rel, ip)
    }

    /// Remove every name of `ip` (a port or a lease went away).
    pub fn remove_ip(&mut self, ip: Ipv4Addr) {
        let Some(names) = self.addrs.get(&ip).cloned() else {
            return;
        };
        for rel in &names {
            self.remove_pair(rel, ip);
        }
    }

    /// The addresses of `name` (relative or under the zone's domain,
    /// any case); empty if unknown or invalid.
    pub fn addrs_of(&self, name: &str) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let set = self
            .relative(name)
            .ok()
            .and_then(|rel| self.names.get(&rel));
        set.into_iter().flatten().copied()
    }

    /// The names of `ip`, relative to the zone's domain, lowercase.
    pub fn names_of(&self, ip: Ipv4Addr) -> impl Iterator<Item = &str> + '_ {
        self.addrs
            .get(&ip)
            .into_iter()
            .flatten()
            .map(String::as_str)
    }

    /// Number of name/address pairs.
    pub fn len(&self) -> usize {
        self.entries
    }

    /// True if the zone has no names.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// `rel` as a fully qualified name without the trailing dot:
    /// `vm1.acme.internal`, or `vm1` in a zone without a domain.
    pub(crate) fn fqdn(&self, rel: &str) -> String {
        match &self.domain {
            Some(d) => format!("{rel}.{d}"),
            None => rel.to_owned(),
        }
    }

    /// Classify a question's name, given as its wire labels (any case, any
    /// bytes: the input is hostile).
    pub(crate) fn lookup(&self, labels: &[&[u8]]) -> Lookup<'_> {
        if let [.., in_addr, arpa] = labels {
            if arpa.eq_ignore_ascii_case(b"arpa") {
                if !in_addr.eq_ignore_ascii_case(b"in-addr") {
                    return Lookup::Refused;
                }
                return match reverse_ip(labels) {
                    Some(ip) => self.addrs.get(&ip).map_or(Lookup::Refused, Lookup::Reverse),
                    None => Lookup::Refused,
                };
            }
        }
        // Lowercased labels; None where a label cannot be in the zone.
        let lower: Vec<Option<String>> = labels.iter().map(|l| label_key(l)).collect();
        let key = |part: &[Option<String>]| -> Option<String> {
            let mut out = String::new();
            for l in part {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(l.as_deref()?);
            }
            Some(out)
        };
        if let Some(addrs) = key(&lower).and_then(|k| self.names.get(&k)) {
            return Lookup::Host(addrs);
        }
        let Some(domain) = &self.domain else {
            return Lookup::Refused;
        };
        let dlabels: Vec<&str> = domain.split('.').collect();
        let Some(split) = lower.len().checked_sub(dlabels.len()) else {
            return Lookup::Refused;
        };
        let (host, suffix) = lower.split_at(split);
        let in_domain = suffix
            .iter()
            .zip(&dlabels)
            .all(|(l, d)| l.as_deref() == Some(*d));
        if !in_domain {
            return Lookup::Refused;
        }
        if host.is_empty() {
            return Lookup::NoData;
        }
        match key(host) {
            Some(k) => match self.names.get(&k) {
                Some(addrs) => Lookup::Host(addrs),
                None if self.parents.contains_key(&k) => Lookup::NoData,
                None => Lookup::NxDomain,
            },
            None => Lookup::NxDomain,
        }
    }

    fn remove_pair(&mut self, rel: &str, ip: Ipv4Addr) -> bool {
        let Some(addrs) = self.names.get_mut(rel) else {
            return false;
        };
        if !addrs.remove(&ip) {
            return false;
        }
        if addrs.is_empty() {
            self.names.remove(rel);
            for parent in proper_suffixes(rel) {
                if let Some(n) = self.parents.get_mut(parent) {
                    *n -= 1;
                    if *n == 0 {
                        self.parents.remove(parent);
                    }
                }
            }
        }
        if let Some(names) = self.addrs.get_mut(&ip) {
            names.remove(rel);
            if names.is_empty() {
                self.addrs.remove(&ip);
            }
        }
        self.entries -= 1;
        true
    }

    /// `name` normalized and made relative to the domain.
    fn relative(&self, name: &str) -> Result<String, NameError> {
        let n = normalize(name)?;
        let rel = match &self.domain {
            Some(d) if n == *d => return Err(NameError::Reserved { name: name.into() }),
            Some(d) => match n.strip_suffix(d.as_str()) {
                Some(host) if host.ends_with('.') => host.trim_end_matches('.').to_owned(),
                _ => n,
            },
            None => n,
        };
        if rel == "arpa" || rel.ends_with(".arpa") {
            return Err(NameError::Reserved { name: name.into() });
        }
        let full = self.domain.as_ref().map_or(0, |d| d.len() + 1) + rel.len();
        if full > MAX_NAME_LEN {
            return Err(NameError::TooLong {
                name: name.into(),
                max: MAX_NAME_LEN,
            });
        }
        Ok(rel)
    }
}

/// Lowercase, without one trailing dot, checked against the label rules.
fn normalize(name: &str) -> Result<String, NameError> {
    let n = name.strip_suffix('.').unwrap_or(name);
    if n.is_empty() {
        return Err(NameError::Empty);
    }
    if let Some(ch) = n.chars().find(|&c| !(is_name_char(c) || c == '.')) {
        return Err(NameError::BadChar {
            name: name.into(),
            ch,
        });
    }
    if n.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            name: name.into(),
            max: MAX_NAME_LEN,
        });
    }
    if n.split('.')
        .any(|l| l.is_empty() || l.len() > MAX_LABEL_LEN)
    {
        return Err(NameError::BadLabel { name: name.into() });
    }
    Ok(n.to_ascii_lowercase())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// A wire label as it would be stored, or None if no stored name has it.
fn label_key(label: &[u8]) -> Option<String> {
    if label.is_empty()
        || label.len() > MAX_LABEL_LEN
        || !label.iter().all(|&b| is_name_char(char::from(b)))
    {
        return None;
    }
    Some(
        label
            .iter()
            .map(|b| char::from(b.to_ascii_lowercase()))
            .collect(),
    )
}

/// `web.1.x` -> `1.x`, `x`.
fn proper_suffixes(rel: &str) -> impl Iterator<Item = &str> {
    rel.match_indices('.').map(move |(i, _)| &rel[i + 1..])
}

/// `d.c.b.a.in-addr.arpa` -> `a.b.c.d`, with the in-addr.arpa labels checked
/// by the caller.
fn reverse_ip(labels: &[&[u8]]) -> Option<Ipv4Addr> {
    let [d, c, b, a, _, _] = labels else {
        return None;
    };
    Some(Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?))
}

/// A decimal octet: 1-3 digits, at most 255, no leading zero.
fn octet(label: &[u8]) -> Option<u8> {
    if label.is_empty() || label.len() > 3 || (label.len() > 1 && label[0] == b'0') {
        return None;
    }
    let mut v: u16 = 0;
    for &b in label {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u16::from(b - b'0');
    }
    u8::try_from(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    fn labels(name: &str) -> Vec<&[u8]> {
        name.split('.')
            .filter(|l| !l.is_empty())
            .map(str::as_bytes)
            .collect()
    }

    #[test]
    fn insert_normalizes_and_dedups() -> Result<(), NameError> {
        let mut z = Zone::new(Some("Acme.Internal."))?;
        assert_eq!(z.domain(), Some("acme.internal"));
        z.insert("VM1", ip("10.0.0.5"))?;
        z.insert("vm1.", ip("10.0.0.5"))?;
        z.insert("vm1.ACME.internal", ip("10.0.0.5"))?;
        assert_eq!(z.len(), 1);
        assert_eq!(
            z.addrs_of("vm1.acme.internal.").collect::<Vec<_>>(),
            [ip("10.0.0.5")]
        );
        assert_eq!(z.names_of(ip("10.0.0.5")).collect::<Vec<_>>(), ["vm1"]);
        Ok(())
    }

    #[test]
    fn bad_names_are_rejected() -> Result<(), NameError> {
        let mut z = Zone::new(Some("acme.internal"))?;
        let a = ip("10.0.0.5");
        assert_eq!(z.insert("", a), Err(NameError::Empty));
        assert_eq!(z.insert(".", a), Err(NameError::Empty));
        assert!(matches!(
            z.insert("a..b", a),
            Err(NameError::BadLabel { .. })
        ));
        assert!(matches!(
            z.insert("vm 1", a),
            Err(NameError::BadChar { ch: ' ', .. })
        ));
        assert!(matches!(z.insert("vé", a), Err(NameError::BadChar { .. })));
        assert!(matches!(
            z.insert(&"a".repeat(64), a),
            Err(NameError::BadLabel { .. })
        ));
        let long = vec!["a".repeat(60); 4].join(".");
        assert!(matches!(z.insert(&long, a), Err(NameError::TooLong { .. })));
        assert!(matches!(
            z.insert("acme.internal", a),
            Err(NameError::Reserved { .. })
        ));
        assert!(matches!(
            z.insert("5.0.0.10.in-addr.arpa", a),
            Err(NameError::Reserved { .. })
        ));
        assert!(z.is_empty());
        assert!(Zone::new(Some("bad domain")).is_err());
        assert!(Zone::new(Some("")).is_err());
        Ok(())
    }

    #[test]
    fn remove_ip_drops_all_its_names() -> Result<(), NameError> {
        let mut z = Zone::new(None)?;
        z.insert("vm1", ip("10.0.0.5"))?;
        z.insert("web", ip("10.0.0.5"))?;
        z.insert("web", ip("10.0.0.6"))?;
        assert_eq!(z.len(), 3);
        z.remove_ip(ip("10.0.0.5"));
        assert_eq!(z.len(), 1);
        assert_eq!(z.addrs_of("vm1").count(), 0);
        assert_eq!(z.addrs_of("web").collect::<Vec<_>>(), [ip("10.0.0.6")]);
        assert!(z.remove("WEB", ip("10.0.0.6")));
        assert!(!z.remove("web", ip("10.0.0.6")));
        assert!(z.is_empty());
        assert_eq!(z, Zone::new(None)?);
        Ok(())
    }

    #[test]
    fn lookup_classifies_names() -> Result<(), NameError> {
        let mut z = Zone::new(Some("acme.internal"))?;
        z.insert("vm1", ip("10.0.0.5"))?;
        z.insert("web.1", ip("10.0.0.6"))?;
        assert!(matches!(z.lookup(&labels("VM1")), Lookup::Host(_)));
        assert!(matches!(
            z.lookup(&labels("vm1.acme.INTERNAL")),
            Lookup::Host(_)
        ));
        assert!(matches!(
            z.lookup(&labels("web.1.acme.internal")),
            Lookup::Host(_)
        ));
        assert_eq!(z.lookup(&labels("1.acme.internal")), Lookup::NoData);
        assert_eq!(z.lookup(&labels("acme.internal")), Lookup::NoData);
        assert_eq!(z.lookup(&labels("vm2.acme.internal")), Lookup::NxDomain);
        assert_eq!(z.lookup(&[b"a.b", b"acme", b"internal"]), Lookup::NxDomain);
        assert_eq!(z.lookup(&labels("vm2")), Lookup::Refused);
        assert_eq!(z.lookup(&labels("internal")), Lookup::Refused);
        assert_eq!(z.lookup(&labels("example.com")), Lookup::Refused);
        assert_eq!(z.lookup(&[]), Lookup::Refused);
        assert!(matches!(
            z.lookup(&labels("5.0.0.10.in-addr.arpa")),
            Lookup::Reverse(_)
        ));
        assert!(matches!(
            z.lookup(&labels("5.0.0.10.IN-ADDR.ARPA")),
            Lookup::Reverse(_)
        ));
        assert_eq!(z.lookup(&labels("7.0.0.10.in-addr.arpa")), Lookup::Refused);
        assert_eq!(z.lookup(&labels("05.0.0.10.in-addr.arpa")), Lookup::Refused);
        assert_eq!(z.lookup(&labels("0.0.10.in-addr.arpa")), Lookup::Refused);
        assert_eq!(z.lookup(&labels("5.0.0.10.ip6.arpa")), Lookup::Refused);
        z.remove_ip(ip("10.0.0.6"));
        assert_eq!(z.lookup(&labels("1.acme.internal")), Lookup::NxDomain);
        Ok(())
    }

    #[test]
    fn octets() {
        assert_eq!(octet(b"0"), Some(0));
        assert_eq!(octet(b"255"), Some(255));
        assert_eq!(octet(b"256"), None);
        assert_eq!(octet(b"999"), None);
        assert_eq!(octet(b"1a"), None);
        assert_eq!(octet(b""), None);
        assert_eq!(octet(b"0001"), None);
    }
}
