//! Differential tests: the tuple-space classifier against the rule-by-rule
//! reference on random group sets and packets.
//!
//! Addresses, prefixes and ports are drawn mostly from small pools so that
//! rules overlap and packets hit them (random 32-bit addresses would almost
//! never match a /32); a share of fully random values covers the rest.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use firewall::{
    evaluate_linear, CompileOptions, Direction, Family, Firewall, GroupId, GroupSpec, Packet,
    Proto, Remote, RuleSpec,
};
use ipnet::IpNet;
use proptest::prelude::*;

const V4_POOL: [[u8; 4]; 7] = [
    [10, 0, 0, 1],
    [10, 0, 0, 2],
    [10, 0, 1, 1],
    [10, 0, 1, 200],
    [10, 1, 0, 1],
    [192, 168, 0, 1],
    [0, 0, 0, 0],
];
const V6_POOL: [u128; 6] = [
    0x2001_0db8_0000_0000_0000_0000_0000_0001,
    0x2001_0db8_0000_0000_0000_0000_0000_0002,
    0x2001_0db8_0000_0001_0000_0000_0000_0001,
    0x2001_0db8_0001_0000_0000_0000_0000_0001,
    0xfe80_0000_0000_0000_0000_0000_0000_0001,
    0,
];
const PORTS: [u16; 12] = [0, 1, 22, 79, 80, 81, 443, 1023, 1024, 8080, 65534, 65535];
const ICMP_TYPES: [u8; 6] = [0, 3, 8, 11, 128, 129];
const ICMP_CODES: [u8; 4] = [0, 1, 4, 255];
const GROUP_NAMES: [&str; 4] = ["a", "b", "c", "d"];

fn addr(family: Family) -> BoxedStrategy<IpAddr> {
    match family {
        Family::V4 => prop_oneof![
            4 => proptest::sample::select(&V4_POOL[..]).prop_map(IpAddr::from),
            1 => any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        ]
        .boxed(),
        Family::V6 => prop_oneof![
            4 => proptest::sample::select(&V6_POOL[..]).prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
            1 => any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        ]
        .boxed(),
    }
}

fn family() -> impl Strategy<Value = Family> {
    prop_oneof![Just(Family::V4), Just(Family::V6)]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![
        3 => proptest::sample::select(&PORTS[..]),
        1 => any::<u16>(),
    ]
}

fn port_range() -> impl Strategy<Value = Option<(u16, u16)>> {
    prop_oneof![
        1 => Just(None),
        3 => (port(), port()).prop_map(|(a, b)| Some((a.min(b), a.max(b)))),
        1 => port().prop_map(|p| Some((p, p))),
    ]
}

fn prefix_len(family: Family) -> BoxedStrategy<u8> {
    match family {
        Family::V4 => prop_oneof![
            proptest::sample::select(&[0u8, 8, 16, 23, 24, 31, 32][..]),
            0u8..=32
        ]
        .boxed(),
        Family::V6 => prop_oneof![
            proptest::sample::select(&[0u8, 16, 32, 48, 64, 127, 128][..]),
            0u8..=128
        ]
        .boxed(),
    }
}

fn remote(family: Family, ngroups: usize) -> BoxedStrategy<Remote> {
    let cidr = (addr(family), prefix_len(family))
        .prop_map(|(a, l)| Remote::Cidr(IpNet::new(a, l).expect("valid prefix length")));
    let group = (0..ngroups).prop_map(|i| Remote::Group(GROUP_NAMES[i].to_string()));
    prop_oneof![
        2 => Just(Remote::Any),
        4 => cidr,
        2 => group,
    ]
    .boxed()
}

fn icmp_fields() -> impl Strategy<Value = (Option<u8>, Option<u8>)> {
    let ty = prop_oneof![proptest::sample::select(&ICMP_TYPES[..]), any::<u8>()];
    let code = prop_oneof![proptest::sample::select(&ICMP_CODES[..]), any::<u8>()];
    prop_oneof![
        1 => Just((None, None)),
        2 => ty.clone().prop_map(|t| (Some(t), None)),
        2 => (ty, code).prop_map(|(t, c)| (Some(t), Some(c))),
    ]
}

/// A valid rule: protocol fields fit the protocol, the family fits both.
/// (Both families' remotes are drawn and one kept: cheaper than a
/// `prop_flat_map` per rule, which rebuilds strategies for every value.)
fn rule(ngroups: usize) -> impl Strategy<Value = RuleSpec> {
    let dir = prop_oneof![Just(Direction::Ingress), Just(Direction::Egress)];
    let proto = prop_oneof![
        1 => Just(Proto::Any),
        3 => Just(Proto::Tcp),
        2 => Just(Proto::Udp),
        1 => Just(Proto::Icmp),
        1 => Just(Proto::Icmpv6),
    ];
    (
        dir,
        proto,
        family(),
        port_range(),
        icmp_fields(),
        remote(Family::V4, ngroups),
        remote(Family::V6, ngroups),
    )
        .prop_map(
            |(direction, proto, fam, ports, (icmp_type, icmp_code), r4, r6)| {
                let family = match proto {
                    Proto::Icmp => Family::V4,
                    Proto::Icmpv6 => Family::V6,
                    _ => fam,
                };
                let tcp_udp = matches!(proto, Proto::Tcp | Proto::Udp);
                let icmp = matches!(proto, Proto::Icmp | Proto::Icmpv6);
                RuleSpec {
                    direction,
                    family,
                    proto,
                    ports: if tcp_udp { ports } else { None },
                    icmp_type: if icmp { icmp_type } else { None },
                    icmp_code: if icmp { icmp_code } else { None },
                    remote: match family {
                        Family::V4 => r4,
                        Family::V6 => r6,
                    },
                }
            },
        )
}

fn groups() -> impl Strategy<Value = Vec<GroupSpec>> {
    (1..=GROUP_NAMES.len()).prop_flat_map(|n| {
        proptest::collection::vec(proptest::collection::vec(rule(n), 0..=50), n).prop_map(|rs| {
            rs.into_iter()
                .enumerate()
                .map(|(i, rules)| GroupSpec {
                    name: GROUP_NAMES[i].to_string(),
                    rules,
                })
                .collect()
        })
    })
}

fn members() -> impl Strategy<Value = HashMap<String, Vec<IpAddr>>> {
    let addrs = proptest::collection::vec(family().prop_flat_map(addr), 0..6);
    // Names beyond the groups ("e") must be ignored.
    proptest::collection::hash_map(
        proptest::sample::select(&["a", "b", "c", "d", "e"][..]).prop_map(String::from),
        addrs,
        0..5,
    )
}

fn packet() -> impl Strategy<Value = Packet> {
    let proto = prop_oneof![
        Just(1u8),
        Just(6),
        Just(17),
        Just(58),
        Just(47),
        any::<u8>()
    ];
    let icmp = proptest::option::weighted(
        0.8,
        (
            prop_oneof![proptest::sample::select(&ICMP_TYPES[..]), any::<u8>()],
            prop_oneof![proptest::sample::select(&ICMP_CODES[..]), any::<u8>()],
        ),
    );
    (family(), proto, port(), icmp, any::<u8>()).prop_flat_map(
        |(family, proto, dst_port, icmp, odd)| {
            // One packet in 64 has a remote of the other family (only a
            // hand-built Packet can): nothing may allow it.
            let rf = match (odd % 64 == 0, family) {
                (false, f) => f,
                (true, Family::V4) => Family::V6,
                (true, Family::V6) => Family::V4,
            };
            addr(rf).prop_map(move |remote| Packet {
                family,
                proto,
                remote,
                dst_port,
                icmp,
            })
        },
    )
}

/// A port's group list: any order, duplicates and unknown ids allowed.
fn group_list() -> impl Strategy<Value = Vec<GroupId>> {
    proptest::collection::vec(prop_oneof![8 => 0u32..4, 1 => 4u32..6], 0..5)
}

/// The classifier three ways: default (small tables scanned), tuples
/// everywhere, scans everywhere.
fn compile_all(specs: &[GroupSpec], members: &HashMap<String, Vec<IpAddr>>) -> [Firewall; 3] {
    let c = |n| {
        let opts = CompileOptions {
            scan_max: n,
            scan_per_tuple: n,
        };
        Firewall::compile_with(specs, members, None, &opts).expect("valid specs compile")
    };
    [
        Firewall::compile(specs, members).expect("valid specs compile"),
        c(0),
        c(usize::MAX),
    ]
}

/// XorShift rather than the default ChaCha: in a debug build generating
/// the values costs far more than checking them, and a test needs no
/// cryptographic randomness.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
        ..ProptestConfig::with_cases(cases)
    }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn classifier_equals_linear(
        specs in groups(),
        members in members(),
        lists in proptest::collection::vec(group_list(), 1..4),
        pkts in proptest::collection::vec(packet(), 1..40),
    ) {
        let fws = compile_all(&specs, &members);
        let all: Vec<GroupId> = (0..specs.len() as u32).collect();
        let mut expected_hits: HashMap<firewall::RuleRef, u64> = HashMap::new();
        for p in &pkts {
            for dir in [Direction::Ingress, Direction::Egress] {
                for l in lists.iter().chain([&all]) {
                    let want = evaluate_linear(&specs, &members, l, dir, p);
                    for (i, fw) in fws.iter().enumerate() {
                        let got = fw.evaluate(l, dir, p);
                        prop_assert_eq!(got, want, "variant {} packet {:?} {:?} groups {:?}", i, p, dir, l);
                    }
                    if let Some(r) = want {
                        *expected_hits.entry(r).or_default() += 1;
                    }
                }
            }
        }
        for fw in &fws {
            for (r, n) in fw.rule_hits() {
                prop_assert_eq!(n, expected_hits.get(&r).copied().unwrap_or(0));
            }
        }
    }

}

proptest! {
    #![proptest_config(config(1000))]

    /// Packets built to hit one chosen rule's own values, so every rule
    /// shape (ranges, ICMP codes, members) gets exercised near its edges.
    #[test]
    fn classifier_equals_linear_on_targeted_packets(
        specs in groups(),
        members in members(),
        picks in proptest::collection::vec((any::<prop::sample::Index>(), any::<u16>(), any::<bool>()), 1..30),
    ) {
        let fws = compile_all(&specs, &members);
        let all: Vec<GroupId> = (0..specs.len() as u32).collect();
        let rules: Vec<&RuleSpec> = specs.iter().flat_map(|g| &g.rules).collect();
        if rules.is_empty() {
            return Ok(());
        }
        for (ix, jitter, edge) in picks {
            let r = rules[ix.index(rules.len())];
            let remote = match &r.remote {
                Remote::Any => match r.family {
                    Family::V4 => IpAddr::from([10, 0, 0, 1]),
                    Family::V6 => IpAddr::V6(Ipv6Addr::from(V6_POOL[0])),
                },
                Remote::Cidr(n) => if edge { n.broadcast() } else { n.network() },
                Remote::Group(g) => members
                    .get(g)
                    .and_then(|m| m.get(usize::from(jitter) % m.len().max(1)).copied())
                    .unwrap_or(IpAddr::from([10, 0, 0, 1])),
            };
            let (proto, dst_port, icmp) = match r.proto {
                Proto::Any => (47, 0, None),
                Proto::Tcp | Proto::Udp => {
                    let (lo, hi) = r.ports.unwrap_or((0, 65535));
                    // Edges and just outside them.
                    let p = match jitter % 4 {
                        0 => lo,
                        1 => hi,
                        2 => lo.wrapping_sub(1),
                        _ => hi.wrapping_add(1),
                    };
                    (if r.proto == Proto::Tcp { 6 } else { 17 }, p, None)
                }
                Proto::Icmp | Proto::Icmpv6 => {
                    let t = r.icmp_type.unwrap_or(jitter as u8);
                    let c = if edge { r.icmp_code.unwrap_or(0) } else { (jitter >> 8) as u8 };
                    (if r.proto == Proto::Icmp { 1 } else { 58 }, 0, Some((t, c)))
                }
            };
            let p = Packet { family: Family::of(&remote), proto, remote, dst_port, icmp };
            let want = evaluate_linear(&specs, &members, &all, r.direction, &p);
            for (i, fw) in fws.iter().enumerate() {
                let got = fw.evaluate(&all, r.direction, &p);
                prop_assert_eq!(got, want, "variant {} packet {:?} aimed at {:?}", i, p, r);
            }
        }
    }

    /// Arbitrary specs, valid or not: compile never panics, and whatever
    /// compiles agrees with the reference.
    #[test]
    fn arbitrary_specs_never_panic(
        raw in proptest::collection::vec(
            (
                proptest::sample::select(&["a", "b", "a"][..]),
                proptest::collection::vec(
                    (
                        any::<bool>(),
                        family(),
                        0u8..5,
                        proptest::option::of((any::<u16>(), any::<u16>())),
                        proptest::option::of(any::<u8>()),
                        proptest::option::of(any::<u8>()),
                        prop_oneof![
                            Just(Remote::Any),
                            family().prop_flat_map(|f| (addr(f), prefix_len(f)))
                                .prop_map(|(a, l)| Remote::Cidr(IpNet::new(a, l).expect("valid prefix length"))),
                            proptest::sample::select(&["a", "b", "zz"][..]).prop_map(|s| Remote::Group(s.into())),
                        ],
                    ),
                    0..6,
                ),
            ),
            0..3,
        ),
        members in members(),
        pkts in proptest::collection::vec(packet(), 1..10),
    ) {
        let specs: Vec<GroupSpec> = raw
            .into_iter()
            .map(|(name, rules)| GroupSpec {
                name: name.to_string(),
                rules: rules
                    .into_iter()
                    .map(|(ing, family, p, ports, icmp_type, icmp_code, remote)| RuleSpec {
                        direction: if ing { Direction::Ingress } else { Direction::Egress },
                        family,
                        proto: [Proto::Any, Proto::Tcp, Proto::Udp, Proto::Icmp, Proto::Icmpv6][usize::from(p)],
                        ports,
                        icmp_type,
                        icmp_code,
                        remote,
                    })
                    .collect(),
            })
            .collect();
        match Firewall::compile(&specs, &members) {
            Err(e) => prop_assert!(!e.to_string().is_empty()),
            Ok(_) => {
                let all: Vec<GroupId> = (0..specs.len() as u32).collect();
                for fw in compile_all(&specs, &members) {
                    for p in &pkts {
                        for dir in [Direction::Ingress, Direction::Egress] {
                            prop_assert_eq!(
                                fw.evaluate(&all, dir, p),
                                evaluate_linear(&specs, &members, &all, dir, p)
                            );
                        }
                    }
                }
            }
        }
    }
}
