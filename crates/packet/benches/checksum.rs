//! The Internet checksum over a TCP segment's payload and a 64 KB
//! super-frame: the cost software segmentation and GRO pay per byte.
//! `bytewise_be` is the straightforward big-endian loop the crate used
//! before (kept here as the reference the speed-up is measured against).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

fn bytewise_be(data: &[u8]) -> u64 {
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        acc += u64::from(u32::from_be_bytes([c[4], c[5], c[6], c[7]]));
    }
    for p in chunks.remainder().chunks(2) {
        acc += u64::from(u16::from_be_bytes([p[0], *p.get(1).unwrap_or(&0)]));
    }
    acc
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("checksum");
    for len in [1448usize, 65_536] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(
            packet::checksum::fold(packet::checksum::sum(&data)),
            packet::checksum::fold(bytewise_be(&data))
        );
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("sum", len), &data, |b, d| {
            b.iter(|| packet::checksum::sum(black_box(d)))
        });
        g.bench_with_input(BenchmarkId::new("bytewise_be", len), &data, |b, d| {
            b.iter(|| bytewise_be(black_box(d)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
