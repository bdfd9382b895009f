//! Security groups as a pipeline stage: stateful allow-lists per port.
//!
//! Each filtered port has its own conntrack zone in the switch's security
//! group table (as OVN gives every logical port a zone), so a connection
//! is judged twice, independently: by the source port's egress rules when
//! it leaves the source VM (on the source's host) and by the destination
//! port's ingress rules when it is delivered (on the destination's host,
//! after VXLAN, routing and NAT). A connection's first packet is evaluated
//! against the port's groups (`firewall` crate) and committed only when a
//! rule allows it; later packets of either direction and related ICMP
//! errors match the entry and skip the rules. Non-IP frames, neighbour
//! discovery and later IP fragments are untracked and pass (port security
//! already bound their addresses). Frames the switch itself makes (DHCP,
//! ARP and DNS answers, ICMP errors from the router) are not judged.

use std::sync::Arc;

use conntrack::{Conntrack, Track};
use firewall::{Direction, Firewall, GroupId, Packet, RuleRef};
use packet::FlowKey;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::DropReason;
use crate::clock::Timestamp;
use crate::fdb::PortId;

/// What the security-group table keeps per connection: the rule that
/// allowed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SgConn {
    /// The allowing rule.
    pub rule: RuleRef,
    /// The direction it was allowed in.
    pub dir: Direction,
}

/// The switch's security-group connection table (all filtered ports; one
/// zone per port).
pub type SgTable = Arc<Mutex<Conntrack<SgConn>>>;

/// A filtered port's policy.
#[derive(Debug)]
pub struct PortSg {
    /// The tenant's compiled groups (with hit counters).
    pub fw: Arc<Firewall>,
    /// The port's groups in `fw`.
    pub groups: Vec<GroupId>,
    /// The port's conntrack zone.
    pub zone: u32,
    /// Most tracked connections of the port.
    pub max_connections: usize,
    /// The table.
    pub table: SgTable,
}

/// The conntrack zone of port `id` in the security-group table.
pub fn zone_of(id: PortId) -> u32 {
    id.wrapping_add(1)
}

impl PortSg {
    /// Judges the frame `key` (parsed from `frame`) crossing port `port` in
    /// `dir`: `Ok` to let it pass, or the drop reason.
    pub fn admit(
        &self,
        port: PortId,
        dir: Direction,
        key: &FlowKey,
        frame: &[u8],
        now: Timestamp,
    ) -> Result<(), DropReason> {
        let mut ct = self.table.lock();
        match ct.track(self.zone, port, key, frame, now.0) {
            Track::Established { .. } | Track::Related { .. } | Track::Untracked(_) => Ok(()),
            Track::Invalid(_) => Err(DropReason::ConnInvalid),
            Track::Refused(_) => Err(DropReason::ConnLimit),
            Track::New(new) => {
                let Some(pkt) = Packet::from_flow(key, dir) else {
                    return Ok(());
                };
                let Some(rule) = self.fw.evaluate(&self.groups, dir, &pkt) else {
                    return Err(match dir {
                        Direction::Egress => DropReason::SgEgressDenied,
                        Direction::Ingress => DropReason::SgIngressDenied,
                    });
                };
                if ct.port_count(port) >= self.max_connections {
                    return Err(DropReason::ConnLimit);
                }
                match ct.commit(&new, now.0, SgConn { rule, dir }) {
                    Ok(_) | Err(conntrack::CommitError::Exists(_)) => Ok(()),
                    Err(conntrack::CommitError::Limit(_)) => Err(DropReason::ConnLimit),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use firewall::{Family, GroupSpec, Proto, Remote, RuleSpec};

    fn tcp(
        src: std::net::Ipv4Addr,
        dst: std::net::Ipv4Addr,
        sp: u16,
        dp: u16,
        flags: u8,
    ) -> Vec<u8> {
        let mut f = Vec::new();
        let b = etherparse::PacketBuilder::ethernet2(A.0, B.0)
            .ipv4(src.octets(), dst.octets(), 64)
            .tcp(sp, dp, 1000, 64000);
        let b = if flags & 0x02 != 0 { b.syn() } else { b };
        let b = if flags & 0x10 != 0 { b.ack(1001) } else { b };
        b.write(&mut f, &[]).unwrap();
        f
    }

    fn sg(table: &SgTable, zone: u32, groups: &[GroupSpec], names: &[&str]) -> PortSg {
        let fw = Firewall::compile(groups, &Default::default()).unwrap();
        let groups = names.iter().map(|n| fw.group_id(n).unwrap()).collect();
        PortSg {
            fw: Arc::new(fw),
            groups,
            zone,
            max_connections: 2,
            table: table.clone(),
        }
    }

    fn rule(direction: Direction, proto: Proto, ports: Option<(u16, u16)>) -> RuleSpec {
        RuleSpec {
            direction,
            family: Family::V4,
            proto,
            ports,
            icmp_type: None,
            icmp_code: None,
            remote: Remote::Any,
        }
    }

    #[test]
    fn stateful_per_port_zones_and_limits() {
        let table: SgTable = Arc::new(Mutex::new(
            Conntrack::new(conntrack::Config::default()).unwrap(),
        ));
        let web = GroupSpec {
            name: "web".into(),
            rules: vec![
                rule(Direction::Ingress, Proto::Tcp, Some((80, 80))),
                rule(Direction::Egress, Proto::Any, None),
            ],
        };
        let client = GroupSpec {
            name: "client".into(),
            rules: vec![rule(Direction::Egress, Proto::Any, None)],
        };
        let groups = [web, client];
        let (a, b) = (
            sg(&table, 1, &groups, &["client"]),
            sg(&table, 2, &groups, &["web"]),
        );
        let now = Timestamp(1);
        let syn = tcp(IP_A, IP_B, 40000, 80, 0x02);
        let k = key(&syn);
        // A's egress allows it; B's ingress allows port 80.
        assert_eq!(a.admit(1, Direction::Egress, &k, &syn, now), Ok(()));
        assert_eq!(b.admit(2, Direction::Ingress, &k, &syn, now), Ok(()));
        // The reply passes both without an ingress rule on A.
        let synack = tcp(IP_B, IP_A, 80, 40000, 0x12);
        let k2 = key(&synack);
        assert_eq!(b.admit(2, Direction::Egress, &k2, &synack, now), Ok(()));
        assert_eq!(a.admit(1, Direction::Ingress, &k2, &synack, now), Ok(()));
        // Port 22 is not allowed into B; nothing is committed for it.
        let ssh = tcp(IP_A, IP_B, 40001, 22, 0x02);
        let k3 = key(&ssh);
        assert_eq!(a.admit(1, Direction::Egress, &k3, &ssh, now), Ok(()));
        assert_eq!(
            b.admit(2, Direction::Ingress, &k3, &ssh, now),
            Err(DropReason::SgIngressDenied)
        );
        // A mid-stream segment nobody tracked is invalid.
        let ack = tcp(IP_A, IP_B, 40002, 80, 0x10);
        assert_eq!(
            a.admit(1, Direction::Egress, &key(&ack), &ack, now),
            Err(DropReason::ConnInvalid)
        );
        // A's limit is 2: the third new connection is refused.
        let third = tcp(IP_A, IP_B, 40003, 80, 0x02);
        assert_eq!(
            a.admit(1, Direction::Egress, &key(&third), &third, now),
            Err(DropReason::ConnLimit)
        );
        // ARP is not judged.
        let arp_f = arp(A, 1, A, IP_A, IP_B);
        assert_eq!(
            b.admit(2, Direction::Ingress, &key(&arp_f), &arp_f, now),
            Ok(())
        );
        // Hits: B's port-80 rule once (the SYN; the reply skipped the
        // rules); A's egress rule for each new connection it allowed.
        let hits = |s: &PortSg| s.fw.rule_hits().map(|(_, h)| h).sum::<u64>();
        assert_eq!(hits(&b), 1);
        assert!(hits(&a) >= 2);
    }
}
