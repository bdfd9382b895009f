//! The load balancer's runtime on this host: per network with balanced
//! backends, an `lb::LoadBalancer` (pools and the smoltcp prober at this
//! host's service address), and the thread that drives the probers.
//!
//! The data path reaches it twice: `pick` for a connection's first packet
//! (the pool's Maglev table), and [`Balancers::deliver`] for frames
//! addressed to a prober's MAC (the backends' answers), which go through a
//! bounded inbox so a worker never waits on a prober. The health thread
//! feeds the inbox to the probers, polls them on their own timers and
//! sends what they transmit into the tenant network through
//! [`crate::dataplane::inject_service`], like a frame from a port.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use packet::MacAddr;
use parking_lot::{Condvar, Mutex};

use crate::clock::Timestamp;
use crate::config::{Config, LoadBalancerCfg, NetKey};
use crate::dataplane::Snapshot;

/// Frames waiting for one network's prober, at most: a VM flooding its
/// network's prober fills only that network's inbox, never another
/// tenant's health checks.
pub const INBOX_MAX: usize = 1024;
/// Longest the health thread sleeps when no timer is due.
const IDLE_WAIT: Duration = Duration::from_millis(500);

/// One network's balancer on this host.
#[derive(Debug)]
struct NetBalancer {
    lb: lb::LoadBalancer,
    /// The prober's MAC and address (the service address).
    mac: MacAddr,
    ip: Ipv4Addr,
}

#[derive(Debug, Default)]
struct Inner {
    nets: HashMap<NetKey, NetBalancer>,
    /// Load balancer id -> its network.
    by_lb: HashMap<u32, NetKey>,
    /// Load balancer id -> (tenant, name), for logs and display.
    names: HashMap<u32, (String, String)>,
}

/// Every balancer of this host.
#[derive(Debug, Default)]
pub struct Balancers {
    inner: Mutex<Inner>,
    inbox: Mutex<HashMap<NetKey, VecDeque<Vec<u8>>>>,
    wake: Condvar,
    stop: AtomicBool,
    /// Frames for a prober dropped because the inbox was full.
    pub inbox_dropped: AtomicU64,
}

/// A backend as `vswitchctl lb` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendView {
    /// Port name or address.
    pub name: String,
    /// Address and port.
    pub endpoint: String,
    /// Weight (0: drained).
    pub weight: u32,
    /// `up` or `down`.
    pub health: &'static str,
    /// Takes new connections (up and weight > 0).
    pub eligible: bool,
    /// Maglev slots.
    pub slots: usize,
    /// Probes sent and failed.
    pub probes: u64,
    /// Failed probes.
    pub failures: u64,
    /// Last failure, if any.
    pub last_error: Option<String>,
}

impl Balancers {
    /// Applies a config: one balancer per network of this host's load
    /// balancers, pools updated in place (health kept for backends that
    /// stay), networks and pools that are gone removed.
    pub fn apply(&self, cfg: &Config, now: Timestamp) {
        let mut inner = self.inner.lock();
        let mut want: HashMap<NetKey, Vec<&LoadBalancerCfg>> = HashMap::new();
        for l in cfg.load_balancers.iter().filter(|l| cfg.runs_lb(l)) {
            want.entry(NetKey::new(&l.tenant, &l.network))
                .or_default()
                .push(l);
        }
        inner.nets.retain(|k, _| want.contains_key(k));
        self.inbox.lock().retain(|k, _| want.contains_key(k));
        inner.by_lb.clear();
        inner.names.clear();
        for (key, lbs) in want {
            let Some(net) = cfg.networks.iter().find(|n| n.key() == key) else {
                continue;
            };
            let Some(ip) = cfg.local_service_address(net) else {
                continue;
            };
            let mac = net.service_mac(cfg.local_host.as_deref());
            let prefix = match net.cidr {
                ipnet::IpNet::V4(c) => c.prefix_len(),
                ipnet::IpNet::V6(_) => continue,
            };
            let fresh = match inner.nets.get(&key) {
                Some(b) => b.ip != ip || b.mac != mac,
                None => true,
            };
            if fresh {
                let mut pc = lb::ProberConfig::new(mac.0, ip, prefix);
                pc.seed = now.0;
                match lb::LoadBalancer::new(pc, now.0) {
                    Ok(l) => {
                        inner
                            .nets
                            .insert(key.clone(), NetBalancer { lb: l, mac, ip });
                    }
                    Err(e) => {
                        tracing::error!(network = %key, error = %e, "cannot start the load balancer's prober");
                        continue;
                    }
                }
            }
            let Some(nb) = inner.nets.get_mut(&key) else {
                continue;
            };
            let keep: Vec<lb::PoolId> = lbs.iter().map(|l| lb::PoolId(l.id)).collect();
            let stale: Vec<lb::PoolId> = nb
                .lb
                .pools()
                .map(|(id, _)| id)
                .filter(|id| !keep.contains(id))
                .collect();
            for id in stale {
                nb.lb.remove_pool(id, now.0);
            }
            for l in &lbs {
                let id = lb::PoolId(l.id);
                if nb.lb.pool(id).is_none() {
                    if let Err(e) = nb.lb.add_pool(id, l.pool.clone()) {
                        tracing::error!(lb = %l.name, error = %e, "cannot add pool");
                        continue;
                    }
                }
                let Some(pool) = nb.lb.pool_mut(id) else {
                    continue;
                };
                if pool.config() != &l.pool {
                    if let Err(e) = pool.set_config(l.pool.clone(), now.0) {
                        tracing::error!(lb = %l.name, error = %e, "cannot change pool config");
                    }
                }
                let backends: Vec<lb::Backend> = l
                    .backends
                    .iter()
                    .map(|b| lb::Backend {
                        id: lb::BackendId::from_name(&format!("{}:{}", b.ip, b.port)),
                        ip: b.ip,
                        port: b.port,
                        weight: b.weight,
                    })
                    .collect();
                if let Err(e) = pool.set_backends(&backends, now.0) {
                    tracing::error!(lb = %l.name, error = %e, "cannot set backends");
                }
            }
            for l in lbs {
                inner.by_lb.insert(l.id, key.clone());
                inner.names.insert(l.id, (l.tenant.clone(), l.name.clone()));
            }
        }
        drop(inner);
        self.wake.notify_one();
    }

    /// The backend for a new connection to load balancer `lb_id`.
    pub fn pick(&self, lb_id: u32, hash: u64) -> Option<(lb::BackendId, SocketAddrV4)> {
        let inner = self.inner.lock();
        let key = inner.by_lb.get(&lb_id)?;
        let b = inner.nets.get(key)?.lb.pick(lb::PoolId(lb_id), hash)?;
        Some((b.id, SocketAddrV4::new(b.ip, b.port)))
    }

    /// `tenant/name` of load balancer `lb_id`.
    pub fn name(&self, lb_id: u32) -> Option<String> {
        let inner = self.inner.lock();
        inner.names.get(&lb_id).map(|(t, n)| format!("{t}/{n}"))
    }

    /// Hands a frame addressed to `net`'s prober to the health thread;
    /// `false` (counted) when the inbox is full.
    pub fn deliver(&self, net: &NetKey, frame: &[u8]) -> bool {
        let mut inbox = self.inbox.lock();
        if let Some(q) = inbox.get_mut(net) {
            if q.len() >= INBOX_MAX {
                drop(inbox);
                self.inbox_dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            q.push_back(frame.to_vec());
        } else {
            // Networks come from the config, so the map is bounded by it.
            inbox.insert(net.clone(), VecDeque::from([frame.to_vec()]));
        }
        drop(inbox);
        self.wake.notify_one();
        true
    }

    /// Status of every pool of this host: `(tenant, name, backends)`.
    pub fn status(&self) -> Vec<(u32, String, String, Vec<BackendView>)> {
        let inner = self.inner.lock();
        let mut out = Vec::new();
        for (id, key) in &inner.by_lb {
            let Some(pool) = inner.nets.get(key).and_then(|n| n.lb.pool(lb::PoolId(*id))) else {
                continue;
            };
            let (tenant, name) = inner.names.get(id).cloned().unwrap_or_default();
            let st = pool.status();
            let views = st
                .backends
                .iter()
                .map(|b| BackendView {
                    name: String::new(),
                    endpoint: format!("{}:{}", b.backend.ip, b.backend.port),
                    weight: b.backend.weight,
                    health: match b.health.state {
                        lb::HealthState::Up => "up",
                        lb::HealthState::Down => "down",
                    },
                    eligible: b.eligible,
                    slots: b.slots,
                    probes: b.health.probes,
                    failures: b.health.failures,
                    last_error: b.health.last_error.map(|e| format!("{e}")),
                })
                .collect();
            out.push((*id, tenant, name, views));
        }
        out.sort_by(|a, b| (&a.1, &a.2).cmp(&(&b.1, &b.2)));
        out
    }

    /// Stops the health thread.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_all();
    }

    /// The health thread: feeds frames to the probers, polls them, sends
    /// what they transmit. Returns when [`Balancers::stop`] is called.
    pub fn run(self: Arc<Self>, shared: Arc<ArcSwap<Snapshot>>) {
        let mut sc = crate::dataplane::ServiceScratch::default();
        while !self.stop.load(Ordering::Relaxed) {
            let frames: Vec<(NetKey, Vec<u8>)> = self
                .inbox
                .lock()
                .iter_mut()
                .flat_map(|(k, q)| q.drain(..).map(|f| (k.clone(), f)).collect::<Vec<_>>())
                .collect();
            let now = Timestamp::now();
            let mut out: Vec<(NetKey, Vec<u8>)> = Vec::new();
            let mut next: Option<u64> = None;
            {
                let mut inner = self.inner.lock();
                for (k, f) in frames {
                    if let Some(nb) = inner.nets.get_mut(&k) {
                        nb.lb.receive(&f, now.0);
                    }
                }
                let names = inner.names.clone();
                for (k, nb) in inner.nets.iter_mut() {
                    for ev in nb.lb.poll(now.0) {
                        let (t, n) = names.get(&ev.pool.0).cloned().unwrap_or_default();
                        tracing::info!(tenant = %t, lb = %n, network = %k, backend = %ev.transition.backend,
                            state = ?ev.transition.state, cause = ?ev.transition.cause, "backend health changed");
                    }
                    out.extend(nb.lb.transmit(now.0).into_iter().map(|f| (k.clone(), f)));
                    if let Some(t) = nb.lb.poll_at(now.0) {
                        next = Some(next.map_or(t, |n: u64| n.min(t)));
                    }
                }
            }
            if !out.is_empty() {
                let snap = shared.load();
                for (k, f) in out {
                    for answer in crate::dataplane::inject_service(&snap, &k, &f, &mut sc) {
                        if let Some(nb) = self.inner.lock().nets.get_mut(&k) {
                            nb.lb.receive(&answer, now.0);
                        }
                    }
                }
                // Answers made locally (ARP) may let probes go on at once.
                continue;
            }
            let wait = next
                .map(|t| Duration::from_nanos(t.saturating_sub(Timestamp::now().0)))
                .unwrap_or(IDLE_WAIT)
                .min(IDLE_WAIT);
            let mut q = self.inbox.lock();
            if q.values().all(VecDeque::is_empty)
                && !self.stop.load(Ordering::Relaxed)
                && !wait.is_zero()
            {
                self.wake.wait_for(&mut q, wait);
            }
        }
    }
}
