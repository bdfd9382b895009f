//! The external side of a config: uplinks (`[[uplink]]`), SNAT on networks
//! (`snat = true`), floating IPs (`[[tenant.floating_ip]]`) and port
//! forwards (`[[tenant.port_forward]]`), and the stable conntrack zone of
//! each tenant. The validated model becomes the NAT's rules
//! ([`Config::nat_rules`]) on the host each item belongs to.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use ipnet::{IpNet, Ipv4Net};
use packet::MacAddr;
use serde::Deserialize;

use super::{check_ifname, check_name, derived_mac, Config, Host, Network, Port, Validator};

/// Default SNAT port range (RFC 6056 recommends 1024-65535).
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (1024, 65535);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUplink {
    host: Option<String>,
    name: Option<String>,
    tap: Option<String>,
    mac: Option<String>,
    address: String,
    gateway: Option<String>,
    snat_ports: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFloatingIp {
    address: String,
    port: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPortForward {
    proto: String,
    external: String,
    port: String,
    to_port: u16,
}

/// A host's link to the external network (`[[uplink]]`): a port of kind
/// uplink, whose address is the host's SNAT address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    /// Port name (captures, counters); default `uplink`, or `up-HOST`.
    pub name: String,
    /// The host it belongs to (`None` in a single-host config).
    pub host: Option<String>,
    /// Tap device name.
    pub tap: String,
    /// The switch's MAC on the external network.
    pub mac: MacAddr,
    /// The switch's address and the external subnet's prefix.
    pub addr: Ipv4Net,
    /// Default next hop toward everything off the external subnet.
    pub gateway: Option<Ipv4Addr>,
    /// Ports SNAT allocates (inclusive).
    pub snat_ports: (u16, u16),
}

impl Uplink {
    /// The switch's external address (the SNAT address).
    pub fn ip(&self) -> Ipv4Addr {
        self.addr.addr()
    }

    /// The MAC `vslab` gives the external network's end of the uplink tap
    /// (how a restarted switch finds its tap again in the lab).
    pub fn peer_mac(&self) -> MacAddr {
        derived_mac("uplink-peer", &self.name)
    }
}

/// A floating IP: 1:1 NAT between an external address and a port's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloatingIpCfg {
    /// Tenant.
    pub tenant: String,
    /// The external address.
    pub address: Ipv4Addr,
    /// The port it belongs to.
    pub port: String,
    /// The port's address.
    pub inside: Ipv4Addr,
    /// The port's host.
    pub host: Option<String>,
}

/// A port forward: external address:port to a port's address:port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForwardCfg {
    /// Tenant.
    pub tenant: String,
    /// TCP or UDP.
    pub proto: nat::Proto,
    /// External address and port.
    pub external: SocketAddrV4,
    /// The port (VM) it goes to.
    pub port: String,
    /// The VM's address and port.
    pub inside: SocketAddrV4,
    /// The VM's host.
    pub host: Option<String>,
}

/// The conntrack zone of tenant `name`: CRC-32 of the name (stable across
/// reloads and restarts, so saved connections find their tenant again),
/// never [`nat::EXTERNAL_ZONE`]. Collisions are refused by validation.
pub fn tenant_zone(name: &str) -> u32 {
    match crc32fast::hash(name.as_bytes()) {
        nat::EXTERNAL_ZONE => 1,
        z => z,
    }
}

impl Config {
    /// The uplink of `host` (`None`: the single-host config's uplink).
    pub fn uplink_of(&self, host: Option<&str>) -> Option<&Uplink> {
        self.uplinks.iter().find(|u| u.host.as_deref() == host)
    }

    /// This host's uplink.
    pub fn local_uplink(&self) -> Option<&Uplink> {
        self.uplink_of(self.local_host.as_deref())
    }

    /// The conntrack zone of `tenant`.
    pub fn zone_of(&self, tenant: &str) -> u32 {
        tenant_zone(tenant)
    }

    /// The tenant whose zone is `zone`.
    pub fn tenant_of_zone(&self, zone: u32) -> Option<&str> {
        self.tenants
            .iter()
            .find(|t| tenant_zone(t) == zone)
            .map(String::as_str)
    }

    /// This host's NAT rules: SNAT for networks with `snat = true` through
    /// this host's uplink address, and the floating IPs and port forwards
    /// of this host's ports.
    pub fn nat_rules(&self) -> nat::Rules {
        let Some(up) = self.local_uplink() else {
            return nat::Rules::default();
        };
        let here = |h: &Option<String>| h.as_deref() == self.local_host.as_deref();
        nat::Rules {
            snat: self
                .networks
                .iter()
                .filter(|n| n.snat)
                .filter_map(|n| match n.cidr {
                    IpNet::V4(inside) => Some(nat::Snat {
                        zone: tenant_zone(&n.tenant),
                        inside,
                        external: up.ip(),
                    }),
                    IpNet::V6(_) => None,
                })
                .collect(),
            floating: self
                .floating_ips
                .iter()
                .filter(|f| here(&f.host))
                .map(|f| nat::FloatingIp {
                    zone: tenant_zone(&f.tenant),
                    inside: f.inside,
                    external: f.address,
                })
                .collect(),
            forwards: self
                .port_forwards
                .iter()
                .filter(|f| here(&f.host))
                .map(|f| nat::PortForward {
                    zone: tenant_zone(&f.tenant),
                    proto: f.proto,
                    external: f.external,
                    inside: f.inside,
                })
                .collect(),
            ports: up.snat_ports,
        }
    }
}

fn parse_range(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.split_once('-')?;
    let (a, b) = (a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?);
    (a >= 1 && a <= b).then_some((a, b))
}

impl Validator {
    /// `[[uplink]]` entries.
    pub(super) fn uplinks(
        &mut self,
        raw: Vec<RawUplink>,
        hosts: &[Host],
        ports: &[Port],
        tap_names: &mut HashMap<String, String>,
    ) -> Vec<Uplink> {
        let mut out: Vec<Uplink> = Vec::new();
        for u in raw {
            let name = u.name.clone().unwrap_or_else(|| match &u.host {
                Some(h) => format!("up-{h}"),
                None => "uplink".to_string(),
            });
            let item = format!("[[uplink]] {name:?}");
            check_name(self, &item, "uplink name", &name, 15);
            match (&u.host, hosts.is_empty()) {
                (Some(h), false) if !hosts.iter().any(|x| &x.name == h) => {
                    let names: Vec<&str> = hosts.iter().map(|x| x.name.as_str()).collect();
                    self.problem(&item, format!("host {h:?} is not a [[host]] of this config (hosts: {}); set host to one of them", names.join(", ")));
                    continue;
                }
                (None, false) => {
                    self.problem(&item, "the config has [[host]] entries, so each uplink says which host it belongs to; add host = \"NAME\"");
                    continue;
                }
                (Some(h), true) => {
                    self.problem(
                        &item,
                        format!(
                            "host {h:?} is set but the config has no [[host]] entries; remove host"
                        ),
                    );
                    continue;
                }
                _ => {}
            }
            if let Some(o) = out.iter().find(|o| o.host == u.host) {
                self.problem(&item, match &u.host {
                    Some(h) => format!("host {h:?} already has uplink {:?}; a host has one uplink, remove one", o.name),
                    None => format!("the config already has uplink {:?}; a single-host config has one uplink, remove one", o.name),
                });
                continue;
            }
            if ports.iter().any(|p| p.name == name)
                || hosts.iter().any(|h| h.name == name)
                || out.iter().any(|o| o.name == name)
            {
                self.problem(&item, "a port, host or other uplink has the same name (they name lab namespaces, captures and counters); set name = \"...\" to another name");
            }
            let addr = match u.address.parse::<Ipv4Net>() {
                Ok(a)
                    if (8..=30).contains(&a.prefix_len())
                        && a.addr() != a.network()
                        && a.addr() != a.broadcast()
                        && !a.addr().is_loopback()
                        && !a.addr().is_multicast() =>
                {
                    a
                }
                _ => {
                    self.problem(&item, format!("address {:?} is not a host address with its prefix (/8../30); write it like \"203.0.113.2/24\"", u.address));
                    continue;
                }
            };
            let gateway = match u.gateway.as_deref().map(|g| g.trim().parse::<Ipv4Addr>()) {
                None => None,
                Some(Ok(g))
                    if addr.contains(&g)
                        && g != addr.addr()
                        && g != addr.network()
                        && g != addr.broadcast() =>
                {
                    Some(g)
                }
                Some(_) => {
                    self.problem(&item, format!("gateway {:?} is not another host address of {}; the default next hop must be on the uplink's subnet", u.gateway.as_deref().unwrap_or_default(), addr.trunc()));
                    continue;
                }
            };
            let snat_ports = match u.snat_ports.as_deref().map(parse_range) {
                None => DEFAULT_SNAT_PORTS,
                Some(Some(r)) => r,
                Some(None) => {
                    self.problem(&item, format!("snat_ports {:?} is not a port range; write it like \"1024-65535\" (start >= 1, start <= end)", u.snat_ports.as_deref().unwrap_or_default()));
                    continue;
                }
            };
            let mac = match u.mac.as_deref().map(str::parse::<MacAddr>) {
                None => derived_mac("uplink", &name),
                Some(Ok(m)) if m.is_unicast() => m,
                Some(_) => {
                    self.problem(
                        &item,
                        format!(
                            "mac {:?} is not a unicast MAC; write it like \"02:00:00:00:00:01\"",
                            u.mac.as_deref().unwrap_or_default()
                        ),
                    );
                    continue;
                }
            };
            let tap = u.tap.clone().unwrap_or_else(|| format!("vs-{name}"));
            if let Err(why) = check_ifname(&tap) {
                self.problem(
                    &item,
                    format!("tap {tap:?} {why}; set tap to a Linux interface name of 1-15 bytes"),
                );
                continue;
            }
            if let Some(other) = tap_names.insert(tap.clone(), name.clone()) {
                self.problem(
                    &item,
                    format!(
                        "tap {tap:?} is also the tap of port {other:?}; give each its own tap name"
                    ),
                );
            }
            out.push(Uplink {
                name,
                host: u.host,
                tap,
                mac,
                addr,
                gateway,
                snat_ports,
            });
        }
        // Two hosts on one external network need distinct addresses.
        let mut seen: HashMap<Ipv4Addr, &str> = HashMap::new();
        for u in &out {
            if let Some(o) = seen.insert(u.ip(), &u.name) {
                self.problem(
                    format!("[[uplink]] {:?}", u.name),
                    format!(
                        "address {} is also uplink {o:?}'s; give each uplink its own address",
                        u.ip()
                    ),
                );
            }
        }
        out
    }

    /// SNAT on networks, floating IPs and port forwards.
    pub(super) fn nat(
        &mut self,
        raw: Vec<(String, Vec<RawFloatingIp>, Vec<RawPortForward>)>,
        networks: &[Network],
        ports: &[Port],
        hosts: &[Host],
        uplinks: &[Uplink],
    ) -> (Vec<FloatingIpCfg>, Vec<PortForwardCfg>) {
        let uplink_of = |h: &Option<String>| uplinks.iter().find(|u| &u.host == h);
        for n in networks.iter().filter(|n| n.snat) {
            let item = format!("tenant {:?}, network {:?}", n.tenant, n.name);
            if !matches!((n.cidr, n.gateway), (IpNet::V4(_), Some(IpAddr::V4(_)))) {
                self.problem(&item, "snat needs an IPv4 cidr and a gateway (VMs send to the gateway, which translates); add gateway = \"...\" or remove snat");
                continue;
            }
            let key = n.key();
            let mut homes: Vec<Option<String>> = ports
                .iter()
                .filter(|p| p.net_key() == key)
                .map(|p| p.host.clone())
                .collect();
            if homes.is_empty() && hosts.is_empty() {
                homes.push(None);
            }
            homes.sort();
            homes.dedup();
            for h in homes {
                if uplink_of(&h).is_none() {
                    self.problem(&item, match h {
                        Some(h) => format!("snat = true but host {h:?}, where ports of the network live, has no [[uplink]]; add [[uplink]] host = {h:?} address = \"...\" (NAT happens on the VM's host)"),
                        None => "snat = true but the config has no [[uplink]]; add [[uplink]] address = \"203.0.113.2/24\" or remove snat".to_string(),
                    });
                }
            }
        }

        let mut floating: Vec<FloatingIpCfg> = Vec::new();
        let mut forwards: Vec<PortForwardCfg> = Vec::new();
        // The port of `tenant` named `name`, with its IPv4 address and a
        // routed network, and its host's uplink.
        let target = |this: &mut Validator,
                      item: &str,
                      tenant: &str,
                      name: &str|
         -> Option<(Ipv4Addr, Option<String>, &Uplink)> {
            let Some(p) = ports.iter().find(|p| p.tenant == tenant && p.name == name) else {
                this.problem(item, format!("port {name:?} is not a port of tenant {tenant:?}; set port to one of its ports"));
                return None;
            };
            let net = networks
                .iter()
                .find(|n| n.tenant == tenant && n.name == p.network)?;
            let Some(IpAddr::V4(ip)) = p.ip else {
                this.problem(item, format!("port {name:?} has no fixed IPv4 address; give it ip = \"...\" (a DHCP reservation keeps it stable)"));
                return None;
            };
            if !matches!(net.gateway, Some(IpAddr::V4(_))) {
                this.problem(item, format!("port {name:?} is on network {:?}, which has no gateway; NAT needs the gateway, add gateway = \"...\"", net.name));
                return None;
            }
            let Some(up) = uplink_of(&p.host) else {
                this.problem(item, match &p.host {
                    Some(h) => format!("port {name:?} lives on host {h:?}, which has no [[uplink]]; add one (NAT happens on the VM's host)"),
                    None => "the config has no [[uplink]]; add [[uplink]] address = \"203.0.113.2/24\"".to_string(),
                });
                return None;
            };
            Some((ip, p.host.clone(), up))
        };
        for (tenant, fips, fwds) in raw {
            for f in fips {
                let item = format!("tenant {tenant:?}, floating_ip {:?}", f.address);
                let Ok(address) = f.address.trim().parse::<Ipv4Addr>() else {
                    self.problem(
                        &item,
                        "address is not an IPv4 address; write it like \"203.0.113.10\"",
                    );
                    continue;
                };
                let Some((inside, host, up)) = target(self, &item, &tenant, &f.port) else {
                    continue;
                };
                if !up.addr.contains(&address)
                    || address == up.addr.network()
                    || address == up.addr.broadcast()
                    || Some(address) == up.gateway
                    || address == up.ip()
                {
                    self.problem(&item, format!("{address} must be a free host address of uplink {:?}'s subnet {} (not its address {} or gateway); pick another", up.name, up.addr.trunc(), up.ip()));
                    continue;
                }
                if let Some(o) = floating.iter().find(|o| o.address == address) {
                    self.problem(&item, format!("{address} is already the floating IP of port {:?}; each floating IP belongs to one port", o.port));
                    continue;
                }
                if let Some(o) = floating
                    .iter()
                    .find(|o| o.tenant == tenant && o.port == f.port)
                {
                    self.problem(
                        &item,
                        format!(
                            "port {:?} already has floating IP {}; a port has one",
                            f.port, o.address
                        ),
                    );
                    continue;
                }
                if let Some(o) = uplinks.iter().find(|u| u.ip() == address) {
                    self.problem(
                        &item,
                        format!("{address} is uplink {:?}'s address; pick another", o.name),
                    );
                    continue;
                }
                floating.push(FloatingIpCfg {
                    tenant: tenant.clone(),
                    address,
                    port: f.port,
                    inside,
                    host,
                });
            }
            for f in fwds {
                let item = format!(
                    "tenant {tenant:?}, port_forward {} {:?}",
                    f.proto, f.external
                );
                let proto = match f.proto.as_str() {
                    "tcp" => nat::Proto::Tcp,
                    "udp" => nat::Proto::Udp,
                    _ => {
                        self.problem(
                            &item,
                            format!("proto {:?} is not \"tcp\" or \"udp\"", f.proto),
                        );
                        continue;
                    }
                };
                let external = match f.external.trim().parse::<SocketAddrV4>() {
                    Ok(e) if e.port() != 0 => e,
                    _ => {
                        self.problem(&item, "external is not ADDRESS:PORT (port 1-65535); write it like \"203.0.113.2:8080\"");
                        continue;
                    }
                };
                if f.to_port == 0 {
                    self.problem(&item, "to_port 0 is not a port; use 1-65535");
                    continue;
                }
                let Some((inside, host, up)) = target(self, &item, &tenant, &f.port) else {
                    continue;
                };
                let a = *external.ip();
                if !up.addr.contains(&a)
                    || a == up.addr.network()
                    || a == up.addr.broadcast()
                    || Some(a) == up.gateway
                {
                    self.problem(&item, format!("{a} must be uplink {:?}'s address {} or a free host address of its subnet {}; pick one", up.name, up.ip(), up.addr.trunc()));
                    continue;
                }
                if let Some(o) = floating.iter().find(|o| o.address == a) {
                    self.problem(&item, format!("{a} is the floating IP of port {:?}, which takes every port of it; forward from another address", o.port));
                    continue;
                }
                if let Some(o) = forwards
                    .iter()
                    .find(|o| o.external == external && o.proto == proto)
                {
                    self.problem(&item, format!("{} {external} is already forwarded to port {:?}; each external port forwards to one place", f.proto, o.port));
                    continue;
                }
                forwards.push(PortForwardCfg {
                    tenant: tenant.clone(),
                    proto,
                    external,
                    port: f.port,
                    inside: SocketAddrV4::new(inside, f.to_port),
                    host,
                });
            }
        }
        // A forward's address that is no uplink's address is the switch's
        // too: no other tenant may float it.
        let mut owner: HashMap<Ipv4Addr, &str> = HashMap::new();
        for f in &forwards {
            if let Some(o) = owner.insert(*f.external.ip(), &f.tenant) {
                if o != f.tenant && !uplinks.iter().any(|u| u.ip() == *f.external.ip()) {
                    self.problem(format!("tenant {:?}, port_forward {:?}", f.tenant, f.external.to_string()), format!("address {} is used for port forwards of tenant {o:?} too; an address other than the uplink's belongs to one tenant", f.external.ip()));
                }
            }
        }
        (floating, forwards)
    }

    /// Tenant zones must be distinct.
    pub(super) fn zones(&mut self, tenants: &[String]) {
        let mut seen: HashSet<u32> = HashSet::new();
        for t in tenants {
            if !seen.insert(tenant_zone(t)) {
                self.problem(format!("tenant {t:?}"), "its conntrack zone (CRC-32 of the name) collides with another tenant's; rename the tenant");
            }
        }
    }
}
