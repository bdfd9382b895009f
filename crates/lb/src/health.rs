//! Per-backend health-check state machine on the caller's clock.
//!
//! [`HealthChecker`] decides when each backend's next probe is due, takes
//! the probes' results, and keeps each backend's [`BackendHealth`]. It does
//! no probing itself: [`HealthChecker::poll`] hands out [`ProbeRequest`]s,
//! the caller runs them (with [`crate::Prober`], or anything else) and
//! reports back with [`HealthChecker::on_result`].
//!
//! # Rules
//!
//! * **Hysteresis.** An Up backend goes Down after `fall` failures in a
//!   row; a Down backend comes Up after `rise` successes in a row. Any
//!   success resets the failure count and any failure the success count,
//!   so a flapping backend (alternating results) never changes state once
//!   `rise` and `fall` are both above 1.
//! * **Initial state** ([`InitialState`], default `Down`): a new backend
//!   starts Down with both counts at 0 and is probed at once, so it takes
//!   traffic after `rise` successful probes (`(rise - 1) * interval` plus a
//!   round trip). Trusting unprobed backends would send connections to a
//!   VM that is still booting; pools that prefer availability on restart
//!   choose `Up`, which then needs `fall` failures to go Down.
//! * **Timing.** Probes of one backend start every `interval`, measured
//!   from when the previous probe was due (no drift), skipping missed
//!   slots instead of bursting when the caller polled late. A probe not
//!   answered within `timeout` is a failure ([`Failure::Timeout`]);
//!   `timeout <= interval`, so a backend has at most one probe in flight.
//!   A result that arrives after its timeout was counted, or for a backend
//!   that was removed (or removed and re-added) meanwhile, is ignored: each
//!   request carries a sequence number.
//! * **Bounded work.** One timer per backend in ordered sets, so a poll
//!   costs `O(log n)` per probe due; [`HealthChecker::poll`] takes a
//!   budget so a caller with a limited number of probe sockets never gets
//!   more requests than it can start. A due backend that did not fit stays
//!   due and goes first next time.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::maglev::BackendId;

/// Longest interval accepted: one day (catches seconds given as ms the
/// other way round, and keeps `now + interval` far from overflow).
pub const MAX_INTERVAL_MS: u64 = 24 * 3600 * 1000;

/// Largest `rise` / `fall`.
pub const MAX_THRESHOLD: u32 = 1000;

const NS_PER_MS: u64 = 1_000_000;

/// State a backend starts in when it is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitialState {
    /// Down until `rise` probes in a row succeed (the default).
    #[default]
    Down,
    /// Up until `fall` probes in a row fail.
    Up,
}

/// Timing and thresholds of a pool's health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Time between the starts of two probes of a backend (default 5000).
    pub interval_ms: u64,
    /// Time a probe may take (default 2000; at most `interval_ms`).
    pub timeout_ms: u64,
    /// Successes in a row that bring a Down backend Up (default 2).
    pub rise: u32,
    /// Failures in a row that take an Up backend Down (default 3).
    pub fall: u32,
    /// State of a newly added backend (default Down).
    pub initial: InitialState,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_ms: 5000,
            timeout_ms: 2000,
            rise: 2,
            fall: 3,
            initial: InitialState::Down,
        }
    }
}

/// A health-check configuration a user must fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthConfigError {
    /// `interval_ms` out of range.
    #[error("health check interval_ms = {0} must be between 1 and {MAX_INTERVAL_MS}")]
    Interval(u64),
    /// `timeout_ms` out of range.
    #[error("health check timeout_ms = {timeout_ms} must be between 1 and interval_ms ({interval_ms}), so a backend has one probe in flight at a time")]
    Timeout {
        /// Configured timeout.
        timeout_ms: u64,
        /// Configured interval.
        interval_ms: u64,
    },
    /// `rise` or `fall` out of range.
    #[error("health check {field} = {value} must be between 1 and {MAX_THRESHOLD}")]
    Threshold {
        /// `"rise"` or `"fall"`.
        field: &'static str,
        /// Configured value.
        value: u32,
    },
}

impl HealthConfig {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), HealthConfigError> {
        if self.interval_ms == 0 || self.interval_ms > MAX_INTERVAL_MS {
            return Err(HealthConfigError::Interval(self.interval_ms));
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.interval_ms {
            return Err(HealthConfigError::Timeout {
                timeout_ms: self.timeout_ms,
                interval_ms: self.interval_ms,
            });
        }
        for (field, value) in [("rise", self.rise), ("fall", self.fall)] {
            if value == 0 || value > MAX_THRESHOLD {
                return Err(HealthConfigError::Threshold { field, value });
            }
        }
        Ok(())
    }

    fn interval_ns(&self) -> u64 {
        self.interval_ms * NS_PER_MS
    }

    fn timeout_ns(&self) -> u64 {
        self.timeout_ms * NS_PER_MS
    }
}

/// Whether a backend gets new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// Passing: eligible for new connections (if its weight is positive).
    Up,
    /// Failing or not yet proven: no new connections. Established ones
    /// stay pinned by conntrack.
    Down,
}

/// Why a probe failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// No answer within the timeout (including no ARP answer).
    #[error("timed out")]
    Timeout,
    /// The backend answered the SYN with a RST (port closed).
    #[error("connection refused")]
    Refused,
    /// The connection was reset after it was established.
    #[error("connection reset")]
    Reset,
    /// The backend closed the connection before answering.
    #[error("closed before answering")]
    Closed,
    /// HTTP: a status other than the expected one.
    #[error("HTTP status {got}, expected {expected}")]
    Status {
        /// Status received.
        got: u16,
        /// Status the check wants.
        expected: u16,
    },
    /// HTTP: the answer is not an HTTP status line (or is too long).
    #[error("not an HTTP response")]
    BadResponse,
    /// The prober cannot reach the address (outside its network and no
    /// gateway, or not a unicast address).
    #[error("no route to backend")]
    NoRoute,
}

/// Outcome of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeResult {
    /// The check passed.
    Up,
    /// The check failed.
    Down(Failure),
}

/// One probe to run. Hand it back unchanged to
/// [`HealthChecker::on_result`] (or [`HealthChecker::abandon`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProbeRequest {
    /// Backend to probe.
    pub backend: BackendId,
    /// Sequence number, unique per checker; stale results are recognised
    /// by it.
    pub seq: u64,
    /// When the probe was handed out (ns).
    pub started_ns: u64,
    /// When the checker counts it as [`Failure::Timeout`] (ns): give the
    /// prober this deadline so both agree.
    pub deadline_ns: u64,
}

/// A backend's health as the checker sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendHealth {
    /// Current state.
    pub state: HealthState,
    /// Successes in a row (0 after any failure).
    pub consecutive_successes: u32,
    /// Failures in a row (0 after any success).
    pub consecutive_failures: u32,
    /// When it was added (ns).
    pub added_ns: u64,
    /// Last state change (ns); `None` while still in the initial state.
    pub last_change_ns: Option<u64>,
    /// Most recent failure, kept after recovery for diagnostics.
    pub last_error: Option<Failure>,
    /// When `last_error` happened (ns).
    pub last_error_ns: Option<u64>,
    /// Results counted (including timeouts).
    pub probes: u64,
    /// Failures counted.
    pub failures: u64,
}

/// A state change, returned by the calls that cause one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// The backend that changed.
    pub backend: BackendId,
    /// Its new state.
    pub state: HealthState,
    /// The failure that took it Down, if it went Down.
    pub cause: Option<Failure>,
    /// When (ns).
    pub at_ns: u64,
}

/// Errors of [`HealthChecker::add`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthError {
    /// The backend is already checked.
    #[error("{0} is already health-checked")]
    Duplicate(BackendId),
}

#[derive(Debug, Clone)]
struct Entry {
    health: BackendHealth,
    /// Start of the next probe (also when one is in flight: the one after).
    next_due: u64,
    in_flight: Option<ProbeRequest>,
}

/// The health checks of one pool: every backend shares one
/// [`HealthConfig`].
#[derive(Debug, Clone)]
pub struct HealthChecker {
    config: HealthConfig,
    backends: BTreeMap<BackendId, Entry>,
    /// (next_due, backend) of backends without a probe in flight.
    idle: BTreeSet<(u64, BackendId)>,
    /// (deadline, backend) of backends with a probe in flight.
    deadlines: BTreeSet<(u64, BackendId)>,
    next_seq: u64,
    /// Bumped at every state change, so a caller can tell cheaply that it
    /// must rebuild what depends on the Up set.
    generation: u64,
}

impl HealthChecker {
    /// A checker with no backends.
    pub fn new(config: HealthConfig) -> Result<HealthChecker, HealthConfigError> {
        config.validate()?;
        Ok(HealthChecker {
            config,
            backends: BTreeMap::new(),
            idle: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            next_seq: 1,
            generation: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &HealthConfig {
        &self.config
    }

    /// Replaces the configuration. States and counts are kept (a backend
    /// with more successes than a lowered `rise` comes Up at its next
    /// success, not at once); probes in flight keep their deadline; the
    /// next probe of each backend comes no later than one new interval
    /// from `now`.
    pub fn set_config(&mut self, config: HealthConfig, now: u64) -> Result<(), HealthConfigError> {
        config.validate()?;
        self.config = config;
        let cap = now.saturating_add(config.interval_ns());
        for (&id, e) in self.backends.iter_mut() {
            if e.next_due > cap {
                if e.in_flight.is_none() {
                    self.idle.remove(&(e.next_due, id));
                    self.idle.insert((cap, id));
                }
                e.next_due = cap;
            }
        }
        Ok(())
    }

    /// Starts checking a backend; its first probe is due at once.
    pub fn add(&mut self, backend: BackendId, now: u64) -> Result<(), HealthError> {
        if self.backends.contains_key(&backend) {
            return Err(HealthError::Duplicate(backend));
        }
        let state = match self.config.initial {
            InitialState::Down => HealthState::Down,
            InitialState::Up => HealthState::Up,
        };
        self.backends.insert(
            backend,
            Entry {
                health: BackendHealth {
                    state,
                    consecutive_successes: 0,
                    consecutive_failures: 0,
                    added_ns: now,
                    last_change_ns: None,
                    last_error: None,
                    last_error_ns: None,
                    probes: 0,
                    failures: 0,
                },
                next_due: now,
                in_flight: None,
            },
        );
        self.idle.insert((now, backend));
        // A new Up backend changes the Up set.
        if state == HealthState::Up {
            self.generation += 1;
        }
        Ok(())
    }

    /// Stops checking a backend; a result of its probe in flight will be
    /// ignored. Returns its last health.
    pub fn remove(&mut self, backend: BackendId) -> Option<BackendHealth> {
        let e = self.backends.remove(&backend)?;
        match e.in_flight {
            Some(req) => self.deadlines.remove(&(req.deadline_ns, backend)),
            None => self.idle.remove(&(e.next_due, backend)),
        };
        if e.health.state == HealthState::Up {
            self.generation += 1;
        }
        Some(e.health)
    }

    /// Counts probes in flight past their deadline as timeouts, then hands
    /// out up to `budget` probes that are due, earliest first.
    ///
    /// Returns the requests to run and the state changes the timeouts
    /// caused.
    pub fn poll(&mut self, now: u64, budget: usize) -> (Vec<ProbeRequest>, Vec<Transition>) {
        let mut transitions = Vec::new();
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            // Taken out first so the loop always advances.
            self.deadlines.remove(&(deadline, id));
            let req = self.backends.get(&id).and_then(|e| e.in_flight);
            if let Some(req) = req {
                if let Some(t) = self.on_result(req, ProbeResult::Down(Failure::Timeout), now) {
                    transitions.push(t);
                }
            }
        }

        let mut requests = Vec::new();
        let interval = self.config.interval_ns();
        let timeout = self.config.timeout_ns();
        while requests.len() < budget {
            let Some(&(due, id)) = self.idle.first() else {
                break;
            };
            if due > now {
                break;
            }
            self.idle.remove(&(due, id));
            let Some(e) = self.backends.get_mut(&id) else {
                continue;
            };
            let req = ProbeRequest {
                backend: id,
                seq: self.next_seq,
                started_ns: now,
                deadline_ns: now.saturating_add(timeout),
            };
            self.next_seq += 1;
            // Keep the cadence of the schedule, not of our polling; if we
            // are a whole interval late, start a fresh cadence from now.
            let mut next = due.saturating_add(interval);
            if next <= now {
                next = now.saturating_add(interval);
            }
            e.next_due = next;
            e.in_flight = Some(req);
            self.deadlines.insert((req.deadline_ns, id));
            requests.push(req);
        }
        (requests, transitions)
    }

    /// Counts a probe's result. Returns the state change it caused, if
    /// any. A result for a request that is not in flight (late after a
    /// timeout, or for a removed backend) is ignored.
    pub fn on_result(
        &mut self,
        req: ProbeRequest,
        result: ProbeResult,
        now: u64,
    ) -> Option<Transition> {
        let config = self.config;
        let e = self.backends.get_mut(&req.backend)?;
        if e.in_flight.map(|r| r.seq) != Some(req.seq) {
            return None;
        }
        e.in_flight = None;
        self.deadlines.remove(&(req.deadline_ns, req.backend));
        self.idle.insert((e.next_due, req.backend));

        let h = &mut e.health;
        h.probes += 1;
        let changed = match result {
            ProbeResult::Up => {
                h.consecutive_successes = h.consecutive_successes.saturating_add(1);
                h.consecutive_failures = 0;
                (h.state == HealthState::Down && h.consecutive_successes >= config.rise)
                    .then_some((HealthState::Up, None))
            }
            ProbeResult::Down(failure) => {
                h.failures += 1;
                h.consecutive_failures = h.consecutive_failures.saturating_add(1);
                h.consecutive_successes = 0;
                h.last_error = Some(failure);
                h.last_error_ns = Some(now);
                (h.state == HealthState::Up && h.consecutive_failures >= config.fall)
                    .then_some((HealthState::Down, Some(failure)))
            }
        };
        let (state, cause) = changed?;
        h.state = state;
        h.last_change_ns = Some(now);
        self.generation += 1;
        Some(Transition {
            backend: req.backend,
            state,
            cause,
            at_ns: now,
        })
    }

    /// Gives a request back unrun (the prober had no room, say): nothing
    /// is counted and the backend is due again at once.
    pub fn abandon(&mut self, req: ProbeRequest, now: u64) {
        let Some(e) = self.backends.get_mut(&req.backend) else {
            return;
        };
        if e.in_flight.map(|r| r.seq) != Some(req.seq) {
            return;
        }
        e.in_flight = None;
        self.deadlines.remove(&(req.deadline_ns, req.backend));
        // Due at once, but the regular cadence resumes after it.
        e.next_due = e.next_due.min(now);
        self.idle.insert((e.next_due, req.backend));
    }

    /// The earliest time at which [`poll`](Self::poll) has work: a probe
    /// due or a deadline. `None` with no backends. May be in the past (a
    /// due probe that did not fit the last budget).
    pub fn next_due(&self) -> Option<u64> {
        let due = self.idle.first().map(|&(t, _)| t);
        let deadline = self.deadlines.first().map(|&(t, _)| t);
        match (due, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The earliest deadline of a probe in flight; for callers that are
    /// out of budget and must not spin on a due probe.
    pub fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|&(t, _)| t)
    }

    /// A backend's health.
    pub fn get(&self, backend: BackendId) -> Option<&BackendHealth> {
        self.backends.get(&backend).map(|e| &e.health)
    }

    /// Whether a backend is checked and Up.
    pub fn is_up(&self, backend: BackendId) -> bool {
        self.get(backend)
            .is_some_and(|h| h.state == HealthState::Up)
    }

    /// Every backend's health, by id.
    pub fn iter(&self) -> impl Iterator<Item = (BackendId, &BackendHealth)> + '_ {
        self.backends.iter().map(|(&id, e)| (id, &e.health))
    }

    /// Number of backends checked.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// Whether no backend is checked.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// Probes in flight.
    pub fn in_flight(&self) -> usize {
        self.deadlines.len()
    }

    /// Changes whenever the Up set may have changed.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

#[cfg(test)]
mod tests;
