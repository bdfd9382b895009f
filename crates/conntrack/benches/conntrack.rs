//! Connection tracker costs: `track` of a packet of an established TCP flow
//! in tables of 10, 10k and 1M entries (must not grow linearly), a new
//! connection's `track` + `commit`, and `expire` per reaped entry.
//!
//! The flow key is parsed once outside the measured loop (the switch parses
//! once per frame for every stage); what is measured is the tracker alone.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use conntrack::{Config, Conntrack, Track};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use etherparse::PacketBuilder;
use packet::{FlowKey, L3, L4};

const NS: u64 = 1_000_000_000;
const ZONE: u32 = 1;

fn frame_tcp(seq: u32, syn: bool, ack: Option<u32>, fwd: bool) -> Vec<u8> {
    let (s, d, sp, dp) = if fwd {
        ([10, 0, 0, 1], [10, 0, 0, 2], 40000, 80)
    } else {
        ([10, 0, 0, 2], [10, 0, 0, 1], 80, 40000)
    };
    let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(s, d, 64)
        .tcp(sp, dp, seq, 1000);
    if syn {
        b = b.syn();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let mut f = Vec::new();
    b.write(&mut f, &[0; 10]).expect("build");
    f
}

fn udp_template() -> (Vec<u8>, FlowKey) {
    let mut f = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([172, 16, 0, 1], [192, 0, 2, 1], 64)
        .udp(1, 53)
        .write(&mut f, &[0; 18])
        .expect("build");
    let k = FlowKey::parse(&f).expect("parse");
    (f, k)
}

/// The template's key with a distinct source address and port for `i`
/// (the frame is only read for its IP length, which all share).
fn udp_key(base: &FlowKey, i: u64) -> FlowKey {
    let mut k = *base;
    if let L3::Ipv4(ip) = &mut k.l3 {
        let hi = (i >> 16) as u32;
        ip.src = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | hi));
    }
    if let L4::Udp { src_port, .. } = &mut k.l4 {
        *src_port = i as u16;
    }
    k
}

fn table() -> Conntrack {
    Conntrack::new(Config {
        max_entries: 2_000_000,
        max_per_port: 2_000_000,
        ..Config::default()
    })
    .expect("config")
}

fn fill(ct: &mut Conntrack, n: u64, now: u64) {
    let (f, base) = udp_template();
    ct.reserve(n as usize);
    for i in 0..n {
        let k = udp_key(&base, i);
        if let Track::New(new) = ct.track(ZONE, (i % 64) as u32, &k, &f, now) {
            ct.commit(&new, now, ()).expect("commit");
        }
    }
}

fn bench_established(c: &mut Criterion) {
    let mut g = c.benchmark_group("conntrack_track_established");
    g.throughput(Throughput::Elements(1));
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(3));
    for n in [10u64, 10_000, 1_000_000] {
        let mut ct = table();
        let t0 = NS;
        fill(&mut ct, n, t0);
        // One TCP flow through the handshake.
        for (f, _) in [
            (frame_tcp(100, true, None, true), ()),
            (frame_tcp(500, true, Some(101), false), ()),
            (frame_tcp(101, false, Some(501), true), ()),
        ] {
            let k = FlowKey::parse(&f).expect("parse");
            if let Track::New(new) = ct.track(ZONE, 0, &k, &f, t0) {
                ct.commit(&new, t0, ()).expect("commit");
            }
        }
        let data = frame_tcp(101, false, Some(501), true);
        let key = FlowKey::parse(&data).expect("parse");
        assert!(matches!(
            ct.track(ZONE, 0, &key, &data, t0),
            Track::Established { .. }
        ));
        let mut now = t0;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                now += 100; // 10 Mpps of simulated time
                black_box(ct.track(ZONE, 0, black_box(&key), &data, now))
            })
        });
        // A lookup without side effects, for comparison.
        let ck = conntrack::ConnKey::from_flow(ZONE, &key).expect("key");
        g.bench_with_input(BenchmarkId::new("lookup", n), &n, |b, _| {
            b.iter(|| black_box(ct.lookup(black_box(&ck), now)))
        });
    }
    g.finish();
}

fn bench_new_commit(c: &mut Criterion) {
    let mut g = c.benchmark_group("conntrack_new_commit");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(3));
    let (f, base) = udp_template();
    // Distinct flows into a table reserved for them (no rehash measured).
    g.bench_function("udp_reserved", |b| {
        b.iter_custom(|iters| {
            let mut ct = table();
            ct.reserve(iters as usize);
            let start = Instant::now();
            for i in 0..iters {
                let k = udp_key(&base, i);
                if let Track::New(new) = ct.track(ZONE, 0, &k, &f, NS) {
                    black_box(ct.commit(&new, NS, ()).ok());
                }
            }
            start.elapsed()
        })
    });
    // Same, with the table growing (rehashes amortized in).
    g.bench_function("udp_growing", |b| {
        b.iter_custom(|iters| {
            let mut ct = table();
            let start = Instant::now();
            for i in 0..iters {
                let k = udp_key(&base, i);
                if let Track::New(new) = ct.track(ZONE, 0, &k, &f, NS) {
                    black_box(ct.commit(&new, NS, ()).ok());
                }
            }
            start.elapsed()
        })
    });
    g.finish();
}

fn bench_expire(c: &mut Criterion) {
    let mut g = c.benchmark_group("conntrack_expire");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(3));
    // Per reaped entry, the table holding only expired entries.
    g.bench_function("per_entry", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let chunk = left.min(1_000_000);
                let mut ct = table();
                fill(&mut ct, chunk, NS);
                let late = NS + 1000 * NS;
                let start = Instant::now();
                let n = ct.expire(late, usize::MAX);
                total += start.elapsed();
                assert_eq!(n as u64, chunk);
                left -= chunk;
            }
            total
        })
    });
    // Nothing due in a 1M table: the cost of asking.
    let mut ct = table();
    fill(&mut ct, 1_000_000, NS);
    g.bench_function("nothing_due_1M", |b| {
        b.iter(|| black_box(ct.expire(black_box(2 * NS), 1024)))
    });
    g.finish();
}

criterion_group!(benches, bench_established, bench_new_commit, bench_expire);
criterion_main!(benches);
