//! The facade: a [`Pool`] of weighted, health-checked backends with its
//! Maglev table, and a [`LoadBalancer`] that runs the pools of one tenant
//! network with one [`Prober`].
//!
//! # Table rebuilds
//!
//! A pool's table covers exactly its *eligible* backends: Up and with a
//! positive weight. After every change that can alter that set (a health
//! transition, a weight, adding or removing a backend, the table size) the
//! pool compares the eligible (id, weight) list with the one its table was
//! built from (`O(n)`) and rebuilds only if they differ. A rebuild is a
//! fresh [`Maglev::new`]: `O(M log M)`, a few milliseconds for the
//! default 65537 slots in a release build, and 256 KiB of memory; health changes are rate-limited by `interval * rise/fall`, so
//! rebuilds are rare. Only new connections consult the table (conntrack
//! pins established ones), so a rebuild never moves a connection.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::health::{
    BackendHealth, Failure, HealthChecker, HealthConfig, HealthConfigError, ProbeRequest,
    ProbeResult, Transition,
};
use crate::maglev::{check_size, BackendId, Maglev, MaglevError, DEFAULT_TABLE_SIZE};
use crate::probe::{Check, CheckError, ProbeId, Prober, ProberConfig, ProberError, StartError};

/// One backend of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// Stable identity (see [`BackendId`]).
    pub id: BackendId,
    /// Address inside the tenant network (the DNAT target).
    pub ip: Ipv4Addr,
    /// Port connections go to (the DNAT target port).
    pub port: u16,
    /// Share of new connections relative to the other backends; 0 drains
    /// the backend (no new connections, established ones continue).
    pub weight: u32,
}

/// A pool's table size and health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Maglev table size: a prime, at least 100 per backend (default
    /// 65537).
    pub table_size: u32,
    /// What a probe checks (default TCP connect).
    pub check: Check,
    /// Port probed; `None` probes each backend's own port.
    pub check_port: Option<u16>,
    /// Timing and thresholds.
    pub health: HealthConfig,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            table_size: DEFAULT_TABLE_SIZE,
            check: Check::Tcp,
            check_port: None,
            health: HealthConfig::default(),
        }
    }
}

/// Why a pool change was refused; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Table size invalid or too small for the backends.
    #[error(transparent)]
    Table(#[from] MaglevError),
    /// Health timing invalid.
    #[error(transparent)]
    Health(#[from] HealthConfigError),
    /// Health check invalid.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// `check_port` is 0.
    #[error(
        "health check port 0 is not a port; leave check_port unset to probe each backend's port"
    )]
    CheckPort,
    /// Two backends share an id.
    #[error("{0} is listed twice; backend ids must be unique")]
    Duplicate(BackendId),
    /// A backend with port 0.
    #[error("{0} has port 0")]
    Port(BackendId),
    /// No such backend.
    #[error("{0} is not in the pool")]
    Unknown(BackendId),
}

impl PoolConfig {
    /// Checks the table size (for no backends yet), check and timing.
    pub fn validate(&self) -> Result<(), PoolError> {
        check_size(self.table_size, 0)?;
        self.check.validate()?;
        self.health.validate()?;
        if self.check_port == Some(0) {
            return Err(PoolError::CheckPort);
        }
        Ok(())
    }
}

/// A probe to run for a pool: the checker's request and where to send it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeTask {
    /// Hand back to [`Pool::on_probe_result`] / [`Pool::abandon_probe`].
    pub request: ProbeRequest,
    /// Backend address.
    pub ip: Ipv4Addr,
    /// Port to probe.
    pub port: u16,
}

/// One backend in [`PoolStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// The backend.
    pub backend: Backend,
    /// Its health.
    pub health: BackendHealth,
    /// Up with a positive weight: in the table.
    pub eligible: bool,
    /// Table slots it holds.
    pub slots: usize,
}

/// A pool's state, for `show` commands and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Table size.
    pub table_size: u32,
    /// Whether any backend is eligible (otherwise new connections are
    /// rejected).
    pub available: bool,
    /// Table rebuilds since the pool was created.
    pub rebuilds: u64,
    /// Backends by id.
    pub backends: Vec<BackendStatus>,
}

/// Weighted, health-checked backends and their Maglev table.
#[derive(Debug, Clone)]
pub struct Pool {
    config: PoolConfig,
    backends: BTreeMap<BackendId, Backend>,
    checker: HealthChecker,
    table: Maglev,
    rebuilds: u64,
}

impl Pool {
    /// An empty pool: every pick is `None` until backends are added and
    /// come Up.
    pub fn new(config: PoolConfig) -> Result<Pool, PoolError> {
        config.validate()?;
        let checker = HealthChecker::new(config.health)?;
        let table = Maglev::new(&[], config.table_size)?;
        Ok(Pool {
            config,
            backends: BTreeMap::new(),
            checker,
            table,
            rebuilds: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Replaces the configuration: a new table size rebuilds the table, a
    /// new timing applies from the next probe, a new check from the next
    /// probe (health states are kept).
    pub fn set_config(&mut self, config: PoolConfig, now: u64) -> Result<(), PoolError> {
        config.validate()?;
        check_size(config.table_size, self.backends.len())?;
        self.checker.set_config(config.health, now)?;
        let resize = config.table_size != self.config.table_size;
        self.config = config;
        if resize {
            self.rebuild();
        }
        Ok(())
    }

    fn check_backend(b: &Backend) -> Result<(), PoolError> {
        if b.port == 0 {
            return Err(PoolError::Port(b.id));
        }
        Ok(())
    }

    /// Replaces the whole backend list (a config reload), with one table
    /// rebuild at most. Backends that keep their id, address and port keep
    /// their health (a weight change alone does not re-probe); a changed
    /// address or port is a new backend, starting in the initial state.
    /// All or nothing: on error nothing changed.
    pub fn set_backends(&mut self, backends: &[Backend], now: u64) -> Result<(), PoolError> {
        let mut new = BTreeMap::new();
        for b in backends {
            Self::check_backend(b)?;
            if new.insert(b.id, *b).is_some() {
                return Err(PoolError::Duplicate(b.id));
            }
        }
        check_size(self.config.table_size, new.len())?;
        for (id, old) in &self.backends {
            let same_target = new
                .get(id)
                .is_some_and(|b: &Backend| b.ip == old.ip && b.port == old.port);
            if !same_target {
                self.checker.remove(*id);
            }
        }
        for id in new.keys() {
            if self.checker.get(*id).is_none() {
                // Cannot be a duplicate: absent just above.
                let _ = self.checker.add(*id, now);
            }
        }
        self.backends = new;
        self.refresh();
        Ok(())
    }

    /// Adds a backend or changes one (see [`set_backends`](Self::set_backends)
    /// for what keeps its health).
    pub fn upsert_backend(&mut self, backend: Backend, now: u64) -> Result<(), PoolError> {
        Self::check_backend(&backend)?;
        match self.backends.get(&backend.id) {
            Some(old) => {
                if old.ip != backend.ip || old.port != backend.port {
                    self.checker.remove(backend.id);
                    let _ = self.checker.add(backend.id, now);
                }
            }
            None => {
                check_size(self.config.table_size, self.backends.len() + 1)?;
                let _ = self.checker.add(backend.id, now);
            }
        }
        self.backends.insert(backend.id, backend);
        self.refresh();
        Ok(())
    }

    /// Removes a backend (its probe in flight, if any, will be ignored).
    pub fn remove_backend(&mut self, id: BackendId) -> Option<Backend> {
        let b = self.backends.remove(&id)?;
        self.checker.remove(id);
        self.refresh();
        Some(b)
    }

    /// Changes a backend's weight; 0 drains it.
    pub fn set_weight(&mut self, id: BackendId, weight: u32) -> Result<(), PoolError> {
        let b = self.backends.get_mut(&id).ok_or(PoolError::Unknown(id))?;
        b.weight = weight;
        self.refresh();
        Ok(())
    }

    /// The backend for a new connection with this flow hash
    /// ([`crate::flow_hash`]); `None` when no backend is eligible (see the
    /// crate doc for what the caller must do then).
    pub fn pick(&self, flow_hash: u64) -> Option<&Backend> {
        self.backends.get(&self.table.lookup(flow_hash)?)
    }

    /// Whether any backend is eligible.
    pub fn is_available(&self) -> bool {
        !self.table.is_empty()
    }

    /// A backend by id.
    pub fn backend(&self, id: BackendId) -> Option<&Backend> {
        self.backends.get(&id)
    }

    /// Every backend, by id.
    pub fn backends(&self) -> impl Iterator<Item = &Backend> + '_ {
        self.backends.values()
    }

    /// A backend's health.
    pub fn health(&self, id: BackendId) -> Option<&BackendHealth> {
        self.checker.get(id)
    }

    /// The current table.
    pub fn table(&self) -> &Maglev {
        &self.table
    }

    /// Table rebuilds so far.
    pub fn rebuilds(&self) -> u64 {
        self.rebuilds
    }

    /// A snapshot for display (walks the table once).
    pub fn status(&self) -> PoolStatus {
        let slots = self.table.slot_counts();
        let backends = self
            .backends
            .values()
            .filter_map(|b| {
                let health = self.checker.get(b.id)?.clone();
                Some(BackendStatus {
                    backend: *b,
                    eligible: self.eligible(b),
                    slots: slots.get(&b.id).copied().unwrap_or(0),
                    health,
                })
            })
            .collect();
        PoolStatus {
            table_size: self.config.table_size,
            available: self.is_available(),
            rebuilds: self.rebuilds,
            backends,
        }
    }

    /// Counts timed-out probes and hands out up to `budget` due probes.
    pub fn poll_health(&mut self, now: u64, budget: usize) -> (Vec<ProbeTask>, Vec<Transition>) {
        let (requests, transitions) = self.checker.poll(now, budget);
        let mut tasks = Vec::with_capacity(requests.len());
        for request in requests {
            match self.backends.get(&request.backend) {
                Some(b) => tasks.push(ProbeTask {
                    request,
                    ip: b.ip,
                    port: self.config.check_port.unwrap_or(b.port),
                }),
                // Every checked backend is in the pool; should one not
                // be, stop checking it rather than hold its request.
                None => {
                    self.checker.remove(request.backend);
                }
            }
        }
        if !transitions.is_empty() {
            self.refresh();
        }
        (tasks, transitions)
    }

    /// Counts a probe's result; rebuilds the table on a state change.
    pub fn on_probe_result(
        &mut self,
        request: ProbeRequest,
        result: ProbeResult,
        now: u64,
    ) -> Option<Transition> {
        let t = self.checker.on_result(request, result, now)?;
        self.refresh();
        Some(t)
    }

    /// Gives back a probe that could not start (nothing is counted).
    pub fn abandon_probe(&mut self, request: ProbeRequest, now: u64) {
        self.checker.abandon(request, now);
    }

    /// When [`poll_health`](Self::poll_health) has work (may be in the
    /// past when the last budget was too small).
    pub fn next_health_due(&self) -> Option<u64> {
        self.checker.next_due()
    }

    /// The earliest deadline of a probe in flight.
    pub fn next_health_deadline(&self) -> Option<u64> {
        self.checker.next_deadline()
    }

    fn eligible(&self, b: &Backend) -> bool {
        b.weight > 0 && self.checker.is_up(b.id)
    }

    /// (id, weight) of the eligible backends, sorted by id.
    fn eligible_list(&self) -> Vec<(BackendId, u32)> {
        self.backends
            .values()
            .filter(|b| self.eligible(b))
            .map(|b| (b.id, b.weight))
            .collect()
    }

    /// Rebuilds the table if the eligible set or a weight changed.
    fn refresh(&mut self) {
        let eligible = self.eligible_list();
        if eligible.as_slice() != self.table.backends() {
            self.build(&eligible);
        }
    }

    fn rebuild(&mut self) {
        let eligible = self.eligible_list();
        self.build(&eligible);
    }

    fn build(&mut self, eligible: &[(BackendId, u32)]) {
        // Cannot fail: the size was checked against all backends, the
        // eligible ones are a subset, and ids are map keys. Should it fail
        // anyway, the old table stays (stale beats rejecting everything).
        if let Ok(table) = Maglev::new(eligible, self.config.table_size) {
            self.table = table;
            self.rebuilds += 1;
        }
    }
}

/// A pool's identity within a [`LoadBalancer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PoolId(pub u32);

/// A health transition in one pool, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthEvent {
    /// The pool.
    pub pool: PoolId,
    /// What changed.
    pub transition: Transition,
}

/// Errors of [`LoadBalancer`] calls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LbError {
    /// The prober's config.
    #[error(transparent)]
    Prober(#[from] ProberError),
    /// A pool's config.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The pool id is taken.
    #[error("load balancer pool {0} already exists")]
    DuplicatePool(u32),
}

/// The pools of one tenant network and the prober that checks them.
///
/// Each [`LoadBalancer::poll`]: results of finished probes go to their
/// pools (which rebuild their tables on a transition), then every pool
/// hands out the probes that are due, within the prober's free slots, and
/// they start. A probe that cannot start because its backend has no route
/// counts as a failure ([`Failure::NoRoute`]).
#[derive(Debug)]
pub struct LoadBalancer {
    prober: Prober,
    pools: BTreeMap<PoolId, Pool>,
    /// Probes running, with the pool and request they answer.
    probes: HashMap<ProbeId, (PoolId, ProbeRequest)>,
    /// Which pool goes first at the next poll.
    turn: usize,
}

impl LoadBalancer {
    /// A load balancer with no pools, probing from `prober`'s address.
    pub fn new(prober: ProberConfig, now: u64) -> Result<LoadBalancer, LbError> {
        Ok(LoadBalancer {
            prober: Prober::new(prober, now)?,
            pools: BTreeMap::new(),
            probes: HashMap::new(),
            turn: 0,
        })
    }

    /// Adds an empty pool.
    pub fn add_pool(&mut self, id: PoolId, config: PoolConfig) -> Result<(), LbError> {
        if self.pools.contains_key(&id) {
            return Err(LbError::DuplicatePool(id.0));
        }
        self.pools.insert(id, Pool::new(config)?);
        Ok(())
    }

    /// Removes a pool and cancels its probes.
    pub fn remove_pool(&mut self, id: PoolId, now: u64) -> Option<Pool> {
        let pool = self.pools.remove(&id)?;
        let mine: Vec<ProbeId> = self
            .probes
            .iter()
            .filter(|(_, (p, _))| *p == id)
            .map(|(&probe, _)| probe)
            .collect();
        for probe in mine {
            self.probes.remove(&probe);
            self.prober.cancel(probe, now);
        }
        Some(pool)
    }

    /// A pool.
    pub fn pool(&self, id: PoolId) -> Option<&Pool> {
        self.pools.get(&id)
    }

    /// A pool, to change its backends or config.
    pub fn pool_mut(&mut self, id: PoolId) -> Option<&mut Pool> {
        self.pools.get_mut(&id)
    }

    /// Every pool, by id.
    pub fn pools(&self) -> impl Iterator<Item = (PoolId, &Pool)> + '_ {
        self.pools.iter().map(|(&id, p)| (id, p))
    }

    /// The backend for a new connection to `pool`; `None` when the pool
    /// does not exist or has no eligible backend.
    pub fn pick(&self, pool: PoolId, flow_hash: u64) -> Option<&Backend> {
        self.pools.get(&pool)?.pick(flow_hash)
    }

    /// The prober (address, counters).
    pub fn prober(&self) -> &Prober {
        &self.prober
    }

    /// A frame addressed to the prober (see [`Prober::receive`]).
    pub fn receive(&mut self, frame: &[u8], now: u64) {
        self.prober.receive(frame, now);
    }

    /// Frames the prober wants sent.
    pub fn transmit(&mut self, now: u64) -> Vec<Vec<u8>> {
        self.prober.transmit(now)
    }

    /// Runs health checking; returns the transitions that happened.
    pub fn poll(&mut self, now: u64) -> Vec<HealthEvent> {
        let mut events = Vec::new();
        for (probe, result) in self.prober.poll(now) {
            let Some((pool_id, request)) = self.probes.remove(&probe) else {
                continue;
            };
            if let Some(pool) = self.pools.get_mut(&pool_id) {
                if let Some(transition) = pool.on_probe_result(request, result, now) {
                    events.push(HealthEvent {
                        pool: pool_id,
                        transition,
                    });
                }
            }
        }
        // Pools take turns going first, so one busy pool cannot keep
        // another from the prober's free slots.
        let mut order: Vec<PoolId> = self.pools.keys().copied().collect();
        if !order.is_empty() {
            let first = self.turn % order.len();
            order.rotate_left(first);
            self.turn = self.turn.wrapping_add(1);
        }
        for pool_id in order {
            let Some(pool) = self.pools.get_mut(&pool_id) else {
                continue;
            };
            let (tasks, transitions) = pool.poll_health(now, self.prober.free_slots());
            events.extend(transitions.into_iter().map(|transition| HealthEvent {
                pool: pool_id,
                transition,
            }));
            for task in tasks {
                let req = task.request;
                let started =
                    self.prober
                        .start(task.ip, task.port, &pool.config.check, req.deadline_ns, now);
                match started {
                    Ok(probe) => {
                        self.probes.insert(probe, (pool_id, req));
                    }
                    Err(StartError::Busy(_) | StartError::NoPort) => pool.abandon_probe(req, now),
                    Err(_) => {
                        let result = ProbeResult::Down(Failure::NoRoute);
                        if let Some(transition) = pool.on_probe_result(req, result, now) {
                            events.push(HealthEvent {
                                pool: pool_id,
                                transition,
                            });
                        }
                    }
                }
            }
        }
        events
    }

    /// When [`poll`](Self::poll) must run next (ns); `None` when idle.
    pub fn poll_at(&mut self, now: u64) -> Option<u64> {
        let mut at = self.prober.poll_at(now);
        let has_room = self.prober.free_slots() > 0;
        for pool in self.pools.values() {
            let t = if has_room {
                pool.next_health_due()
            } else {
                pool.next_health_deadline()
            };
            if let Some(t) = t {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        }
        at
    }
}

#[cfg(test)]
mod tests;
