//! Load balancer costs: the Maglev table lookup per new connection with 2,
//! 10, 100 and 1000 backends (alone, and as `Pool::pick` after the flow
//! hash the data path computes), the table build a backend or weight
//! change triggers (10 and 1000 backends), and `Services::forward` of a
//! packet of an established connection (conntrack lookup + DNAT rewrite).
//!
//! The default table (65537 slots) holds at most 655 backends (100 slots
//! each), so the 1000-backend table has 100003 slots (the smallest prime
//! at or above 100,000). Lookups cycle through 4096 precomputed hashes so
//! they hit different slots. `forward` rewrites the frame in place, so it copies a
//! 74-byte template into a reused buffer first (`copy_only` measures that
//! copy alone).

use std::collections::{HashMap, HashSet};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use etherparse::PacketBuilder;
use lb::maglev::next_prime;
use lb::service::FLOW_SEED;
use lb::{
    flow_hash, Backend, BackendId, FlowTuple, Forward, HealthConfig, InitialState, Maglev, Pool,
    PoolConfig, Reply, Services, VipKey, VipRule, DEFAULT_TABLE_SIZE,
};
use packet::flow::proto;
use packet::FlowKey;

const ZONE: u32 = 7;
const NOW: u64 = 1_000_000_000;
const VIP: [u8; 4] = [10, 0, 1, 100];
const BACKEND: [u8; 4] = [10, 0, 1, 11];

/// The table size for `n` backends: the default, or the smallest prime
/// with 100 slots per backend when the default is too small.
fn size_for(n: u32) -> u32 {
    if n * 100 <= DEFAULT_TABLE_SIZE {
        DEFAULT_TABLE_SIZE
    } else {
        next_prime(u64::from(n) * 100).expect("prime")
    }
}

fn backends(n: u32) -> Vec<(BackendId, u32)> {
    (0..n)
        .map(|i| (BackendId::from_name(&format!("backend-{i}")), 1))
        .collect()
}

/// A pool of `n` Up backends of weight 1.
fn pool(n: u32) -> Pool {
    let mut p = Pool::new(PoolConfig {
        table_size: size_for(n),
        health: HealthConfig {
            initial: InitialState::Up,
            ..HealthConfig::default()
        },
        ..PoolConfig::default()
    })
    .expect("pool");
    let list: Vec<Backend> = backends(n)
        .into_iter()
        .enumerate()
        .map(|(i, (id, weight))| Backend {
            id,
            ip: Ipv4Addr::from(0x0a00_1000 + i as u32),
            port: 8080,
            weight,
        })
        .collect();
    p.set_backends(&list, 0).expect("backends");
    assert!(p.is_available());
    p
}

/// 4096 client tuples toward the VIP, distinct source ports.
fn tuples() -> Vec<FlowTuple> {
    (0..4096u16)
        .map(|i| FlowTuple {
            src: IpAddr::V4(Ipv4Addr::new(192, 0, 2, (i % 251) as u8)),
            dst: IpAddr::V4(Ipv4Addr::from(VIP)),
            proto: proto::TCP,
            src_port: 20000 + i,
            dst_port: 80,
        })
        .collect()
}

fn bench_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_lookup");
    g.throughput(Throughput::Elements(1));
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(3));
    let flows = tuples();
    let hashes: Vec<u64> = flows.iter().map(|t| flow_hash(FLOW_SEED, t)).collect();
    g.bench_function("flow_hash_only", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & 4095;
            flow_hash(FLOW_SEED, black_box(&flows[i]))
        })
    });
    for n in [2u32, 10, 100, 1000] {
        let p = pool(n);
        let table = p.table().clone();
        g.bench_with_input(BenchmarkId::new("table_lookup", n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 4095;
                table.lookup(black_box(hashes[i]))
            })
        });
        g.bench_with_input(BenchmarkId::new("hash_and_pool_pick", n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 4095;
                p.pick(flow_hash(FLOW_SEED, black_box(&flows[i])))
                    .map(|b| b.ip)
            })
        });
    }
    g.finish();
}

fn bench_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_build");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    for n in [10u32, 1000] {
        let list = backends(n);
        let size = size_for(n);
        g.bench_with_input(BenchmarkId::new("backends", n), &n, |b, _| {
            b.iter(|| Maglev::new(black_box(&list), size).expect("table"))
        });
    }
    g.finish();
}

fn sa(a: [u8; 4], p: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(a), p)
}

fn tcp(s: SocketAddrV4, d: SocketAddrV4, syn: bool, seq: u32, ack: Option<u32>) -> Vec<u8> {
    let mut out = Vec::new();
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(s.ip().octets(), d.ip().octets(), 64)
        .tcp(s.port(), d.port(), seq, 64000);
    let b = if syn { b.syn() } else { b };
    let b = match ack {
        Some(a) => b.ack(a),
        None => b,
    };
    b.write(&mut out, &[0x5a; 20]).expect("build");
    out
}

/// One TCP VIP (VIP:80 -> BACKEND:8000) with a connection from the client
/// through the handshake; returns the services and the client's next
/// data frame.
fn established() -> (Services, Vec<u8>) {
    let mut s = Services::new(conntrack::Config::default()).expect("config");
    let mut vips = HashMap::new();
    vips.insert(
        VipKey {
            zone: ZONE,
            addr: sa(VIP, 80),
            proto: proto::TCP,
        },
        VipRule {
            lb: 0,
            external: false,
            hairpin_src: None,
        },
    );
    let mut ends = HashSet::new();
    ends.insert((ZONE, sa(BACKEND, 8000), proto::TCP));
    s.set_rules(vips, ends);
    let client = sa([10, 0, 1, 50], 40000);
    let pick = |_, _| Some((BackendId(11), sa(BACKEND, 8000)));
    let mut syn = tcp(client, sa(VIP, 80), true, 1, None);
    let k = FlowKey::parse(&syn).expect("parse");
    let f = s.forward(ZONE, 1, false, &k, &mut syn, false, NOW, pick);
    assert!(matches!(f, Forward::To { new: true, .. }), "{f:?}");
    let mut synack = tcp(sa(BACKEND, 8000), client, true, 100, Some(2));
    let k = FlowKey::parse(&synack).expect("parse");
    let r = s.reply(ZONE, &k, &mut synack, false, NOW);
    assert!(matches!(r, Reply::To { .. }), "{r:?}");
    let mut ack = tcp(client, sa(VIP, 80), false, 2, Some(101));
    let k = FlowKey::parse(&ack).expect("parse");
    let f = s.forward(ZONE, 1, false, &k, &mut ack, false, NOW, pick);
    assert!(matches!(f, Forward::To { new: false, .. }), "{f:?}");
    (s, tcp(client, sa(VIP, 80), false, 2, Some(101)))
}

fn bench_forward(c: &mut Criterion) {
    let mut g = c.benchmark_group("lb_services_forward");
    g.throughput(Throughput::Elements(1));
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(3));
    let (mut s, data) = established();
    let key = FlowKey::parse(&data).expect("parse");
    let len = data.len();
    let mut buf = [0u8; 128];
    buf[..len].copy_from_slice(&data);
    let f = s.forward(ZONE, 1, false, &key, &mut buf[..len], false, NOW, |_, _| {
        None
    });
    assert!(matches!(f, Forward::To { new: false, .. }), "{f:?}");
    g.bench_function("copy_only", |b| {
        b.iter(|| {
            buf[..len].copy_from_slice(black_box(&data));
            black_box(&mut buf);
        })
    });
    let mut now = NOW;
    g.bench_function("tcp_established", |b| {
        b.iter(|| {
            now += 100;
            buf[..len].copy_from_slice(&data);
            s.forward(
                ZONE,
                1,
                false,
                black_box(&key),
                &mut buf[..len],
                false,
                now,
                |_, _| None,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench_lookup, bench_build, bench_forward);
criterion_main!(benches);
