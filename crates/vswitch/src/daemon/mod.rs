//! The switch's control-plane state: applying a config (at start and on
//! reload) and answering questions about the running switch.
//!
//! Applying a config is a diff against the running one, by port and network
//! name. Ports that did not change keep their tap, id, counters and MAC
//! entries; only what changed is touched, in an order that never exposes a
//! half-built state to the data path: stop polling what goes, flush its MAC
//! entries, install what comes, publish the new snapshot, start polling what
//! is new. A config that cannot be applied (a tap cannot be created) leaves
//! the running one in place.

mod connections;
mod trace;

pub use trace::NOT_OBSERVABLE;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::clock::Timestamp;
use crate::config::{Config, NetKey, Port};
use crate::dataplane::{NetworkRt, PortCounters, PortKind, PortRt, Snapshot, TapHandle, Workers};
use crate::dhcp_service::{DhcpQueue, DhcpService};
use crate::directory::{Directory, StaticDirectory};
use crate::fdb::{Fdb, PortId};
use crate::lb_tables::LbTables;
use crate::nat_tables::NatTables;
use crate::pipeline::external::UplinkRt;
use crate::pipeline::router::{Leg, Neighbours, Router};
use crate::pipeline::security::{self, PortSg, SgTables};
use crate::pipeline::{Addresses, Bridge, DropReason, IpOwner, Leased};
use crate::tap::Tap;
use crate::underlay::{PeerCounters, PeerRt, Underlay, VTEP_BASE};
use packet::MacAddr;

/// Why the switch could not start or apply a config.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A tap could not be created.
    #[error("port {port:?}: cannot create tap {tap:?}: {source}{hint}")]
    Tap {
        /// The port.
        port: String,
        /// The tap name.
        tap: String,
        /// The OS error.
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// Worker threads or epoll could not be set up.
    #[error("cannot start the data plane: {0}")]
    Io(#[from] std::io::Error),
    /// A network's DHCP server could not be set up (config or lease log).
    #[error("DHCP: {0}")]
    Dhcp(String),
    /// The underlay socket could not be opened.
    #[error("underlay {addr}: {source}{hint}")]
    Underlay {
        /// Address and port.
        addr: String,
        /// The OS error.
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// A reload that would need a restart.
    #[error("{0}")]
    NeedsRestart(String),
    /// NAT refused the rules.
    #[error("NAT: {0}")]
    Nat(String),
    /// Security groups did not compile.
    #[error("security groups of tenant {tenant:?}: {message}")]
    SecurityGroups {
        /// The tenant.
        tenant: String,
        /// The firewall's message.
        message: String,
    },
}

/// What a reload changed.
#[derive(Debug, Default, Clone, serde::Serialize, PartialEq, Eq)]
pub struct ReloadReport {
    /// New ports.
    pub added_ports: Vec<String>,
    /// Ports that went away.
    pub removed_ports: Vec<String>,
    /// Ports whose network, MAC, port security or tap changed.
    pub changed_ports: Vec<String>,
    /// New networks (`tenant/network`).
    pub added_networks: Vec<String>,
    /// Networks that went away.
    pub removed_networks: Vec<String>,
}

#[derive(Debug)]
struct PortState {
    id: PortId,
    cfg: Port,
    tap: Arc<TapHandle>,
    counters: Arc<PortCounters>,
    capture: Arc<crate::capture::PortCapture>,
}

#[derive(Debug)]
struct State {
    config: Arc<Config>,
    ports: HashMap<String, PortState>,
    bridges: HashMap<NetKey, Arc<Bridge>>,
    /// DHCP leases per network, kept across reloads.
    leased: HashMap<NetKey, Arc<ArcSwap<Leased>>>,
    /// DNS zone per tenant, kept across reloads.
    zones: HashMap<String, Arc<ArcSwap<dns::Zone>>>,
    /// Peer pseudo-port ids by host name, kept across reloads.
    peer_ids: HashMap<String, PortId>,
    /// Peer counters by host name, kept across reloads.
    peer_counters: HashMap<String, Arc<PeerCounters>>,
    /// Directory MACs of remote ports installed in the bridges.
    remote_statics: HashSet<(NetKey, MacAddr, PortId)>,
    /// The router's ARP answers per network, kept across reloads.
    neighbours: HashMap<NetKey, Arc<Neighbours>>,
    /// The uplink's ARP answers, kept across reloads.
    uplink_neighbours: Arc<Neighbours>,
    /// Compiled security groups per filtering tenant (their hit counters
    /// carry over to the next compile for unchanged rules).
    firewalls: HashMap<String, Arc<firewall::Firewall>>,
}

/// The running switch.
#[derive(Debug)]
pub struct Daemon {
    shared: Arc<ArcSwap<Snapshot>>,
    dhcp: DhcpService,
    workers: Mutex<Option<Workers>>,
    state: Mutex<State>,
    started: Instant,
    underlay: Option<Arc<Underlay>>,
    nat: Arc<NatTables>,
    /// NAT, the balancer's table and pools, for new snapshots.
    lasting: Lasting,
    /// The load balancers' health-check thread.
    health: Mutex<Option<std::thread::JoinHandle<()>>>,
    sg_table: Arc<SgTables>,
    state_dir: std::path::PathBuf,
    /// Set by `vswitchctl restart`; the control loop stops the switch
    /// without removing taps, after saving connections.
    restart: Arc<tokio::sync::Notify>,
}

/// The tables that outlive snapshots (reloads) and go into each one.
#[derive(Debug, Clone)]
struct Lasting {
    nat: Arc<NatTables>,
    lb: Arc<LbTables>,
    balancers: Arc<crate::balancer::Balancers>,
}

fn empty_snapshot(config: Arc<Config>, l: &Lasting) -> Snapshot {
    let nat = l.nat.clone();
    Snapshot {
        lb: l.lb.clone(),
        balancers: l.balancers.clone(),
        lb_gate: crate::dataplane::LbGate::default(),
        lb_external: HashSet::new(),
        ports: Vec::new(),
        networks: Vec::new(),
        config,
        underlay: None,
        peers: Vec::new(),
        peer_by_ip: HashMap::new(),
        by_vni: HashMap::new(),
        uplink: None,
        nat,
        routers: HashMap::new(),
    }
}

/// The uplink of this host as a port (its tap, id, counters and capture
/// are handled like a VM port's).
fn uplink_port(cfg: &Config) -> Option<Port> {
    let u = cfg.local_uplink()?;
    Some(Port {
        name: u.name.clone(),
        tenant: String::new(),
        network: String::new(),
        mac: u.mac,
        ip: Some(IpAddr::V4(u.ip())),
        tap: u.tap.clone(),
        port_security: false,
        hostname: None,
        host: u.host.clone(),
        security_groups: Vec::new(),
        max_connections: cfg.switch.max_connections_per_port,
    })
}

/// Where `vslab` keeps port `p`'s tap and the MAC it gave it there: a VM's
/// namespace (named after the port; the VM's MAC), or for an uplink the
/// lab's external namespace (the MAC of the external end).
fn lab_home(cfg: &Config, p: &Port) -> (String, MacAddr) {
    match cfg.uplinks.iter().find(|u| u.name == p.name) {
        Some(u) => (
            crate::lab::external_namespace(cfg).unwrap_or_default(),
            u.peer_mac(),
        ),
        None => (p.name.clone(), p.mac),
    }
}

/// Opens this host's underlay sockets, when the config spans hosts.
fn open_underlay(config: &Config, workers: usize) -> Result<Option<Arc<Underlay>>, ApplyError> {
    let Some(me) = config.local_host.as_deref().and_then(|h| config.host(h)) else {
        return Ok(None);
    };
    let u = &config.underlay;
    Underlay::open(me.addr, u.port, u.ttl, u.mtu, workers, u.src_ports, u.gso)
        .map(|ul| Some(Arc::new(ul)))
        .map_err(|source| ApplyError::Underlay {
            addr: format!("{}:{}", me.addr, u.port),
            hint: match source.raw_os_error() {
                Some(libc::EADDRNOTAVAIL) => "; no interface of this host (network namespace) has that address: is this the right --host?",
                Some(libc::EADDRINUSE) => "; another process (a kernel vxlan device?) has that UDP port",
                _ => "",
            },
            source,
        })
}

impl Daemon {
    /// Starts the workers and applies `config`.
    pub fn start(
        config: Config,
        workers_override: Option<usize>,
        state_dir: &std::path::Path,
    ) -> Result<Daemon, ApplyError> {
        let n = match workers_override.unwrap_or(config.switch.workers) {
            0 => auto_workers(),
            n => n,
        };
        let config = Arc::new(config);
        // Stripes fixed for the process: from the starting config's range.
        let stripes = crate::nat_tables::stripes_for(config.nat_rules().ports);
        let nat = NatTables::new(conntrack::Config::default(), stripes)
            .map_err(|e| ApplyError::Nat(e.to_string()))?;
        let nat = Arc::new(nat);
        // Per-port caps are the ports' own (`max_connections`, checked by
        // the stage); the table's is only the global one, over all shards.
        let sg_table = SgTables::new_sg(conntrack::Config {
            max_per_port: usize::MAX,
            ..conntrack::Config::default()
        })
        .map_err(|e| ApplyError::Nat(e.to_string()))?;
        let sg_table = Arc::new(sg_table);
        let lb = LbTables::new_lb(conntrack::Config::default())
            .map_err(|e| ApplyError::Nat(e.to_string()))?;
        let lasting = Lasting {
            nat: nat.clone(),
            lb: Arc::new(lb),
            balancers: Arc::default(),
        };
        let shared = Arc::new(ArcSwap::from_pointee(empty_snapshot(
            config.clone(),
            &lasting,
        )));
        let health = {
            let (b, sh) = (lasting.balancers.clone(), shared.clone());
            std::thread::Builder::new()
                .name("vs-lb-health".into())
                .spawn(move || b.run(sh))?
        };
        let underlay = open_underlay(&config, n)?;
        let workers = Workers::start(n, shared.clone())?;
        if let Some(ul) = &underlay {
            workers.register_underlay(ul)?;
        }
        let dhcp = DhcpService::start(state_dir, shared.clone())?;
        let daemon = Daemon {
            dhcp,
            shared,
            workers: Mutex::new(Some(workers)),
            state: Mutex::new(State {
                config: Arc::new(Config {
                    ports: Vec::new(),
                    networks: Vec::new(),
                    tenants: Vec::new(),
                    ..(*config).clone()
                }),
                ports: HashMap::new(),
                bridges: HashMap::new(),
                leased: HashMap::new(),
                zones: HashMap::new(),
                peer_ids: HashMap::new(),
                peer_counters: HashMap::new(),
                remote_statics: HashSet::new(),
                neighbours: HashMap::new(),
                uplink_neighbours: Arc::default(),
                firewalls: HashMap::new(),
            }),
            started: Instant::now(),
            underlay,
            nat,
            lasting,
            health: Mutex::new(Some(health)),
            sg_table,
            state_dir: state_dir.to_path_buf(),
            restart: Arc::new(tokio::sync::Notify::new()),
        };
        daemon.apply((*config).clone())?;
        Ok(daemon)
    }

    /// The running config.
    pub fn config(&self) -> Arc<Config> {
        self.state.lock().config.clone()
    }

    /// Re-reads the config file and applies it; on any error the running
    /// config stays.
    pub fn reload(&self) -> Result<ReloadReport, String> {
        let path = self.config().path.clone();
        let kept = "reload refused; the running config is kept";
        let host = self.config().local_host.clone();
        let cfg = Config::load(&path)
            .and_then(|c| c.for_host(host.as_deref()))
            .map_err(|e| format!("{e}\n{kept}"))?;
        self.apply(cfg)
            .map_err(|e| format!("{}: {e}\n{kept}", path.display()))
    }

    /// Applies `new` (see the module docs for the order of steps).
    pub fn apply(&self, new: Config) -> Result<ReloadReport, ApplyError> {
        let mut st = self.state.lock();
        let workers_guard = self.workers.lock();
        let Some(workers) = workers_guard.as_ref() else {
            return Ok(ReloadReport::default());
        };
        // Taps that exist keep their queues; new ones get this many.
        let tap_queues = match new.switch.tap_queues {
            0 => workers.len(),
            n => n,
        };
        if let Some(ul) = &self.underlay {
            let me = new.local_host.as_deref().and_then(|h| new.host(h));
            let same = me.is_some_and(|h| h.addr == ul.local)
                && new.underlay.port == ul.port
                && new.underlay.ttl == ul.ttl
                && new.underlay.gso == ul.gso
                && usize::from(new.underlay.src_ports) == ul.src_ports().len();
            if !same {
                return Err(ApplyError::NeedsRestart(
                    "this host's underlay address or [underlay] port, ttl, src_ports or gso changed; those need a restart of vswitchd (the running config is kept)".into(),
                ));
            }
        }
        let new = Arc::new(new);
        let mut report = ReloadReport::default();
        // This host's ports: VM NICs and the uplink.
        let wanted: Vec<Port> = new
            .local_ports()
            .cloned()
            .chain(uplink_port(&new))
            .collect();

        // 1. Create every tap we need before touching anything, so a failure
        //    leaves the running state as it was.
        let mut opened: HashMap<String, Arc<TapHandle>> = HashMap::new();
        for p in &wanted {
            let reusable = st.ports.get(&p.name).is_some_and(|old| {
                old.cfg.tap == p.tap && !old.tap.detached.load(Ordering::Relaxed)
            });
            if !reusable {
                let (home, home_mac) = lab_home(&new, p);
                let tap = open_port_tap(p, &home, home_mac, tap_queues).map_err(|source| {
                    ApplyError::Tap {
                        port: p.name.clone(),
                        tap: p.tap.clone(),
                        hint: match source.raw_os_error() {
                            Some(libc::EBUSY) => {
                                "; another process holds that tap: stop it or set another tap name"
                            }
                            Some(libc::EINVAL) => {
                                "; an interface of another kind has that name: set another tap name"
                            }
                            Some(libc::EPERM) => "; vswitchd needs CAP_NET_ADMIN (run as root)",
                            _ => "",
                        },
                        source,
                    }
                })?;
                opened.insert(
                    p.name.clone(),
                    Arc::new(TapHandle {
                        tap,
                        detached: false.into(),
                    }),
                );
            }
        }

        // Security groups: compiled before anything changes.
        let firewalls = compile_firewalls(&new, &st)?;

        // NAT rules: refused before anything changes. Tracked connections
        // keep their mappings.
        self.nat
            .set_rules(new.nat_rules())
            .map_err(|e| ApplyError::Nat(e.to_string()))?;

        // DHCP servers (they may open lease logs): before anything changes.
        let leased: HashMap<NetKey, Arc<ArcSwap<Leased>>> = new
            .networks
            .iter()
            .map(|n| {
                let k = n.key();
                // A network that lost its DHCP server loses its leases too.
                let l = match n.dhcp {
                    Some(_) => st.leased.get(&k).cloned().unwrap_or_default(),
                    None => Arc::default(),
                };
                (k, l)
            })
            .collect();
        let zones: HashMap<String, Arc<ArcSwap<dns::Zone>>> = new
            .tenants
            .iter()
            .map(|t| {
                let z = st.zones.get(t).cloned().unwrap_or_default();
                (t.clone(), z)
            })
            .collect();
        self.dhcp
            .apply(&new, &leased, &zones)
            .map_err(ApplyError::Dhcp)?;

        // 2. Classify ports; assign ids (kept for surviving names, lowest
        //    free id for new ones).
        let new_names: HashSet<&str> = wanted.iter().map(|p| p.name.as_str()).collect();
        let removed: Vec<String> = st
            .ports
            .keys()
            .filter(|n| !new_names.contains(n.as_str()))
            .cloned()
            .collect();
        let mut used: HashSet<PortId> = st
            .ports
            .values()
            .filter(|ps| new_names.contains(ps.cfg.name.as_str()))
            .map(|ps| ps.id)
            .collect();
        let mut next_free = 0;
        let mut touched: HashSet<String> = HashSet::new(); // new or changed
        let mut ids: HashMap<String, PortId> = HashMap::new();
        for p in &wanted {
            match st.ports.get(&p.name) {
                Some(old) => {
                    ids.insert(p.name.clone(), old.id);
                    let changed = old.cfg.tenant != p.tenant
                        || old.cfg.network != p.network
                        || old.cfg.mac != p.mac
                        || old.cfg.port_security != p.port_security
                        || opened.contains_key(&p.name);
                    if changed {
                        report.changed_ports.push(p.name.clone());
                        touched.insert(p.name.clone());
                    }
                }
                None => {
                    while used.contains(&next_free) {
                        next_free += 1;
                    }
                    used.insert(next_free);
                    ids.insert(p.name.clone(), next_free);
                    report.added_ports.push(p.name.clone());
                    touched.insert(p.name.clone());
                }
            }
        }
        report.removed_ports = removed.clone();
        report.removed_ports.sort();

        // Tracked connections of ports that go or change are forgotten; the
        // ICMP ones of every port are judged again by the new rules at once
        // (other connections keep running until they end: docs).
        {
            for name in removed.iter().chain(report.changed_ports.iter()) {
                if let Some(old) = st.ports.get(name) {
                    self.sg_table.flush_zone(security::zone_of(old.id));
                }
            }
            let now = Timestamp::now().0;
            self.sg_table.with_each(|ct| {
                let icmp: Vec<conntrack::ConnId> = ct
                    .entries(now)
                    .filter(|e| e.orig.is_icmp())
                    .map(|e| e.id)
                    .collect();
                for id in icmp {
                    ct.remove(id);
                }
            });
        }

        // 3. Stop polling what goes away or gets a new tap; those taps go
        //    when their last handle drops.
        for name in removed.iter().chain(opened.keys()) {
            if let Some(old) = st.ports.get(name) {
                workers.unregister(old.id, &old.tap);
                release_tap(&old.tap);
            }
        }

        // 4. Bridges: keep existing ones (their learned MACs), adjust limits.
        let old_keys: HashSet<NetKey> = st.bridges.keys().cloned().collect();
        let mut bridges: HashMap<NetKey, Arc<Bridge>> = HashMap::new();
        for n in &new.networks {
            let key = n.key();
            let b = match st.bridges.get(&key) {
                Some(b) => {
                    b.fdb()
                        .write()
                        .set_limits(n.mac_table_size, new.switch.mac_aging);
                    b.clone()
                }
                None => {
                    report.added_networks.push(key.0.clone());
                    Arc::new(Bridge::new(Fdb::new(
                        n.mac_table_size,
                        new.switch.mac_aging,
                    )))
                }
            };
            bridges.insert(key, b);
        }
        report.removed_networks = old_keys
            .iter()
            .filter(|k| !bridges.contains_key(*k))
            .map(|k| k.0.clone())
            .collect();
        report.removed_networks.sort();

        // 5. Flush MAC entries of removed and changed ports from the bridge
        //    they were in; install the directory's static MACs of new and
        //    changed ports.
        for name in removed.iter().chain(report.changed_ports.iter()) {
            if let Some(old) = st.ports.get(name) {
                if let Some(b) = bridges.get(&old.cfg.net_key()) {
                    b.fdb().write().flush_port(old.id);
                }
            }
        }
        let directory = StaticDirectory::from_config(&new);
        // Peers: stable pseudo-port ids and counters per host name.
        let mut peer_ids = std::mem::take(&mut st.peer_ids);
        let mut peers: Vec<(PortId, &crate::config::Host)> = Vec::new();
        for h in &new.hosts {
            if Some(&h.name) == new.local_host.as_ref() {
                continue;
            }
            let next = (0..)
                .map(|i| VTEP_BASE + i)
                .find(|id| !peer_ids.values().any(|v| v == id));
            let id = *peer_ids
                .entry(h.name.clone())
                .or_insert_with(|| next.unwrap_or(VTEP_BASE));
            peers.push((id, h));
        }
        peer_ids.retain(|name, _| new.hosts.iter().any(|h| &h.name == name));
        let mut remote_statics: HashSet<(NetKey, MacAddr, PortId)> = new
            .ports
            .iter()
            .filter(|p| !new.is_local(p))
            .filter_map(|p| {
                let id = peer_ids.get(p.host.as_deref()?)?;
                Some((p.net_key(), p.mac, *id))
            })
            .collect();
        // Other hosts' load-balancer probers live behind their VTEPs.
        for n in &new.networks {
            for (h, _) in &n.service_addresses {
                if let Some(id) = h
                    .as_deref()
                    .filter(|h| Some(*h) != new.local_host.as_deref())
                    .and_then(|h| peer_ids.get(h))
                {
                    remote_statics.insert((n.key(), n.service_mac(h.as_deref()), *id));
                }
            }
        }
        for (key, mac, id) in st.remote_statics.difference(&remote_statics) {
            if let Some(b) = bridges.get(key) {
                b.fdb().write().remove_static(mac, *id);
            }
        }
        // Peers that went away lose what was learned behind them.
        for (name, id) in &st.peer_ids {
            if !peer_ids.contains_key(name) {
                for b in bridges.values() {
                    b.fdb().write().flush_port(*id);
                }
            }
        }
        for n in &new.networks {
            let key = n.key();
            let Some(b) = bridges.get(&key) else { continue };
            let mut fdb = b.fdb().write();
            for entry in directory.ports_of(&key) {
                if let (true, Some(&id)) = (touched.contains(&entry.name), ids.get(&entry.name)) {
                    fdb.add_static(entry.mac, id);
                }
            }
            for (k, mac, id) in &remote_statics {
                if *k == key && !st.remote_statics.contains(&(k.clone(), *mac, *id)) {
                    fdb.add_static(*mac, *id);
                }
            }
        }
        let mut peer_counters = std::mem::take(&mut st.peer_counters);
        peer_counters.retain(|name, _| peer_ids.contains_key(name));
        let peer_rts: Vec<Arc<PeerRt>> = peers
            .iter()
            .map(|(id, h)| {
                Arc::new(PeerRt {
                    id: *id,
                    name: h.name.clone(),
                    addr: std::net::SocketAddrV4::new(h.addr, new.underlay.port),
                    counters: peer_counters.entry(h.name.clone()).or_default().clone(),
                })
            })
            .collect();

        // 6. New port states and the snapshot.
        let mut ports: HashMap<String, PortState> = HashMap::new();
        for p in &wanted {
            let id = ids[&p.name];
            let old = st.ports.remove(&p.name);
            let tap = match opened.get(&p.name) {
                Some(t) => t.clone(),
                None => match &old {
                    Some(o) => o.tap.clone(),
                    None => continue, // unreachable: new ports always open a tap
                },
            };
            let (counters, capture) = old.map(|o| (o.counters, o.capture)).unwrap_or_default();
            ports.insert(
                p.name.clone(),
                PortState {
                    id,
                    cfg: p.clone(),
                    tap,
                    counters,
                    capture,
                },
            );
        }
        let neighbours: HashMap<NetKey, Arc<Neighbours>> = new
            .networks
            .iter()
            .map(|n| {
                let k = n.key();
                let v = st.neighbours.get(&k).cloned().unwrap_or_default();
                (k, v)
            })
            .collect();
        self.lasting.balancers.apply(&new, Timestamp::now());
        let mut snap = build_snapshot(
            &new,
            &directory,
            &ports,
            &bridges,
            &Kept {
                leased: &leased,
                zones: &zones,
                neighbours: &neighbours,
                uplink_neighbours: &st.uplink_neighbours,
                lasting: &self.lasting,
                firewalls: &firewalls,
                sg_table: &self.sg_table,
            },
            &self.dhcp.queue(),
        );
        add_peers(&mut snap, &new, self.underlay.clone(), &peer_rts);
        self.shared.store(Arc::new(snap));

        // 7. Start polling new taps. Old ones left in `st.ports` (removed
        //    ports) are dropped with `st`'s old map below: their taps close.
        for name in opened.keys() {
            if let Some(ps) = ports.get(name) {
                if let Err(e) = workers.register(ps.id, &ps.tap) {
                    tracing::error!(port = %name, error = %e, "cannot poll tap");
                }
            }
        }
        st.ports = ports;
        st.bridges = bridges;
        st.leased = leased;
        st.zones = zones;
        st.peer_ids = peer_ids;
        st.peer_counters = peer_counters;
        st.remote_statics = remote_statics;
        st.neighbours = neighbours;
        st.firewalls = firewalls;
        st.config = new;
        report.added_ports.sort();
        report.changed_ports.sort();
        tracing::info!(?report, "config applied");
        Ok(report)
    }

    /// Forgets learned MACs unseen for the aging time (call about once a
    /// second).
    pub fn age(&self, now: Timestamp) {
        let snap = self.shared.load();
        for n in &snap.networks {
            let aged = n.bridge.fdb().write().expire(now);
            if aged > 0 {
                tracing::debug!(network = %n.cfg.key(), aged, "MAC entries aged out");
            }
        }
        // Bounded work per tick: at most this many connections reaped (a
        // full table drains over several ticks; lookups never see an
        // expired entry meanwhile).
        self.nat.expire(now.0, 65_536);
        self.sg_table.expire(now.0, 65_536);
        self.lasting.lb.expire(now.0, 65_536);
    }

    /// Asks the control loop for a graceful restart (`vswitchctl
    /// restart`).
    pub fn request_restart(&self) {
        self.restart.notify_one();
    }

    /// Resolves when a graceful restart was asked for.
    pub fn restart_requested(&self) -> Arc<tokio::sync::Notify> {
        self.restart.clone()
    }

    /// Stops for a restart: workers and DHCP stop, connections are saved to
    /// the state directory, taps stay (persistent) for the next run to
    /// re-attach, so VMs keep their NICs and flows resume.
    pub fn shutdown_for_restart(&self) -> std::io::Result<usize> {
        if let Some(w) = self.workers.lock().take() {
            w.stop();
        }
        self.dhcp.stop();
        self.stop_health();
        self.save_connections()
    }

    /// Stops the load balancers' health thread.
    fn stop_health(&self) {
        self.lasting.balancers.stop();
        if let Some(h) = self.health.lock().take() {
            let _ = h.join();
        }
    }

    /// Stops the workers and removes every tap (a clean stop; a crash
    /// leaves them for the next run to re-attach).
    pub fn shutdown(&self) {
        if let Some(w) = self.workers.lock().take() {
            w.stop();
        }
        self.dhcp.stop();
        let mut st = self.state.lock();
        self.stop_health();
        self.shared
            .store(Arc::new(empty_snapshot(st.config.clone(), &self.lasting)));
        for ps in st.ports.values() {
            release_tap(&ps.tap);
        }
        st.ports.clear();
        st.bridges.clear();
    }

    /// The capture point of port `name`, if it is a port of this host.
    pub fn capture_point(&self, name: &str) -> Option<Arc<crate::capture::PortCapture>> {
        self.state.lock().ports.get(name).map(|p| p.capture.clone())
    }

    /// The underlay's capture point, when this host has an underlay.
    pub fn underlay_capture(&self) -> Option<Arc<crate::capture::PortCapture>> {
        self.shared
            .load()
            .underlay
            .as_ref()
            .map(|u| u.capture.clone())
    }

    /// The name of this host's uplink port, if it has one.
    pub fn uplink_port(&self) -> Option<String> {
        let snap = self.shared.load();
        let up = snap.uplink.as_ref()?;
        snap.port(up.port).map(|p| p.name.clone())
    }

    /// The MAC of VM port `name` of this host and its network's VNI.
    pub fn port_mac_vni(&self, name: &str) -> Option<(MacAddr, u32)> {
        let snap = self.shared.load();
        let p = snap.iter_ports().find(|p| p.name == name)?;
        let net = snap.networks.get(p.net)?;
        Some((p.mac, net.vni.get()))
    }

    /// `leases` data (see docs/cli.md).
    pub fn leases(&self, filter: Option<&str>) -> Value {
        self.dhcp.leases(filter)
    }

    /// `show` data (see docs/cli.md).
    pub fn show(&self) -> Value {
        let snap = self.shared.load();
        let (workers, worker_stats) = self.workers.lock().as_ref().map_or((0, vec![]), |w| {
            let stats = w
                .stats()
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    json!({
                        "worker": i,
                        "tap_rx_packets": s.tap_rx_packets.load(Ordering::Relaxed),
                        "tap_rx_bytes": s.tap_rx_bytes.load(Ordering::Relaxed),
                        "wakeups": s.wakeups.load(Ordering::Relaxed),
                    })
                })
                .collect::<Vec<Value>>();
            (w.len(), stats)
        });
        let caps = snap
            .iter_ports()
            .next()
            .map(|p| p.tap.tap.rx_offloads())
            .unwrap_or_default();
        let networks: Vec<Value> = snap
            .networks
            .iter()
            .map(|n| {
                let names: Vec<&str> = n
                    .ports
                    .iter()
                    .filter_map(|&id| snap.port(id).map(|p| p.name.as_str()))
                    .collect();
                let fdb = n.bridge.fdb().read();
                json!({
                    "tenant": n.cfg.tenant, "name": n.cfg.name, "vni": n.cfg.vni,
                    "cidr": n.cfg.cidr.to_string(),
                    "gateway": n.cfg.gateway.map(|g| g.to_string()),
                    "ports": names, "mac_entries": fdb.len(), "mac_table_size": fdb.cap(),
                })
            })
            .collect();
        let ports: Vec<Value> = snap
            .iter_ports()
            .map(|p| {
                let c = &p.counters;
                let (drops, total) = drop_map(|r| c.drops(r));
                let net = snap.networks.get(p.net);
                json!({
                    "name": p.name, "tenant": p.tenant,
                    "network": net.map(|n| n.cfg.name.as_str()),
                    "vni": net.map(|n| n.cfg.vni),
                    "tap": p.tap.tap.name(), "tap_queues": p.tap.tap.queues(),
                    "mac": p.mac.to_string(),
                    "ip": p.ip.map(|i| i.to_string()), "port_security": p.port_security,
                    "kind": p.kind.as_str(),
                    "link": if p.tap.detached.load(Ordering::Relaxed) { "detached" } else { "up" },
                    "rx_packets": c.rx_packets.load(Ordering::Relaxed),
                    "rx_bytes": c.rx_bytes.load(Ordering::Relaxed),
                    "tx_packets": c.tx_packets.load(Ordering::Relaxed),
                    "tx_bytes": c.tx_bytes.load(Ordering::Relaxed),
                    "drops_total": total, "drops": drops,
                })
            })
            .collect();
        let underlay = snap.underlay.as_ref().map(|ul| {
            let peers: Vec<Value> = snap
                .peers
                .iter()
                .flatten()
                .map(|p| {
                    let c = &p.counters;
                    let (drops, total) = drop_map(|r| c.drops(r));
                    let nets: Vec<String> = snap
                        .networks
                        .iter()
                        .filter(|n| n.vteps.contains(&p.id))
                        .map(|n| n.cfg.key().0)
                        .collect();
                    json!({
                        "name": p.name, "address": p.addr.ip().to_string(), "networks": nets,
                        "rx_packets": c.rx_packets.load(Ordering::Relaxed),
                        "rx_bytes": c.rx_bytes.load(Ordering::Relaxed),
                        "tx_packets": c.tx_packets.load(Ordering::Relaxed),
                        "tx_bytes": c.tx_bytes.load(Ordering::Relaxed),
                        "drops_total": total, "drops": drops,
                    })
                })
                .collect();
            json!({
                "host": snap.config.local_host, "address": ul.local.to_string(), "port": ul.port,
                "ttl": ul.ttl, "mtu": snap.config.underlay.mtu,
                "overlay_mtu": snap.config.overlay_mtu(), "src_ports": ul.src_ports(),
                "rx_not_peer": ul.counters.rx_not_peer.load(Ordering::Relaxed),
                "rx_errors": ul.counters.rx_errors.load(Ordering::Relaxed),
                "peers": peers,
            })
        });
        json!({
            "config": snap.config.path.display().to_string(),
            "uptime_secs": self.started.elapsed().as_secs(),
            "underlay": underlay,
            "workers": workers,
            "worker_stats": worker_stats,
            "offloads": caps,
            "networks": networks,
            "ports": ports,
        })
    }

    /// `fdb` data for all networks or the one named `filter`
    /// (`tenant/network`, or a network name unique across tenants).
    pub fn fdb(&self, filter: Option<&str>, now: Timestamp) -> Result<Value, String> {
        let snap = self.shared.load();
        let selected: Vec<&NetworkRt> = match filter {
            None => snap.networks.iter().collect(),
            Some(f) => {
                let m: Vec<&NetworkRt> = snap
                    .networks
                    .iter()
                    .filter(|n| n.cfg.key().0 == f || (!f.contains('/') && n.cfg.name == f))
                    .collect();
                if m.is_empty() || (m.len() > 1 && !f.contains('/')) {
                    let all: Vec<String> = snap.networks.iter().map(|n| n.cfg.key().0).collect();
                    return Err(format!(
                        "{} network {f:?}; networks: {} (write TENANT/NETWORK when a name is in several tenants)",
                        if m.is_empty() { "no" } else { "more than one" },
                        if all.is_empty() { "none".to_string() } else { all.join(", ") }
                    ));
                }
                m
            }
        };
        let nets: Vec<Value> = selected
            .into_iter()
            .map(|n| {
                let fdb = n.bridge.fdb().read();
                let entries: Vec<Value> = fdb
                    .entries(now)
                    .into_iter()
                    .map(|e| {
                        let peer = snap.peer(e.port);
                        json!({
                            "mac": e.mac.to_string(),
                            "port": match peer {
                                Some(p) => Some(format!("vtep:{}", p.name)),
                                None => snap.port(e.port).map(|p| p.name.clone()),
                            },
                            "vtep": peer.map(|p| p.addr.ip().to_string()),
                            "kind": e.kind, "age_secs": e.age.as_secs(),
                        })
                    })
                    .collect();
                json!({
                    "tenant": n.cfg.tenant, "network": n.cfg.name, "vni": n.cfg.vni,
                    "mac_table_size": fdb.cap(), "count": fdb.len(), "stats": fdb.stats(),
                    "entries": entries,
                })
            })
            .collect();
        Ok(json!({ "networks": nets }))
    }
}

/// Non-zero drop counters by reason name, and their total.
fn drop_map(get: impl Fn(DropReason) -> u64) -> (BTreeMap<&'static str, u64>, u64) {
    let mut drops = BTreeMap::new();
    let mut total = 0;
    for r in DropReason::ALL {
        let v = get(r);
        if v > 0 {
            drops.insert(r.as_str(), v);
            total += v;
        }
    }
    (drops, total)
}

/// The tap of port `p`: a persistent tap left by a previous run is
/// re-attached, whether it is still in this namespace under its name or in
/// the lab namespace named after the port (where `vslab` moved it and
/// renamed it `eth0`; found by the port's MAC); otherwise a new one. Either
/// way it is made persistent, so a crash of the switch leaves the VM's NIC
/// in place for the next run.
fn open_port_tap(p: &Port, home: &str, home_mac: MacAddr, queues: usize) -> std::io::Result<Tap> {
    let here = std::path::Path::new("/sys/class/net").join(&p.tap).exists();
    let lab_ns = std::path::Path::new("/run/netns").join(home);
    let tap = match (here, !home.is_empty() && lab_ns.exists()) {
        (false, true) => match Tap::attach_in_netns(&lab_ns, home_mac.0, queues) {
            Ok(Some(t)) => {
                tracing::info!(port = %p.name, netns = %lab_ns.display(), dev = t.name(),
                    "re-attached the port's persistent tap");
                t
            }
            _ => Tap::open_queues(&p.tap, queues)?,
        },
        _ => Tap::open_queues(&p.tap, queues)?,
    };
    if tap.queues() < queues {
        tracing::info!(port = %p.name, dev = tap.name(), queues = tap.queues(),
            "the tap exists single-queue; its traffic stays on one worker");
    }
    if let Err(e) = tap.set_persist(true) {
        tracing::warn!(port = %p.name, error = %e, "tap not persistent; a crash removes it");
    }
    Ok(tap)
}

/// Lets a tap vanish when its fd closes (the port left the config, or the
/// switch stops cleanly).
fn release_tap(tap: &TapHandle) {
    let _ = tap.tap.set_persist(false);
}

/// Workers when the config says 0: half the cores, at least one. The VMs'
/// own stacks run on the same cores (a write into a tap runs the receiving
/// stack in the writer's thread); on the 2-core bench machine one worker
/// moved a TCP stream at 0.84x the Linux bridge and two at 0.67-0.73x, with
/// 0.47 vs 0.63-0.76 CPU s per Gbit/s. Set `workers` to dedicate more.
pub fn auto_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// Puts the underlay, the peers and each network's flood list into `snap`.
fn add_peers(
    snap: &mut Snapshot,
    cfg: &Config,
    underlay: Option<Arc<Underlay>>,
    peers: &[Arc<PeerRt>],
) {
    let Some(ul) = underlay else {
        return;
    };
    let max = peers
        .iter()
        .map(|p| (p.id - VTEP_BASE) as usize + 1)
        .max()
        .unwrap_or(0);
    snap.peers = vec![None; max];
    for p in peers {
        snap.peers[(p.id - VTEP_BASE) as usize] = Some(p.clone());
        snap.peer_by_ip.insert(*p.addr.ip(), p.id);
    }
    // Hosts with a port in some routed network, per tenant.
    let mut routed_hosts: HashMap<&str, HashSet<&str>> = HashMap::new();
    for n in cfg.networks.iter().filter(|n| n.gateway.is_some()) {
        routed_hosts
            .entry(n.tenant.as_str())
            .or_default()
            .extend(cfg.hosts_of(n));
    }
    for (i, n) in snap.networks.iter_mut().enumerate() {
        snap.by_vni.insert(n.cfg.vni, i);
        let hosts = cfg.hosts_of(&n.cfg);
        n.vteps = peers
            .iter()
            .filter(|p| hosts.contains(&p.name.as_str()))
            .map(|p| p.id)
            .collect();
        let routers = routed_hosts.get(n.cfg.tenant.as_str());
        n.accept_from = peers
            .iter()
            .filter(|p| {
                hosts.contains(&p.name.as_str())
                    || (n.router.is_some() && routers.is_some_and(|r| r.contains(p.name.as_str())))
            })
            .map(|p| p.id)
            .collect();
    }
    snap.underlay = Some(ul);
}

/// Compiles the security groups of every tenant of `cfg` that has some,
/// with member addresses from the config and this host's leases, carrying
/// hit counters over from the running ones.
fn compile_firewalls(
    cfg: &Config,
    st: &State,
) -> Result<HashMap<String, Arc<firewall::Firewall>>, ApplyError> {
    let mut out = HashMap::new();
    for t in cfg.tenants.iter().filter(|t| cfg.tenant_filters(t)) {
        let leased = |p: &Port| -> Vec<IpAddr> {
            st.leased
                .get(&p.net_key())
                .map(|l| {
                    l.load()
                        .iter()
                        .filter(|(_, mac)| **mac == p.mac)
                        .map(|(ip, _)| IpAddr::V4(*ip))
                        .collect()
                })
                .unwrap_or_default()
        };
        let members = cfg.group_members(t, &leased);
        let fw = firewall::Firewall::compile_with_previous(
            &cfg.tenant_groups(t),
            &members,
            st.firewalls.get(t).map(|f| &**f),
        )
        .map_err(|e| ApplyError::SecurityGroups {
            tenant: t.clone(),
            message: e.to_string(),
        })?;
        out.insert(t.clone(), Arc::new(fw));
    }
    Ok(out)
}

/// Hands this host's VIPs and backends to the balancer's table and returns
/// the gate the data path checks without its lock (retired VIPs and
/// backends included, so their connections keep flowing).
fn lb_gate(cfg: &Config, services: &LbTables) -> crate::dataplane::LbGate {
    let mut vips = HashMap::new();
    let mut backends = HashSet::new();
    let mut gate = crate::dataplane::LbGate::default();
    for l in cfg.load_balancers.iter().filter(|l| cfg.runs_lb(l)) {
        let zone = cfg.zone_of(&l.tenant);
        let svc = cfg
            .networks
            .iter()
            .find(|n| n.tenant == l.tenant && n.name == l.network)
            .and_then(|n| cfg.local_service_address(n));
        vips.insert(
            lb::VipKey {
                zone,
                addr: std::net::SocketAddrV4::new(l.vip, l.port),
                proto: l.proto,
            },
            lb::VipRule {
                lb: l.id,
                external: l.external,
                hairpin_src: svc,
            },
        );
        for b in &l.backends {
            backends.insert((zone, std::net::SocketAddrV4::new(b.ip, b.port), l.proto));
        }
    }
    // Backends of connections balanced on other hosts answer through this
    // one too when they live here: the gate lets their replies be looked
    // up (a miss costs one lookup and changes nothing).
    for l in &cfg.load_balancers {
        let zone = cfg.zone_of(&l.tenant);
        for b in &l.backends {
            backends.insert((zone, std::net::SocketAddrV4::new(b.ip, b.port), l.proto));
        }
    }
    services.set_rules(vips, backends);
    for (k, r, _) in services.all_vips() {
        gate.vips
            .insert((k.zone, *k.addr.ip(), k.proto, k.addr.port()));
        gate.vip_addrs.insert((k.zone, *k.addr.ip()));
        if let Some(h) = r.hairpin_src {
            gate.hairpin.insert((k.zone, h));
        }
    }
    gate.backends = services.backend_endpoints().into_iter().collect();
    gate
}

/// State that outlives a snapshot, by network or tenant.
struct Kept<'a> {
    leased: &'a HashMap<NetKey, Arc<ArcSwap<Leased>>>,
    zones: &'a HashMap<String, Arc<ArcSwap<dns::Zone>>>,
    neighbours: &'a HashMap<NetKey, Arc<Neighbours>>,
    uplink_neighbours: &'a Arc<Neighbours>,
    lasting: &'a Lasting,
    firewalls: &'a HashMap<String, Arc<firewall::Firewall>>,
    sg_table: &'a Arc<SgTables>,
}

fn build_snapshot(
    cfg: &Arc<Config>,
    directory: &dyn Directory,
    ports: &HashMap<String, PortState>,
    bridges: &HashMap<NetKey, Arc<Bridge>>,
    kept: &Kept<'_>,
    dhcp: &DhcpQueue,
) -> Snapshot {
    let Kept {
        leased,
        zones,
        neighbours,
        uplink_neighbours,
        lasting,
        firewalls,
        sg_table,
    } = kept;
    let max_id = ports.values().map(|p| p.id as usize + 1).max().unwrap_or(0);
    let mut by_id: Vec<Option<Arc<PortRt>>> = vec![None; max_id];
    let mut networks = Vec::with_capacity(cfg.networks.len());
    for n in &cfg.networks {
        let key = n.key();
        let Some(bridge) = bridges.get(&key) else {
            continue;
        };
        let idx = networks.len();
        let mut ids = Vec::new();
        for p in cfg.local_ports().filter(|p| p.net_key() == key) {
            let Some(ps) = ports.get(&p.name) else {
                continue;
            };
            ids.push(ps.id);
            let sg = firewalls
                .get(&p.tenant)
                .filter(|_| cfg.port_filtered(p))
                .map(|fw| PortSg {
                    fw: fw.clone(),
                    groups: cfg
                        .port_groups(p)
                        .iter()
                        .filter_map(|g| fw.group_id(g))
                        .collect(),
                    zone: security::zone_of(ps.id),
                    max_connections: p.max_connections,
                    table: (*sg_table).clone(),
                });
            by_id[ps.id as usize] = Some(Arc::new(PortRt {
                id: ps.id,
                kind: PortKind::Vm,
                sg,
                name: p.name.clone(),
                tenant: p.tenant.clone(),
                net: idx,
                mac: p.mac,
                ip: p.ip,
                port_security: p.port_security,
                tap: ps.tap.clone(),
                counters: ps.counters.clone(),
                capture: ps.capture.clone(),
            }));
        }
        let mut fixed = HashMap::new();
        if let Some(IpAddr::V4(gw)) = n.gateway {
            fixed.insert(
                gw,
                IpOwner {
                    mac: n.gateway_mac(),
                    gateway: true,
                },
            );
        }
        for e in directory.ports_of(&key) {
            if let Some(IpAddr::V4(ip)) = e.ip {
                fixed.insert(
                    ip,
                    IpOwner {
                        mac: e.mac,
                        gateway: false,
                    },
                );
            }
        }
        // Internal VIPs are the gateway's; every host's service address
        // is its prober's.
        for l in cfg.load_balancers.iter().filter(|l| !l.external) {
            if l.tenant == n.tenant && n.cidr.contains(&IpAddr::V4(l.vip)) {
                fixed.insert(
                    l.vip,
                    IpOwner {
                        mac: n.gateway_mac(),
                        gateway: true,
                    },
                );
            }
        }
        for (h, a) in &n.service_addresses {
            fixed.insert(
                *a,
                IpOwner {
                    mac: n.service_mac(h.as_deref()),
                    gateway: false,
                },
            );
        }
        let service = cfg
            .local_service_address(n)
            .filter(|_| {
                cfg.load_balancers
                    .iter()
                    .any(|l| l.tenant == n.tenant && l.network == n.name && cfg.runs_lb(l))
            })
            .map(|ip| crate::dataplane::ServiceRt {
                mac: n.service_mac(cfg.local_host.as_deref()),
                ip,
            });
        let addrs = Addresses {
            fixed,
            leased: leased.get(&key).cloned().unwrap_or_default(),
        };
        networks.push(NetworkRt {
            cfg: n.clone(),
            ports: ids,
            bridge: bridge.clone(),
            addrs,
            dhcp: n.dhcp.is_some().then(|| dhcp.clone()),
            gateway: match n.gateway {
                Some(IpAddr::V4(gw)) => Some((gw, n.gateway_mac())),
                _ => None,
            },
            zone: zones.get(&n.tenant).cloned().unwrap_or_default(),
            vteps: Vec::new(),
            accept_from: Vec::new(),
            vni: vxlan::Vni::new(n.vni).unwrap_or(vxlan::Vni::from_bytes([0, 0, 0])),
            router: None,
            neighbours: neighbours.get(&key).cloned().unwrap_or_default(),
            ct_zone: cfg.zone_of(&n.tenant),
            service,
        });
    }
    // One router per tenant over its networks with an IPv4 gateway.
    let mut legs: HashMap<&str, Vec<Leg>> = HashMap::new();
    for (i, n) in networks.iter().enumerate() {
        if let (ipnet::IpNet::V4(cidr), Some((gw_ip, gw_mac))) = (n.cfg.cidr, n.gateway) {
            legs.entry(n.cfg.tenant.as_str()).or_default().push(Leg {
                net: i,
                cidr,
                gw_ip,
                gw_mac,
            });
        }
    }
    let routers: HashMap<String, Arc<Router>> = legs
        .into_iter()
        .map(|(t, l)| (t.to_string(), Arc::new(Router::new(l))))
        .collect();
    for n in &mut networks {
        if n.gateway.is_some() {
            n.router = routers.get(&n.cfg.tenant).cloned();
        }
    }
    let uplink = cfg.local_uplink().and_then(|u| {
        let ps = ports.get(&u.name)?;
        by_id[ps.id as usize] = Some(Arc::new(PortRt {
            id: ps.id,
            kind: PortKind::Uplink,
            name: u.name.clone(),
            tenant: String::new(),
            net: usize::MAX,
            mac: u.mac,
            ip: Some(IpAddr::V4(u.ip())),
            port_security: false,
            tap: ps.tap.clone(),
            counters: ps.counters.clone(),
            capture: ps.capture.clone(),
            sg: None,
        }));
        Some(UplinkRt {
            port: ps.id,
            mac: u.mac,
            addr: u.addr,
            gateway: u.gateway,
            neighbours: (*uplink_neighbours).clone(),
        })
    });
    Snapshot {
        ports: by_id,
        networks,
        uplink,
        routers: routers
            .iter()
            .map(|(t, r)| (cfg.zone_of(t), r.clone()))
            .collect(),
        lb_gate: lb_gate(cfg, &lasting.lb),
        lb_external: cfg
            .load_balancers
            .iter()
            .filter(|l| l.external && cfg.runs_lb(l))
            .map(|l| l.vip)
            .collect(),
        ..empty_snapshot(cfg.clone(), lasting)
    }
}
