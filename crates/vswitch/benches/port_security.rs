//! Per-frame cost of port binding (anti-spoofing) on a secured port:
//! `port_security::check` and `check_unparsed` for an allowed IPv4 TCP
//! frame sent from the port's own MAC and IPv4 address, with the address
//! found among the directory's fixed owners, and (the slower path) only
//! among the DHCP leases (a miss in the fixed map, then an `ArcSwap` load).
//!
//! Every secured frame pays this before the bridge stage. The flow key is
//! parsed once outside the loop (the switch parses once per frame for every
//! stage); `parse_and_check` adds the parse for scale.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use etherparse::PacketBuilder;
use packet::{FlowKey, MacAddr};
use vswitch::pipeline::port_security::{check, check_unparsed};
use vswitch::pipeline::{Addresses, Ingress, IpOwner, Leased};

const MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x01]);
const IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

fn frame() -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(MAC.0, [0x02, 0, 0, 0, 0, 0x02])
        .ipv4(IP.octets(), PEER.octets(), 64)
        .tcp(40000, 80, 1, 64000)
        .ack(1)
        .write(&mut f, &[0x5a; 20])
        .expect("build");
    f
}

/// A network of 253 ports (10.0.0.1-253, one MAC each) and a gateway; with
/// `leased`, the ports' addresses are DHCP leases instead of fixed.
fn addresses(leased: bool) -> Addresses {
    let mut a = Addresses::default();
    let mut leases = Leased::new();
    for i in 1..=253u8 {
        let ip = Ipv4Addr::new(10, 0, 0, i);
        let mac = MacAddr([0x02, 0, 0, 0, 0, i]);
        if leased {
            leases.insert(ip, mac);
        } else {
            a.fixed.insert(
                ip,
                IpOwner {
                    mac,
                    gateway: false,
                },
            );
        }
    }
    a.fixed.insert(
        Ipv4Addr::new(10, 0, 0, 254),
        IpOwner {
            mac: MacAddr([0x02, 0, 0, 0, 0, 0xfe]),
            gateway: true,
        },
    );
    a.leased.store(Arc::new(leases));
    a
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("port_security");
    g.throughput(Throughput::Elements(1));
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(3));
    let f = frame();
    let key = FlowKey::parse(&f).expect("parse");
    let ingress = Ingress {
        id: 1,
        mac: MAC,
        port_security: true,
    };
    for (name, leased) in [("fixed_owner", false), ("leased_owner", true)] {
        let addrs = addresses(leased);
        assert_eq!(check(&ingress, &key, &addrs), Ok(()));
        assert_eq!(check_unparsed(&ingress, &key, &f), Ok(()));
        g.bench_function(format!("check/{name}"), |b| {
            b.iter(|| check(black_box(&ingress), black_box(&key), &addrs))
        });
        g.bench_function(format!("check_and_unparsed/{name}"), |b| {
            b.iter(|| {
                check(black_box(&ingress), black_box(&key), &addrs)
                    .and_then(|()| check_unparsed(&ingress, black_box(&key), black_box(&f)))
            })
        });
    }
    let addrs = addresses(false);
    g.bench_function("check_unparsed", |b| {
        b.iter(|| check_unparsed(black_box(&ingress), black_box(&key), black_box(&f)))
    });
    g.bench_function("parse_and_check/fixed_owner", |b| {
        b.iter(|| {
            let k = FlowKey::parse(black_box(&f)).expect("parse");
            check(&ingress, &k, &addrs).and_then(|()| check_unparsed(&ingress, &k, &f))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
