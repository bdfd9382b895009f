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
use crate::dataplane::{NetworkRt, PortCounters, PortRt, Snapshot, TapHandle, Workers};
use crate::dhcp_service::{DhcpQueue, DhcpService};
use crate::directory::{Directory, StaticDirectory};
use crate::fdb::{Fdb, PortId};
use crate::pipeline::{Addresses, Bridge, DropReason, IpOwner, Leased};
use crate::tap::Tap;

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
}

/// The running switch.
#[derive(Debug)]
pub struct Daemon {
    shared: Arc<ArcSwap<Snapshot>>,
    dhcp: DhcpService,
    workers: Mutex<Option<Workers>>,
    state: Mutex<State>,
    started: Instant,
}

fn empty_snapshot(config: Arc<Config>) -> Snapshot {
    Snapshot {
        ports: Vec::new(),
        networks: Vec::new(),
        config,
    }
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
        let shared = Arc::new(ArcSwap::from_pointee(empty_snapshot(config.clone())));
        let workers = Workers::start(n, shared.clone())?;
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
            }),
            started: Instant::now(),
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
        let cfg = Config::load(&path).map_err(|e| format!("{e}\n{kept}"))?;
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
        let new = Arc::new(new);
        let mut report = ReloadReport::default();

        // 1. Create every tap we need before touching anything, so a failure
        //    leaves the running state as it was.
        let mut opened: HashMap<String, Arc<TapHandle>> = HashMap::new();
        for p in &new.ports {
            let reusable = st.ports.get(&p.name).is_some_and(|old| {
                old.cfg.tap == p.tap && !old.tap.detached.load(Ordering::Relaxed)
            });
            if !reusable {
                let tap = Tap::open(&p.tap).map_err(|source| ApplyError::Tap {
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
        let new_names: HashSet<&str> = new.ports.iter().map(|p| p.name.as_str()).collect();
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
        for p in &new.ports {
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

        // 3. Stop polling what goes away or gets a new tap.
        for name in removed.iter().chain(opened.keys()) {
            if let Some(old) = st.ports.get(name) {
                workers.unregister(old.id, &old.tap);
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
        for n in &new.networks {
            let key = n.key();
            let Some(b) = bridges.get(&key) else { continue };
            let mut fdb = b.fdb().write();
            for entry in directory.ports_of(&key) {
                if let (true, Some(&id)) = (touched.contains(&entry.name), ids.get(&entry.name)) {
                    fdb.add_static(entry.mac, id);
                }
            }
        }

        // 6. New port states and the snapshot.
        let mut ports: HashMap<String, PortState> = HashMap::new();
        for p in &new.ports {
            let id = ids[&p.name];
            let old = st.ports.remove(&p.name);
            let tap = match opened.get(&p.name) {
                Some(t) => t.clone(),
                None => match &old {
                    Some(o) => o.tap.clone(),
                    None => continue, // unreachable: new ports always open a tap
                },
            };
            let counters = old.map(|o| o.counters).unwrap_or_default();
            ports.insert(
                p.name.clone(),
                PortState {
                    id,
                    cfg: p.clone(),
                    tap,
                    counters,
                },
            );
        }
        let snap = build_snapshot(
            &new,
            &directory,
            &ports,
            &bridges,
            &leased,
            &zones,
            &self.dhcp.queue(),
        );
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
    }

    /// Stops the workers and closes every tap (non-persistent taps vanish).
    pub fn shutdown(&self) {
        if let Some(w) = self.workers.lock().take() {
            w.stop();
        }
        self.dhcp.stop();
        let mut st = self.state.lock();
        self.shared
            .store(Arc::new(empty_snapshot(st.config.clone())));
        st.ports.clear();
        st.bridges.clear();
    }

    /// `leases` data (see docs/cli.md).
    pub fn leases(&self, filter: Option<&str>) -> Value {
        self.dhcp.leases(filter)
    }

    /// `show` data (see docs/cli.md).
    pub fn show(&self) -> Value {
        let snap = self.shared.load();
        let workers = self.workers.lock().as_ref().map_or(0, |w| w.len());
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
                let mut drops = BTreeMap::new();
                let mut total = 0;
                for r in DropReason::ALL {
                    let v = c.drops(r);
                    if v > 0 {
                        drops.insert(r.as_str(), v);
                        total += v;
                    }
                }
                let net = snap.networks.get(p.net);
                json!({
                    "name": p.name, "tenant": p.tenant,
                    "network": net.map(|n| n.cfg.name.as_str()),
                    "vni": net.map(|n| n.cfg.vni),
                    "tap": p.tap.tap.name(), "mac": p.mac.to_string(),
                    "ip": p.ip.map(|i| i.to_string()), "port_security": p.port_security,
                    "link": if p.tap.detached.load(Ordering::Relaxed) { "detached" } else { "up" },
                    "rx_packets": c.rx_packets.load(Ordering::Relaxed),
                    "rx_bytes": c.rx_bytes.load(Ordering::Relaxed),
                    "tx_packets": c.tx_packets.load(Ordering::Relaxed),
                    "tx_bytes": c.tx_bytes.load(Ordering::Relaxed),
                    "drops_total": total, "drops": drops,
                })
            })
            .collect();
        json!({
            "config": snap.config.path.display().to_string(),
            "uptime_secs": self.started.elapsed().as_secs(),
            "workers": workers,
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
                        json!({
                            "mac": e.mac.to_string(),
                            "port": snap.port(e.port).map(|p| p.name.as_str()),
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

/// Workers when the config says 0: half the cores, at least one. The VMs'
/// own stacks run on the same cores (a write into a tap runs the receiving
/// stack in the writer's thread); on the 2-core bench machine one worker
/// moved a TCP stream at 0.84x the Linux bridge and two at 0.67-0.73x, with
/// 0.47 vs 0.63-0.76 CPU s per Gbit/s. Set `workers` to dedicate more.
pub fn auto_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

fn build_snapshot(
    cfg: &Arc<Config>,
    directory: &dyn Directory,
    ports: &HashMap<String, PortState>,
    bridges: &HashMap<NetKey, Arc<Bridge>>,
    leased: &HashMap<NetKey, Arc<ArcSwap<Leased>>>,
    zones: &HashMap<String, Arc<ArcSwap<dns::Zone>>>,
    dhcp: &DhcpQueue,
) -> Snapshot {
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
        for p in cfg.ports.iter().filter(|p| p.net_key() == key) {
            let Some(ps) = ports.get(&p.name) else {
                continue;
            };
            ids.push(ps.id);
            by_id[ps.id as usize] = Some(Arc::new(PortRt {
                id: ps.id,
                name: p.name.clone(),
                tenant: p.tenant.clone(),
                net: idx,
                mac: p.mac,
                ip: p.ip,
                port_security: p.port_security,
                tap: ps.tap.clone(),
                counters: ps.counters.clone(),
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
        });
    }
    Snapshot {
        ports: by_id,
        networks,
        config: cfg.clone(),
    }
}
