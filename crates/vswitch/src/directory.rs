//! The directory: which MAC and IP belong to which port of which network.
//!
//! Everything that needs the IP/MAC/port mapping reads it through the
//! [`Directory`] trait: the bridge's static MAC entries today; the DHCP
//! server, the ARP/DNS responders and VXLAN's remote-port lookups as they
//! land. [`StaticDirectory`] is built from the config file; a distributed
//! implementation (etcd, many hosts) can replace it without touching the
//! data path, which only ever sees the snapshot built from a directory.

use std::collections::HashMap;
use std::net::IpAddr;

use packet::MacAddr;

use crate::config::{Config, NetKey};

/// One port's addresses and location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortEntry {
    /// Port name.
    pub name: String,
    /// Its network.
    pub network: NetKey,
    /// Its MAC.
    pub mac: MacAddr,
    /// Its fixed IP, if any.
    pub ip: Option<IpAddr>,
    /// The host it lives on; `None` for this host.
    pub host: Option<String>,
}

/// Read access to the IP/MAC/port mapping.
pub trait Directory: Send + Sync + std::fmt::Debug {
    /// Every port of `network`, on any host.
    fn ports_of(&self, network: &NetKey) -> Vec<&PortEntry>;
    /// The port owning `mac` in `network`.
    fn lookup_mac(&self, network: &NetKey, mac: &MacAddr) -> Option<&PortEntry>;
    /// The port owning `ip` in `network`.
    fn lookup_ip(&self, network: &NetKey, ip: &IpAddr) -> Option<&PortEntry>;
    /// A port by name.
    fn port(&self, name: &str) -> Option<&PortEntry>;
}

/// A directory fed by the config file.
#[derive(Debug, Default)]
pub struct StaticDirectory {
    ports: Vec<PortEntry>,
    by_name: HashMap<String, usize>,
    by_mac: HashMap<(NetKey, MacAddr), usize>,
    by_ip: HashMap<(NetKey, IpAddr), usize>,
    by_net: HashMap<NetKey, Vec<usize>>,
}

impl StaticDirectory {
    /// Indexes the ports of a validated config.
    pub fn from_config(cfg: &Config) -> StaticDirectory {
        let mut d = StaticDirectory::default();
        for p in &cfg.ports {
            let i = d.ports.len();
            let network = p.net_key();
            d.by_name.insert(p.name.clone(), i);
            d.by_mac.insert((network.clone(), p.mac), i);
            if let Some(ip) = p.ip {
                d.by_ip.insert((network.clone(), ip), i);
            }
            d.by_net.entry(network.clone()).or_default().push(i);
            d.ports.push(PortEntry {
                name: p.name.clone(),
                network,
                mac: p.mac,
                ip: p.ip,
                host: None,
            });
        }
        d
    }
}

impl Directory for StaticDirectory {
    fn ports_of(&self, network: &NetKey) -> Vec<&PortEntry> {
        self.by_net
            .get(network)
            .map(|v| v.iter().filter_map(|&i| self.ports.get(i)).collect())
            .unwrap_or_default()
    }

    fn lookup_mac(&self, network: &NetKey, mac: &MacAddr) -> Option<&PortEntry> {
        self.by_mac
            .get(&(network.clone(), *mac))
            .and_then(|&i| self.ports.get(i))
    }

    fn lookup_ip(&self, network: &NetKey, ip: &IpAddr) -> Option<&PortEntry> {
        self.by_ip
            .get(&(network.clone(), *ip))
            .and_then(|&i| self.ports.get(i))
    }

    fn port(&self, name: &str) -> Option<&PortEntry> {
        self.by_name.get(name).and_then(|&i| self.ports.get(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn overlapping_tenants_resolve_separately() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/two-tenants-overlap.toml"),
        )
        .unwrap();
        let cfg = Config::parse(Path::new("x.toml"), &text).unwrap();
        let d = StaticDirectory::from_config(&cfg);
        let mac: MacAddr = "02:00:00:00:00:01".parse().unwrap();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = NetKey::new("acme", "prod");
        let g = NetKey::new("globex", "prod");
        assert_eq!(d.lookup_mac(&a, &mac).unwrap().name, "a1");
        assert_eq!(d.lookup_mac(&g, &mac).unwrap().name, "b1");
        assert_eq!(d.lookup_ip(&g, &ip).unwrap().name, "b1");
        assert_eq!(d.ports_of(&a).len(), 2);
        assert!(d.lookup_ip(&NetKey::new("nobody", "prod"), &ip).is_none());
        assert_eq!(d.port("b2").unwrap().network, g);
    }
}
