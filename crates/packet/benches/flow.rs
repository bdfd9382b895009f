//! Flow key parse cost per frame kind.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use etherparse::PacketBuilder;
use packet::FlowKey;

const SRC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const DST: [u8; 6] = [2, 0, 0, 0, 0, 2];

fn frames() -> Vec<(&'static str, Vec<u8>)> {
    let mut tcp64 = Vec::new();
    PacketBuilder::ethernet2(SRC, DST)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(40000, 80, 1, 1000)
        .ack(1)
        .write(&mut tcp64, &[0; 10])
        .expect("build");
    assert_eq!(tcp64.len(), 64);

    let mut udp1500 = Vec::new();
    PacketBuilder::ethernet2(SRC, DST)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .udp(5000, 4789)
        .write(&mut udp1500, &[0; 1500 - 42])
        .expect("build");

    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&SRC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&SRC);
    arp.extend_from_slice(&[10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 10, 0, 0, 1]);
    arp.resize(60, 0);

    let mut tcp6 = Vec::new();
    PacketBuilder::ethernet2(SRC, DST)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .tcp(443, 50000, 1, 1000)
        .ack(1)
        .write(&mut tcp6, &[0; 20])
        .expect("build");

    vec![
        ("tcp4_64B", tcp64),
        ("udp4_1500B", udp1500),
        ("arp", arp),
        ("tcp6_94B", tcp6),
    ]
}

fn bench_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("flow_parse");
    g.throughput(Throughput::Elements(1));
    for (name, f) in frames() {
        g.bench_function(name, |b| b.iter(|| FlowKey::parse(black_box(&f))));
    }
    g.finish();
}

criterion_group!(benches, bench_parse);
criterion_main!(benches);
