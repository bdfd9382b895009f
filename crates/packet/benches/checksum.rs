//! The Internet checksum over a TCP segment's payload and a 64 KB
//! super-frame: the cost software segmentation and GRO pay per byte.
//! `bytewise_be` is the straightforward big-endian loop the crate used
//! before (kept here as the reference the speed-up is measured against).
//! `copy_then_sum` / `copy_and_sum` compare moving a payload and summing it
//! in two passes against the fused pass (GRO's merge path). `gso/...` is
//! the software TSO path of a VXLAN egress, kept two-pass (see
//! `gso::segment_append`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use etherparse::PacketBuilder;
use packet::checksum::{copy_and_sum, fold, sum};
use packet::{GsoType, PacketBuf};
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
        assert_eq!(fold(sum(&data)), fold(bytewise_be(&data)));
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("sum", len), &data, |b, d| {
            b.iter(|| sum(black_box(d)))
        });
        g.bench_with_input(BenchmarkId::new("bytewise_be", len), &data, |b, d| {
            b.iter(|| bytewise_be(black_box(d)))
        });
        let mut dst = vec![0u8; len];
        g.bench_with_input(BenchmarkId::new("copy_then_sum", len), &data, |b, d| {
            b.iter(|| {
                dst.copy_from_slice(black_box(d));
                sum(black_box(&dst))
            })
        });
        g.bench_with_input(BenchmarkId::new("copy_and_sum", len), &data, |b, d| {
            b.iter(|| copy_and_sum(black_box(&mut dst), black_box(d)))
        });
    }
    g.finish();
}

/// A 64 KB TSO4 super-frame (MSS 1448, 46 segments) cut into a reused
/// buffer behind an 8-byte prefix, as the VXLAN egress does.
fn bench_segment_append(c: &mut Criterion) {
    let payload: Vec<u8> = (0..65_000usize).map(|i| i as u8).collect();
    let mut f = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(40000, 80, 1, 1000)
        .ack(1)
        .write(&mut f, &payload)
        .expect("build");
    let mut buf = PacketBuf::from_frame(&f);
    buf.offload.gso = GsoType::TcpV4;
    buf.offload.gso_size = 1448;
    let mut out = Vec::new();
    let mut g = c.benchmark_group("gso");
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.bench_function("segment_append_tcp4_64k", |b| {
        b.iter(|| {
            out.clear();
            packet::gso::segment_append(black_box(&buf), &[0; 8], &mut out, |_, _| {})
        })
    });
    g.finish();
}

criterion_group!(benches, bench, bench_segment_append);
criterion_main!(benches);
