//! Security groups in the config: `[[tenant.security_group]]` with
//! `[[tenant.security_group.rule]]` entries, and the groups a port names
//! (`security_groups = [...]`). Validated into `firewall::GroupSpec`s per
//! tenant; the `firewall` crate compiles them.
//!
//! Enforcement is per tenant: a tenant that defines at least one security
//! group has every port with port security filtered, and a port that names
//! no group gets the default (no inbound, all outbound, as AWS). A tenant
//! without security groups is not filtered (and pays no conntrack).

use std::collections::HashSet;

use ipnet::IpNet;
use serde::Deserialize;

use super::{Config, Port, Validator};

/// Default tracked connections per port (security groups), beyond which
/// new connections of that port are dropped (`conn_limit`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;

/// The implicit group of ports that name none.
pub const DEFAULT_GROUP: &str = "default";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroup {
    name: String,
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    direction: String,
    proto: Option<String>,
    ports: Option<String>,
    icmp_type: Option<u8>,
    icmp_code: Option<u8>,
    remote: Option<String>,
    remote_group: Option<String>,
    family: Option<String>,
}

/// A tenant's security group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityGroupCfg {
    /// Tenant.
    pub tenant: String,
    /// The group.
    pub spec: firewall::GroupSpec,
}

impl Config {
    /// Whether `tenant` filters its ports with security groups.
    pub fn tenant_filters(&self, tenant: &str) -> bool {
        self.security_groups.iter().any(|g| g.tenant == tenant)
    }

    /// Whether port `p` is filtered by security groups.
    pub fn port_filtered(&self, p: &Port) -> bool {
        p.port_security && self.tenant_filters(&p.tenant)
    }

    /// The groups of `tenant`, plus the implicit default group (all
    /// outbound, no inbound) ports without groups get.
    pub fn tenant_groups(&self, tenant: &str) -> Vec<firewall::GroupSpec> {
        let mut out: Vec<firewall::GroupSpec> = self
            .security_groups
            .iter()
            .filter(|g| g.tenant == tenant)
            .map(|g| g.spec.clone())
            .collect();
        if !out.iter().any(|g| g.name == DEFAULT_GROUP) {
            let all = |family| firewall::RuleSpec {
                direction: firewall::Direction::Egress,
                family,
                proto: firewall::Proto::Any,
                ports: None,
                icmp_type: None,
                icmp_code: None,
                remote: firewall::Remote::Any,
            };
            out.push(firewall::GroupSpec {
                name: DEFAULT_GROUP.to_string(),
                rules: vec![all(firewall::Family::V4), all(firewall::Family::V6)],
            });
        }
        out
    }

    /// The groups port `p` is in (the default group when it names none).
    pub fn port_groups(&self, p: &Port) -> Vec<String> {
        if p.security_groups.is_empty() {
            vec![DEFAULT_GROUP.to_string()]
        } else {
            p.security_groups.clone()
        }
    }

    /// Member addresses of each of `tenant`'s groups: the configured
    /// addresses of its ports on every host, plus `leased` addresses of
    /// this host's ports (by port name).
    pub fn group_members(
        &self,
        tenant: &str,
        leased: &dyn Fn(&Port) -> Vec<std::net::IpAddr>,
    ) -> std::collections::HashMap<String, Vec<std::net::IpAddr>> {
        let mut m: std::collections::HashMap<String, Vec<std::net::IpAddr>> =
            std::collections::HashMap::new();
        for p in self.ports.iter().filter(|p| p.tenant == tenant) {
            let mut addrs: Vec<std::net::IpAddr> = p.ip.into_iter().collect();
            addrs.extend(leased(p));
            addrs.sort();
            addrs.dedup();
            for g in self.port_groups(p) {
                m.entry(g).or_default().extend(addrs.iter().copied());
            }
        }
        m
    }
}

fn parse_ports(s: &str) -> Option<(u16, u16)> {
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let p = s.trim().parse().ok()?;
            (p, p)
        }
    };
    (a <= b).then_some((a, b))
}

impl Validator {
    /// A tenant's `[[tenant.security_group]]` entries.
    pub(super) fn security_groups(
        &mut self,
        tenant: &str,
        raw: Vec<RawGroup>,
    ) -> Vec<SecurityGroupCfg> {
        let mut out: Vec<SecurityGroupCfg> = Vec::new();
        let names: HashSet<String> = raw.iter().map(|g| g.name.clone()).collect();
        for g in &raw {
            let gitem = format!("tenant {tenant:?}, security_group {:?}", g.name);
            super::check_name(self, &gitem, "security group name", &g.name, 32);
            if out.iter().any(|o| o.spec.name == g.name) {
                self.problem(
                    &gitem,
                    "the group is defined twice in this tenant; merge or rename one",
                );
                continue;
            }
            let mut rules = Vec::new();
            for (i, r) in g.rule.iter().enumerate() {
                let item = format!("{gitem}, rule {}", i + 1);
                if let Some(rule) = self.rule(&item, r, &names) {
                    rules.push(rule);
                }
            }
            out.push(SecurityGroupCfg {
                tenant: tenant.to_string(),
                spec: firewall::GroupSpec {
                    name: g.name.clone(),
                    rules,
                },
            });
        }
        out
    }

    fn rule(
        &mut self,
        item: &str,
        r: &RawRule,
        groups: &HashSet<String>,
    ) -> Option<firewall::RuleSpec> {
        use firewall::{Direction, Family, Proto, Remote};
        let direction = match r.direction.as_str() {
            "ingress" => Direction::Ingress,
            "egress" => Direction::Egress,
            d => {
                self.problem(
                    item,
                    format!("direction {d:?} is not \"ingress\" or \"egress\""),
                );
                return None;
            }
        };
        let proto = match r.proto.as_deref().unwrap_or("any") {
            "any" => Proto::Any,
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "icmp" => Proto::Icmp,
            "icmpv6" => Proto::Icmpv6,
            p => {
                self.problem(
                    item,
                    format!("proto {p:?} is not one of tcp, udp, icmp, icmpv6, any"),
                );
                return None;
            }
        };
        let ports = match &r.ports {
            None => None,
            Some(_) if !matches!(proto, Proto::Tcp | Proto::Udp) => {
                self.problem(
                    item,
                    "ports needs proto \"tcp\" or \"udp\"; remove ports or set proto",
                );
                return None;
            }
            Some(s) => match parse_ports(s) {
                Some(r) => Some(r),
                None => {
                    self.problem(item, format!("ports {s:?} is not a port or range with start <= end; write \"80\" or \"8000-8100\""));
                    return None;
                }
            },
        };
        if (r.icmp_type.is_some() || r.icmp_code.is_some())
            && !matches!(proto, Proto::Icmp | Proto::Icmpv6)
        {
            self.problem(
                item,
                "icmp_type and icmp_code need proto \"icmp\" or \"icmpv6\"",
            );
            return None;
        }
        if r.icmp_code.is_some() && r.icmp_type.is_none() {
            self.problem(
                item,
                "icmp_code needs an icmp_type; add icmp_type or remove icmp_code",
            );
            return None;
        }
        let remote = match (&r.remote, &r.remote_group) {
            (Some(_), Some(_)) => {
                self.problem(item, "remote and remote_group are both set; a rule has one remote, split it into two rules");
                return None;
            }
            (Some(c), None) => match c.parse::<IpNet>() {
                Ok(n) if n.trunc() == n => Remote::Cidr(n),
                Ok(n) => {
                    self.problem(
                        item,
                        format!("remote {n} has host bits set; did you mean {}?", n.trunc()),
                    );
                    return None;
                }
                Err(_) => {
                    self.problem(item, format!("remote {c:?} is not a prefix; write it like \"10.0.0.0/8\" or \"::/0\""));
                    return None;
                }
            },
            (None, Some(g)) if groups.contains(g) => Remote::Group(g.clone()),
            (None, Some(g)) => {
                self.problem(item, format!("remote_group {g:?} is not a security group of this tenant; define it or fix the name"));
                return None;
            }
            (None, None) => Remote::Any,
        };
        let implied = match (&remote, proto) {
            (Remote::Cidr(IpNet::V6(_)), _) | (_, Proto::Icmpv6) => Some(Family::V6),
            (Remote::Cidr(IpNet::V4(_)), _) | (_, Proto::Icmp) => Some(Family::V4),
            _ => None,
        };
        let family = match (r.family.as_deref(), implied) {
            (None, f) => f.unwrap_or(Family::V4),
            (Some("ipv4"), None | Some(Family::V4)) => Family::V4,
            (Some("ipv6"), None | Some(Family::V6)) => Family::V6,
            (Some(f @ ("ipv4" | "ipv6")), Some(_)) => {
                self.problem(
                    item,
                    format!("family {f:?} contradicts the rule's remote or proto; remove family"),
                );
                return None;
            }
            (Some(f), _) => {
                self.problem(item, format!("family {f:?} is not \"ipv4\" or \"ipv6\""));
                return None;
            }
        };
        if let (Family::V4, Proto::Icmpv6) | (Family::V6, Proto::Icmp) = (family, proto) {
            self.problem(
                item,
                "icmp is IPv4's and icmpv6 IPv6's; use the protocol of the rule's family",
            );
            return None;
        }
        Some(firewall::RuleSpec {
            direction,
            family,
            proto,
            ports,
            icmp_type: r.icmp_type,
            icmp_code: r.icmp_code,
            remote,
        })
    }
}
