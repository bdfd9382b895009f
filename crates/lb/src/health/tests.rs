use super::*;

const MS: u64 = 1_000_000;
const S: u64 = 1000 * MS;

/// The test owns the clock: nothing in the checker reads time.
struct Clock(u64);

impl Clock {
    fn now(&self) -> u64 {
        self.0
    }
    fn advance(&mut self, ns: u64) -> u64 {
        self.0 += ns;
        self.0
    }
}

fn config(rise: u32, fall: u32) -> HealthConfig {
    HealthConfig {
        interval_ms: 5000,
        timeout_ms: 2000,
        rise,
        fall,
        initial: InitialState::Down,
    }
}

const B: BackendId = BackendId(7);

/// Polls at `now` and expects exactly one request for `B`.
fn one(hc: &mut HealthChecker, now: u64) -> ProbeRequest {
    let (reqs, transitions) = hc.poll(now, usize::MAX);
    assert!(transitions.is_empty());
    assert_eq!(reqs.len(), 1, "at {now}");
    assert_eq!(reqs[0].backend, B);
    reqs[0]
}

/// Runs one probe cycle with `result`; returns the transition and leaves
/// the clock at the next due time.
fn cycle(hc: &mut HealthChecker, clock: &mut Clock, result: ProbeResult) -> Option<Transition> {
    let req = one(hc, clock.now());
    let t = hc.on_result(req, result, clock.now() + 10 * MS);
    clock.advance(5 * S);
    t
}

fn down(f: Failure) -> ProbeResult {
    ProbeResult::Down(f)
}

#[test]
fn new_backend_starts_down_and_rises_after_rise_successes() {
    let mut clock = Clock(1000 * S);
    let mut hc = HealthChecker::new(config(3, 2)).unwrap();
    hc.add(B, clock.now()).unwrap();
    assert_eq!(hc.get(B).unwrap().state, HealthState::Down);
    assert!(!hc.is_up(B));
    // First probe at once.
    assert_eq!(hc.next_due(), Some(clock.now()));
    assert_eq!(cycle(&mut hc, &mut clock, ProbeResult::Up), None);
    assert_eq!(cycle(&mut hc, &mut clock, ProbeResult::Up), None);
    let t = cycle(&mut hc, &mut clock, ProbeResult::Up).unwrap();
    assert_eq!(t.state, HealthState::Up);
    assert_eq!(t.cause, None);
    let h = hc.get(B).unwrap();
    assert_eq!(h.state, HealthState::Up);
    assert_eq!(h.consecutive_successes, 3);
    assert_eq!(h.last_change_ns, Some(t.at_ns));
    assert_eq!(h.probes, 3);
}

#[test]
fn up_backend_falls_after_fall_failures() {
    let mut clock = Clock(0);
    let mut hc = HealthChecker::new(config(1, 3)).unwrap();
    hc.add(B, clock.now()).unwrap();
    assert!(cycle(&mut hc, &mut clock, ProbeResult::Up).is_some());
    assert_eq!(cycle(&mut hc, &mut clock, down(Failure::Refused)), None);
    assert_eq!(cycle(&mut hc, &mut clock, down(Failure::Refused)), None);
    assert_eq!(hc.get(B).unwrap().consecutive_failures, 2);
    assert!(hc.is_up(B));
    let t = cycle(
        &mut hc,
        &mut clock,
        down(Failure::Status {
            got: 503,
            expected: 200,
        }),
    )
    .unwrap();
    assert_eq!(t.state, HealthState::Down);
    assert_eq!(
        t.cause,
        Some(Failure::Status {
            got: 503,
            expected: 200
        })
    );
    let h = hc.get(B).unwrap();
    assert_eq!(
        h.last_error,
        Some(Failure::Status {
            got: 503,
            expected: 200
        })
    );
    assert_eq!(h.failures, 3);
    // Further failures change nothing.
    assert_eq!(cycle(&mut hc, &mut clock, down(Failure::Refused)), None);
    // The last error survives recovery, for diagnostics.
    assert!(cycle(&mut hc, &mut clock, ProbeResult::Up).is_some());
    assert_eq!(hc.get(B).unwrap().last_error, Some(Failure::Refused));
}

#[test]
fn timeout_counts_as_failure_and_late_result_is_ignored() {
    let mut clock = Clock(0);
    let mut hc = HealthChecker::new(config(1, 1)).unwrap();
    hc.add(B, clock.now()).unwrap();
    assert!(cycle(&mut hc, &mut clock, ProbeResult::Up).is_some());

    let req = one(&mut hc, clock.now());
    assert_eq!(req.deadline_ns, clock.now() + 2 * S);
    assert_eq!(hc.next_due(), Some(req.deadline_ns));
    // Just before the deadline: nothing.
    let (reqs, ts) = hc.poll(req.deadline_ns - 1, usize::MAX);
    assert!(reqs.is_empty() && ts.is_empty());
    // At the deadline: a timeout, which with fall = 1 takes it Down.
    let (reqs, ts) = hc.poll(clock.advance(2 * S), usize::MAX);
    assert!(reqs.is_empty());
    assert_eq!(ts.len(), 1);
    assert_eq!(ts[0].state, HealthState::Down);
    assert_eq!(ts[0].cause, Some(Failure::Timeout));
    assert_eq!(hc.in_flight(), 0);
    // The answer that arrives afterwards is not counted.
    assert_eq!(hc.on_result(req, ProbeResult::Up, clock.advance(MS)), None);
    let h = hc.get(B).unwrap();
    assert_eq!(h.state, HealthState::Down);
    assert_eq!(h.consecutive_successes, 0);
    assert_eq!(h.probes, 2);
    // The next probe keeps the 5 s cadence.
    assert_eq!(hc.next_due(), Some(10 * S));
}

#[test]
fn flapping_is_absorbed_by_hysteresis() {
    let mut clock = Clock(0);
    let mut hc = HealthChecker::new(config(2, 2)).unwrap();
    hc.add(B, clock.now()).unwrap();
    let gen = hc.generation();
    for i in 0..20 {
        let r = if i % 2 == 0 {
            ProbeResult::Up
        } else {
            down(Failure::Timeout)
        };
        assert_eq!(cycle(&mut hc, &mut clock, r), None, "probe {i}");
    }
    assert_eq!(hc.get(B).unwrap().state, HealthState::Down);
    assert_eq!(hc.generation(), gen);

    // Up, then the same flapping never takes it Down.
    cycle(&mut hc, &mut clock, ProbeResult::Up);
    assert!(cycle(&mut hc, &mut clock, ProbeResult::Up).is_some());
    for i in 0..20 {
        let r = if i % 2 == 0 {
            down(Failure::Reset)
        } else {
            ProbeResult::Up
        };
        assert_eq!(cycle(&mut hc, &mut clock, r), None, "probe {i}");
    }
    assert!(hc.is_up(B));

    // Without hysteresis (1/1) every result flips it.
    let mut hc = HealthChecker::new(config(1, 1)).unwrap();
    hc.add(B, clock.now()).unwrap();
    for i in 0..10 {
        let r = if i % 2 == 0 {
            ProbeResult::Up
        } else {
            down(Failure::Refused)
        };
        assert!(cycle(&mut hc, &mut clock, r).is_some(), "probe {i}");
    }
}

#[test]
fn probes_are_spaced_by_interval_without_drift_or_bursts() {
    let mut clock = Clock(100 * S);
    let mut hc = HealthChecker::new(config(1, 1)).unwrap();
    hc.add(B, clock.now()).unwrap();
    let req = one(&mut hc, clock.now());
    // Answered quickly: the next probe is one interval after the first.
    hc.on_result(req, ProbeResult::Up, clock.advance(3 * MS));
    assert_eq!(hc.next_due(), Some(105 * S));
    let (reqs, _) = hc.poll(105 * S - 1, usize::MAX);
    assert!(reqs.is_empty());
    // Polled 1.2 s late: the probe goes now, the next stays on the grid.
    clock.0 = 106 * S + 200 * MS;
    let req = one(&mut hc, clock.now());
    hc.on_result(req, ProbeResult::Up, clock.advance(MS));
    assert_eq!(hc.next_due(), Some(110 * S));
    // Polled three intervals late: one probe, not three, and a fresh
    // cadence from now.
    clock.0 = 126 * S;
    let req = one(&mut hc, clock.now());
    let (reqs, _) = hc.poll(clock.now(), usize::MAX);
    assert!(reqs.is_empty());
    hc.on_result(req, ProbeResult::Up, clock.advance(MS));
    assert_eq!(hc.next_due(), Some(131 * S));
}

#[test]
fn adding_and_removing_backends() {
    let mut clock = Clock(0);
    let mut hc = HealthChecker::new(config(1, 1)).unwrap();
    hc.add(BackendId(1), clock.now()).unwrap();
    hc.add(BackendId(2), clock.now()).unwrap();
    assert_eq!(
        hc.add(BackendId(1), clock.now()),
        Err(HealthError::Duplicate(BackendId(1)))
    );
    let (reqs, _) = hc.poll(clock.now(), usize::MAX);
    assert_eq!(reqs.len(), 2);
    // Removing a backend with a probe in flight: its result is ignored and
    // its deadline does not fire.
    let h = hc.remove(BackendId(2)).unwrap();
    assert_eq!(h.state, HealthState::Down);
    assert_eq!(
        hc.on_result(reqs[1], ProbeResult::Up, clock.advance(MS)),
        None
    );
    assert!(hc.get(BackendId(2)).is_none());
    assert_eq!(hc.len(), 1);
    assert_eq!(hc.in_flight(), 1);
    // Re-added under the same id: a fresh start, the old request still
    // does not count.
    hc.add(BackendId(2), clock.now()).unwrap();
    assert_eq!(hc.on_result(reqs[1], ProbeResult::Up, clock.now()), None);
    assert_eq!(hc.get(BackendId(2)).unwrap().probes, 0);
    let (reqs2, _) = hc.poll(clock.now(), usize::MAX);
    assert_eq!(reqs2.len(), 1);
    assert_eq!(reqs2[0].backend, BackendId(2));
    assert!(reqs2[0].seq > reqs[1].seq);
    // Removing an Up backend changes the generation; unknown is None.
    hc.on_result(reqs[0], ProbeResult::Up, clock.now());
    let gen = hc.generation();
    hc.remove(BackendId(1));
    assert_ne!(hc.generation(), gen);
    assert!(hc.remove(BackendId(1)).is_none());
    hc.remove(BackendId(2));
    assert!(hc.is_empty());
    assert_eq!(hc.next_due(), None);
    let (reqs, ts) = hc.poll(clock.advance(10 * S), usize::MAX);
    assert!(reqs.is_empty() && ts.is_empty());
}

#[test]
fn budget_limits_requests_and_the_rest_go_first_next_time() {
    let mut hc = HealthChecker::new(config(1, 1)).unwrap();
    for i in 0..5 {
        hc.add(BackendId(i), u64::from(i) * MS).unwrap();
    }
    let now = 10 * MS;
    let (reqs, _) = hc.poll(now, 2);
    let ids: Vec<u32> = reqs.iter().map(|r| r.backend.0).collect();
    assert_eq!(ids, [0, 1]);
    // Still due: next_due is in the past, next_deadline is not.
    assert_eq!(hc.next_due(), Some(2 * MS));
    assert_eq!(hc.next_deadline(), Some(now + 2 * S));
    let (reqs, _) = hc.poll(now, 0);
    assert!(reqs.is_empty());
    let (reqs, _) = hc.poll(now + MS, 10);
    let ids: Vec<u32> = reqs.iter().map(|r| r.backend.0).collect();
    assert_eq!(ids, [2, 3, 4]);
}

#[test]
fn abandoned_request_is_not_counted_and_is_due_again() {
    let mut hc = HealthChecker::new(config(1, 1)).unwrap();
    hc.add(B, 0).unwrap();
    let req = one(&mut hc, 0);
    hc.abandon(req, MS);
    assert_eq!(hc.in_flight(), 0);
    assert_eq!(hc.get(B).unwrap().probes, 0);
    assert_eq!(hc.next_due(), Some(MS));
    // Its result, if it came anyway, is not counted.
    assert_eq!(hc.on_result(req, ProbeResult::Up, MS), None);
    let again = one(&mut hc, 2 * MS);
    assert_ne!(again.seq, req.seq);
    // Abandoning a stale request changes nothing.
    hc.abandon(req, 3 * MS);
    assert_eq!(hc.in_flight(), 1);
}

#[test]
fn initial_up_needs_fall_failures() {
    let mut clock = Clock(0);
    let mut hc = HealthChecker::new(HealthConfig {
        initial: InitialState::Up,
        ..config(2, 2)
    })
    .unwrap();
    let gen = hc.generation();
    hc.add(B, clock.now()).unwrap();
    assert!(hc.is_up(B));
    assert_ne!(hc.generation(), gen);
    assert_eq!(cycle(&mut hc, &mut clock, down(Failure::Timeout)), None);
    let t = cycle(&mut hc, &mut clock, down(Failure::Timeout)).unwrap();
    assert_eq!(t.state, HealthState::Down);
}

#[test]
fn set_config_pulls_next_probe_in() {
    let mut hc = HealthChecker::new(config(1, 1)).unwrap();
    hc.add(B, 0).unwrap();
    let req = one(&mut hc, 0);
    hc.on_result(req, ProbeResult::Up, MS);
    assert_eq!(hc.next_due(), Some(5 * S));
    let faster = HealthConfig {
        interval_ms: 1000,
        timeout_ms: 500,
        ..config(1, 1)
    };
    hc.set_config(faster, 2 * MS).unwrap();
    assert_eq!(hc.next_due(), Some(S + 2 * MS));
    assert!(hc.is_up(B));
    assert!(hc
        .set_config(HealthConfig { rise: 0, ..faster }, 0)
        .is_err());
}

#[test]
fn config_validation_and_serde() {
    assert!(HealthConfig::default().validate().is_ok());
    let bad = |c: HealthConfig| HealthChecker::new(c).unwrap_err();
    assert_eq!(
        bad(HealthConfig {
            interval_ms: 0,
            ..HealthConfig::default()
        }),
        HealthConfigError::Interval(0)
    );
    let e = bad(HealthConfig {
        timeout_ms: 6000,
        ..HealthConfig::default()
    });
    assert!(e.to_string().contains("timeout_ms = 6000"), "{e}");
    assert_eq!(
        bad(HealthConfig {
            fall: 0,
            ..HealthConfig::default()
        }),
        HealthConfigError::Threshold {
            field: "fall",
            value: 0
        }
    );
    let c: HealthConfig =
        serde_json::from_str(r#"{"interval_ms": 1000, "timeout_ms": 300, "initial": "up"}"#)
            .unwrap();
    assert_eq!(c.rise, 2);
    assert_eq!(c.initial, InitialState::Up);
    assert!(serde_json::from_str::<HealthConfig>(r#"{"intervall_ms": 1}"#).is_err());
    let r = serde_json::to_string(&ProbeResult::Down(Failure::Status {
        got: 503,
        expected: 200,
    }))
    .unwrap();
    assert_eq!(
        serde_json::from_str::<ProbeResult>(&r).unwrap(),
        ProbeResult::Down(Failure::Status {
            got: 503,
            expected: 200
        })
    );
}
