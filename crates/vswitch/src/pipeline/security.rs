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
use crate::trace;

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
        if trace::active() {
            return self.admit_traced(port, dir, key, frame, now);
        }
        self.admit_inner(port, dir, key, frame, now)
    }

    fn admit_inner(
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
                    return Err(denied(dir));
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

    /// [`PortSg::admit`] under a packet trace: says which connection or
    /// rule decided; a dry run only looks the table up and classifies
    /// (no state advanced, nothing committed, no hit counted).
    #[cold]
    fn admit_traced(
        &self,
        port: PortId,
        dir: Direction,
        key: &FlowKey,
        frame: &[u8],
        now: Timestamp,
    ) -> Result<(), DropReason> {
        let way = match dir {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        };
        let known = {
            let ct = self.table.lock();
            let ext = ct
                .lookup_flow(self.zone, key, now.0)
                .and_then(|(id, _)| ct.get(id, now.0).map(|e| *e.ext));
            ext
        };
        if let Some(c) = known {
            trace::note("sg", || {
                format!(
                    "security groups {way}: tracked connection, allowed when it began by {}",
                    self.rule_name(c.rule)
                )
            });
            return if trace::dry_run() {
                Ok(())
            } else {
                self.admit_inner(port, dir, key, frame, now)
            };
        }
        let pkt = Packet::from_flow(key, dir);
        let first = match Conntrack::<SgConn>::first_packet(self.zone, key, frame) {
            Some(Track::Untracked(u)) => Some(Ok(u)),
            Some(Track::Invalid(i)) => Some(Err(i)),
            _ => None,
        };
        let matched = pkt.and_then(|p| self.fw.classify(&self.groups, dir, &p));
        let verdict = if trace::dry_run() {
            match (first, pkt, matched) {
                (Some(Ok(_)), ..) | (_, None, _) => Ok(()),
                (Some(Err(_)), ..) => Err(DropReason::ConnInvalid),
                (_, Some(_), None) => Err(denied(dir)),
                (_, Some(_), Some(_)) => Ok(()),
            }
        } else {
            self.admit_inner(port, dir, key, frame, now)
        };
        trace::note("sg", || match (first, pkt, matched, verdict) {
            (Some(Ok(u)), ..) => {
                format!("security groups {way}: not tracked ({u:?}), passes")
            }
            (_, None, ..) => format!("security groups {way}: not judged (not an IP flow), passes"),
            (Some(Err(i)), ..) => format!(
                "security groups {way}: no tracked connection and it cannot start one ({i:?})"
            ),
            (_, _, Some(r), Ok(())) => format!(
                "security groups {way}: new connection, {} allows",
                self.rule_name(r)
            ),
            (_, _, Some(r), Err(e)) => format!(
                "security groups {way}: {} allows, but {}",
                self.rule_name(r),
                e.as_str()
            ),
            (_, _, None, _) => format!(
                "security groups {way}: no rule of {} allows it",
                self.group_names()
            ),
        });
        verdict
    }

    /// `group web rule 2 (ingress ipv4 tcp 80 from any)`.
    fn rule_name(&self, r: RuleRef) -> String {
        let g = self.fw.group_name(r.group).unwrap_or("?");
        match self.fw.rule(r) {
            Some(spec) => format!("group {g} rule {} ({spec})", r.rule + 1),
            None => format!("group {g} rule {}", r.rule + 1),
        }
    }

    /// The port's groups, `web, ssh`.
    fn group_names(&self) -> String {
        let names: Vec<&str> = self
            .groups
            .iter()
            .filter_map(|&g| self.fw.group_name(g))
            .collect();
        if names.is_empty() {
            "its groups (none)".into()
        } else {
            format!("groups {}", names.join(", "))
        }
    }
}

fn denied(dir: Direction) -> DropReason {
    match dir {
        Direction::Egress => DropReason::SgEgressDenied,
        Direction::Ingress => DropReason::SgIngressDenied,
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
