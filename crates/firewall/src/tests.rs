//! Unit tests: rule semantics edge by edge, ordering, counters, errors.
//! Every `evaluate` here is also checked against `evaluate_linear`.

use std::collections::HashMap;
use std::net::IpAddr;

use super::*;

type Members = HashMap<String, Vec<IpAddr>>;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn rule(direction: Direction, family: Family, proto: Proto) -> RuleSpec {
    RuleSpec {
        direction,
        family,
        proto,
        ports: None,
        icmp_type: None,
        icmp_code: None,
        remote: Remote::Any,
    }
}

fn tcp_in(ports: Option<(u16, u16)>) -> RuleSpec {
    RuleSpec {
        ports,
        ..rule(Direction::Ingress, Family::V4, Proto::Tcp)
    }
}

fn group(name: &str, rules: Vec<RuleSpec>) -> GroupSpec {
    GroupSpec {
        name: name.to_string(),
        rules,
    }
}

fn pkt(remote: &str, proto: u8, dst_port: u16) -> Packet {
    let remote = ip(remote);
    Packet {
        family: Family::of(&remote),
        proto,
        remote,
        dst_port,
        icmp: None,
    }
}

fn icmp_pkt(remote: &str, proto: u8, icmp: Option<(u8, u8)>) -> Packet {
    Packet {
        icmp,
        ..pkt(remote, proto, 0)
    }
}

/// Tuples everywhere, however small the table.
const TUPLES: CompileOptions = CompileOptions {
    scan_max: 0,
    scan_per_tuple: 0,
};

/// A compiled set plus its specs, evaluating three ways: default options
/// (small tables scanned), tuples only, and the linear reference.
struct Fx {
    specs: Vec<GroupSpec>,
    members: Members,
    fw: Firewall,
    tuples: Firewall,
}

impl Fx {
    fn new(specs: Vec<GroupSpec>, members: Members) -> Fx {
        let fw = Firewall::compile(&specs, &members).unwrap();
        let tuples = Firewall::compile_with(&specs, &members, None, &TUPLES).unwrap();
        assert_eq!(tuples.stats().scanned, 0);
        Fx {
            specs,
            members,
            fw,
            tuples,
        }
    }

    fn one(rules: Vec<RuleSpec>) -> Fx {
        Fx::new(vec![group("g", rules)], Members::new())
    }

    fn eval(&self, groups: &[GroupId], dir: Direction, p: &Packet) -> Option<RuleRef> {
        let got = self.fw.evaluate(groups, dir, p);
        let want = evaluate_linear(&self.specs, &self.members, groups, dir, p);
        assert_eq!(got, want, "classifier vs linear for {p:?} {dir:?}");
        let tuples = self.tuples.evaluate(groups, dir, p);
        assert_eq!(tuples, want, "tuples vs linear for {p:?} {dir:?}");
        got
    }

    /// Rule index allowing `p` on ingress in group 0.
    fn ing(&self, p: &Packet) -> Option<u32> {
        self.eval(&[0], Direction::Ingress, p).map(|r| r.rule)
    }
}

#[test]
fn port_range_edges() {
    let fx = Fx::one(vec![tcp_in(Some((1000, 2000)))]);
    for (port, ok) in [
        (999, false),
        (1000, true),
        (1500, true),
        (2000, true),
        (2001, false),
    ] {
        assert_eq!(
            fx.ing(&pkt("10.0.0.1", 6, port)).is_some(),
            ok,
            "port {port}"
        );
    }
    // Same range, other protocols: no.
    assert_eq!(fx.ing(&pkt("10.0.0.1", 17, 1000)), None);
    assert_eq!(fx.ing(&pkt("10.0.0.1", 132, 1000)), None);
}

#[test]
fn port_range_full_single_zero_and_top() {
    let all = Fx::one(vec![tcp_in(Some((0, 65535)))]);
    let none = Fx::one(vec![tcp_in(None)]);
    for port in [0, 1, 80, 65534, 65535] {
        assert_eq!(all.ing(&pkt("10.0.0.1", 6, port)), Some(0));
        assert_eq!(none.ing(&pkt("10.0.0.1", 6, port)), Some(0));
    }
    // (0, 65535) is the same single wildcard entry as no range.
    assert_eq!(all.tuples.stats().entries, 1);
    assert_eq!(all.tuples.stats().tuples, 1);

    let single = Fx::one(vec![tcp_in(Some((443, 443)))]);
    assert_eq!(single.ing(&pkt("10.0.0.1", 6, 443)), Some(0));
    assert_eq!(single.ing(&pkt("10.0.0.1", 6, 442)), None);
    assert_eq!(single.ing(&pkt("10.0.0.1", 6, 444)), None);

    let no_zero = Fx::one(vec![tcp_in(Some((1, 65535)))]);
    assert_eq!(no_zero.ing(&pkt("10.0.0.1", 6, 0)), None);
    assert_eq!(no_zero.ing(&pkt("10.0.0.1", 6, 1)), Some(0));
    assert_eq!(no_zero.ing(&pkt("10.0.0.1", 6, 65535)), Some(0));

    // Port 0 is allowed in a range (later fragments carry it).
    let zero = Fx::one(vec![tcp_in(Some((0, 0)))]);
    assert_eq!(zero.ing(&pkt("10.0.0.1", 6, 0)), Some(0));
    assert_eq!(zero.ing(&pkt("10.0.0.1", 6, 1)), None);

    let top = Fx::one(vec![tcp_in(Some((65535, 65535)))]);
    assert_eq!(top.ing(&pkt("10.0.0.1", 6, 65535)), Some(0));
    assert_eq!(top.ing(&pkt("10.0.0.1", 6, 65534)), None);
}

#[test]
fn udp_ports() {
    let fx = Fx::one(vec![RuleSpec {
        ports: Some((53, 53)),
        ..rule(Direction::Ingress, Family::V4, Proto::Udp)
    }]);
    assert_eq!(fx.ing(&pkt("10.0.0.1", 17, 53)), Some(0));
    assert_eq!(fx.ing(&pkt("10.0.0.1", 6, 53)), None);
    assert_eq!(fx.ing(&pkt("10.0.0.1", 17, 54)), None);
}

#[test]
fn cidr_prefixes() {
    let cidr = |s: &str| {
        let n = net(s);
        let family = Family::of(&n.addr());
        Fx::one(vec![RuleSpec {
            remote: Remote::Cidr(n),
            ..rule(Direction::Ingress, family, Proto::Any)
        }])
    };
    let any4 = cidr("0.0.0.0/0");
    assert_eq!(any4.ing(&pkt("203.0.113.9", 6, 1)), Some(0));
    assert_eq!(any4.ing(&pkt("2001:db8::1", 6, 1)), None);

    let host = cidr("10.1.2.3/32");
    assert_eq!(host.ing(&pkt("10.1.2.3", 6, 1)), Some(0));
    assert_eq!(host.ing(&pkt("10.1.2.4", 6, 1)), None);
    assert_eq!(host.ing(&pkt("10.1.2.2", 6, 1)), None);

    let sub = cidr("10.1.2.0/24");
    assert_eq!(sub.ing(&pkt("10.1.2.0", 1, 0)), Some(0));
    assert_eq!(sub.ing(&pkt("10.1.2.255", 1, 0)), Some(0));
    assert_eq!(sub.ing(&pkt("10.1.3.0", 1, 0)), None);
    assert_eq!(sub.ing(&pkt("10.1.1.255", 1, 0)), None);
    // The IPv4-mapped form is IPv6, not the IPv4 address.
    assert_eq!(sub.ing(&pkt("::ffff:10.1.2.1", 1, 0)), None);

    // Host bits in the prefix are ignored, as `IpNet::contains` does.
    let sloppy = cidr("10.1.2.77/24");
    assert_eq!(sloppy.ing(&pkt("10.1.2.1", 6, 1)), Some(0));

    let any6 = cidr("::/0");
    assert_eq!(any6.ing(&pkt("2001:db8::1", 6, 1)), Some(0));
    assert_eq!(any6.ing(&pkt("10.0.0.1", 6, 1)), None);

    let host6 = cidr("2001:db8::1/128");
    assert_eq!(host6.ing(&pkt("2001:db8::1", 6, 1)), Some(0));
    assert_eq!(host6.ing(&pkt("2001:db8::2", 6, 1)), None);
    assert_eq!(host6.ing(&pkt("2001:db8::", 6, 1)), None);

    let p6 = cidr("2001:db8:1::/48");
    assert_eq!(p6.ing(&pkt("2001:db8:1:ffff::1", 17, 1)), Some(0));
    assert_eq!(p6.ing(&pkt("2001:db8:2::1", 17, 1)), None);
}

#[test]
fn families_never_cross() {
    // Proto::Any, Remote::Any: the family alone separates.
    let fx = Fx::one(vec![rule(Direction::Ingress, Family::V6, Proto::Any)]);
    assert_eq!(fx.ing(&pkt("2001:db8::1", 47, 0)), Some(0));
    assert_eq!(fx.ing(&pkt("10.0.0.1", 47, 0)), None);
    // A hand-built packet whose remote is not of its family matches nothing.
    let mut bad = pkt("10.0.0.1", 47, 0);
    bad.family = Family::V6;
    assert_eq!(fx.ing(&bad), None);
}

#[test]
fn remote_groups() {
    let web_from_lb = RuleSpec {
        ports: Some((80, 80)),
        remote: Remote::Group("lb".into()),
        ..tcp_in(None)
    };
    let web_from_lb6 = RuleSpec {
        family: Family::V6,
        ..web_from_lb.clone()
    };
    let specs = vec![
        group("web", vec![web_from_lb, web_from_lb6]),
        group("lb", vec![]),
    ];
    let mut members = Members::new();
    members.insert(
        "lb".into(),
        vec![ip("10.0.0.5"), ip("10.0.0.6"), ip("2001:db8::5")],
    );
    let fx = Fx::new(specs.clone(), members.clone());
    assert_eq!(fx.ing(&pkt("10.0.0.5", 6, 80)), Some(0));
    assert_eq!(fx.ing(&pkt("10.0.0.6", 6, 80)), Some(0));
    assert_eq!(fx.ing(&pkt("10.0.0.7", 6, 80)), None);
    assert_eq!(fx.ing(&pkt("10.0.0.5", 6, 81)), None);
    assert_eq!(fx.ing(&pkt("2001:db8::5", 6, 80)), Some(1));
    assert_eq!(fx.ing(&pkt("2001:db8::6", 6, 80)), None);

    // Membership changes: recompile with the new list.
    members.insert("lb".into(), vec![ip("10.0.0.7")]);
    let fx = Fx::new(specs.clone(), members);
    assert_eq!(fx.ing(&pkt("10.0.0.5", 6, 80)), None);
    assert_eq!(fx.ing(&pkt("10.0.0.7", 6, 80)), Some(0));
    assert_eq!(fx.ing(&pkt("2001:db8::5", 6, 80)), None);

    // A group absent from `members` has no members.
    let fx = Fx::new(specs, Members::new());
    assert_eq!(fx.ing(&pkt("10.0.0.5", 6, 80)), None);
    assert_eq!(fx.tuples.stats().entries, 0);
    assert_eq!(fx.fw.stats().scanned, 0);
}

#[test]
fn remote_group_can_be_self() {
    let specs = vec![group(
        "app",
        vec![RuleSpec {
            remote: Remote::Group("app".into()),
            ..rule(Direction::Ingress, Family::V4, Proto::Any)
        }],
    )];
    let members = Members::from([("app".to_string(), vec![ip("10.0.0.1"), ip("10.0.0.1")])]);
    let fx = Fx::new(specs, members);
    assert_eq!(fx.ing(&pkt("10.0.0.1", 17, 9)), Some(0));
    assert_eq!(fx.ing(&pkt("10.0.0.2", 17, 9)), None);
}

#[test]
fn icmp_type_and_code() {
    let icmp = |t: Option<u8>, c: Option<u8>| RuleSpec {
        icmp_type: t,
        icmp_code: c,
        ..rule(Direction::Ingress, Family::V4, Proto::Icmp)
    };
    let any = Fx::one(vec![icmp(None, None)]);
    let echo = Fx::one(vec![icmp(Some(8), None)]);
    let unreach_frag = Fx::one(vec![icmp(Some(3), Some(4))]);

    assert_eq!(any.ing(&icmp_pkt("10.0.0.1", 1, Some((8, 0)))), Some(0));
    assert_eq!(any.ing(&icmp_pkt("10.0.0.1", 1, Some((3, 4)))), Some(0));
    // No ICMP header parsed: only "any type" rules.
    assert_eq!(any.ing(&icmp_pkt("10.0.0.1", 1, None)), Some(0));
    assert_eq!(echo.ing(&icmp_pkt("10.0.0.1", 1, None)), None);
    assert_eq!(unreach_frag.ing(&icmp_pkt("10.0.0.1", 1, None)), None);

    assert_eq!(echo.ing(&icmp_pkt("10.0.0.1", 1, Some((8, 0)))), Some(0));
    assert_eq!(echo.ing(&icmp_pkt("10.0.0.1", 1, Some((8, 255)))), Some(0));
    assert_eq!(echo.ing(&icmp_pkt("10.0.0.1", 1, Some((0, 0)))), None);
    assert_eq!(echo.ing(&icmp_pkt("10.0.0.1", 1, Some((9, 8)))), None);

    assert_eq!(
        unreach_frag.ing(&icmp_pkt("10.0.0.1", 1, Some((3, 4)))),
        Some(0)
    );
    assert_eq!(
        unreach_frag.ing(&icmp_pkt("10.0.0.1", 1, Some((3, 3)))),
        None
    );
    assert_eq!(
        unreach_frag.ing(&icmp_pkt("10.0.0.1", 1, Some((4, 3)))),
        None
    );

    // Not ICMP: no, even with the same number in the port field.
    assert_eq!(echo.ing(&pkt("10.0.0.1", 6, 0x0800)), None);
    // ICMPv6 rules are IPv6 only and look at proto 58.
    let v6 = Fx::one(vec![RuleSpec {
        family: Family::V6,
        proto: Proto::Icmpv6,
        ..icmp(Some(128), Some(0))
    }]);
    assert_eq!(
        v6.ing(&icmp_pkt("2001:db8::1", 58, Some((128, 0)))),
        Some(0)
    );
    assert_eq!(v6.ing(&icmp_pkt("2001:db8::1", 58, Some((129, 0)))), None);
    assert_eq!(v6.ing(&icmp_pkt("2001:db8::1", 1, Some((128, 0)))), None);
    assert_eq!(v6.ing(&icmp_pkt("10.0.0.1", 58, Some((128, 0)))), None);
}

#[test]
fn proto_any_ignores_ports_and_icmp() {
    let fx = Fx::one(vec![rule(Direction::Ingress, Family::V4, Proto::Any)]);
    for p in [
        pkt("10.0.0.1", 6, 22),
        pkt("10.0.0.1", 17, 0),
        pkt("10.0.0.1", 47, 0),
        pkt("10.0.0.1", 0, 0),
        pkt("10.0.0.1", 255, 0),
        icmp_pkt("10.0.0.1", 1, Some((13, 0))),
        icmp_pkt("10.0.0.1", 1, None),
    ] {
        assert_eq!(fx.ing(&p), Some(0), "{p:?}");
    }
}

#[test]
fn directions_are_separate() {
    let fx = Fx::one(vec![
        rule(Direction::Egress, Family::V4, Proto::Any),
        tcp_in(Some((22, 22))),
    ]);
    let p = pkt("10.0.0.1", 17, 53);
    assert_eq!(
        fx.eval(&[0], Direction::Egress, &p).map(|r| r.rule),
        Some(0)
    );
    assert_eq!(fx.eval(&[0], Direction::Ingress, &p), None);
    let ssh = pkt("10.0.0.1", 6, 22);
    assert_eq!(
        fx.eval(&[0], Direction::Ingress, &ssh).map(|r| r.rule),
        Some(1)
    );
}

#[test]
fn first_match_by_group_position_then_rule_index() {
    let specs = vec![
        group("a", vec![tcp_in(Some((1, 1000))), tcp_in(Some((80, 80)))]),
        group(
            "b",
            vec![
                rule(Direction::Egress, Family::V4, Proto::Any),
                tcp_in(Some((80, 80))),
                tcp_in(None),
            ],
        ),
    ];
    let fx = Fx::new(specs, Members::new());
    let http = pkt("10.0.0.1", 6, 80);
    let r = |group, rule| Some(RuleRef { group, rule });
    // Lowest position in the port's list wins, not the lowest id.
    assert_eq!(fx.eval(&[0, 1], Direction::Ingress, &http), r(0, 0));
    assert_eq!(fx.eval(&[1, 0], Direction::Ingress, &http), r(1, 1));
    // Only group b has a match for port 2000.
    let p2000 = pkt("10.0.0.1", 6, 2000);
    assert_eq!(fx.eval(&[0, 1], Direction::Ingress, &p2000), r(1, 2));
    // Unknown ids and an empty list are skipped, not an error.
    assert_eq!(fx.eval(&[7, 0], Direction::Ingress, &http), r(0, 0));
    assert_eq!(fx.eval(&[], Direction::Ingress, &http), None);
    assert_eq!(fx.eval(&[u32::MAX], Direction::Ingress, &http), None);
}

#[test]
fn first_match_across_tuples() {
    // The lowest index must win even when it sits in a later-probed tuple.
    let cidr = |s: &str, ports| RuleSpec {
        remote: Remote::Cidr(net(s)),
        ..tcp_in(ports)
    };
    let fx = Fx::one(vec![
        cidr("10.0.0.0/8", Some((9000, 9000))),
        cidr("10.1.0.0/16", Some((80, 80))),
        cidr("10.1.2.3/32", Some((0, 65535))),
        cidr("10.1.2.0/24", Some((80, 81))),
        tcp_in(Some((80, 80))),
    ]);
    assert_eq!(fx.ing(&pkt("10.1.2.3", 6, 80)), Some(1));
    assert_eq!(fx.ing(&pkt("10.1.2.3", 6, 81)), Some(2));
    assert_eq!(fx.ing(&pkt("10.1.2.4", 6, 81)), Some(3));
    assert_eq!(fx.ing(&pkt("192.0.2.1", 6, 80)), Some(4));
    assert_eq!(fx.ing(&pkt("10.9.9.9", 6, 9000)), Some(0));
    assert_eq!(fx.ing(&pkt("192.0.2.1", 6, 9000)), None);
}

#[test]
fn hit_counters_and_carry_over() {
    let specs = vec![
        group("a", vec![tcp_in(Some((22, 22))), tcp_in(Some((80, 80)))]),
        group(
            "b",
            vec![tcp_in(Some((443, 443))), tcp_in(Some((443, 443)))],
        ),
    ];
    let fw = Firewall::compile(&specs, &Members::new()).unwrap();
    let r = |group, rule| RuleRef { group, rule };
    let ssh = pkt("10.0.0.1", 6, 22);
    let https = pkt("10.0.0.1", 6, 443);
    for _ in 0..3 {
        fw.evaluate(&[0, 1], Direction::Ingress, &ssh);
    }
    fw.evaluate(&[0, 1], Direction::Ingress, &https);
    fw.evaluate(&[0, 1], Direction::Ingress, &pkt("10.0.0.1", 6, 9)); // no match
    assert_eq!(fw.hits(r(0, 0)), 3);
    assert_eq!(fw.hits(r(0, 1)), 0);
    assert_eq!(fw.hits(r(1, 0)), 1);
    assert_eq!(fw.hits(r(1, 1)), 0);
    assert_eq!(fw.hits(r(1, 2)), 0);
    assert_eq!(fw.hits(r(9, 0)), 0);
    let all: Vec<_> = fw.rule_hits().collect();
    assert_eq!(
        all,
        vec![(r(0, 0), 3), (r(0, 1), 0), (r(1, 0), 1), (r(1, 1), 0)]
    );

    // Recompile: group b moves first, a's rules are reordered with one
    // changed, and b's duplicate keeps the first count for its first copy.
    let specs2 = vec![
        group(
            "b",
            vec![tcp_in(Some((443, 443))), tcp_in(Some((443, 443)))],
        ),
        group(
            "a",
            vec![tcp_in(Some((8080, 8080))), tcp_in(Some((22, 22)))],
        ),
    ];
    let fw2 = Firewall::compile_with_previous(&specs2, &Members::new(), Some(&fw)).unwrap();
    assert_eq!(fw2.hits(r(0, 0)), 1);
    assert_eq!(fw2.hits(r(0, 1)), 0);
    assert_eq!(fw2.hits(r(1, 0)), 0);
    assert_eq!(fw2.hits(r(1, 1)), 3);
    // A rule moved to another group is a new rule.
    let specs3 = vec![group("c", vec![tcp_in(Some((22, 22)))])];
    let fw3 = Firewall::compile_with_previous(&specs3, &Members::new(), Some(&fw2)).unwrap();
    assert_eq!(fw3.hits(r(0, 0)), 0);
    // Counting goes on from the carried value.
    fw2.evaluate(&[1], Direction::Ingress, &ssh);
    assert_eq!(fw2.hits(r(1, 1)), 4);
    assert_eq!(fw.hits(r(0, 0)), 3);
    // And plain compile starts at zero.
    let fresh = Firewall::compile(&specs2, &Members::new()).unwrap();
    assert!(fresh.rule_hits().all(|(_, n)| n == 0));
}

#[test]
fn names_rules_and_stats() {
    let specs = vec![group("a", vec![tcp_in(Some((1, 3)))]), group("b", vec![])];
    let fw = Firewall::compile(&specs, &Members::new()).unwrap();
    assert_eq!(fw.group_id("a"), Some(0));
    assert_eq!(fw.group_id("b"), Some(1));
    assert_eq!(fw.group_id("c"), None);
    assert_eq!(fw.group_name(1), Some("b"));
    assert_eq!(fw.group_name(2), None);
    assert_eq!(
        fw.rule(RuleRef { group: 0, rule: 0 }),
        Some(&tcp_in(Some((1, 3))))
    );
    assert_eq!(fw.rule(RuleRef { group: 0, rule: 1 }), None);
    assert_eq!(fw.groups(), &specs[..]);
    // One rule: scanned by default.
    let s = fw.stats();
    assert_eq!(
        (s.groups, s.rules, s.tuples, s.scanned, s.entries),
        (2, 1, 0, 1, 0)
    );
    // As tuples, 1-3 is the blocks 1/16 and 2/15: two shapes.
    let fw = Firewall::compile_with(&specs, &Members::new(), None, &TUPLES).unwrap();
    let s = fw.stats();
    assert_eq!((s.tuples, s.max_tuples, s.scanned, s.entries), (2, 2, 0, 2));
    assert!(format!("{fw:?}").contains("entries: 2"));

    let empty = Firewall::default();
    assert_eq!(
        empty.evaluate(&[0], Direction::Ingress, &pkt("10.0.0.1", 6, 1)),
        None
    );
    assert_eq!(empty.rule_hits().count(), 0);
}

#[test]
fn tuples_do_not_grow_with_rules() {
    // 5,000 /32 single-port rules: one shape.
    let rules = (0..5000u32)
        .map(|i| RuleSpec {
            remote: Remote::Cidr(IpNet::from(IpAddr::from([10, 0, (i >> 8) as u8, i as u8]))),
            ..tcp_in(Some((1000 + i as u16, 1000 + i as u16)))
        })
        .collect();
    let fx = Fx::one(rules);
    assert_eq!(fx.fw.stats().max_tuples, 1);
    assert_eq!(fx.fw.stats().scanned, 0);
    assert_eq!(fx.ing(&pkt("10.0.19.135", 6, 1000 + 5000 - 1)), Some(4999));
    assert_eq!(fx.ing(&pkt("10.0.19.135", 6, 1000)), None);
}

#[test]
fn scan_threshold() {
    let opts = CompileOptions {
        scan_max: 3,
        scan_per_tuple: usize::MAX,
    };
    let compile = |specs: &[GroupSpec], m: &Members| {
        Firewall::compile_with(specs, m, None, &opts)
            .unwrap()
            .stats()
    };
    let g = |n| vec![group("g", vec![tcp_in(Some((80, 80))); n])];
    assert_eq!(compile(&g(3), &Members::new()).scanned, 3);
    assert_eq!(compile(&g(3), &Members::new()).tuples, 0);
    assert_eq!(compile(&g(4), &Members::new()).scanned, 0);
    assert_eq!(compile(&g(4), &Members::new()).tuples, 1);
    // Per (direction, family) table, not per group.
    let mut mixed = g(3);
    mixed[0]
        .rules
        .push(rule(Direction::Egress, Family::V4, Proto::Any));
    assert_eq!(compile(&mixed, &Members::new()).scanned, 4);
    // A remote-group rule counts once per member of its family.
    let specs = vec![group(
        "g",
        vec![RuleSpec {
            remote: Remote::Group("g".into()),
            ..tcp_in(None)
        }],
    )];
    let m = |n: u8| {
        let mut v: Vec<IpAddr> = (0..n).map(|i| IpAddr::from([10, 0, 0, i])).collect();
        v.push(ip("2001:db8::1"));
        Members::from([("g".to_string(), v)])
    };
    assert_eq!(compile(&specs, &m(3)).scanned, 3);
    assert_eq!(compile(&specs, &m(4)).scanned, 0);
    let fx = Fx::new(specs, m(4));
    assert_eq!(fx.ing(&pkt("10.0.0.3", 6, 1)), Some(0));
    assert_eq!(fx.ing(&pkt("10.0.0.4", 6, 1)), None);
}

#[test]
fn scan_cost_model() {
    // Defaults: scan while predicates <= 6 per tuple.
    let d = |specs: &[GroupSpec]| Firewall::compile(specs, &Members::new()).unwrap().stats();
    let same = |n| vec![group("g", vec![tcp_in(Some((80, 80))); n])];
    assert_eq!(d(&same(6)).scanned, 6);
    // Seven rules of one shape: one probe beats seven tests.
    assert_eq!(d(&same(7)).scanned, 0);
    assert_eq!(d(&same(7)).tuples, 1);
    // Ranges spread few rules over many shapes: scanned.
    let ranges: Vec<RuleSpec> = (0..40u16)
        .map(|i| tcp_in(Some((1000 + i * 7, 1000 + i * 13))))
        .collect();
    let s = d(&[group("g", ranges.clone())]);
    assert_eq!((s.scanned, s.tuples), (40, 0));
    // But never more than `scan_max`.
    let many: Vec<RuleSpec> = ranges.iter().cycle().take(200).cloned().collect();
    let s = d(&[group("g", many)]);
    assert_eq!(s.scanned, 0);
    assert!(s.tuples > 0);
}

#[test]
fn firewall_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Firewall>();
}

fn err(specs: Vec<GroupSpec>) -> CompileError {
    Firewall::compile(&specs, &Members::new()).unwrap_err()
}

#[test]
fn compile_errors() {
    let g1 = |r: RuleSpec| vec![group("web", vec![tcp_in(None), r])];
    let name = || "web".to_string();

    let e = err(vec![group("web", vec![]), group("web", vec![])]);
    assert_eq!(e, CompileError::DuplicateGroup { group: name() });
    assert!(e.to_string().contains("\"web\" is defined twice"));

    let e = err(g1(RuleSpec {
        icmp_code: Some(4),
        ..rule(Direction::Ingress, Family::V4, Proto::Icmp)
    }));
    assert_eq!(
        e,
        CompileError::IcmpCodeWithoutType {
            group: name(),
            rule: 2
        }
    );
    assert!(
        e.to_string()
            .contains("rule 2: icmp_code needs an icmp_type"),
        "{e}"
    );

    let e = err(g1(RuleSpec {
        ports: Some((1, 2)),
        ..rule(Direction::Ingress, Family::V4, Proto::Icmp)
    }));
    assert_eq!(
        e,
        CompileError::PortsNeedTcpUdp {
            group: name(),
            rule: 2,
            proto: Proto::Icmp
        }
    );
    let e = err(g1(RuleSpec {
        ports: Some((1, 2)),
        ..rule(Direction::Ingress, Family::V4, Proto::Any)
    }));
    assert!(
        e.to_string()
            .contains("ports need proto tcp or udp, not any"),
        "{e}"
    );

    let e = err(g1(RuleSpec {
        icmp_type: Some(8),
        ..tcp_in(None)
    }));
    assert_eq!(
        e,
        CompileError::IcmpFieldsNeedIcmp {
            group: name(),
            rule: 2,
            proto: Proto::Tcp
        }
    );
    let e = err(g1(RuleSpec {
        icmp_code: Some(0),
        ..rule(Direction::Ingress, Family::V4, Proto::Udp)
    }));
    assert!(matches!(
        e,
        CompileError::IcmpFieldsNeedIcmp {
            proto: Proto::Udp,
            ..
        }
    ));

    let e = err(g1(tcp_in(Some((2000, 1000)))));
    assert_eq!(
        e,
        CompileError::InvertedPortRange {
            group: name(),
            rule: 2,
            lo: 2000,
            hi: 1000
        }
    );
    assert!(e.to_string().contains("write 1000-2000"), "{e}");

    let e = err(g1(rule(Direction::Ingress, Family::V6, Proto::Icmp)));
    assert_eq!(
        e,
        CompileError::ProtoFamily {
            group: name(),
            rule: 2,
            proto: Proto::Icmp,
            family: Family::V6
        }
    );
    let e = err(g1(rule(Direction::Egress, Family::V4, Proto::Icmpv6)));
    assert!(matches!(
        e,
        CompileError::ProtoFamily {
            proto: Proto::Icmpv6,
            ..
        }
    ));

    let e = err(g1(RuleSpec {
        remote: Remote::Cidr(net("2001:db8::/32")),
        ..tcp_in(None)
    }));
    assert_eq!(
        e,
        CompileError::CidrFamily {
            group: name(),
            rule: 2,
            cidr: net("2001:db8::/32"),
            family: Family::V4
        }
    );
    assert!(e.to_string().contains("not an ipv4 prefix"), "{e}");

    let e = err(g1(RuleSpec {
        remote: Remote::Group("db".into()),
        ..tcp_in(None)
    }));
    assert_eq!(
        e,
        CompileError::UnknownRemoteGroup {
            group: name(),
            rule: 2,
            remote: "db".into()
        }
    );
    assert!(e.to_string().contains("remote group \"db\""), "{e}");
}

#[test]
fn compile_error_caps() {
    // Rules: the first rule past the cap is named.
    let many = vec![tcp_in(None); MAX_RULES / 2];
    let e = err(vec![
        group("a", many.clone()),
        group("b", many),
        group("c", vec![tcp_in(None); 3]),
    ]);
    assert_eq!(
        e,
        CompileError::TooManyRules {
            group: "c".into(),
            rule: 1,
            limit: MAX_RULES
        }
    );

    let e = err((0..=MAX_GROUPS)
        .map(|i| group(&i.to_string(), vec![]))
        .collect());
    assert_eq!(
        e,
        CompileError::TooManyGroups {
            count: MAX_GROUPS + 1,
            limit: MAX_GROUPS
        }
    );

    // Members: counted per referenced group.
    let specs = vec![group(
        "g",
        vec![RuleSpec {
            remote: Remote::Group("g".into()),
            ..tcp_in(None)
        }],
    )];
    let big = Members::from([("g".to_string(), vec![ip("10.0.0.1"); MAX_MEMBERS + 1])]);
    let e = Firewall::compile(&specs, &big).unwrap_err();
    assert_eq!(
        e,
        CompileError::TooManyMembers {
            group: "g".into(),
            rule: 1,
            remote: "g".into(),
            count: MAX_MEMBERS + 1,
            limit: MAX_MEMBERS
        }
    );

    // Entries: members x port blocks. 1-65534 is 30 blocks; 2 rules of
    // 40,000 members each are 2.4M entries.
    let members: Vec<IpAddr> = (0..40_000u32)
        .map(|i| IpAddr::from((0x0a00_0000 + i).to_be_bytes()))
        .collect();
    let wide = RuleSpec {
        remote: Remote::Group("g".into()),
        ..tcp_in(Some((1, 65534)))
    };
    let specs = vec![group("g", vec![wide.clone(), wide])];
    let m = Members::from([("g".to_string(), members)]);
    let e = Firewall::compile(&specs, &m).unwrap_err();
    assert_eq!(
        e,
        CompileError::TooManyEntries {
            group: "g".into(),
            rule: 2,
            limit: MAX_ENTRIES
        }
    );
    assert!(e.to_string().contains("rule 2"), "{e}");
}

mod from_flow {
    use super::*;
    use etherparse::PacketBuilder;
    use packet::FlowKey;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn both(f: &[u8]) -> (Option<Packet>, Option<Packet>) {
        let k = FlowKey::parse(f).unwrap();
        (
            Packet::from_flow(&k, Direction::Ingress),
            Packet::from_flow(&k, Direction::Egress),
        )
    }

    #[test]
    fn tcp_v4() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 443, 1, 1000)
            .syn()
            .write(&mut f, &[])
            .unwrap();
        let (i, e) = both(&f);
        let want = Packet {
            family: Family::V4,
            proto: 6,
            remote: ip("10.0.0.1"),
            dst_port: 443,
            icmp: None,
        };
        assert_eq!(i, Some(want));
        assert_eq!(
            e,
            Some(Packet {
                remote: ip("10.0.0.2"),
                ..want
            })
        );
    }

    #[test]
    fn udp_v6() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .ipv6(ip6("2001:db8::1"), ip6("2001:db8::2"), 64)
            .udp(5353, 53)
            .write(&mut f, &[0; 4])
            .unwrap();
        let (i, e) = both(&f);
        let i = i.unwrap();
        assert_eq!(
            (i.family, i.proto, i.dst_port, i.icmp),
            (Family::V6, 17, 53, None)
        );
        assert_eq!(i.remote, ip("2001:db8::1"));
        assert_eq!(e.unwrap().remote, ip("2001:db8::2"));
    }

    fn ip6(s: &str) -> [u8; 16] {
        s.parse::<std::net::Ipv6Addr>().unwrap().octets()
    }

    #[test]
    fn icmpv4_echo() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .ipv4([192, 0, 2, 1], [10, 0, 0, 2], 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut f, &[0; 8])
            .unwrap();
        let (i, _) = both(&f);
        let i = i.unwrap();
        assert_eq!(
            (i.family, i.proto, i.dst_port, i.icmp),
            (Family::V4, 1, 0, Some((8, 0)))
        );
        assert_eq!(i.remote, ip("192.0.2.1"));
    }

    #[test]
    fn icmpv6_echo() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .ipv6(ip6("2001:db8::1"), ip6("2001:db8::2"), 64)
            .icmpv6_echo_request(7, 1)
            .write(&mut f, &[0; 8])
            .unwrap();
        let (_, e) = both(&f);
        let e = e.unwrap();
        assert_eq!(
            (e.family, e.proto, e.icmp),
            (Family::V6, 58, Some((128, 0)))
        );
        assert_eq!(e.remote, ip("2001:db8::2"));
    }

    #[test]
    fn arp_is_not_judged() {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&A);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&A);
        f.extend_from_slice(&[10, 0, 0, 1]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[10, 0, 0, 2]);
        let k = FlowKey::parse(&f).unwrap();
        assert!(matches!(k.l3, packet::L3::Arp(_)));
        assert_eq!(both(&f), (None, None));
    }

    #[test]
    fn vlan_tagged_v4() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .single_vlan(100.try_into().unwrap())
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 4789)
            .write(&mut f, &[0; 8])
            .unwrap();
        let k = FlowKey::parse(&f).unwrap();
        assert_eq!(k.vlan, Some(100));
        let (i, _) = both(&f);
        let i = i.unwrap();
        assert_eq!((i.proto, i.dst_port, i.remote), (17, 4789, ip("10.0.0.1")));
    }

    #[test]
    fn broken_l4_keeps_ip_fields() {
        // A TCP header cut to 10 bytes: L4 is None, the IP view remains.
        let mut f = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(1, 80, 1, 1000)
            .write(&mut f, &[])
            .unwrap();
        let ip_start = 14;
        f.truncate(ip_start + 20 + 10);
        f[ip_start + 2..ip_start + 4].copy_from_slice(&30u16.to_be_bytes());
        let k = FlowKey::parse(&f).unwrap();
        assert!(k.malformed.is_some());
        let (i, _) = both(&f);
        let i = i.unwrap();
        assert_eq!((i.proto, i.dst_port, i.icmp), (6, 0, None));
    }

    #[test]
    fn non_ip_ethertype() {
        let mut f = vec![0u8; 60];
        f[12] = 0x88;
        f[13] = 0xcc; // LLDP
        assert_eq!(both(&f), (None, None));
    }
}
