//! Per-frame cost of the bridge stage (`Bridge::decide`) and how it grows
//! with the MAC table: known unicast through a secured port, learning-port
//! traffic with a refreshed source, and flood of unknown unicast.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use packet::MacAddr;
use vswitch::clock::Timestamp;
use vswitch::fdb::Fdb;
use vswitch::pipeline::{Bridge, Ingress};

fn mac(n: u32) -> MacAddr {
    let b = n.to_be_bytes();
    MacAddr([0x02, 0xbb, b[0], b[1], b[2], b[3]])
}

fn frame(dst: MacAddr, src: MacAddr) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x08, 0x00]);
    f.resize(64, 0);
    f
}

fn bridge_with(entries: u32) -> Bridge {
    let mut fdb = Fdb::new(entries as usize + 16, Duration::from_secs(300));
    fdb.add_static(mac(1), 1);
    fdb.add_static(mac(2), 2);
    for i in 0..entries {
        fdb.learn(mac(1000 + i), 3 + i % 8, Timestamp::ZERO);
    }
    Bridge::new(fdb)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("bridge_decide");
    for entries in [16u32, 1024, 8192, 65536] {
        let b = bridge_with(entries);
        let secured = Ingress {
            id: 1,
            mac: mac(1),
            port_security: true,
        };
        let learning = Ingress {
            id: 3,
            mac: mac(3),
            port_security: false,
        };
        let known = frame(mac(2), mac(1));
        let learned_src = frame(mac(2), mac(1000));
        let unknown = frame(mac(99), mac(1));
        let now = Timestamp::ZERO;
        g.bench_with_input(
            BenchmarkId::new("known_unicast", entries),
            &known,
            |bch, f| bch.iter(|| b.decide(black_box(&secured), black_box(f), now)),
        );
        g.bench_with_input(
            BenchmarkId::new("learned_source", entries),
            &learned_src,
            |bch, f| bch.iter(|| b.decide(black_box(&learning), black_box(f), now)),
        );
        g.bench_with_input(
            BenchmarkId::new("unknown_flood", entries),
            &unknown,
            |bch, f| bch.iter(|| b.decide(black_box(&secured), black_box(f), now)),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
