//! Load balancers in the config: `[[tenant.load_balancer]]` (a VIP, a
//! protocol and port, backends, a health check) and the networks'
//! `service_address` (where health checks and hairpinned connections come
//! from). Validated into [`LoadBalancerCfg`]s; `lb` runs them.
//!
//! A VIP inside a network of the tenant is internal: every host with a
//! port of the tenant balances the connections its VMs open (distributed,
//! as OVN's load balancers). A VIP on an uplink's subnet is external: the
//! host of that uplink balances what arrives from outside, so its backends
//! must live on that host (replies leave through its uplink).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use serde::Deserialize;

use super::{check_name, Config, Network, Port, Uplink, Validator};
use crate::config::FloatingIpCfg;

/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 1000;

/// `service_address`: one address, or one per host (multi-host configs).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawServiceAddress {
    One(String),
    PerHost(HashMap<String, String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLoadBalancer {
    name: String,
    vip: String,
    proto: Option<String>,
    port: i64,
    network: Option<String>,
    host: Option<String>,
    table_size: Option<u32>,
    #[serde(default)]
    backends: Vec<RawBackend>,
    health_check: Option<RawHealthCheck>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    port: Option<String>,
    address: Option<String>,
    to_port: Option<i64>,
    weight: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    #[serde(rename = "type")]
    kind: Option<String>,
    path: Option<String>,
    expected_status: Option<u16>,
    port: Option<i64>,
    interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
    rise: Option<u32>,
    fall: Option<u32>,
    initial: Option<String>,
}

/// One backend of a load balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendCfg {
    /// The port's name, or the address as written.
    pub name: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// The port connections go to.
    pub port: u16,
    /// Share of new connections (0: drained).
    pub weight: u32,
    /// Its host when it is a port of a multi-host config.
    pub host: Option<String>,
}

/// A validated `[[tenant.load_balancer]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadBalancerCfg {
    /// Tenant.
    pub tenant: String,
    /// Name, unique in the tenant.
    pub name: String,
    /// Stable id (CRC-32 of `tenant/name`): names its connections across
    /// reloads and restarts.
    pub id: u32,
    /// The VIP.
    pub vip: Ipv4Addr,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    /// The VIP's port.
    pub port: u16,
    /// The network of its backends and service address.
    pub network: String,
    /// The VIP is on an uplink's subnet.
    pub external: bool,
    /// For an external VIP, the host that balances it.
    pub host: Option<String>,
    /// Backends.
    pub backends: Vec<BackendCfg>,
    /// Table size and health check.
    pub pool: lb::PoolConfig,
}

impl LoadBalancerCfg {
    /// `"tcp"` or `"udp"`.
    pub fn proto_name(&self) -> &'static str {
        if self.proto == 17 {
            "udp"
        } else {
            "tcp"
        }
    }
}

impl Config {
    /// Whether this host balances `lb`: an internal VIP on every host
    /// with a port of the tenant, an external one on its uplink's host.
    pub fn runs_lb(&self, lb: &LoadBalancerCfg) -> bool {
        if lb.external {
            return self.local_host.is_none() || lb.host == self.local_host;
        }
        self.local_ports().any(|p| p.tenant == lb.tenant)
    }

    /// This host's service address in `net`, if it has one.
    pub fn local_service_address(&self, net: &Network) -> Option<Ipv4Addr> {
        net.service_addresses
            .iter()
            .find(|(h, _)| self.local_host.is_none() || *h == self.local_host)
            .map(|(_, a)| *a)
    }
}

impl Validator {
    /// A service address must not be a port's address.
    pub(super) fn service_address_owners(&mut self, networks: &[Network], ports: &[Port]) {
        for n in networks {
            for (_, a) in &n.service_addresses {
                if let Some(p) = ports.iter().find(|p| {
                    p.tenant == n.tenant && p.network == n.name && p.ip == Some(IpAddr::V4(*a))
                }) {
                    self.problem(
                        format!("tenant {:?}, network {:?}", n.tenant, n.name),
                        format!(
                            "service_address {a} is port {:?}'s address; pick a free one",
                            p.name
                        ),
                    );
                }
            }
        }
    }

    /// A network's `service_address`.
    pub(super) fn service_addresses(
        &mut self,
        item: &str,
        raw: Option<RawServiceAddress>,
        cidr: &IpNet,
        gateway: Option<IpAddr>,
        host_names: &[String],
    ) -> Vec<(Option<String>, Ipv4Addr)> {
        let Some(raw) = raw else { return Vec::new() };
        let IpNet::V4(net) = cidr else {
            self.problem(item, "service_address needs an IPv4 cidr");
            return Vec::new();
        };
        let entries: Vec<(Option<String>, String)> = match raw {
            RawServiceAddress::One(s) if host_names.is_empty() => vec![(None, s)],
            RawServiceAddress::One(_) => {
                self.problem(item, format!("the config has several hosts ({}): every host probes from its own address, so write service_address = {{ {} }}", host_names.join(", "), host_names.iter().map(|h| format!("{h} = \"10.0.1.N\"")).collect::<Vec<_>>().join(", ")));
                return Vec::new();
            }
            RawServiceAddress::PerHost(m) => {
                if host_names.is_empty() {
                    self.problem(item, "service_address is a table of hosts but the config has no [[host]] entries; write one address: service_address = \"10.0.1.2\"");
                    return Vec::new();
                }
                let mut v: Vec<(Option<String>, String)> =
                    m.into_iter().map(|(h, a)| (Some(h), a)).collect();
                v.sort();
                v
            }
        };
        let mut out: Vec<(Option<String>, Ipv4Addr)> = Vec::new();
        for (host, a) in entries {
            if let Some(h) = &host {
                if !host_names.contains(h) {
                    self.problem(item, format!("service_address names host {h:?}, which is not a [[host]] of the config ({})", host_names.join(", ")));
                    continue;
                }
            }
            let Ok(ip) = a.trim().parse::<Ipv4Addr>() else {
                self.problem(
                    item,
                    format!(
                        "service_address {a:?} is not an IPv4 address; write it like \"10.0.1.2\""
                    ),
                );
                continue;
            };
            if !net.contains(&ip)
                || (net.prefix_len() < 31 && (ip == net.network() || ip == net.broadcast()))
                || gateway == Some(IpAddr::V4(ip))
            {
                self.problem(item, format!("service_address {ip} must be a free host address of {} other than the gateway; pick another", net.trunc()));
                continue;
            }
            if out.iter().any(|(_, o)| *o == ip) {
                self.problem(
                    item,
                    format!("service_address {ip} is given to two hosts; each host needs its own"),
                );
                continue;
            }
            out.push((host, ip));
        }
        out
    }

    /// `[[tenant.load_balancer]]` of every tenant.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn load_balancers(
        &mut self,
        raw: Vec<(String, Vec<RawLoadBalancer>)>,
        networks: &[Network],
        ports: &[Port],
        hosts: &[String],
        uplinks: &[Uplink],
        floating: &[FloatingIpCfg],
    ) -> Vec<LoadBalancerCfg> {
        let mut out: Vec<LoadBalancerCfg> = Vec::new();
        for (tenant, lbs) in raw {
            for r in lbs {
                let item = format!("tenant {tenant:?}, load_balancer {:?}", r.name);
                if let Some(lb) =
                    self.load_balancer(&item, &tenant, r, networks, ports, hosts, uplinks, floating)
                {
                    if out.iter().any(|o| o.tenant == tenant && o.name == lb.name) {
                        self.problem(
                            &item,
                            "another load balancer of the tenant has this name; rename one",
                        );
                        continue;
                    }
                    if let Some(o) = out.iter().find(|o| {
                        o.vip == lb.vip
                            && o.proto == lb.proto
                            && o.port == lb.port
                            && (o.tenant == tenant || (o.external && lb.external))
                    }) {
                        self.problem(&item, format!("{} {}:{} is already load balancer {:?}'s VIP; a VIP address, protocol and port lead to one pool", lb.proto_name(), lb.vip, lb.port, o.name));
                        continue;
                    }
                    if let Some(o) = out.iter().find(|o| {
                        o.external && lb.external && o.vip == lb.vip && o.tenant != tenant
                    }) {
                        self.problem(&item, format!("external VIP {} belongs to tenant {:?}; an external address belongs to one tenant", lb.vip, o.tenant));
                        continue;
                    }
                    out.push(lb);
                }
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn load_balancer(
        &mut self,
        item: &str,
        tenant: &str,
        r: RawLoadBalancer,
        networks: &[Network],
        ports: &[Port],
        hosts: &[String],
        uplinks: &[Uplink],
        floating: &[FloatingIpCfg],
    ) -> Option<LoadBalancerCfg> {
        check_name(self, item, "load balancer name", &r.name, 32);
        let Ok(vip) = r.vip.trim().parse::<Ipv4Addr>() else {
            self.problem(
                item,
                format!(
                    "vip {:?} is not an IPv4 address; write it like \"10.0.1.100\"",
                    r.vip
                ),
            );
            return None;
        };
        let proto = match r.proto.as_deref().unwrap_or("tcp") {
            "tcp" => 6,
            "udp" => 17,
            p => {
                self.problem(item, format!("proto {p:?} is not \"tcp\" or \"udp\""));
                return None;
            }
        };
        let Ok(port) =
            u16::try_from(r.port)
                .map_err(|_| ())
                .and_then(|p| if p == 0 { Err(()) } else { Ok(p) })
        else {
            self.problem(item, format!("port {} is not a port; use 1-65535", r.port));
            return None;
        };
        let tenant_nets: Vec<&Network> = networks.iter().filter(|n| n.tenant == tenant).collect();
        let home = tenant_nets
            .iter()
            .find(|n| n.cidr.contains(&IpAddr::V4(vip)))
            .copied();
        let uplink = uplinks.iter().find(|u| u.addr.contains(&vip));
        let external = home.is_none() && uplink.is_some();
        if home.is_none() && uplink.is_none() {
            self.problem(item, format!("vip {vip} is in no network of the tenant and on no uplink's subnet; pick an address of a tenant network (internal VIP) or of an uplink's subnet (external VIP)"));
            return None;
        }
        let mut host = None;
        if let Some(n) = home {
            let IpNet::V4(c) = n.cidr else { return None };
            if vip == c.network() || vip == c.broadcast() || n.gateway == Some(IpAddr::V4(vip)) {
                self.problem(item, format!("vip {vip} is the network, broadcast or gateway address of network {:?}; pick a free address", n.name));
                return None;
            }
            if n.gateway.is_none() {
                self.problem(item, format!("network {:?} has no gateway; clients reach a VIP through the gateway, add gateway = \"...\"", n.name));
                return None;
            }
            if let Some(p) = ports
                .iter()
                .find(|p| p.tenant == tenant && p.ip == Some(IpAddr::V4(vip)))
            {
                self.problem(
                    item,
                    format!(
                        "vip {vip} is port {:?}'s address; pick a free address",
                        p.name
                    ),
                );
                return None;
            }
            if n.service_addresses.iter().any(|(_, a)| *a == vip) {
                self.problem(
                    item,
                    format!(
                        "vip {vip} is a service_address of network {:?}; pick another",
                        n.name
                    ),
                );
                return None;
            }
            if let Some(d) = &n.dhcp {
                if d.pools.iter().any(|(a, b)| (*a..=*b).contains(&vip)) {
                    self.problem(item, format!("vip {vip} is inside a DHCP pool of network {:?}, which could lease it to a VM; pick an address outside the pools", n.name));
                    return None;
                }
            }
        }
        if let (true, Some(u)) = (external, uplink) {
            if vip == u.ip()
                || Some(vip) == u.gateway
                || vip == u.addr.network()
                || vip == u.addr.broadcast()
            {
                self.problem(item, format!("vip {vip} is uplink {:?}'s address, gateway, network or broadcast address; pick a free address of {}", u.name, u.addr.trunc()));
                return None;
            }
            if let Some(f) = floating.iter().find(|f| f.address == vip) {
                self.problem(
                    item,
                    format!(
                        "vip {vip} is the floating IP of port {:?}; pick another",
                        f.port
                    ),
                );
                return None;
            }
            let candidates: Vec<&Uplink> =
                uplinks.iter().filter(|u| u.addr.contains(&vip)).collect();
            host = match (&r.host, candidates.len()) {
                (Some(h), _) => match candidates.iter().find(|u| u.host.as_ref() == Some(h)) {
                    Some(u) => u.host.clone(),
                    None => {
                        self.problem(item, format!("host {h:?} has no uplink whose subnet holds vip {vip}; set host to one that does"));
                        return None;
                    }
                },
                (None, 1) => u.host.clone(),
                (None, _) => {
                    let names: Vec<String> =
                        candidates.iter().filter_map(|u| u.host.clone()).collect();
                    self.problem(item, format!("vip {vip} is on the uplink subnet of several hosts ({}); say which host balances it with host = \"...\"", names.join(", ")));
                    return None;
                }
            };
        } else if r.host.is_some() {
            self.problem(item, "host is only for an external VIP (an internal one is balanced on every host with ports of the tenant); remove it");
            return None;
        }
        let net = match (&r.network, home) {
            (Some(name), _) => match tenant_nets.iter().find(|n| &n.name == name) {
                Some(n) => *n,
                None => {
                    self.problem(item, format!("network {name:?} is not a network of tenant {tenant:?}; set network to the backends' network"));
                    return None;
                }
            },
            (None, Some(n)) => n,
            (None, None) => {
                self.problem(item, "an external VIP needs network = \"...\": the tenant network its backends are in");
                return None;
            }
        };
        let IpNet::V4(net_cidr) = net.cidr else {
            self.problem(
                item,
                format!(
                    "network {:?} is not IPv4; load balancers are IPv4",
                    net.name
                ),
            );
            return None;
        };
        if net.gateway.is_none() {
            self.problem(item, format!("network {:?} has no gateway; the load balancer routes to its backends through it, add gateway = \"...\"", net.name));
            return None;
        }
        // Every host that balances the VIP probes from its own address.
        let balancing_hosts: Vec<Option<String>> = if external {
            vec![host.clone()]
        } else if hosts.is_empty() {
            vec![None]
        } else {
            let mut hs: Vec<Option<String>> = ports
                .iter()
                .filter(|p| p.tenant == tenant)
                .map(|p| p.host.clone())
                .collect();
            hs.sort();
            hs.dedup();
            hs
        };
        let missing: Vec<String> = balancing_hosts
            .iter()
            .filter(|h| !net.service_addresses.iter().any(|(sh, _)| sh == *h))
            .map(|h| h.clone().unwrap_or_else(|| "this host".into()))
            .collect();
        if !missing.is_empty() {
            let example = if hosts.is_empty() {
                "service_address = \"10.0.1.2\"".to_string()
            } else {
                format!(
                    "service_address = {{ {} }}",
                    missing
                        .iter()
                        .map(|h| format!("{h} = \"...\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            self.problem(item, format!("network {:?} needs a service_address for {} (health checks and hairpinned connections come from it); add {example} to the network with free addresses of {}", net.name, missing.join(", "), net_cidr.trunc()));
            return None;
        }
        if r.backends.is_empty() {
            self.problem(
                item,
                "the load balancer has no backends; add backends = [{ port = \"vm1\" }, ...]",
            );
            return None;
        }
        let mut backends: Vec<BackendCfg> = Vec::new();
        for (i, b) in r.backends.into_iter().enumerate() {
            let bitem = format!("{item}, backend {}", i + 1);
            let to_port = match b.to_port {
                None => port,
                Some(p) => match u16::try_from(p) {
                    Ok(p) if p != 0 => p,
                    _ => {
                        self.problem(&bitem, format!("to_port {p} is not a port; use 1-65535"));
                        continue;
                    }
                },
            };
            let weight = match b.weight {
                None => 1,
                Some(w) => match u32::try_from(w) {
                    Ok(w) if w <= MAX_WEIGHT => w,
                    _ => {
                        self.problem(
                            &bitem,
                            format!("weight {w} must be between 0 (drained) and {MAX_WEIGHT}"),
                        );
                        continue;
                    }
                },
            };
            let (name, ip, bhost) = match (b.port, b.address) {
                (Some(pn), None) => {
                    let Some(p) = ports.iter().find(|p| p.tenant == tenant && p.name == pn) else {
                        self.problem(
                            &bitem,
                            format!("port {pn:?} is not a port of tenant {tenant:?}"),
                        );
                        continue;
                    };
                    if p.network != net.name {
                        self.problem(&bitem, format!("port {pn:?} is on network {:?}, not the load balancer's network {:?}; backends live in one network (set network = ... on the load balancer)", p.network, net.name));
                        continue;
                    }
                    let Some(IpAddr::V4(ip)) = p.ip else {
                        self.problem(&bitem, format!("port {pn:?} has no fixed IPv4 address; give it ip = \"...\" (a DHCP reservation keeps it stable)"));
                        continue;
                    };
                    (pn, ip, p.host.clone())
                }
                (None, Some(a)) => {
                    let Ok(ip) = a.trim().parse::<Ipv4Addr>() else {
                        self.problem(&bitem, format!("address {a:?} is not an IPv4 address"));
                        continue;
                    };
                    if !net_cidr.contains(&ip) {
                        self.problem(&bitem, format!("address {ip} is outside network {:?} ({}); backends live in the load balancer's network", net.name, net_cidr.trunc()));
                        continue;
                    }
                    let h = ports
                        .iter()
                        .find(|p| p.tenant == tenant && p.ip == Some(IpAddr::V4(ip)))
                        .and_then(|p| p.host.clone());
                    (a.trim().to_string(), ip, h)
                }
                _ => {
                    self.problem(&bitem, "give exactly one of port = \"vm1\" (a port of the tenant) or address = \"10.0.1.5\"");
                    continue;
                }
            };
            if external && bhost != host && !hosts.is_empty() {
                self.problem(&bitem, format!("{name:?} lives on host {:?} but external VIP {vip} is balanced on host {:?}; an external VIP's backends must live on its host (replies leave through its uplink)", bhost.unwrap_or_default(), host.clone().unwrap_or_default()));
                continue;
            }
            if backends.iter().any(|o| o.ip == ip && o.port == to_port) {
                self.problem(
                    &bitem,
                    format!("{ip}:{to_port} is listed twice; list each backend once"),
                );
                continue;
            }
            backends.push(BackendCfg {
                name,
                ip,
                port: to_port,
                weight,
                host: bhost,
            });
        }
        if backends.is_empty() {
            return None;
        }
        let pool = self.pool_config(item, r.table_size, r.health_check, backends.len())?;
        Some(LoadBalancerCfg {
            tenant: tenant.to_string(),
            name: r.name.clone(),
            id: crc32fast::hash(format!("{tenant}/{}", r.name).as_bytes()),
            vip,
            proto,
            port,
            network: net.name.clone(),
            external,
            host,
            backends,
            pool,
        })
    }

    fn pool_config(
        &mut self,
        item: &str,
        table_size: Option<u32>,
        hc: Option<RawHealthCheck>,
        backends: usize,
    ) -> Option<lb::PoolConfig> {
        let mut pool = lb::PoolConfig::default();
        if let Some(t) = table_size {
            pool.table_size = t;
        }
        if let Some(h) = hc {
            let hitem = format!("{item}, health_check");
            pool.check = match h.kind.as_deref().unwrap_or("tcp") {
                "tcp" => {
                    if h.path.is_some() || h.expected_status.is_some() {
                        self.problem(&hitem, "path and expected_status are for type = \"http\"; remove them or set type = \"http\"");
                        return None;
                    }
                    lb::Check::Tcp
                }
                "http" => lb::Check::Http {
                    path: h.path.unwrap_or_else(|| "/".into()),
                    expected_status: h.expected_status.unwrap_or(200),
                },
                k => {
                    self.problem(&hitem, format!("type {k:?} is not \"tcp\" or \"http\""));
                    return None;
                }
            };
            if let Some(p) = h.port {
                match u16::try_from(p) {
                    Ok(p) if p != 0 => pool.check_port = Some(p),
                    _ => {
                        self.problem(&hitem, format!("port {p} is not a port; use 1-65535 or leave it out to probe each backend's port"));
                        return None;
                    }
                }
            }
            let d = lb::HealthConfig::default();
            pool.health = lb::HealthConfig {
                interval_ms: h.interval_ms.unwrap_or(d.interval_ms),
                timeout_ms: h
                    .timeout_ms
                    .unwrap_or(d.timeout_ms.min(h.interval_ms.unwrap_or(d.interval_ms))),
                rise: h.rise.unwrap_or(d.rise),
                fall: h.fall.unwrap_or(d.fall),
                initial: match h.initial.as_deref() {
                    None | Some("down") => lb::InitialState::Down,
                    Some("up") => lb::InitialState::Up,
                    Some(o) => {
                        self.problem(&hitem, format!("initial {o:?} is not \"down\" (until proven up, the default) or \"up\""));
                        return None;
                    }
                },
            };
        }
        if let Err(e) = pool.validate() {
            self.problem(item, format!("{e}"));
            return None;
        }
        if let Err(e) = lb::maglev::check_size(pool.table_size, backends) {
            self.problem(item, format!("table_size: {e}"));
            return None;
        }
        Some(pool)
    }
}
