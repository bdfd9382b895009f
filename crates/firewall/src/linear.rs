//! The reference evaluator: the policy read straight off the specs, one
//! rule at a time. Deliberately naive (no precomputation, member lists
//! searched linearly) so that it is obviously the definition; the tuple
//! classifier is tested against it and benchmarked next to it.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::{Direction, GroupId, GroupSpec, Packet, Proto, Remote, RuleRef, RuleSpec};
use crate::{ICMP, ICMPV6, TCP, UDP};

/// The first rule (lowest position in `groups`, then lowest rule index) of
/// `specs[g]` for `g` in `groups` that allows `pkt` in `dir`, evaluated rule
/// by rule: O(rules x members) per packet. Same answer as
/// [`Firewall::evaluate`](crate::Firewall::evaluate) on the compiled specs,
/// without validation (a remote group missing from `members` has no
/// members) and without counting hits. Ids that index no spec are skipped.
pub fn evaluate_linear(
    specs: &[GroupSpec],
    members: &HashMap<String, Vec<IpAddr>>,
    groups: &[GroupId],
    dir: Direction,
    pkt: &Packet,
) -> Option<RuleRef> {
    if crate::Family::of(&pkt.remote) != pkt.family {
        return None;
    }
    for &g in groups {
        let Some(spec) = specs.get(g as usize) else {
            continue;
        };
        for (i, r) in spec.rules.iter().enumerate() {
            if r.direction == dir && matches(r, members, pkt) {
                return Some(RuleRef {
                    group: g,
                    rule: u32::try_from(i).ok()?,
                });
            }
        }
    }
    None
}

fn matches(r: &RuleSpec, members: &HashMap<String, Vec<IpAddr>>, pkt: &Packet) -> bool {
    if r.family != pkt.family {
        return false;
    }
    let in_range = |p: u16| r.ports.is_none_or(|(lo, hi)| lo <= p && p <= hi);
    let icmp_ok = || match (r.icmp_type, pkt.icmp) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(t), Some((ty, code))) => t == ty && r.icmp_code.is_none_or(|c| c == code),
    };
    let proto = match r.proto {
        Proto::Any => true,
        Proto::Tcp => pkt.proto == TCP && in_range(pkt.dst_port),
        Proto::Udp => pkt.proto == UDP && in_range(pkt.dst_port),
        Proto::Icmp => pkt.proto == ICMP && icmp_ok(),
        Proto::Icmpv6 => pkt.proto == ICMPV6 && icmp_ok(),
    };
    proto
        && match &r.remote {
            Remote::Any => true,
            Remote::Cidr(net) => net.contains(&pkt.remote),
            Remote::Group(name) => members.get(name).is_some_and(|m| m.contains(&pkt.remote)),
        }
}
