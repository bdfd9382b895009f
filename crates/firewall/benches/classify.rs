//! Security-group lookup cost per packet with 10, 1,000 and 10,000 rules
//! in one group: the tuple-space classifier (`Firewall::evaluate`, hit
//! counting included) must stay flat; the rule-by-rule reference
//! (`evaluate_linear`) at 10 and 10,000 rules is the baseline.
//!
//! Small tables are scanned by default (`CompileOptions`): the 10-rule
//! set is also measured as tuples (`tuple-only`) to show why.
//!
//! Rules are a seeded random "realistic" ingress mix: TCP mostly, some
//! UDP; remotes /32 (half), /24 and /16 inside 10.0.0.0/8; single ports
//! (common ones or random) and ranges up to 1,024 ports wide. Two packets:
//! one aimed at the last rule (so the reference scans the whole list, and
//! the classifier cannot stop early), one from outside 10.0.0.0/8 that no
//! rule allows.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use firewall::{
    evaluate_linear, CompileOptions, Direction, Family, Firewall, GroupSpec, Packet, Proto, Remote,
    RuleSpec,
};
use ipnet::{IpNet, Ipv4Net};

/// splitmix64: reproducible rule sets without a `rand` dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const COMMON_PORTS: [u16; 8] = [22, 80, 443, 3306, 5432, 6379, 8080, 9090];

fn rules(n: usize, seed: u64) -> Vec<RuleSpec> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| {
            let proto = if rng.below(100) < 85 {
                Proto::Tcp
            } else {
                Proto::Udp
            };
            let addr = Ipv4Addr::from(0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff));
            let plen = match rng.below(10) {
                0..=4 => 32,
                5..=7 => 24,
                _ => 16,
            };
            let net = Ipv4Net::new(addr, plen).expect("prefix length").trunc();
            let ports = match rng.below(10) {
                0..=3 => {
                    let p = COMMON_PORTS[rng.below(COMMON_PORTS.len() as u64) as usize];
                    (p, p)
                }
                4..=6 => {
                    let p = 1 + rng.below(65535) as u16;
                    (p, p)
                }
                _ => {
                    let lo = 1 + rng.below(64000) as u16;
                    (lo, lo + rng.below(1024) as u16)
                }
            };
            RuleSpec {
                direction: Direction::Ingress,
                family: Family::V4,
                proto,
                ports: Some(ports),
                icmp_type: None,
                icmp_code: None,
                remote: Remote::Cidr(IpNet::V4(net)),
            }
        })
        .collect()
}

/// A packet the last rule allows (from the top of its prefix, to the top
/// of its range).
fn aimed_at(r: &RuleSpec) -> Packet {
    let Remote::Cidr(net) = r.remote else {
        unreachable!("bench rules are CIDR rules")
    };
    Packet {
        family: Family::V4,
        proto: if r.proto == Proto::Tcp { 6 } else { 17 },
        remote: net.broadcast(),
        dst_port: r.ports.map_or(80, |p| p.1),
        icmp: None,
    }
}

fn bench(c: &mut Criterion) {
    let members = HashMap::new();
    let miss = Packet {
        family: Family::V4,
        proto: 6,
        remote: IpAddr::from([192, 0, 2, 1]),
        dst_port: 443,
        icmp: None,
    };
    let mut g = c.benchmark_group("evaluate");
    for n in [10usize, 1_000, 10_000] {
        let specs = vec![GroupSpec {
            name: "web".into(),
            rules: rules(n, 42 + n as u64),
        }];
        let fw = Firewall::compile(&specs, &members).expect("compile");
        let tuples_only = CompileOptions {
            scan_max: 0,
            scan_per_tuple: 0,
        };
        let fw_tuples =
            Firewall::compile_with(&specs, &members, None, &tuples_only).expect("compile");
        let hit = aimed_at(specs[0].rules.last().expect("n > 0"));
        let expect = evaluate_linear(&specs, &members, &[0], Direction::Ingress, &hit);
        assert!(expect.is_some());
        for f in [&fw, &fw_tuples] {
            assert_eq!(f.evaluate(&[0], Direction::Ingress, &hit), expect);
            assert_eq!(f.evaluate(&[0], Direction::Ingress, &miss), None);
        }
        eprintln!(
            "{n} rules: {:?}; the match packet's first rule is {:?}",
            fw.stats(),
            expect.map(|r| r.rule)
        );
        for (name, p) in [("match", hit), ("miss", miss)] {
            g.bench_with_input(
                BenchmarkId::new(format!("default/{name}"), n),
                &p,
                |b, p| b.iter(|| fw.evaluate(black_box(&[0]), Direction::Ingress, black_box(p))),
            );
            if n == 10 {
                g.bench_with_input(
                    BenchmarkId::new(format!("tuple-only/{name}"), n),
                    &p,
                    |b, p| {
                        b.iter(|| {
                            fw_tuples.evaluate(black_box(&[0]), Direction::Ingress, black_box(p))
                        })
                    },
                );
            }
            if n != 1_000 {
                g.bench_with_input(BenchmarkId::new(format!("linear/{name}"), n), &p, |b, p| {
                    b.iter(|| {
                        evaluate_linear(
                            &specs,
                            &members,
                            black_box(&[0]),
                            Direction::Ingress,
                            black_box(p),
                        )
                    })
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
