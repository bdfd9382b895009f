//! Encap and decap cost for a 64-byte and a 1450-byte-IP inner frame.

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use etherparse::PacketBuilder;
use packet::{FlowKey, MacAddr, PacketBuf};
use vxlan::{decap, EncapConfig, Encapsulator, Underlay, Vni, DEFAULT_PORT};

fn inner(frame_len: usize) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(40000, 80, 1, 1000)
        .ack(1)
        .write(&mut f, &vec![0; frame_len - 54])
        .expect("build");
    f
}

fn bench(c: &mut Criterion) {
    let underlay = Underlay::v4(
        MacAddr([0x52, 0x54, 0, 0, 0, 1]),
        MacAddr([0x52, 0x54, 0, 0, 0, 2]),
        Ipv4Addr::new(192, 0, 2, 1),
        Ipv4Addr::new(192, 0, 2, 2),
    );
    let vni = Vni::new(42).expect("vni");
    let mut g = c.benchmark_group("vxlan");
    for (name, len) in [("64B", 64usize), ("1450B_ip", 1464)] {
        let frame = inner(len);
        let key = FlowKey::parse(&frame).expect("parse");
        let mut enc = Encapsulator::new(EncapConfig::default());
        let mut buf = PacketBuf::with_capacity(2048);
        assert!(buf.replace_frame(&frame));
        g.throughput(Throughput::Elements(1));
        // encap, then undo with pull_front so the buffer is reused (the
        // pull is one subtraction)
        g.bench_function(format!("encap_{name}"), |b| {
            b.iter(|| {
                let r = enc.encap(&mut buf, &underlay, vni, black_box(&key));
                black_box(&r);
                buf.pull_front(50);
            })
        });
        let mut outer = PacketBuf::with_capacity(2048);
        assert!(outer.replace_frame(&frame));
        enc.encap(&mut outer, &underlay, vni, &key).expect("encap");
        let outer_frame = outer.frame().to_vec();
        g.bench_function(format!("decap_{name}"), |b| {
            b.iter(|| {
                let r = decap(&mut outer, DEFAULT_PORT);
                black_box(&r);
                // restore the outer headers (headroom still holds them)
                outer.push_front(50);
            })
        });
        assert!(outer.frame() == &outer_frame[..]);
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
