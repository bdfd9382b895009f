//! The tenant config file: parsing, validation and the validated model.
//!
//! Parsing goes in two steps. `serde` + `toml` turn the text into raw
//! structs that reject unknown keys and wrong types (their messages carry the
//! line and column). Validation then checks meaning (references, ranges,
//! uniqueness) and reports *every* problem, each naming the file, the item
//! (tenant / network / port) and what to change. See `docs/config.md`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use packet::MacAddr;
use serde::Deserialize;

mod balancer;
mod external;
mod security;
pub use balancer::{BackendCfg, LoadBalancerCfg, MAX_WEIGHT};
use balancer::{RawLoadBalancer, RawServiceAddress};
pub use external::{FloatingIpCfg, PortForwardCfg, Uplink};
use external::{RawFloatingIp, RawPortForward, RawUplink};
use security::RawGroup;
pub use security::{SecurityGroupCfg, DEFAULT_GROUP, DEFAULT_MAX_CONNECTIONS};

/// Default learned+static MAC entries per network.
pub const DEFAULT_MAC_TABLE_SIZE: usize = 8192;
/// Default MAC aging time.
pub const DEFAULT_MAC_AGING_SECS: u64 = 300;
const MAC_TABLE_RANGE: std::ops::RangeInclusive<usize> = 16..=1_048_576;
const AGING_RANGE: std::ops::RangeInclusive<u64> = 10..=86_400;
const MAX_WORKERS: usize = 64;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    switch: RawSwitch,
    #[serde(default)]
    underlay: RawUnderlay,
    #[serde(default)]
    host: Vec<RawHost>,
    #[serde(default)]
    uplink: Vec<RawUplink>,
    #[serde(default)]
    tenant: Vec<RawTenant>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnderlay {
    port: Option<u16>,
    ttl: Option<u8>,
    mtu: Option<u16>,
    src_ports: Option<u16>,
    gso: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    name: String,
    underlay: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSwitch {
    mac_table_size: Option<usize>,
    mac_aging_secs: Option<u64>,
    workers: Option<usize>,
    tap_queues: Option<usize>,
    metrics_listen: Option<String>,
    max_connections_per_port: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    name: String,
    #[serde(default)]
    network: Vec<RawNetwork>,
    #[serde(default)]
    port: Vec<RawPort>,
    #[serde(default)]
    security_group: Vec<RawGroup>,
    #[serde(default)]
    floating_ip: Vec<RawFloatingIp>,
    #[serde(default)]
    port_forward: Vec<RawPortForward>,
    #[serde(default)]
    load_balancer: Vec<RawLoadBalancer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    name: String,
    vni: i64,
    cidr: String,
    gateway: Option<String>,
    mac_table_size: Option<usize>,
    snat: Option<bool>,
    service_address: Option<RawServiceAddress>,
    dhcp: Option<RawDhcp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDhcp {
    #[serde(default)]
    pool: Vec<String>,
    lease_secs: Option<u32>,
    dns: Option<Vec<String>>,
    domain: Option<String>,
    mtu: Option<u16>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    max_leases: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    dest: String,
    via: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    name: String,
    network: String,
    mac: Option<String>,
    ip: Option<String>,
    tap: Option<String>,
    port_security: Option<bool>,
    hostname: Option<String>,
    host: Option<String>,
    #[serde(default)]
    security_groups: Vec<String>,
    max_connections: Option<usize>,
}

/// Switch-wide settings (`[switch]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchSettings {
    /// Default MAC table cap per network.
    pub mac_table_size: usize,
    /// How long a learned MAC lives without being seen.
    pub mac_aging: Duration,
    /// Data-plane threads; 0 means half the CPU cores, at least one.
    pub workers: usize,
    /// Queues per tap the switch creates: 0 means one per worker, 1 turns
    /// multi-queue off.
    pub tap_queues: usize,
    /// Where to serve Prometheus metrics (`GET /metrics`); off when `None`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Default tracked-connection cap per port (security groups).
    pub max_connections_per_port: usize,
}

/// `[underlay]`: how this host's switch reaches the others (VXLAN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnderlaySettings {
    /// VXLAN UDP destination port (and the port the switch listens on).
    pub port: u16,
    /// Outer IPv4 TTL.
    pub ttl: u8,
    /// The underlay's IP MTU; overlay networks get `mtu - 50`.
    pub mtu: u16,
    /// How many UDP source ports flows are spread over (ECMP entropy).
    pub src_ports: u16,
    /// Send a super-frame's VXLAN packets as one UDP GSO train (`false`:
    /// one `sendmsg` per packet, for kernels or NICs without UDP GSO).
    pub gso: bool,
}

impl Default for UnderlaySettings {
    fn default() -> Self {
        UnderlaySettings {
            port: 4789,
            ttl: 64,
            mtu: 1500,
            src_ports: 16,
            gso: true,
        }
    }
}

/// Bytes VXLAN over IPv4 adds to an inner IP packet: outer IPv4 (20) + UDP
/// (8) + VXLAN (8) + the inner Ethernet header (14).
pub const VXLAN_V4_OVERHEAD: u16 = 50;

/// A host (`[[host]]`): a switch reachable over the underlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Name, as `vswitchd --host` and ports' `host` give it.
    pub name: String,
    /// Its underlay (VTEP) address.
    pub addr: std::net::Ipv4Addr,
    /// The underlay prefix length (for `vslab`'s underlay; 24 when the
    /// config gives a bare address).
    pub prefix: u8,
}

/// A tenant network: one bridge domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// Owning tenant.
    pub tenant: String,
    /// Name, unique within the tenant.
    pub name: String,
    /// VXLAN network identifier, unique on the host.
    pub vni: u32,
    /// The subnet.
    pub cidr: IpNet,
    /// The gateway address, if the network has one.
    pub gateway: Option<IpAddr>,
    /// MAC table cap for this network.
    pub mac_table_size: usize,
    /// The DHCP server of this network, if it has one.
    pub dhcp: Option<DhcpSettings>,
    /// Its VMs reach the external network through their host's SNAT
    /// address.
    pub snat: bool,
    /// Where this network's load-balancer health checks and hairpinned
    /// connections come from, per host (`None`: single-host config).
    pub service_addresses: Vec<(Option<String>, std::net::Ipv4Addr)>,
}

/// `[tenant.network.dhcp]`: the switch's DHCP server for a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpSettings {
    /// Dynamic pools (inclusive ranges).
    pub pools: Vec<(std::net::Ipv4Addr, std::net::Ipv4Addr)>,
    /// Lease time, seconds.
    pub lease_secs: u32,
    /// DNS servers (option 6).
    pub dns: Vec<std::net::Ipv4Addr>,
    /// Domain name (option 15).
    pub domain: Option<String>,
    /// Interface MTU (option 26).
    pub mtu: Option<u16>,
    /// Extra routes (option 121).
    pub routes: Vec<(ipnet::Ipv4Net, std::net::Ipv4Addr)>,
    /// Most leases at once.
    pub max_leases: usize,
}

impl Network {
    /// `tenant/name`, how the CLI and logs name a network.
    pub fn key(&self) -> NetKey {
        NetKey::new(&self.tenant, &self.name)
    }

    /// The MAC the switch answers ARP with for the gateway address: stable,
    /// locally administered, distinct per network (a port name cannot
    /// contain '/', so it never equals a port's derived MAC).
    pub fn gateway_mac(&self) -> MacAddr {
        derived_mac(&self.tenant, &format!("gateway/{}", self.name))
    }

    /// The MAC of the load balancer's prober of `host` in this network
    /// (the owner of that host's service address).
    pub fn service_mac(&self, host: Option<&str>) -> MacAddr {
        derived_mac(
            &self.tenant,
            &format!("service/{}/{}", self.name, host.unwrap_or("")),
        )
    }
}

/// A VM NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Name, unique in the file.
    pub name: String,
    /// Owning tenant.
    pub tenant: String,
    /// Network name within the tenant.
    pub network: String,
    /// The port's MAC (configured or derived).
    pub mac: MacAddr,
    /// Fixed IP, if configured.
    pub ip: Option<IpAddr>,
    /// Tap device name.
    pub tap: String,
    /// Only `mac`/`ip` may be used as sources.
    pub port_security: bool,
    /// DHCP host name (option 12); default: the port name.
    pub hostname: Option<String>,
    /// The host the port lives on (`None` in a single-host config).
    pub host: Option<String>,
    /// Security groups (names in the tenant); empty: the default group
    /// when the tenant filters.
    pub security_groups: Vec<String>,
    /// Most tracked connections of this port (security groups).
    pub max_connections: usize,
}

impl Port {
    /// The key of the port's network.
    pub fn net_key(&self) -> NetKey {
        NetKey::new(&self.tenant, &self.network)
    }
}

/// Identifies a network across reloads: `tenant/network`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetKey(pub String);

impl NetKey {
    /// Builds `tenant/network`.
    pub fn new(tenant: &str, network: &str) -> NetKey {
        NetKey(format!("{tenant}/{network}"))
    }
}

impl fmt::Display for NetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where it was read from.
    pub path: PathBuf,
    /// `[switch]` settings.
    pub switch: SwitchSettings,
    /// Tenant names, in file order.
    pub tenants: Vec<String>,
    /// All networks of all tenants, in file order.
    pub networks: Vec<Network>,
    /// All ports of all tenants, in file order (on every host).
    pub ports: Vec<Port>,
    /// `[underlay]` settings.
    pub underlay: UnderlaySettings,
    /// `[[host]]` entries; empty for a single-host config.
    pub hosts: Vec<Host>,
    /// The host this switch is (`vswitchd --host`), set by
    /// [`Config::for_host`]; `None` for a single-host config.
    pub local_host: Option<String>,
    /// `[[uplink]]` entries: at most one per host.
    pub uplinks: Vec<Uplink>,
    /// Floating IPs of all tenants.
    pub floating_ips: Vec<FloatingIpCfg>,
    /// Port forwards of all tenants.
    pub port_forwards: Vec<PortForwardCfg>,
    /// Security groups of all tenants.
    pub security_groups: Vec<SecurityGroupCfg>,
    /// Load balancers of all tenants.
    pub load_balancers: Vec<LoadBalancerCfg>,
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The item: `tenant "acme", port "vm1"`, or `[switch]`.
    pub item: String,
    /// What is wrong and what to change.
    pub message: String,
}

/// Why a config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read the config file: {source}")]
    Read {
        /// The path.
        file: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not valid TOML, a wrong type or an unknown key.
    #[error("{file}: {message}")]
    Syntax {
        /// The path.
        file: String,
        /// toml's message, with line, column and key.
        message: String,
    },
    /// Valid TOML whose content is wrong.
    #[error("{}", format_problems(file, problems))]
    Invalid {
        /// The path.
        file: String,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

fn format_problems(file: &str, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| format!("{file}: {}: {}", p.item, p.message))
        .collect();
    lines.join("\n")
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.clone(),
            message: syntax_message(text, &e),
        })?;
        let mut v = Validator::default();
        let cfg = v.validate(path, raw);
        if v.problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                file,
                problems: v.problems,
            })
        }
    }

    /// Selects the host this switch plays (`vswitchd --host NAME`). A
    /// config with `[[host]]` entries needs one of their names; a config
    /// without needs none.
    pub fn for_host(mut self, host: Option<&str>) -> Result<Config, ConfigError> {
        let file = self.path.display().to_string();
        let names: Vec<&str> = self.hosts.iter().map(|h| h.name.as_str()).collect();
        let problem = match (host, self.hosts.is_empty()) {
            (None, true) => None,
            (None, false) => Some(format!(
                "the config describes several hosts ({}); start vswitchd with --host NAME to say which one this is",
                names.join(", ")
            )),
            (Some(h), true) => Some(format!(
                "--host {h:?} given but the config has no [[host]] entries; drop --host or add the hosts"
            )),
            (Some(h), false) if !names.contains(&h) => Some(format!(
                "--host {h:?} is not one of the config's hosts ({}); pick one of them",
                names.join(", ")
            )),
            (Some(_), false) => None,
        };
        if let Some(message) = problem {
            return Err(ConfigError::Invalid {
                file,
                problems: vec![Problem {
                    item: "[[host]]".into(),
                    message,
                }],
            });
        }
        self.local_host = host.map(str::to_string);
        Ok(self)
    }

    /// Whether `port` lives on this host.
    pub fn is_local(&self, port: &Port) -> bool {
        self.local_host.is_none() || port.host == self.local_host
    }

    /// Ports on this host, in file order.
    pub fn local_ports(&self) -> impl Iterator<Item = &Port> {
        self.ports.iter().filter(|p| self.is_local(p))
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// The IP MTU of overlay networks (underlay MTU minus VXLAN's 50 bytes),
    /// when the config spans hosts.
    pub fn overlay_mtu(&self) -> Option<u16> {
        (!self.hosts.is_empty()).then(|| self.underlay.mtu.saturating_sub(VXLAN_V4_OVERHEAD))
    }

    /// Hosts with at least one port in `net`, sorted by name.
    pub fn hosts_of(&self, net: &Network) -> Vec<&str> {
        let key = net.key();
        let mut hs: Vec<&str> = self
            .ports
            .iter()
            .filter(|p| p.net_key() == key)
            .filter_map(|p| p.host.as_deref())
            .collect();
        hs.sort_unstable();
        hs.dedup();
        hs
    }

    /// The part of `net`'s DHCP pools this host hands out. Every host runs
    /// its own DHCP server for its own VMs, so a network spanning hosts
    /// splits its pool addresses into equal contiguous shares, one per host
    /// with ports in the network, in host-name order: every host computes
    /// the same split from the same file, and no address is handed out
    /// twice.
    pub fn local_pools(&self, net: &Network) -> Vec<(std::net::Ipv4Addr, std::net::Ipv4Addr)> {
        let Some(d) = &net.dhcp else {
            return Vec::new();
        };
        let Some(me) = &self.local_host else {
            return d.pools.clone();
        };
        let hosts = self.hosts_of(net);
        let Some(idx) = hosts.iter().position(|h| h == me) else {
            return Vec::new();
        };
        let total: u64 = d
            .pools
            .iter()
            .map(|(a, b)| u64::from(u32::from(*b)) - u64::from(u32::from(*a)) + 1)
            .sum();
        let n = hosts.len() as u64;
        let (lo, hi) = (total * idx as u64 / n, total * (idx as u64 + 1) / n);
        // Walk the pools, keeping the addresses with ordinal in [lo, hi).
        let mut out = Vec::new();
        let mut base = 0u64;
        for (a, b) in &d.pools {
            let (a, b) = (u64::from(u32::from(*a)), u64::from(u32::from(*b)));
            let len = b - a + 1;
            let (s, e) = (lo.max(base), hi.min(base + len));
            if s < e {
                let first = u32::try_from(a + (s - base)).unwrap_or(u32::MAX);
                let last = u32::try_from(a + (e - base) - 1).unwrap_or(u32::MAX);
                out.push((first.into(), last.into()));
            }
            base += len;
        }
        out
    }

    /// The network a port belongs to.
    pub fn network_of(&self, port: &Port) -> Option<&Network> {
        self.networks
            .iter()
            .find(|n| n.tenant == port.tenant && n.name == port.network)
    }
}

/// toml's message as `line L, column C: what; fix`.
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let mut msg = e.message().trim().replace('\n', " ");
    let at = e
        .span()
        .map(|sp| {
            let before = &text.as_bytes()[..sp.start.min(text.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
            format!("line {line}, column {col}: ")
        })
        .unwrap_or_default();
    let mut hint = String::new();
    if msg.contains("unknown field") {
        hint.push_str("; remove the key or fix its spelling (see docs/config.md)");
    } else if msg.contains("missing field") {
        hint.push_str("; add it (see docs/config.md)");
    } else if msg.starts_with("invalid type") || msg.starts_with("invalid value") {
        // serde names Rust types; say what to write instead.
        for (rust, toml) in [
            ("expected i64", "expected an integer"),
            ("expected u8", "expected an integer 0..=255"),
            ("expected u16", "expected an integer 0..=65535"),
            ("expected u32", "expected an integer 0..=4294967295"),
            ("expected usize", "expected an integer >= 0"),
            ("expected u64", "expected an integer >= 0"),
            ("expected a sequence", "expected a list [...]"),
            ("expected a map", "expected a table"),
        ] {
            if let Some(rest) = msg.strip_suffix(rust) {
                msg = format!("{rest}{toml}");
            }
        }
        match e.span().and_then(|sp| key_at(text, sp.start)) {
            Some(key) => {
                msg = format!("{key}: {msg}");
                hint = format!("; give {key} a value of that type (see docs/config.md)");
            }
            None => hint.push_str("; give the key a value of that type (see docs/config.md)"),
        }
    }
    format!("{at}{msg}{hint}")
}

/// The key of the `key = value` line whose value holds byte `offset`.
fn key_at(text: &str, offset: usize) -> Option<&str> {
    let before = text.get(..offset)?;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let (key, _) = text[start..offset].split_once('=')?;
    let key = key.trim();
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"'));
    plain.then_some(key)
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn problem(&mut self, item: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            item: item.into(),
            message: message.into(),
        });
    }

    fn validate(&mut self, path: &Path, raw: RawFile) -> Config {
        let switch = self.switch(raw.switch);
        let underlay = self.underlay(raw.underlay);
        let hosts = self.hosts(raw.host);
        let mut tenants = Vec::new();
        let mut networks: Vec<Network> = Vec::new();
        let mut ports: Vec<Port> = Vec::new();
        let mut tenant_names = HashSet::new();
        let mut vnis: HashMap<u32, String> = HashMap::new();
        let mut port_names = HashSet::new();
        let mut tap_names: HashMap<String, String> = HashMap::new();
        let mut nat_raw = Vec::new();
        let mut lb_raw = Vec::new();
        let host_names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
        let mut security_groups: Vec<SecurityGroupCfg> = Vec::new();

        for t in raw.tenant {
            let titem = format!("tenant {:?}", t.name);
            check_name(self, &titem, "tenant name", &t.name, 32);
            if !tenant_names.insert(t.name.clone()) {
                self.problem(
                    &titem,
                    "the tenant is defined twice; merge the two [[tenant]] tables or rename one",
                );
            }
            tenants.push(t.name.clone());

            let first_net = networks.len();
            for n in t.network {
                if let Some(net) = self.network(&t.name, n, &switch, &mut vnis, &host_names) {
                    if networks[first_net..].iter().any(|o| o.name == net.name) {
                        self.problem(
                            format!("tenant {:?}, network {:?}", t.name, net.name),
                            "the network is defined twice in this tenant; rename one",
                        );
                        continue;
                    }
                    networks.push(net);
                }
            }
            let tenant_nets = &networks[first_net..];
            // A tenant has one DNS zone (docs/config.md, DNS): its networks'
            // [dhcp] domains must agree, or clients of all but one would be
            // told a domain the zone does not answer for.
            let mut domain: Option<(&str, &str)> = None;
            for n in tenant_nets {
                let Some(d) = n.dhcp.as_ref().and_then(|d| d.domain.as_deref()) else {
                    continue;
                };
                match domain {
                    None => domain = Some((d, &n.name)),
                    Some((first, net))
                        if !first
                            .trim_end_matches('.')
                            .eq_ignore_ascii_case(d.trim_end_matches('.')) =>
                    {
                        self.problem(
                            format!("tenant {:?}, network {:?}, [dhcp]", t.name, n.name),
                            format!("domain {d:?} differs from domain {first:?} of network {net:?}; a tenant has one DNS zone, so give every network of the tenant the same domain (or leave it out)"),
                        );
                    }
                    Some(_) => {}
                }
            }

            nat_raw.push((t.name.clone(), t.floating_ip, t.port_forward));
            lb_raw.push((t.name.clone(), t.load_balancer));
            let groups = self.security_groups(&t.name, t.security_group);
            let mut macs: HashSet<(String, MacAddr)> = HashSet::new();
            let mut ips: HashSet<(String, IpAddr)> = HashSet::new();
            for p in t.port {
                let pitem = format!("tenant {:?}, port {:?}", t.name, p.name);
                check_name(self, &pitem, "port name", &p.name, 15);
                if !port_names.insert(p.name.clone()) {
                    self.problem(
                        &pitem,
                        "another port has the same name (port names are unique across tenants: they name lab namespaces and taps); rename one",
                    );
                }
                let Some(net) = tenant_nets.iter().find(|n| n.name == p.network) else {
                    let known: Vec<&str> = tenant_nets.iter().map(|n| n.name.as_str()).collect();
                    self.problem(
                        &pitem,
                        format!(
                            "network {:?} is not a network of tenant {:?} (its networks: {}); set network to one of them or add a [[tenant.network]] named {:?}",
                            p.network,
                            t.name,
                            if known.is_empty() { "none".to_string() } else { known.join(", ") },
                            p.network
                        ),
                    );
                    continue;
                };
                let mac = match &p.mac {
                    Some(s) => match s.parse::<MacAddr>() {
                        Ok(m) if m.is_unicast() => m,
                        Ok(m) => {
                            self.problem(&pitem, format!("mac {m} is a multicast or all-zero address; a NIC needs a unicast MAC such as 02:00:00:00:00:01"));
                            continue;
                        }
                        Err(e) => {
                            self.problem(&pitem, format!("mac: {e}"));
                            continue;
                        }
                    },
                    None => derived_mac(&t.name, &p.name),
                };
                if !macs.insert((net.name.clone(), mac)) {
                    self.problem(
                        &pitem,
                        format!("mac {mac} is already used by another port of network {:?}; give each port its own MAC", net.name),
                    );
                }
                let ip = match &p.ip {
                    None => None,
                    Some(s) => match s.parse::<IpAddr>() {
                        Err(_) => {
                            self.problem(&pitem, format!("ip {s:?} is not an IP address; write a bare address such as \"10.0.1.10\" (the prefix comes from the network's cidr)"));
                            continue;
                        }
                        Ok(ip) => {
                            if let Some(why) = host_address_problem(net, ip) {
                                self.problem(&pitem, format!("ip {ip} {why}"));
                            } else if !ips.insert((net.name.clone(), ip)) {
                                self.problem(
                                    &pitem,
                                    format!("ip {ip} is already used by another port of network {:?}; give each port its own address", net.name),
                                );
                            }
                            Some(ip)
                        }
                    },
                };
                if let Some(h) = &p.hostname {
                    let label_ok = !h.is_empty()
                        && h.len() <= 63
                        && h.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                    if !label_ok {
                        self.problem(&pitem, format!("hostname {h:?} is not a DNS label; use 1-63 characters of A-Z a-z 0-9 - _"));
                    }
                }
                match (&p.host, hosts.is_empty()) {
                    (Some(h), false) if !hosts.iter().any(|x| &x.name == h) => {
                        let names: Vec<&str> = hosts.iter().map(|x| x.name.as_str()).collect();
                        self.problem(&pitem, format!("host {h:?} is not a [[host]] of this config (hosts: {}); set host to one of them or add a [[host]] named {h:?}", names.join(", ")));
                    }
                    (None, false) => self.problem(
                        &pitem,
                        "the config has [[host]] entries, so every port says where it lives; add host = \"NAME\"",
                    ),
                    (Some(h), true) => self.problem(
                        &pitem,
                        format!("host {h:?} is set but the config has no [[host]] entries; add [[host]] name = {h:?} underlay = \"ADDRESS\", or remove host"),
                    ),
                    _ => {}
                }
                if hosts.iter().any(|x| x.name == p.name) {
                    self.problem(&pitem, "a host has the same name (ports and hosts name lab namespaces); rename one");
                }
                // vslab's underlay namespace (lab::underlay_namespace).
                if let Some(first) = hosts.first() {
                    if p.name == format!("ul-{}", first.name) {
                        self.problem(&pitem, format!("the lab's underlay namespace is also named {:?} (\"ul-\" + the first host's name); rename the port", p.name));
                    }
                }
                let tap = p.tap.clone().unwrap_or_else(|| format!("vs-{}", p.name));
                if let Err(why) = check_ifname(&tap) {
                    if p.tap.is_some() {
                        self.problem(&pitem, format!("tap {tap:?} {why}; set tap to a Linux interface name of 1-15 bytes without '/', ':' or white space"));
                    } else {
                        self.problem(&pitem, format!("the default tap name {tap:?} {why}; set tap = \"...\" to a name of at most 15 bytes"));
                    }
                } else if let Some(other) = tap_names.insert(tap.clone(), p.name.clone()) {
                    self.problem(&pitem, format!("tap {tap:?} is also the tap of port {other:?}; give each port its own tap name"));
                }
                let port_security = p.port_security.unwrap_or(true);
                for g in &p.security_groups {
                    if !groups.iter().any(|x| &x.spec.name == g) {
                        let known: Vec<&str> =
                            groups.iter().map(|x| x.spec.name.as_str()).collect();
                        self.problem(&pitem, format!("security group {g:?} is not a security_group of tenant {:?} (its groups: {}); define it or fix the name", t.name, if known.is_empty() { "none".into() } else { known.join(", ") }));
                    }
                }
                if !p.security_groups.is_empty() && !port_security {
                    self.problem(&pitem, "security_groups need port_security (an unsecured port may send from any address, so rules could not hold); remove security_groups or set port_security = true");
                }
                let max_connections = p.max_connections.unwrap_or(switch.max_connections_per_port);
                self.in_range(&pitem, "max_connections", max_connections, 1..=1_048_576);
                ports.push(Port {
                    name: p.name,
                    tenant: t.name.clone(),
                    network: p.network,
                    mac,
                    ip,
                    tap,
                    port_security,
                    hostname: p.hostname,
                    host: p.host,
                    security_groups: p.security_groups,
                    max_connections,
                });
            }
            security_groups.extend(groups);
        }

        for n in &networks {
            let count = ports
                .iter()
                .filter(|p| p.tenant == n.tenant && p.network == n.name)
                .count();
            if count > n.mac_table_size {
                self.problem(
                    format!("tenant {:?}, network {:?}", n.tenant, n.name),
                    format!(
                        "has {count} ports but mac_table_size {}; raise mac_table_size",
                        n.mac_table_size
                    ),
                );
            }
        }

        if !hosts.is_empty() {
            let overlay = underlay.mtu.saturating_sub(VXLAN_V4_OVERHEAD);
            for n in &networks {
                if let Some(m) = n.dhcp.as_ref().and_then(|d| d.mtu) {
                    if m > overlay {
                        self.problem(
                            format!("tenant {:?}, network {:?}, [dhcp]", n.tenant, n.name),
                            format!("mtu {m} does not fit VXLAN over the underlay MTU {} (at most {overlay}); lower mtu or raise [underlay] mtu", underlay.mtu),
                        );
                    }
                }
            }
        }

        let uplinks = self.uplinks(raw.uplink, &hosts, &ports, &mut tap_names);
        let (floating_ips, port_forwards) = self.nat(nat_raw, &networks, &ports, &hosts, &uplinks);
        let load_balancers = self.load_balancers(
            lb_raw,
            &networks,
            &ports,
            &host_names,
            &uplinks,
            &floating_ips,
        );
        self.service_address_owners(&networks, &ports);
        self.zones(&tenants);
        Config {
            path: path.to_path_buf(),
            switch,
            tenants,
            networks,
            ports,
            underlay,
            hosts,
            local_host: None,
            uplinks,
            floating_ips,
            port_forwards,
            security_groups,
            load_balancers,
        }
    }

    fn underlay(&mut self, u: RawUnderlay) -> UnderlaySettings {
        let d = UnderlaySettings::default();
        let s = UnderlaySettings {
            port: u.port.unwrap_or(d.port),
            ttl: u.ttl.unwrap_or(d.ttl),
            mtu: u.mtu.unwrap_or(d.mtu),
            src_ports: u.src_ports.unwrap_or(d.src_ports),
            gso: u.gso.unwrap_or(d.gso),
        };
        self.in_range("[underlay]", "port", s.port, 1..=65535);
        self.in_range("[underlay]", "ttl", s.ttl, 1..=255);
        self.in_range("[underlay]", "mtu", s.mtu, 1280..=9216);
        self.in_range("[underlay]", "src_ports", s.src_ports, 1..=256);
        s
    }

    fn hosts(&mut self, raw: Vec<RawHost>) -> Vec<Host> {
        let mut hosts: Vec<Host> = Vec::new();
        for h in raw {
            let item = format!("host {:?}", h.name);
            // Host names name lab namespaces, with "ul-" in front for the
            // underlay's.
            check_name(self, &item, "host name", &h.name, 12);
            let (addr, prefix) = match h.underlay.split_once('/') {
                None => (h.underlay.as_str(), Some(24)),
                Some((a, p)) => (a, p.parse::<u8>().ok().filter(|p| (8..=30).contains(p))),
            };
            let (Ok(addr), Some(prefix)) = (addr.trim().parse::<std::net::Ipv4Addr>(), prefix)
            else {
                self.problem(&item, format!("underlay {:?} is not an IPv4 address (optionally with a /8../30 prefix for the lab); write it like \"198.19.0.1/16\"", h.underlay));
                continue;
            };
            if addr.is_unspecified()
                || addr.is_multicast()
                || addr.is_broadcast()
                || addr.is_loopback()
            {
                self.problem(&item, format!("underlay {addr} cannot be a host's address; use the host's unicast underlay address"));
                continue;
            }
            if let Some(o) = hosts.iter().find(|o| o.name == h.name) {
                self.problem(
                    &item,
                    format!(
                        "the host is defined twice (underlay {} and {addr}); remove one",
                        o.addr
                    ),
                );
                continue;
            }
            if let Some(o) = hosts.iter().find(|o| o.addr == addr) {
                self.problem(
                    &item,
                    format!(
                        "underlay {addr} is also host {:?}'s; each host needs its own address",
                        o.name
                    ),
                );
                continue;
            }
            hosts.push(Host {
                name: h.name,
                addr,
                prefix,
            });
        }
        hosts
    }

    /// Reports `key` = `v` outside `range`; true when it is inside.
    fn in_range<T: PartialOrd + fmt::Display>(
        &mut self,
        item: &str,
        key: &str,
        v: T,
        range: std::ops::RangeInclusive<T>,
    ) -> bool {
        let ok = range.contains(&v);
        if !ok {
            let (lo, hi) = range.into_inner();
            self.problem(item, format!("{key} {v} is out of range; use {lo}..={hi}"));
        }
        ok
    }

    fn switch(&mut self, s: RawSwitch) -> SwitchSettings {
        let mac_table_size = s.mac_table_size.unwrap_or(DEFAULT_MAC_TABLE_SIZE);
        self.in_range(
            "[switch]",
            "mac_table_size",
            mac_table_size,
            MAC_TABLE_RANGE,
        );
        let aging = s.mac_aging_secs.unwrap_or(DEFAULT_MAC_AGING_SECS);
        self.in_range("[switch]", "mac_aging_secs", aging, AGING_RANGE);
        let workers = s.workers.unwrap_or(0);
        if workers > MAX_WORKERS {
            self.problem(
                "[switch]",
                format!("workers {workers} is more than {MAX_WORKERS}; use 0 for one per core"),
            );
        }
        let tap_queues = s.tap_queues.unwrap_or(0);
        if tap_queues > MAX_WORKERS {
            self.problem(
                "[switch]",
                format!(
                    "tap_queues {tap_queues} is more than {MAX_WORKERS}; use 0 for one per worker"
                ),
            );
        }
        let metrics_listen = match s.metrics_listen.as_deref().map(str::parse) {
            None => None,
            Some(Ok(a)) => Some(a),
            Some(Err(_)) => {
                self.problem(
                    "[switch]",
                    format!(
                        "metrics_listen {:?} is not ADDRESS:PORT; write it like \"127.0.0.1:9477\"",
                        s.metrics_listen.as_deref().unwrap_or_default()
                    ),
                );
                None
            }
        };
        let max_connections_per_port = s
            .max_connections_per_port
            .unwrap_or(DEFAULT_MAX_CONNECTIONS);
        self.in_range(
            "[switch]",
            "max_connections_per_port",
            max_connections_per_port,
            1..=1_048_576,
        );
        SwitchSettings {
            mac_table_size,
            mac_aging: Duration::from_secs(aging),
            workers,
            tap_queues,
            metrics_listen,
            max_connections_per_port,
        }
    }

    fn dhcp(&mut self, item: &str, net: &Network, d: RawDhcp) -> Option<DhcpSettings> {
        let item = format!("{item}, [dhcp]");
        if let IpNet::V4(c) = net.cidr {
            if c.prefix_len() > 30 {
                self.problem(&item, format!("cidr {c} leaves no addresses to hand out; DHCP needs a /30 or larger network; widen cidr or remove [dhcp]"));
                return None;
            }
        }
        let (IpNet::V4(cidr), Some(IpAddr::V4(_))) = (net.cidr, net.gateway) else {
            self.problem(&item, "DHCP needs an IPv4 cidr and a gateway (the server answers from the gateway address); add gateway = \"...\" or remove [dhcp]");
            return None;
        };
        let mut ok = true;
        let v4 = |what: &str, s: &str, this: &mut Validator| -> Option<std::net::Ipv4Addr> {
            match s.trim().parse() {
                Ok(a) => Some(a),
                Err(_) => {
                    this.problem(
                        &item,
                        format!("{what} {s:?} is not an IPv4 address; write it like \"10.0.1.1\""),
                    );
                    None
                }
            }
        };
        let mut pools = Vec::new();
        for r in &d.pool {
            let Some((a, b)) = r.split_once('-') else {
                self.problem(
                    &item,
                    format!("pool {r:?} is not a range; write it like \"10.0.1.100-10.0.1.199\""),
                );
                ok = false;
                continue;
            };
            match (v4("pool start", a, self), v4("pool end", b, self)) {
                (Some(a), Some(b)) if a <= b && cidr.contains(&a) && cidr.contains(&b) => {
                    pools.push((a, b))
                }
                (Some(a), Some(b)) => {
                    self.problem(&item, format!("pool {a}-{b} is reversed or not inside {cidr}; give start <= end inside the network"));
                    ok = false;
                }
                _ => ok = false,
            }
        }
        let mut dns = Vec::new();
        for s in d.dns.iter().flatten() {
            match v4("dns", s, self) {
                Some(a) => dns.push(a),
                None => ok = false,
            }
        }
        let mut routes = Vec::new();
        for r in &d.routes {
            let dest = r.dest.parse::<ipnet::Ipv4Net>();
            let via = v4("route via", &r.via, self);
            match (dest, via) {
                (Ok(dest), Some(via)) if dest.trunc() == dest && cidr.contains(&via) => {
                    routes.push((dest, via))
                }
                (Ok(dest), Some(via)) if dest.trunc() != dest => {
                    self.problem(&item, format!("route {dest} via {via}: the destination must be a network address; did you mean {}?", dest.trunc()));
                    ok = false;
                }
                (Ok(dest), Some(via)) => {
                    self.problem(&item, format!("route {dest} via {via}: via must be inside {cidr} (the next hop is on this network); pick a next hop inside it"));
                    ok = false;
                }
                (Err(_), _) => {
                    self.problem(
                        &item,
                        format!(
                            "route dest {:?} is not an IPv4 prefix such as \"192.168.0.0/16\"",
                            r.dest
                        ),
                    );
                    ok = false;
                }
                _ => ok = false,
            }
        }
        if let Some(m) = d.mtu {
            ok &= self.in_range(&item, "mtu", m, 576..=9000);
        }
        let lease_secs = d.lease_secs.unwrap_or(3600);
        ok &= self.in_range(&item, "lease_secs", lease_secs, 60..=31_536_000);
        let max_leases = d.max_leases.unwrap_or(4096);
        ok &= self.in_range(&item, "max_leases", max_leases, 1..=65_536);
        if let Some(domain) = &d.domain {
            if let Err(e) = dns::Zone::new(Some(domain)) {
                self.problem(&item, format!("domain {domain:?}: {e}"));
                ok = false;
            }
        }
        ok.then_some(DhcpSettings {
            pools,
            lease_secs,
            dns,
            domain: d.domain,
            mtu: d.mtu,
            routes,
            max_leases,
        })
    }

    fn network(
        &mut self,
        tenant: &str,
        n: RawNetwork,
        switch: &SwitchSettings,
        vnis: &mut HashMap<u32, String>,
        host_names: &[String],
    ) -> Option<Network> {
        let item = format!("tenant {tenant:?}, network {:?}", n.name);
        check_name(self, &item, "network name", &n.name, 32);
        let vni = match u32::try_from(n.vni) {
            Ok(v) if (1..=0xff_ffff).contains(&v) => v,
            _ => {
                self.problem(
                    &item,
                    format!("vni {} is out of range; use 1..=16777215", n.vni),
                );
                return None;
            }
        };
        let here = format!("{tenant}/{}", n.name);
        if let Some(other) = vnis.insert(vni, here) {
            self.problem(&item, format!("vni {vni} is also used by network {other}; VNIs are unique on a host, pick another"));
        }
        let cidr: IpNet = match n.cidr.parse() {
            Ok(c) => c,
            Err(_) => {
                self.problem(
                    &item,
                    format!(
                        "cidr {:?} is not a prefix; write it like \"10.0.1.0/24\"",
                        n.cidr
                    ),
                );
                return None;
            }
        };
        if cidr.trunc() != cidr {
            self.problem(
                &item,
                format!(
                    "cidr {cidr} has host bits set; did you mean {}?",
                    cidr.trunc()
                ),
            );
        }
        let cidr = cidr.trunc();
        let mac_table_size = n.mac_table_size.unwrap_or(switch.mac_table_size);
        self.in_range(&item, "mac_table_size", mac_table_size, MAC_TABLE_RANGE);
        let mut net = Network {
            tenant: tenant.to_string(),
            name: n.name,
            vni,
            cidr,
            gateway: None,
            mac_table_size,
            dhcp: None,
            snat: n.snat.unwrap_or(false),
            service_addresses: Vec::new(),
        };
        if let Some(g) = n.gateway {
            match g.parse::<IpAddr>() {
                Err(_) => self.problem(
                    &item,
                    format!("gateway {g:?} is not an IP address; write it like \"10.0.1.1\""),
                ),
                Ok(ip) => match host_address_problem(&net, ip) {
                    Some(why) => self.problem(&item, format!("gateway {ip} {why}")),
                    None => net.gateway = Some(ip),
                },
            }
        }
        if let Some(d) = n.dhcp {
            net.dhcp = self.dhcp(&item, &net, d);
        }
        net.service_addresses =
            self.service_addresses(&item, n.service_address, &net.cidr, net.gateway, host_names);
        if let Some(d) = &net.dhcp {
            for (_, a) in &net.service_addresses {
                if d.pools.iter().any(|(lo, hi)| (*lo..=*hi).contains(a)) {
                    self.problem(&item, format!("service_address {a} is inside a DHCP pool, which could lease it to a VM; pick an address outside the pools"));
                }
            }
        }
        Some(net)
    }
}

/// Why `ip` cannot be a host in `net`, if it cannot.
fn host_address_problem(net: &Network, ip: IpAddr) -> Option<String> {
    let cidr = net.cidr;
    if !cidr.contains(&ip) {
        return Some(format!(
            "is outside the network's cidr {cidr}; pick an address inside it"
        ));
    }
    if let IpNet::V4(v4) = cidr {
        if v4.prefix_len() < 31
            && (ip == IpAddr::V4(v4.network()) || ip == IpAddr::V4(v4.broadcast()))
        {
            return Some(format!(
                "is the network or broadcast address of {cidr}; pick a host address"
            ));
        }
    }
    if Some(ip) == net.gateway {
        return Some(format!(
            "is the gateway of network {:?}; pick another address",
            net.name
        ));
    }
    None
}

fn check_name(v: &mut Validator, item: &str, what: &str, name: &str, max: usize) {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if name.is_empty() || name.len() > max || !ok_chars || name.starts_with('.') {
        v.problem(
            item,
            format!("{what} {name:?} is not valid; use 1-{max} characters of A-Z a-z 0-9 - _ . (not starting with '.')"),
        );
    }
}

/// Whether `name` can name a Linux network interface.
pub fn check_ifname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 15 {
        Err("is not 1-15 bytes long")
    } else if name == "." || name == ".." {
        Err("is not a valid interface name")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Err("contains '/', ':', white space or a control character")
    } else {
        Ok(())
    }
}

/// The MAC a port gets when the config gives none: locally administered,
/// unicast, stable for a given tenant and port name (FNV-1a of both).
pub fn derived_mac(tenant: &str, port: &str) -> MacAddr {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tenant.bytes().chain([b'/']).chain(port.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    MacAddr([0x02, b[0], b[1], b[2], b[3], b[4]])
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[switch]
mac_table_size = 1024

[[tenant]]
name = "acme"
  [[tenant.network]]
  name = "web"
  vni = 1001
  cidr = "10.0.1.0/24"
  gateway = "10.0.1.1"
  [[tenant.port]]
  name = "vm1"
  network = "web"
  mac = "02:00:0a:00:01:0a"
  ip = "10.0.1.10"
  [[tenant.port]]
  name = "vm2"
  network = "web"

[[tenant]]
name = "globex"
  [[tenant.network]]
  name = "web"
  vni = 2001
  cidr = "10.0.1.0/24"
  [[tenant.port]]
  name = "g1"
  network = "web"
  mac = "02:00:0a:00:01:0a"
  ip = "10.0.1.10"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), text)
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("config was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.tenants, ["acme", "globex"]);
        assert_eq!(c.networks.len(), 2);
        assert_eq!(c.networks[0].mac_table_size, 1024);
        assert_eq!(c.switch.mac_aging, Duration::from_secs(300));
        let vm2 = &c.ports[1];
        assert_eq!(vm2.tap, "vs-vm2");
        assert!(vm2.port_security);
        assert_eq!(vm2.mac, derived_mac("acme", "vm2"));
        assert!(vm2.mac.is_unicast() && vm2.mac.is_local());
        // Overlapping tenants: same cidr, ip and MAC are fine.
        assert_eq!(c.ports[2].mac, c.ports[0].mac);
    }

    #[test]
    fn unknown_network_names_port_and_fix() {
        let e = err(&GOOD.replace("network = \"web\"\n\n", "network = \"db\"\n\n"));
        assert!(e.contains("t.toml: tenant \"acme\", port \"vm2\": network \"db\" is not a network of tenant \"acme\" (its networks: web)"), "{e}");
        assert!(e.contains("add a [[tenant.network]]"), "{e}");
    }

    #[test]
    fn duplicate_vni_across_tenants() {
        let e = err(&GOOD.replace("vni = 2001", "vni = 1001"));
        assert!(
            e.contains(
                "tenant \"globex\", network \"web\": vni 1001 is also used by network acme/web"
            ),
            "{e}"
        );
    }

    #[test]
    fn ip_checks() {
        let e = err(&GOOD.replacen("ip = \"10.0.1.10\"", "ip = \"10.0.2.10\"", 1));
        assert!(
            e.contains("port \"vm1\": ip 10.0.2.10 is outside the network's cidr 10.0.1.0/24"),
            "{e}"
        );
        let e = err(&GOOD.replacen("ip = \"10.0.1.10\"", "ip = \"10.0.1.1\"", 1));
        assert!(e.contains("is the gateway"), "{e}");
        let e = err(&GOOD.replacen("ip = \"10.0.1.10\"", "ip = \"10.0.1.255\"", 1));
        assert!(e.contains("broadcast"), "{e}");
        let e = err(&GOOD.replacen("ip = \"10.0.1.10\"", "ip = \"10.0.1.10/24\"", 1));
        assert!(e.contains("not an IP address"), "{e}");
    }

    #[test]
    fn mac_checks() {
        let e = err(&GOOD.replacen("02:00:0a:00:01:0a", "01:00:5e:00:00:01", 1));
        assert!(
            e.contains("port \"vm1\": mac 01:00:5e:00:00:01 is a multicast"),
            "{e}"
        );
        let e = err(&GOOD.replacen("02:00:0a:00:01:0a", "zz", 1));
        assert!(
            e.contains("port \"vm1\": mac: \"zz\" is not a MAC address"),
            "{e}"
        );
        let dup = GOOD.replacen(
            "  name = \"vm2\"\n  network = \"web\"\n",
            "  name = \"vm2\"\n  network = \"web\"\n  mac = \"02:00:0a:00:01:0a\"\n",
            1,
        );
        let e = err(&dup);
        assert!(
            e.contains("port \"vm2\": mac 02:00:0a:00:01:0a is already used"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_is_a_syntax_error_with_hint() {
        let e = err(&GOOD.replace("gateway = \"10.0.1.1\"", "gatway = \"10.0.1.1\""));
        assert!(
            e.starts_with("t.toml: line 11, column 3: unknown field `gatway`"),
            "{e}"
        );
        assert!(e.contains("gatway"), "{e}");
        assert!(e.contains("fix its spelling"), "{e}");
    }

    #[test]
    fn names_taps_and_ranges() {
        let e = err(&GOOD.replace("name = \"vm1\"", "name = \"a-very-long-port-name\""));
        assert!(
            e.contains("port name \"a-very-long-port-name\" is not valid"),
            "{e}"
        );
        let e = err(&GOOD.replace("name = \"g1\"", "name = \"vm1\""));
        assert!(
            e.contains("port \"vm1\": another port has the same name"),
            "{e}"
        );
        let e = err(&GOOD.replace("mac_table_size = 1024", "mac_table_size = 1"));
        assert!(
            e.contains("[switch]: mac_table_size 1 is out of range"),
            "{e}"
        );
        let e = err(&GOOD.replace("vni = 1001", "vni = 16777216"));
        assert!(e.contains("vni 16777216 is out of range"), "{e}");
        let e = err(&GOOD.replace(
            "cidr = \"10.0.1.0/24\"\n  gateway",
            "cidr = \"10.0.1.5/24\"\n  gateway",
        ));
        assert!(e.contains("did you mean 10.0.1.0/24"), "{e}");
    }

    #[test]
    fn reports_every_problem() {
        let text = GOOD.replace("vni = 2001", "vni = 0").replace(
            "ip = \"10.0.1.10\"\n  [[tenant.port]]",
            "ip = \"x\"\n  [[tenant.port]]",
        );
        match parse(&text) {
            Err(ConfigError::Invalid { problems, .. }) => {
                assert!(problems.len() >= 2, "{problems:?}")
            }
            other => panic!("{other:?}"),
        }
    }

    const DHCP: &str = r#"
[[tenant]]
name = "acme"
  [[tenant.network]]
  name = "web"
  vni = 1001
  cidr = "10.0.1.0/24"
  gateway = "10.0.1.1"
  [tenant.network.dhcp]
  pool = ["10.0.1.100-10.0.1.199"]
  lease_secs = 600
  dns = ["10.0.1.1"]
  domain = "acme.internal"
  mtu = 1450
  routes = [{ dest = "192.168.0.0/16", via = "10.0.1.1" }]
  [[tenant.port]]
  name = "vm1"
  network = "web"
  ip = "10.0.1.10"
  hostname = "www"
"#;

    #[test]
    fn dhcp_section_parses() {
        let c = parse(DHCP).unwrap();
        let d = c.networks[0].dhcp.as_ref().unwrap();
        assert_eq!(
            d.pools,
            vec![("10.0.1.100".parse().unwrap(), "10.0.1.199".parse().unwrap())]
        );
        assert_eq!((d.lease_secs, d.mtu, d.max_leases), (600, Some(1450), 4096));
        assert_eq!(
            d.routes,
            vec![(
                "192.168.0.0/16".parse().unwrap(),
                "10.0.1.1".parse().unwrap()
            )]
        );
        assert_eq!(c.ports[0].hostname.as_deref(), Some("www"));
        // The dhcp crate accepts what we validated; the port's ip is a reservation.
        let sc = crate::dhcp_service::server_config(&c, &c.networks[0]).unwrap();
        sc.validate().unwrap();
        assert_eq!(sc.reservations.len(), 1);
        assert_eq!(
            sc.reservations[0].ip,
            "10.0.1.10".parse::<std::net::Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn dhcp_section_errors_name_the_network() {
        let e = err(&DHCP.replace("10.0.1.100-10.0.1.199", "10.0.2.100-10.0.2.199"));
        assert!(e.contains("tenant \"acme\", network \"web\", [dhcp]: pool 10.0.2.100-10.0.2.199 is reversed or not inside 10.0.1.0/24"), "{e}");
        let e = err(&DHCP.replace("10.0.1.100-10.0.1.199", "10.0.1.100"));
        assert!(e.contains("is not a range"), "{e}");
        let e = err(&DHCP.replace("  gateway = \"10.0.1.1\"\n", ""));
        assert!(
            e.contains("[dhcp]: DHCP needs an IPv4 cidr and a gateway"),
            "{e}"
        );
        let small = DHCP.replace("10.0.1.0/24", "10.0.1.0/31");
        let e = err(&small);
        assert!(e.contains("DHCP needs a /30 or larger network"), "{e}");
        let e = err(&DHCP.replace("mtu = 1450", "mtu = 100"));
        assert!(e.contains("mtu 100 is out of range"), "{e}");
        let e = err(&DHCP.replace("acme.internal", "bad..domain"));
        assert!(e.contains("domain \"bad..domain\""), "{e}");
        let e = err(&DHCP.replace("via = \"10.0.1.1\"", "via = \"172.16.0.1\""));
        assert!(e.contains("via must be inside 10.0.1.0/24"), "{e}");
        let e = err(&DHCP.replace("lease_secs = 600", "lease_sec = 600"));
        assert!(e.contains("unknown field `lease_sec`"), "{e}");
    }

    #[test]
    fn type_errors_name_the_key_and_the_type() {
        let e = err(&GOOD.replace("vni = 1001", "vni = \"1001\""));
        assert!(
            e.contains("t.toml: line 9, column 9: vni: invalid type: string \"1001\", expected an integer; give vni a value of that type"),
            "{e}"
        );
        let e = err(&DHCP.replace("lease_secs = 600", "lease_secs = -1"));
        assert!(
            e.contains(
                "lease_secs: invalid value: integer `-1`, expected an integer 0..=4294967295"
            ),
            "{e}"
        );
        let e = err(&DHCP.replace(
            "pool = [\"10.0.1.100-10.0.1.199\"]",
            "pool = \"10.0.1.100-10.0.1.199\"",
        ));
        assert!(e.contains("pool: invalid type: string \"10.0.1.100-10.0.1.199\", expected a list [...]; give pool a value"), "{e}");
    }

    #[test]
    fn dhcp_routes_and_addresses_say_what_is_wrong() {
        let e = err(&DHCP.replace("192.168.0.0/16", "192.168.1.0/16"));
        assert!(
            e.contains("route 192.168.1.0/16 via 10.0.1.1: the destination must be a network address; did you mean 192.168.0.0/16?"),
            "{e}"
        );
        let e = err(&DHCP.replace("dns = [\"10.0.1.1\"]", "dns = [\"ns1\"]"));
        assert!(
            e.contains("[dhcp]: dns \"ns1\" is not an IPv4 address; write it like \"10.0.1.1\""),
            "{e}"
        );
    }

    #[test]
    fn a_tenants_networks_share_one_domain() {
        let two = format!(
            "{DHCP}  [[tenant.network]]\n  name = \"db\"\n  vni = 1002\n  cidr = \"10.0.2.0/24\"\n  \
             gateway = \"10.0.2.1\"\n  [tenant.network.dhcp]\n  domain = \"DB.internal\"\n"
        );
        let e = err(&two);
        assert!(e.contains("tenant \"acme\", network \"db\", [dhcp]: domain \"DB.internal\" differs from domain \"acme.internal\" of network \"web\"; a tenant has one DNS zone"), "{e}");
        // The same domain (any case, trailing dot) or none is fine.
        parse(&two.replace("DB.internal", "ACME.internal.")).unwrap();
        parse(&two.replace("  domain = \"DB.internal\"\n", "")).unwrap();
        // Other tenants have their own zone.
        let other = format!(
            "{DHCP}[[tenant]]\nname = \"globex\"\n  [[tenant.network]]\n  name = \"db\"\n  vni = 2002\n  \
             cidr = \"10.0.2.0/24\"\n  gateway = \"10.0.2.1\"\n  [tenant.network.dhcp]\n  domain = \"globex.internal\"\n"
        );
        parse(&other).unwrap();
    }

    #[test]
    fn derived_mac_is_stable_and_distinct() {
        assert_eq!(derived_mac("a", "vm1"), derived_mac("a", "vm1"));
        assert_ne!(derived_mac("a", "vm1"), derived_mac("b", "vm1"));
        assert_ne!(derived_mac("a", "vm1"), derived_mac("a", "vm2"));
    }

    #[test]
    fn examples_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(
            n >= 2,
            "expected at least two examples in {}",
            dir.display()
        );
    }

    const HOSTS: &str = r#"
[underlay]
mtu = 1600

[[host]]
name = "a"
underlay = "198.19.0.1/16"

[[host]]
name = "b"
underlay = "198.19.0.2"

[[tenant]]
name = "acme"
  [[tenant.network]]
  name = "web"
  vni = 1001
  cidr = "10.0.1.0/24"
  gateway = "10.0.1.1"
  [tenant.network.dhcp]
  pool = ["10.0.1.100-10.0.1.109", "10.0.1.200-10.0.1.204"]
  [[tenant.port]]
  name = "vm1"
  network = "web"
  host = "a"
  [[tenant.port]]
  name = "vm2"
  network = "web"
  host = "b"
  [[tenant.port]]
  name = "vm3"
  network = "web"
  host = "b"
"#;

    #[test]
    fn hosts_parse_and_select() {
        let c = parse(HOSTS).unwrap();
        assert_eq!(c.hosts.len(), 2);
        assert_eq!(c.hosts[0].prefix, 16);
        assert_eq!(c.hosts[1].prefix, 24);
        assert_eq!(c.overlay_mtu(), Some(1550));
        let e = c.clone().for_host(None).unwrap_err().to_string();
        assert!(e.contains("t.toml: [[host]]: the config describes several hosts (a, b); start vswitchd with --host NAME"), "{e}");
        let e = c.clone().for_host(Some("c")).unwrap_err().to_string();
        assert!(
            e.contains("--host \"c\" is not one of the config's hosts (a, b)"),
            "{e}"
        );
        let b = c.clone().for_host(Some("b")).unwrap();
        let local: Vec<&str> = b.local_ports().map(|p| p.name.as_str()).collect();
        assert_eq!(local, ["vm2", "vm3"]);
        let e = parse(GOOD)
            .unwrap()
            .for_host(Some("a"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no [[host]] entries"), "{e}");
    }

    #[test]
    fn pools_split_between_hosts_without_overlap() {
        let c = parse(HOSTS).unwrap();
        let net = &c.networks[0];
        let a = c.clone().for_host(Some("a")).unwrap().local_pools(net);
        let b = c.clone().for_host(Some("b")).unwrap().local_pools(net);
        let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap();
        // 15 addresses, two hosts: 7 and 8, contiguous in pool order.
        assert_eq!(a, [(ip("10.0.1.100"), ip("10.0.1.106"))]);
        assert_eq!(
            b,
            [
                (ip("10.0.1.107"), ip("10.0.1.109")),
                (ip("10.0.1.200"), ip("10.0.1.204"))
            ]
        );
        // Single host: the whole pool.
        assert_eq!(c.local_pools(net).len(), 2);
    }

    #[test]
    fn host_problems_name_the_item_and_fix() {
        let e = err(&HOSTS.replacen("host = \"b\"", "host = \"z\"", 1));
        assert!(
            e.contains("port \"vm2\": host \"z\" is not a [[host]] of this config (hosts: a, b)"),
            "{e}"
        );
        let e = err(&HOSTS.replacen("  host = \"a\"\n", "", 1));
        assert!(e.contains("port \"vm1\": the config has [[host]] entries, so every port says where it lives; add host = \"NAME\""), "{e}");
        let e = err(&HOSTS.replace("198.19.0.2\"", "198.19.0.1\""));
        assert!(
            e.contains("host \"b\": underlay 198.19.0.1 is also host \"a\"'s"),
            "{e}"
        );
        let e = err(&HOSTS.replace("198.19.0.2\"", "banana\""));
        assert!(
            e.contains("host \"b\": underlay \"banana\" is not an IPv4 address"),
            "{e}"
        );
        let e = err(&HOSTS
            .replace("name = \"b\"", "name = \"vm1\"")
            .replace("host = \"b\"", "host = \"vm1\""));
        assert!(e.contains("a host has the same name"), "{e}");
        let e = err(&HOSTS.replace("name = \"vm3\"", "name = \"ul-a\""));
        assert!(
            e.contains("port \"ul-a\": the lab's underlay namespace is also named \"ul-a\""),
            "{e}"
        );
        parse(&HOSTS.replace("name = \"vm3\"", "name = \"ul-b\"")).unwrap();
        let e = err(&HOSTS.replace(
            "[tenant.network.dhcp]",
            "[tenant.network.dhcp]\n  mtu = 1551",
        ));
        assert!(
            e.contains(
                "[dhcp]: mtu 1551 does not fit VXLAN over the underlay MTU 1600 (at most 1550)"
            ),
            "{e}"
        );
        let e = err(&HOSTS.replace("mtu = 1600", "mtu = 100"));
        assert!(e.contains("[underlay]: mtu 100 is out of range"), "{e}");
        let e = err(&GOOD.replacen(
            "network = \"web\"\n",
            "network = \"web\"\n  host = \"a\"\n",
            1,
        ));
        assert!(e.contains("the config has no [[host]] entries"), "{e}");
    }
}
