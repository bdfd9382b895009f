//! GRO cost per receive batch: 44 wire segments of 1448 bytes of one TCP
//! flow merged into one super-frame, against the same number of UDP frames
//! passed through.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use etherparse::PacketBuilder;
use packet::{segment, Gro, GsoType, PacketBuf};

const SRC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const DST: [u8; 6] = [2, 0, 0, 0, 0, 2];
const SEGS: usize = 44;
const MSS: usize = 1448;

/// 44 segments of 1448 bytes (TCP timestamps: 1514-byte frames), cut from
/// one TSO super-frame by `gso::segment`.
fn tcp_segments(v6: bool) -> Vec<Vec<u8>> {
    let payload: Vec<u8> = (0..SEGS * MSS).map(|i| i as u8).collect();
    let ts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
    let mut f = Vec::new();
    let b = PacketBuilder::ethernet2(SRC, DST);
    if v6 {
        b.ipv6([0xfd; 16], [0xfe; 16], 64)
            .tcp(40000, 80, 1, 1000)
            .ack(1)
            .options_raw(&ts)
            .expect("options")
            .write(&mut f, &payload)
            .expect("build");
    } else {
        b.ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 80, 1, 1000)
            .ack(1)
            .options_raw(&ts)
            .expect("options")
            .write(&mut f, &payload)
            .expect("build");
    }
    let mut buf = PacketBuf::from_frame(&f);
    buf.offload.gso = if v6 { GsoType::TcpV6 } else { GsoType::TcpV4 };
    buf.offload.gso_size = MSS as u16;
    let mut out = Vec::new();
    segment(&buf, |s| out.push(s.to_vec())).expect("segment");
    assert_eq!(out.len(), SEGS);
    out
}

fn udp_frames() -> Vec<Vec<u8>> {
    (0..SEGS)
        .map(|_| {
            let mut f = Vec::new();
            PacketBuilder::ethernet2(SRC, DST)
                .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .udp(5000, 5001)
                .write(&mut f, &[7; 1472])
                .expect("build");
            f
        })
        .collect()
}

fn bench_gro(c: &mut Criterion) {
    let mut g = c.benchmark_group("gro");
    g.throughput(Throughput::Elements(SEGS as u64));
    let cases = [
        ("tcp4_44x1448_push_flush", tcp_segments(false)),
        ("tcp6_44x1448_push_flush", tcp_segments(true)),
        ("udp4_44x1472_passthrough", udp_frames()),
    ];
    for (name, frames) in cases {
        let mut gro = Gro::new(8);
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut out = 0usize;
                let mut emit = |p: &PacketBuf| out += p.len();
                for f in &frames {
                    gro.push(black_box(f), &mut emit);
                }
                gro.flush(&mut emit);
                out
            })
        });
        let s = gro.stats();
        assert_eq!(s.frames_in, s.frames_merged + s.passed_through);
    }
    g.finish();
}

criterion_group!(benches, bench_gro);
criterion_main!(benches);
