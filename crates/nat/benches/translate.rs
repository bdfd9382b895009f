//! Per-packet cost of `Nat::translate` on the SNAT path: a packet of an
//! established TCP connection in each direction (outbound data, inbound
//! reply), a new connection's first packet (SYN: rule match, port
//! allocation, conntrack commit), and how the established lookup grows with
//! the table (10, 10k and 1M connections; it must not grow linearly).
//!
//! `translate` rewrites the frame in place, so the established benches copy
//! a 74-byte template into a reused buffer before each call (no allocation;
//! `copy_only` measures that copy alone, to subtract). The flow key is
//! parsed once outside the loop, as the switch parses once per frame for
//! every stage. New-connection frames are built and parsed before the
//! clock starts and each is translated once.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use etherparse::PacketBuilder;
use nat::{Nat, Outcome, Rules, Snat, EXTERNAL_ZONE};
use packet::FlowKey;

const NS: u64 = 1_000_000_000;
const T0: u64 = 1_000 * NS;
const ZONE: u32 = 7;
const PORT: u32 = 3;

const VM: [u8; 4] = [10, 0, 1, 11];
const SRV: [u8; 4] = [203, 0, 113, 100];
const E: [u8; 4] = [203, 0, 113, 2];

/// What a frame carries.
#[derive(Clone, Copy)]
enum L {
    Syn(u32),
    SynAck(u32, u32),
    Ack(u32, u32),
    Data(u32, u32),
    Udp,
}

/// An Ethernet/IPv4 frame from `s`:`sp` to `d`:`dp`; data segments carry
/// 20 bytes (a 74-byte frame).
fn pkt(s: [u8; 4], d: [u8; 4], sp: u16, dp: u16, l: L) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(s, d, 64);
    let mut out = Vec::with_capacity(96);
    match l {
        L::Syn(seq) => b.tcp(sp, dp, seq, 64000).syn().write(&mut out, &[]),
        L::SynAck(seq, ack) => b
            .tcp(sp, dp, seq, 64000)
            .syn()
            .ack(ack)
            .write(&mut out, &[]),
        L::Ack(seq, ack) => b.tcp(sp, dp, seq, 64000).ack(ack).write(&mut out, &[]),
        L::Data(seq, ack) => b
            .tcp(sp, dp, seq, 64000)
            .ack(ack)
            .write(&mut out, &[0x5a; 20]),
        L::Udp => b.udp(sp, dp).write(&mut out, &[0x33; 20]),
    }
    .expect("build");
    out
}

fn nat(max_entries: usize) -> Nat {
    Nat::new(
        conntrack::Config {
            max_entries,
            max_per_port: max_entries,
            ..conntrack::Config::default()
        },
        Rules {
            snat: vec![Snat {
                zone: ZONE,
                inside: "10.0.0.0/8".parse().expect("net"),
                external: Ipv4Addr::from(E),
            }],
            ..Rules::default()
        },
    )
    .expect("rules")
}

/// Translates `f` (in place) from `zone`; panics unless it is forwarded.
fn go(n: &mut Nat, zone: u32, mut f: Vec<u8>, now: u64) {
    let k = FlowKey::parse(&f).expect("parse");
    let o = n.translate(zone, PORT, &k, &mut f, false, now);
    assert!(matches!(o, Outcome::Forward { .. }), "{o:?}");
}

/// `n` established UDP connections (one packet each way) from one inside
/// endpoint (10.0.2.1:5000, so one mapping) to distinct servers in
/// 100.64.0.0/10.
fn fill(nt: &mut Nat, n: u32, now: u64) {
    const FILLER: [u8; 4] = [10, 0, 2, 1];
    for i in 0..n {
        let srv = (Ipv4Addr::new(100, 64, 0, 0).to_bits() + i).to_be_bytes();
        go(nt, ZONE, pkt(FILLER, srv, 5000, 53, L::Udp), now);
        go(nt, EXTERNAL_ZONE, pkt(srv, E, 53, 5000, L::Udp), now);
    }
}

/// Runs VM:40000 -> SRV:80 through the handshake and returns the outbound
/// data frame and the inbound reply (each with its key) of the established
/// connection, checked to translate as established.
fn handshake(nt: &mut Nat, now: u64) -> [(Vec<u8>, FlowKey); 2] {
    go(nt, ZONE, pkt(VM, SRV, 40000, 80, L::Syn(100)), now);
    go(
        nt,
        EXTERNAL_ZONE,
        pkt(SRV, E, 80, 40000, L::SynAck(500, 101)),
        now,
    );
    go(nt, ZONE, pkt(VM, SRV, 40000, 80, L::Ack(101, 501)), now);
    let out = pkt(VM, SRV, 40000, 80, L::Data(101, 501));
    let inb = pkt(SRV, E, 80, 40000, L::Data(501, 121));
    let new = nt.stats().snat_new;
    let r = [out, inb].map(|f| {
        let k = FlowKey::parse(&f).expect("parse");
        (f, k)
    });
    for (zone, (f, k)) in [ZONE, EXTERNAL_ZONE].into_iter().zip(&r) {
        let mut buf = f.clone();
        let o = nt.translate(zone, PORT, k, &mut buf, false, now);
        assert!(matches!(o, Outcome::Forward { .. }), "{o:?}");
    }
    assert_eq!(nt.stats().snat_new, new, "no new connection");
    r
}

fn bench_established(c: &mut Criterion) {
    let mut g = c.benchmark_group("nat_translate_established");
    g.throughput(Throughput::Elements(1));
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(3));
    let mut nt = nat(1 << 16);
    let [(out, out_k), (inb, inb_k)] = handshake(&mut nt, T0);
    let mut buf = [0u8; 128];
    let len = out.len();
    assert_eq!(len, inb.len());
    g.bench_function("copy_only", |b| {
        b.iter(|| {
            buf[..len].copy_from_slice(black_box(&out));
            black_box(&mut buf);
        })
    });
    let mut now = T0;
    for (name, zone, f, k) in [
        ("tcp_outbound", ZONE, &out, &out_k),
        ("tcp_inbound_reply", EXTERNAL_ZONE, &inb, &inb_k),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                now += 100; // 10 Mpps of simulated time
                buf[..len].copy_from_slice(f);
                black_box(nt.translate(zone, PORT, black_box(k), &mut buf[..len], false, now))
            })
        });
    }
    g.finish();
}

fn bench_table_size(c: &mut Criterion) {
    let mut g = c.benchmark_group("nat_translate_established_table");
    g.throughput(Throughput::Elements(1));
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(3));
    for n in [10u32, 10_000, 1_000_000] {
        let mut nt = nat(2_000_000);
        fill(&mut nt, n, T0);
        let [(out, out_k), (inb, inb_k)] = handshake(&mut nt, T0);
        assert_eq!(nt.conntrack().len(), n as usize + 1);
        let mut buf = [0u8; 128];
        let len = out.len();
        let mut now = T0;
        for (name, zone, f, k) in [
            ("tcp_outbound", ZONE, &out, &out_k),
            ("tcp_inbound_reply", EXTERNAL_ZONE, &inb, &inb_k),
        ] {
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    now += 100;
                    buf[..len].copy_from_slice(f);
                    black_box(nt.translate(zone, PORT, black_box(k), &mut buf[..len], false, now))
                })
            });
        }
    }
    g.finish();
}

/// Frames (with keys) of `n` new connections: SYNs from VM to SRV:80 with
/// source ports from 1024 (distinct inside endpoints: each needs a new
/// mapping; its port is free, so it is preserved), or, with `same_src`,
/// from VM:40000 to distinct servers (one mapping, reused).
fn syns(n: u32, same_src: bool) -> Vec<(Vec<u8>, FlowKey)> {
    (0..n)
        .map(|i| {
            let f = if same_src {
                let srv = (Ipv4Addr::new(100, 64, 0, 0).to_bits() + i).to_be_bytes();
                pkt(VM, srv, 40000, 80, L::Syn(100))
            } else {
                pkt(VM, SRV, 1024 + i as u16, 80, L::Syn(100))
            };
            let k = FlowKey::parse(&f).expect("parse");
            (f, k)
        })
        .collect()
}

fn bench_new(c: &mut Criterion) {
    let mut g = c.benchmark_group("nat_translate_new");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(3));
    for (name, same_src, chunk_max) in [
        // A fresh NAT per 60,000 connections: the external port range
        // (1024-65535) holds no more distinct inside endpoints.
        ("tcp_syn_new_mapping", false, 60_000u64),
        ("tcp_syn_same_mapping", true, 100_000),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let chunk = left.min(chunk_max);
                    let mut nt = nat(1 << 18);
                    let mut frames = syns(chunk as u32, same_src);
                    let start = Instant::now();
                    for (f, k) in &mut frames {
                        black_box(nt.translate(ZONE, PORT, k, f, false, T0));
                    }
                    total += start.elapsed();
                    assert_eq!(nt.stats().snat_new, chunk);
                    left -= chunk;
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_established, bench_table_size, bench_new);
criterion_main!(benches);
