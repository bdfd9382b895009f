use super::*;
use crate::health::{HealthState, InitialState};
use crate::probe::tests::{dst_mac, Behavior, Host, MS, PROBER_IP, PROBER_MAC, S};

const SIZE: u32 = 10_007;

fn config() -> PoolConfig {
    PoolConfig {
        table_size: SIZE,
        check: Check::Tcp,
        check_port: None,
        health: HealthConfig {
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 2,
            fall: 2,
            initial: InitialState::Down,
        },
    }
}

fn backend(id: u32, weight: u32) -> Backend {
    Backend {
        id: BackendId(id),
        ip: Ipv4Addr::new(10, 0, 0, 100 + id as u8),
        port: 8080,
        weight,
    }
}

fn pool(n: u32) -> Pool {
    let mut p = Pool::new(config()).unwrap();
    let backends: Vec<_> = (1..=n).map(|i| backend(i, 1)).collect();
    p.set_backends(&backends, 0).unwrap();
    p
}

/// Runs every due probe at `now` with `result(backend)`.
fn round(p: &mut Pool, now: u64, result: impl Fn(BackendId) -> ProbeResult) -> Vec<Transition> {
    let (tasks, mut transitions) = p.poll_health(now, usize::MAX);
    for t in tasks {
        transitions.extend(p.on_probe_result(t.request, result(t.request.backend), now + MS));
    }
    transitions
}

fn up(_: BackendId) -> ProbeResult {
    ProbeResult::Up
}

/// A pool of `n` whose backends are all Up (after two rounds); returns
/// the time of the next round.
fn healthy(n: u32) -> (Pool, u64) {
    let mut p = pool(n);
    round(&mut p, 0, up);
    round(&mut p, S, up);
    assert!((1..=n).all(|i| p.health(BackendId(i)).unwrap().state == HealthState::Up));
    (p, 2 * S)
}

fn picks(p: &Pool) -> Vec<Option<BackendId>> {
    (0..20_000u64)
        .map(|i| {
            p.pick(crate::hash::siphash24(1, 2, &i.to_le_bytes()))
                .map(|b| b.id)
        })
        .collect()
}

#[test]
fn all_down_picks_none_until_rise() {
    let mut p = pool(3);
    assert!(!p.is_available());
    assert_eq!(p.pick(42), None);
    assert!(round(&mut p, 0, up).is_empty());
    assert_eq!(p.pick(42), None);
    let ts = round(&mut p, S, up);
    assert_eq!(ts.len(), 3);
    assert!(p.is_available());
    let status = p.status();
    assert!(status.available);
    assert_eq!(
        status.backends.iter().map(|b| b.slots).sum::<usize>(),
        SIZE as usize
    );
    assert!(status.backends.iter().all(|b| b.eligible && b.slots > 3000));
    let seen: std::collections::BTreeSet<_> = picks(&p).into_iter().collect();
    assert_eq!(seen.len(), 3);
    assert!(!seen.contains(&None));
}

#[test]
fn a_failed_backend_leaves_the_table_and_only_its_flows_move() {
    let (mut p, now) = healthy(5);
    let before = picks(&p);
    let rebuilds = p.rebuilds();
    let fail3 = |id: BackendId| {
        if id == BackendId(3) {
            ProbeResult::Down(Failure::Refused)
        } else {
            ProbeResult::Up
        }
    };
    assert!(round(&mut p, now, fail3).is_empty());
    let ts = round(&mut p, now + S, fail3);
    assert_eq!(ts.len(), 1);
    assert_eq!(ts[0].backend, BackendId(3));
    assert_eq!(ts[0].state, HealthState::Down);
    assert_eq!(p.rebuilds(), rebuilds + 1);
    let after = picks(&p);
    assert!(after
        .iter()
        .all(|b| *b != Some(BackendId(3)) && b.is_some()));
    let kept = before
        .iter()
        .zip(&after)
        .filter(|(b, _)| **b != Some(BackendId(3)))
        .filter(|(b, a)| b == a)
        .count();
    let others = before.iter().filter(|b| **b != Some(BackendId(3))).count();
    assert!(
        kept as f64 >= others as f64 * 0.99,
        "{kept} of {others} kept"
    );
    // It comes back after `rise` successes, to the very same slots.
    round(&mut p, now + 2 * S, up);
    round(&mut p, now + 3 * S, up);
    assert_eq!(picks(&p), before);
}

#[test]
fn no_rebuild_without_a_change() {
    let (mut p, now) = healthy(3);
    let rebuilds = p.rebuilds();
    round(&mut p, now, up);
    // One failure is below `fall`.
    round(&mut p, now + S, |_| ProbeResult::Down(Failure::Timeout));
    round(&mut p, now + 2 * S, up);
    p.set_weight(BackendId(1), 1).unwrap();
    assert_eq!(p.rebuilds(), rebuilds);
}

#[test]
fn weight_zero_drains_and_weights_split_traffic() {
    let (mut p, now) = healthy(2);
    p.set_weight(BackendId(2), 0).unwrap();
    assert!(picks(&p).iter().all(|b| *b == Some(BackendId(1))));
    // A drained backend is still checked.
    let (tasks, _) = p.poll_health(now, usize::MAX);
    assert_eq!(tasks.len(), 2);
    p.set_weight(BackendId(2), 3).unwrap();
    let two = picks(&p)
        .iter()
        .filter(|b| **b == Some(BackendId(2)))
        .count();
    let share = two as f64 / 20_000.0;
    assert!((share - 0.75).abs() < 0.02, "{share}");
    assert_eq!(
        p.set_weight(BackendId(9), 1),
        Err(PoolError::Unknown(BackendId(9)))
    );
    // Every backend drained: nothing to pick, like all down.
    p.set_weight(BackendId(1), 0).unwrap();
    p.set_weight(BackendId(2), 0).unwrap();
    assert_eq!(p.pick(7), None);
}

#[test]
fn missed_results_time_out_through_poll_health() {
    let (mut p, now) = healthy(2);
    // Probes go out and nobody answers.
    let (tasks, _) = p.poll_health(now, usize::MAX);
    assert_eq!(tasks.len(), 2);
    assert_eq!(p.next_health_deadline(), Some(now + 500 * MS));
    let (tasks, ts) = p.poll_health(now + 500 * MS, usize::MAX);
    assert!(tasks.is_empty() && ts.is_empty());
    let (_, ts) = p.poll_health(now + S, usize::MAX);
    assert!(ts.is_empty());
    let (_, ts) = p.poll_health(now + S + 500 * MS, usize::MAX);
    assert_eq!(ts.len(), 2);
    assert!(ts.iter().all(|t| t.cause == Some(Failure::Timeout)));
    assert!(!p.is_available());
    assert_eq!(
        p.health(BackendId(1)).unwrap().last_error,
        Some(Failure::Timeout)
    );
}

#[test]
fn set_backends_keeps_health_of_unchanged_targets() {
    let (mut p, now) = healthy(3);
    let mut list: Vec<_> = (1..=3).map(|i| backend(i, 1)).collect();
    list[0].weight = 5; // weight only: keeps health
    list[1].port = 9090; // new target: starts over
    list.remove(2); // removed
    list.push(backend(4, 1)); // new
    p.set_backends(&list, now).unwrap();
    assert_eq!(p.health(BackendId(1)).unwrap().state, HealthState::Up);
    assert_eq!(p.health(BackendId(2)).unwrap().state, HealthState::Down);
    assert!(p.health(BackendId(3)).is_none());
    assert_eq!(p.health(BackendId(4)).unwrap().state, HealthState::Down);
    assert!(picks(&p).iter().all(|b| *b == Some(BackendId(1))));
    let (tasks, _) = p.poll_health(now, usize::MAX);
    let ports: Vec<_> = tasks
        .iter()
        .map(|t| (t.request.backend.0, t.port))
        .collect();
    assert!(ports.contains(&(2, 9090)) && ports.contains(&(4, 8080)));

    // Refusals change nothing.
    let snapshot = p.status();
    let dup = [backend(1, 1), backend(1, 2)];
    assert_eq!(
        p.set_backends(&dup, now),
        Err(PoolError::Duplicate(BackendId(1)))
    );
    let port0 = [Backend {
        port: 0,
        ..backend(1, 1)
    }];
    assert_eq!(
        p.set_backends(&port0, now),
        Err(PoolError::Port(BackendId(1)))
    );
    let many: Vec<_> = (1..=101).map(|i| backend(i, 1)).collect();
    let e = p.set_backends(&many, now).unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::Table(MaglevError::TooSmall { backends: 101, .. })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("10103"), "{e}");
    assert_eq!(p.status(), snapshot);
}

#[test]
fn upsert_and_remove() {
    let (mut p, now) = healthy(2);
    p.upsert_backend(backend(3, 1), now).unwrap();
    assert_eq!(p.health(BackendId(3)).unwrap().state, HealthState::Down);
    // Same target, new weight: health kept.
    p.upsert_backend(backend(1, 4), now).unwrap();
    assert_eq!(p.health(BackendId(1)).unwrap().state, HealthState::Up);
    assert_eq!(p.backend(BackendId(1)).unwrap().weight, 4);
    // New address: starts over.
    p.upsert_backend(
        Backend {
            ip: Ipv4Addr::new(10, 0, 0, 9),
            ..backend(1, 4)
        },
        now,
    )
    .unwrap();
    assert_eq!(p.health(BackendId(1)).unwrap().state, HealthState::Down);
    assert!(picks(&p).iter().all(|b| *b == Some(BackendId(2))));
    assert_eq!(p.remove_backend(BackendId(2)).unwrap().id, BackendId(2));
    assert_eq!(p.pick(1), None);
    assert!(p.remove_backend(BackendId(2)).is_none());
    assert_eq!(p.backends().count(), 2);
    // A full pool refuses one more.
    let mut small = Pool::new(PoolConfig {
        table_size: 211,
        ..config()
    })
    .unwrap();
    small.upsert_backend(backend(1, 1), now).unwrap();
    small.upsert_backend(backend(2, 1), now).unwrap();
    assert!(small.upsert_backend(backend(3, 1), now).is_err());
    assert_eq!(small.backends().count(), 2);
}

#[test]
fn config_changes() {
    let (mut p, now) = healthy(3);
    let rebuilds = p.rebuilds();
    p.set_config(
        PoolConfig {
            table_size: 65_537,
            ..config()
        },
        now,
    )
    .unwrap();
    assert_eq!(p.rebuilds(), rebuilds + 1);
    assert_eq!(p.table().size(), 65_537);
    assert!(p.is_available());
    assert!(matches!(
        p.set_config(
            PoolConfig {
                table_size: 65_536,
                ..config()
            },
            now
        ),
        Err(PoolError::Table(MaglevError::NotPrime {
            suggestion: 65_537,
            ..
        }))
    ));
    assert!(matches!(
        p.set_config(
            PoolConfig {
                table_size: 211,
                ..config()
            },
            now
        ),
        Err(PoolError::Table(MaglevError::TooSmall { .. }))
    ));
    assert_eq!(
        p.set_config(
            PoolConfig {
                check_port: Some(0),
                ..config()
            },
            now
        ),
        Err(PoolError::CheckPort)
    );
    let http = PoolConfig {
        check: Check::Http {
            path: "/h".into(),
            expected_status: 204,
        },
        check_port: Some(9000),
        ..config()
    };
    p.set_config(http, now).unwrap();
    let (tasks, _) = p.poll_health(now + 10 * S, usize::MAX);
    assert!(tasks.iter().all(|t| t.port == 9000));
    assert_eq!(p.table().size(), SIZE);
    let c: PoolConfig = serde_json::from_str(
        r#"{"check": {"type": "http", "path": "/healthz"}, "health": {"rise": 3}}"#,
    )
    .unwrap();
    assert_eq!(c.table_size, 65_537);
    assert_eq!(c.health.rise, 3);
    assert!(serde_json::from_str::<PoolConfig>(r#"{"tablesize": 7}"#).is_err());
    let status = serde_json::to_string(&p.status()).unwrap();
    assert!(status.contains("\"state\":\"up\""), "{status}");
}

/// The load balancer, its backends and the switch between them, on the
/// test's clock.
struct LbLab {
    lb: LoadBalancer,
    hosts: Vec<Host>,
    /// Hosts whose frames (both ways) are lost.
    dead: Vec<bool>,
    now: u64,
    events: Vec<HealthEvent>,
}

impl LbLab {
    fn new(n: u8, servers: &[(u16, Behavior)]) -> LbLab {
        let hosts: Vec<Host> = (1..=n)
            .map(|i| {
                Host::new(
                    [0x02, 0, 0, 0, 1, i],
                    &[(Ipv4Addr::new(10, 0, 0, 100 + i), 24)],
                    servers,
                )
            })
            .collect();
        let now = 5000 * S;
        LbLab {
            lb: LoadBalancer::new(ProberConfig::new(PROBER_MAC, PROBER_IP, 24), now).unwrap(),
            dead: vec![false; hosts.len()],
            hosts,
            now,
            events: Vec::new(),
        }
    }

    fn tick(&mut self) {
        for f in self.lb.transmit(self.now) {
            let dst = dst_mac(&f);
            for (h, dead) in self.hosts.iter_mut().zip(&self.dead) {
                if !dead && (dst == h.mac || dst == [0xff; 6]) {
                    h.push(f.clone());
                }
            }
        }
        for (h, dead) in self.hosts.iter_mut().zip(&self.dead) {
            h.step(self.now);
            let frames = h.take_frames();
            if *dead {
                continue;
            }
            for f in frames {
                if dst_mac(&f) == PROBER_MAC || dst_mac(&f) == [0xff; 6] {
                    self.lb.receive(&f, self.now);
                }
            }
        }
        let events = self.lb.poll(self.now);
        self.events.extend(events);
        self.now += MS;
    }

    fn run(&mut self, d: u64) {
        let end = self.now + d;
        while self.now < end {
            self.tick();
        }
    }

    fn state(&self, pool: PoolId, id: u32) -> HealthState {
        self.lb
            .pool(pool)
            .unwrap()
            .health(BackendId(id))
            .unwrap()
            .state
    }
}

#[test]
fn load_balancer_end_to_end() {
    let mut lab = LbLab::new(3, &[(8080, Behavior::Http("HTTP/1.0 200 OK\r\n\r\n"))]);
    let pool = PoolId(1);
    let config = PoolConfig {
        check: Check::Http {
            path: "/health".into(),
            expected_status: 200,
        },
        ..config()
    };
    lab.lb.add_pool(pool, config.clone()).unwrap();
    assert_eq!(
        lab.lb.add_pool(pool, config),
        Err(LbError::DuplicatePool(1))
    );
    let backends: Vec<_> = (1..=3).map(|i| backend(i, 1)).collect();
    let now = lab.now;
    lab.lb
        .pool_mut(pool)
        .unwrap()
        .set_backends(&backends, now)
        .unwrap();
    assert_eq!(lab.lb.pick(pool, 1), None);
    assert_eq!(lab.lb.pick(PoolId(9), 1), None);

    // Probes at 0 and 1 s: Up after the second.
    lab.run(1100 * MS);
    assert_eq!(lab.events.len(), 3, "{:?}", lab.events);
    assert!(lab
        .events
        .iter()
        .all(|e| e.transition.state == HealthState::Up));
    assert!(lab.lb.pool(pool).unwrap().is_available());
    lab.events.clear();

    // Between probes the load balancer asks to be woken no later than the
    // next one, and not at once.
    let at = lab.lb.poll_at(lab.now).unwrap();
    assert!(at > lab.now && at <= lab.now + S, "{at} vs {}", lab.now);

    // Backend 2 vanishes: two timeouts (fall = 2) take it out.
    lab.dead[1] = true;
    lab.run(2500 * MS);
    assert_eq!(lab.events.len(), 1, "{:?}", lab.events);
    let e = lab.events[0];
    assert_eq!(e.pool, pool);
    assert_eq!(e.transition.backend, BackendId(2));
    assert_eq!(e.transition.cause, Some(Failure::Timeout));
    assert_eq!(lab.state(pool, 2), HealthState::Down);
    for h in 0..5000u64 {
        let b = lab.lb.pick(pool, h).unwrap();
        assert_ne!(b.id, BackendId(2));
    }
    lab.events.clear();

    // It comes back.
    lab.dead[1] = false;
    lab.run(2500 * MS);
    assert_eq!(lab.state(pool, 2), HealthState::Up);
    assert_eq!(lab.events.len(), 1);

    // Probes are bounded and cleaned up.
    assert!(lab.lb.prober().sockets_in_use() <= 6);
    let stats = lab.lb.prober().stats();
    assert!(stats.probes_started >= 3 * 6, "{stats:?}");

    // Removing the pool cancels its probes.
    let now = lab.now;
    assert!(lab.lb.remove_pool(pool, now).is_some());
    assert_eq!(lab.lb.prober().active(), 0);
    lab.run(3 * S);
    assert!(lab.lb.pools().next().is_none());
}

#[test]
fn unroutable_backend_counts_as_failure() {
    let mut lab = LbLab::new(1, &[(8080, Behavior::Accept)]);
    let pool = PoolId(7);
    lab.lb
        .add_pool(
            pool,
            PoolConfig {
                health: HealthConfig {
                    initial: InitialState::Up,
                    ..config().health
                },
                ..config()
            },
        )
        .unwrap();
    let far = Backend {
        ip: Ipv4Addr::new(192, 168, 1, 1),
        ..backend(1, 1)
    };
    let now = lab.now;
    lab.lb
        .pool_mut(pool)
        .unwrap()
        .set_backends(&[far, backend(2, 1)], now)
        .unwrap();
    assert!(lab.lb.pick(pool, 3).is_some());
    // Probes at 0 and 1 s; the second timeout comes at 1.5 s.
    lab.run(1600 * MS);
    let h = lab.lb.pool(pool).unwrap().health(BackendId(1)).unwrap();
    assert_eq!(h.state, HealthState::Down);
    assert_eq!(h.last_error, Some(Failure::NoRoute));
    // Backend 2 (10.0.0.102) has no host at all: ARP goes unanswered.
    let h = lab.lb.pool(pool).unwrap().health(BackendId(2)).unwrap();
    assert_eq!(h.last_error, Some(Failure::Timeout));
    assert!(!lab.lb.pool(pool).unwrap().is_available());
    assert_eq!(lab.lb.pick(pool, 3), None);
}

#[test]
fn prober_capacity_is_shared_between_pools() {
    // The fake hosts have one socket per port: each pool probes its own.
    let mut lab = LbLab::new(3, &[(8080, Behavior::Accept), (8081, Behavior::Accept)]);
    let config = ProberConfig {
        max_probes: 2,
        ..ProberConfig::new(PROBER_MAC, PROBER_IP, 24)
    };
    lab.lb = LoadBalancer::new(config, lab.now).unwrap();
    let now = lab.now;
    for p in 1..=2 {
        let config = PoolConfig {
            check_port: Some(8079 + p as u16),
            ..config_fast()
        };
        lab.lb.add_pool(PoolId(p), config).unwrap();
        let backends: Vec<_> = (1..=3).map(|i| backend(i, 1)).collect();
        lab.lb
            .pool_mut(PoolId(p))
            .unwrap()
            .set_backends(&backends, now)
            .unwrap();
    }
    // Six backends to check, two at a time: all Up all the same.
    for _ in 0..3000 {
        lab.tick();
        assert!(lab.lb.prober().active() <= 2);
    }
    for p in 1..=2 {
        for i in 1..=3 {
            assert_eq!(
                lab.state(PoolId(p), i),
                HealthState::Up,
                "pool {p} backend {i}"
            );
        }
    }
}

fn config_fast() -> PoolConfig {
    PoolConfig {
        health: HealthConfig {
            interval_ms: 500,
            timeout_ms: 200,
            ..config().health
        },
        ..config()
    }
}
