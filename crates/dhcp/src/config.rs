//! Per-network server configuration and its validation.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::Mac;

/// An inclusive range of addresses handed out dynamically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    /// First address.
    pub start: Ipv4Addr,
    /// Last address (inclusive).
    pub end: Ipv4Addr,
}

/// A static reservation: this MAC always gets this address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The client's MAC (chaddr).
    pub mac: Mac,
    /// The reserved address (inside the subnet; excluded from pools).
    pub ip: Ipv4Addr,
    /// Host name sent in option 12 (overrides the port name).
    pub hostname: Option<String>,
    /// Lease time in seconds (overrides [`ServerConfig::lease_time`]).
    pub lease_time: Option<u32>,
}

/// A classless static route (option 121, RFC 3442).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticRoute {
    /// Destination network.
    pub dest: Ipv4Net,
    /// Next hop.
    pub gateway: Ipv4Addr,
}

/// The DHCP server configuration of one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Network id (for messages and the lease store).
    pub network: String,
    /// The subnet the network serves (e.g. 10.0.0.0/24).
    pub subnet: Ipv4Net,
    /// Server identifier (option 54): the switch's address in the subnet,
    /// usually the gateway. Never handed out.
    pub server_ip: Ipv4Addr,
    /// Routers (option 3). Usually `[server_ip]`.
    pub routers: Vec<Ipv4Addr>,
    /// DNS servers (option 6).
    pub dns_servers: Vec<Ipv4Addr>,
    /// Domain name (option 15).
    pub domain_name: Option<String>,
    /// Interface MTU (option 26).
    pub mtu: Option<u16>,
    /// Classless static routes (option 121). When sent, a default route via
    /// `routers[0]` is added (clients that use 121 ignore option 3).
    pub static_routes: Vec<StaticRoute>,
    /// Lease time in seconds (option 51). Default 3600.
    pub lease_time: u32,
    /// Renewal time T1 in seconds; default 0.5 × lease time.
    pub t1: Option<u32>,
    /// Rebinding time T2 in seconds; default 0.875 × lease time.
    pub t2: Option<u32>,
    /// How long an offer holds its address, seconds. Default 60.
    pub offer_timeout: u32,
    /// How long a declined address is kept out of use, seconds. Default 600.
    pub decline_quarantine: u32,
    /// Most bindings (offered + bound) at once. Default 4096.
    pub max_leases: usize,
    /// Dynamic pools (inside the subnet).
    pub pools: Vec<IpRange>,
    /// Static reservations.
    pub reservations: Vec<Reservation>,
}

impl ServerConfig {
    /// A configuration with defaults: the router is `server_ip`, no pools.
    pub fn new(network: impl Into<String>, subnet: Ipv4Net, server_ip: Ipv4Addr) -> Self {
        ServerConfig {
            network: network.into(),
            subnet: subnet.trunc(),
            server_ip,
            routers: vec![server_ip],
            dns_servers: Vec::new(),
            domain_name: None,
            mtu: None,
            static_routes: Vec::new(),
            lease_time: 3600,
            t1: None,
            t2: None,
            offer_timeout: 60,
            decline_quarantine: 600,
            max_leases: 4096,
            pools: Vec::new(),
            reservations: Vec::new(),
        }
    }

    /// T1 in seconds for a lease of `lease` seconds.
    pub fn t1_for(&self, lease: u32) -> u32 {
        match self.t1 {
            Some(t) => t.min(lease),
            None => lease / 2,
        }
    }

    /// T2 in seconds for a lease of `lease` seconds.
    pub fn t2_for(&self, lease: u32) -> u32 {
        match self.t2 {
            Some(t) => t.min(lease),
            None => (u64::from(lease) * 7 / 8) as u32,
        }
    }

    /// Checks the configuration; every error names the item and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let net = &self.network;
        if self.subnet.prefix_len() > 30 {
            return Err(ConfigError::SubnetTooSmall {
                network: net.clone(),
                subnet: self.subnet,
            });
        }
        if !self.usable(self.server_ip) {
            return Err(ConfigError::ServerIpOutside {
                network: net.clone(),
                ip: self.server_ip,
                subnet: self.subnet,
            });
        }
        if self.lease_time == 0 {
            return Err(ConfigError::ZeroLeaseTime {
                network: net.clone(),
            });
        }
        if self.max_leases == 0 {
            return Err(ConfigError::ZeroMaxLeases {
                network: net.clone(),
            });
        }
        let t1 = self.t1_for(self.lease_time);
        let t2 = self.t2_for(self.lease_time);
        if t1 > t2 {
            return Err(ConfigError::T1AfterT2 {
                network: net.clone(),
                t1,
                t2,
            });
        }
        for r in &self.pools {
            if r.start > r.end || !self.subnet.contains(&r.start) || !self.subnet.contains(&r.end) {
                return Err(ConfigError::BadPool {
                    network: net.clone(),
                    start: r.start,
                    end: r.end,
                    subnet: self.subnet,
                });
            }
        }
        let mut macs = HashSet::new();
        let mut ips = HashSet::new();
        for r in &self.reservations {
            if !self.usable(r.ip) || r.ip == self.server_ip {
                return Err(ConfigError::BadReservation {
                    network: net.clone(),
                    ip: r.ip,
                    subnet: self.subnet,
                });
            }
            if r.lease_time == Some(0) {
                return Err(ConfigError::ZeroLeaseTime {
                    network: net.clone(),
                });
            }
            if !macs.insert(r.mac) || !ips.insert(r.ip) {
                return Err(ConfigError::DuplicateReservation {
                    network: net.clone(),
                    ip: r.ip,
                    mac: crate::fmt_mac(&r.mac),
                });
            }
        }
        for r in &self.static_routes {
            if r.dest.trunc() != r.dest {
                return Err(ConfigError::BadRoute {
                    network: net.clone(),
                    dest: r.dest,
                });
            }
        }
        Ok(())
    }

    /// A host address of the subnet (not the network or broadcast address).
    pub fn usable(&self, ip: Ipv4Addr) -> bool {
        self.subnet.contains(&ip) && ip != self.subnet.network() && ip != self.subnet.broadcast()
    }
}

/// A configuration the server cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Subnet with no room for clients.
    #[error(
        "network {network}: dhcp subnet {subnet} is too small; use a prefix of /30 or shorter"
    )]
    SubnetTooSmall {
        /// Network id.
        network: String,
        /// The subnet.
        subnet: Ipv4Net,
    },
    /// Server address not a host address of the subnet.
    #[error("network {network}: dhcp server address {ip} is not a host address of {subnet}; pick one inside the subnet")]
    ServerIpOutside {
        /// Network id.
        network: String,
        /// The address.
        ip: Ipv4Addr,
        /// The subnet.
        subnet: Ipv4Net,
    },
    /// Lease time 0.
    #[error("network {network}: dhcp lease time must be at least 1 second")]
    ZeroLeaseTime {
        /// Network id.
        network: String,
    },
    /// max_leases 0.
    #[error("network {network}: dhcp max_leases must be at least 1")]
    ZeroMaxLeases {
        /// Network id.
        network: String,
    },
    /// T1 later than T2.
    #[error("network {network}: dhcp renewal time t1 ({t1} s) is later than rebinding time t2 ({t2} s); make t1 <= t2")]
    T1AfterT2 {
        /// Network id.
        network: String,
        /// T1 seconds.
        t1: u32,
        /// T2 seconds.
        t2: u32,
    },
    /// Pool range reversed or outside the subnet.
    #[error("network {network}: dhcp pool {start}-{end} is reversed or not inside {subnet}; give start <= end inside the subnet")]
    BadPool {
        /// Network id.
        network: String,
        /// Range start.
        start: Ipv4Addr,
        /// Range end.
        end: Ipv4Addr,
        /// The subnet.
        subnet: Ipv4Net,
    },
    /// Reservation address outside the subnet or the server's own address.
    #[error("network {network}: dhcp reservation {ip} is not a free host address of {subnet}; pick another address")]
    BadReservation {
        /// Network id.
        network: String,
        /// The address.
        ip: Ipv4Addr,
        /// The subnet.
        subnet: Ipv4Net,
    },
    /// Same MAC or address reserved twice.
    #[error("network {network}: dhcp reservation {mac} -> {ip} repeats a MAC or an address; each MAC and address may be reserved once")]
    DuplicateReservation {
        /// Network id.
        network: String,
        /// The address.
        ip: Ipv4Addr,
        /// The MAC.
        mac: String,
    },
    /// Static route with host bits set.
    #[error(
        "network {network}: dhcp static route {dest} has host bits set; write the network address"
    )]
    BadRoute {
        /// Network id.
        network: String,
        /// The route.
        dest: Ipv4Net,
    },
}
