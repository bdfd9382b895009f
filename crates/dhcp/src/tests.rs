//! The RFC 2131 message matrix against a test-owned clock. Client messages
//! are built, and replies decoded, with `dhcproto` (an independent codec).

#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;

use dhcproto::v4 as d;
use dhcproto::{Decodable, Encodable};
use proptest::prelude::*;

use crate::*;

const S: u64 = 1_000_000_000;
const T0: u64 = 1_000 * S;
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const RES_MAC: Mac = [2, 0, 0, 0, 0, 0xaa];
const RES_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, last)
}

fn mac(n: u8) -> Mac {
    [2, 0, 0, 0, 0, n]
}

fn cfg_pool(first: u8, last: u8) -> ServerConfig {
    let mut c = ServerConfig::new("net1", "10.0.0.0/24".parse().unwrap(), SERVER);
    c.dns_servers = vec![ip(1), ip(2)];
    c.domain_name = Some("example.test".into());
    c.mtu = Some(1450);
    c.pools = vec![IpRange {
        start: ip(first),
        end: ip(last),
    }];
    c.reservations = vec![Reservation {
        mac: RES_MAC,
        ip: RES_IP,
        hostname: Some("db".into()),
        lease_time: Some(7200),
    }];
    c
}

fn server() -> Server {
    Server::new(cfg_pool(10, 19)).unwrap()
}

/// A client message builder.
#[derive(Debug, Clone)]
struct C {
    mac: Mac,
    ty: d::MessageType,
    ciaddr: Ipv4Addr,
    broadcast: bool,
    requested: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
    client_id: Option<Vec<u8>>,
    prl: Option<Vec<d::OptionCode>>,
    max_size: Option<u16>,
}

impl C {
    fn new(mac: Mac, ty: d::MessageType) -> Self {
        C {
            mac,
            ty,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            broadcast: false,
            requested: None,
            server_id: None,
            client_id: None,
            prl: None,
            max_size: None,
        }
    }
    fn discover(mac: Mac) -> Self {
        Self::new(mac, d::MessageType::Discover)
    }
    fn select(mac: Mac, ip: Ipv4Addr) -> Self {
        C {
            requested: Some(ip),
            server_id: Some(SERVER),
            ..Self::new(mac, d::MessageType::Request)
        }
    }
    fn bytes(&self) -> Vec<u8> {
        let mut m = d::Message::new_with_id(
            0x1234_5678,
            self.ciaddr,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &self.mac,
        );
        if self.broadcast {
            m.set_flags(d::Flags::default().set_broadcast());
        }
        let o = m.opts_mut();
        o.insert(d::DhcpOption::MessageType(self.ty));
        if let Some(r) = self.requested {
            o.insert(d::DhcpOption::RequestedIpAddress(r));
        }
        if let Some(s) = self.server_id {
            o.insert(d::DhcpOption::ServerIdentifier(s));
        }
        if let Some(id) = &self.client_id {
            o.insert(d::DhcpOption::ClientIdentifier(id.clone()));
        }
        if let Some(p) = &self.prl {
            o.insert(d::DhcpOption::ParameterRequestList(p.clone()));
        }
        if let Some(s) = self.max_size {
            o.insert(d::DhcpOption::MaxMessageSize(s));
        }
        m.to_vec().unwrap()
    }
    fn send(&self, srv: &mut Server, now: u64) -> Outcome {
        srv.handle(now, self.mac, &self.bytes())
    }
}

fn reply(o: &Outcome) -> d::Message {
    let r = o.reply.as_ref().expect("a reply");
    assert!(r.bytes.len() >= 300);
    d::Message::from_bytes(&r.bytes).expect("dhcproto decodes our reply")
}

fn kind(m: &d::Message) -> d::MessageType {
    match m.opts().get(d::OptionCode::MessageType) {
        Some(d::DhcpOption::MessageType(t)) => *t,
        other => panic!("no message type: {other:?}"),
    }
}

fn has(m: &d::Message, c: d::OptionCode) -> bool {
    m.opts().get(c).is_some()
}

fn lease_time(m: &d::Message) -> Option<u32> {
    match m.opts().get(d::OptionCode::AddressLeaseTime) {
        Some(d::DhcpOption::AddressLeaseTime(t)) => Some(*t),
        _ => None,
    }
}

/// DISCOVER + REQUEST; returns the bound address.
fn bind(srv: &mut Server, now: u64, mac: Mac) -> Ipv4Addr {
    let o = C::discover(mac).send(srv, now);
    let offered = reply(&o).yiaddr();
    let o = C::select(mac, offered).send(srv, now);
    assert_eq!(kind(&reply(&o)), d::MessageType::Ack, "{o:?}");
    srv.check_invariants();
    offered
}

fn release(srv: &mut Server, now: u64, mac: Mac, addr: Ipv4Addr) -> Outcome {
    C {
        ciaddr: addr,
        server_id: Some(SERVER),
        ..C::new(mac, d::MessageType::Release)
    }
    .send(srv, now)
}

// ---- DISCOVER / OFFER --------------------------------------------------

#[test]
fn discover_offers_pool_address_with_options() {
    let mut srv = server();
    let o = C::discover(mac(1)).send(&mut srv, T0);
    assert!(o.drop.is_none());
    assert!(o.changes.is_empty(), "offers are not durable");
    let r = reply(&o);
    assert_eq!(kind(&r), d::MessageType::Offer);
    assert_eq!(r.opcode(), d::Opcode::BootReply);
    assert_eq!(r.xid(), 0x1234_5678);
    assert_eq!(r.yiaddr(), ip(10));
    assert_eq!(r.ciaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(&r.chaddr()[..6], &mac(1));
    assert_eq!(lease_time(&r), Some(3600));
    let o2 = r.opts();
    assert_eq!(
        o2.get(d::OptionCode::ServerIdentifier),
        Some(&d::DhcpOption::ServerIdentifier(SERVER))
    );
    assert_eq!(
        o2.get(d::OptionCode::SubnetMask),
        Some(&d::DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
    );
    assert_eq!(
        o2.get(d::OptionCode::Router),
        Some(&d::DhcpOption::Router(vec![SERVER]))
    );
    assert_eq!(
        o2.get(d::OptionCode::DomainNameServer),
        Some(&d::DhcpOption::DomainNameServer(vec![ip(1), ip(2)]))
    );
    assert_eq!(
        o2.get(d::OptionCode::InterfaceMtu),
        Some(&d::DhcpOption::InterfaceMtu(1450))
    );
    assert_eq!(
        o2.get(d::OptionCode::BroadcastAddr),
        Some(&d::DhcpOption::BroadcastAddr(ip(255)))
    );
    assert_eq!(
        o2.get(d::OptionCode::Renewal),
        Some(&d::DhcpOption::Renewal(1800))
    );
    assert_eq!(
        o2.get(d::OptionCode::Rebinding),
        Some(&d::DhcpOption::Rebinding(3150))
    );
    assert!(
        !has(&r, d::OptionCode::ClasslessStaticRoute),
        "no routes set"
    );
    // No broadcast flag, no ciaddr: unicast to yiaddr + chaddr.
    let to = o.reply.as_ref().unwrap().to;
    assert_eq!(
        to,
        ReplyTo {
            ip: ip(10),
            mac: mac(1),
            broadcast: false
        }
    );
    assert_eq!(srv.counters().discover, 1);
    assert_eq!(srv.counters().offer, 1);
    let v = srv.leases(T0);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].state, LeaseState::Offered);
    assert_eq!(v[0].expires_at, T0 + 60 * S);
    srv.check_invariants();
}

#[test]
fn repeated_discover_gets_the_same_offer() {
    let mut srv = server();
    let a = reply(&C::discover(mac(1)).send(&mut srv, T0)).yiaddr();
    let b = reply(&C::discover(mac(1)).send(&mut srv, T0 + S)).yiaddr();
    assert_eq!(a, b);
    assert_eq!(srv.binding_count(), 1);
}

#[test]
fn reservation_goes_to_its_mac_only() {
    let mut srv = server();
    // Someone else asking for the reserved address does not get it.
    let o = C {
        requested: Some(RES_IP),
        ..C::discover(mac(1))
    }
    .send(&mut srv, T0);
    assert_ne!(reply(&o).yiaddr(), RES_IP);
    let o = C::select(mac(1), RES_IP).send(&mut srv, T0);
    assert_eq!(kind(&reply(&o)), d::MessageType::Nak);
    // The reserved MAC gets it, with its hostname and lease time.
    let o = C::discover(RES_MAC).send(&mut srv, T0);
    let r = reply(&o);
    assert_eq!(r.yiaddr(), RES_IP);
    assert_eq!(lease_time(&r), Some(7200));
    assert_eq!(
        r.opts().get(d::OptionCode::Hostname),
        Some(&d::DhcpOption::Hostname("db".into()))
    );
    let o = C::select(RES_MAC, RES_IP).send(&mut srv, T0);
    assert_eq!(kind(&reply(&o)), d::MessageType::Ack);
    let v = srv.leases(T0);
    let l = v.iter().find(|l| l.ip == RES_IP).unwrap();
    assert!(l.reserved);
    assert_eq!(l.hostname.as_deref(), Some("db"));
    assert_eq!(l.state, LeaseState::Bound);
    srv.check_invariants();
}

#[test]
fn reserved_address_is_excluded_from_pool() {
    let mut c = cfg_pool(4, 6); // .4 .5 .6 with .5 reserved
    c.max_leases = 10;
    let mut srv = Server::new(c).unwrap();
    let got: Vec<_> = (1..=3)
        .map(|n| C::discover(mac(n)).send(&mut srv, T0))
        .collect();
    assert_eq!(reply(&got[0]).yiaddr(), ip(4));
    assert_eq!(reply(&got[1]).yiaddr(), ip(6));
    assert_eq!(got[2].drop, Some(DropReason::PoolExhausted));
    assert!(got[2].reply.is_none());
    assert_eq!(srv.counters().pool_exhausted, 1);
    srv.check_invariants();
}

#[test]
fn port_hostname_is_echoed_unless_reserved() {
    let mut srv = server();
    let o = srv.handle_from(
        T0,
        Ingress {
            src_mac: mac(1),
            hostname: Some("vm1"),
        },
        &C::discover(mac(1)).bytes(),
    );
    assert_eq!(
        reply(&o).opts().get(d::OptionCode::Hostname),
        Some(&d::DhcpOption::Hostname("vm1".into()))
    );
    let o = srv.handle_from(
        T0,
        Ingress {
            src_mac: RES_MAC,
            hostname: Some("port7"),
        },
        &C::discover(RES_MAC).bytes(),
    );
    assert_eq!(
        reply(&o).opts().get(d::OptionCode::Hostname),
        Some(&d::DhcpOption::Hostname("db".into()))
    );
}

#[test]
fn returning_client_gets_previous_address() {
    let mut srv = server();
    let a = bind(&mut srv, T0, mac(1));
    let b = bind(&mut srv, T0, mac(2));
    assert_ne!(a, b);
    release(&mut srv, T0 + S, mac(1), a);
    // A new client does not take the released address while never-used
    // ones remain.
    let c = bind(&mut srv, T0 + 2 * S, mac(3));
    assert_ne!(c, a);
    // Client 1 comes back and gets its old address.
    assert_eq!(bind(&mut srv, T0 + 3 * S, mac(1)), a);
}

#[test]
fn never_used_first_then_least_recently_expired() {
    let mut srv = Server::new(cfg_pool(10, 12)).unwrap();
    let a = bind(&mut srv, T0, mac(1));
    let b = bind(&mut srv, T0, mac(2));
    let c = bind(&mut srv, T0, mac(3));
    assert_eq!((a, b, c), (ip(10), ip(11), ip(12)));
    release(&mut srv, T0 + 10 * S, mac(1), a);
    release(&mut srv, T0 + 20 * S, mac(3), c);
    release(&mut srv, T0 + 30 * S, mac(2), b);
    // New clients reclaim in order of release: .10, .12, .11.
    assert_eq!(bind(&mut srv, T0 + 40 * S, mac(4)), ip(10));
    assert_eq!(bind(&mut srv, T0 + 40 * S, mac(5)), ip(12));
    assert_eq!(bind(&mut srv, T0 + 40 * S, mac(6)), ip(11));
    let o = C::discover(mac(7)).send(&mut srv, T0 + 41 * S);
    assert_eq!(o.drop, Some(DropReason::PoolExhausted));
}

#[test]
fn requested_address_honoured_when_free() {
    let mut srv = server();
    let o = C {
        requested: Some(ip(15)),
        ..C::discover(mac(1))
    }
    .send(&mut srv, T0);
    assert_eq!(reply(&o).yiaddr(), ip(15));
    // Outside the pool: ignored.
    let o = C {
        requested: Some(ip(100)),
        ..C::discover(mac(2))
    }
    .send(&mut srv, T0);
    assert_eq!(reply(&o).yiaddr(), ip(10));
    srv.check_invariants();
}

#[test]
fn lease_limit_drops_new_clients_only() {
    let mut c = cfg_pool(10, 19);
    c.max_leases = 2;
    let mut srv = Server::new(c).unwrap();
    let a = bind(&mut srv, T0, mac(1));
    bind(&mut srv, T0, mac(2));
    let o = C::discover(mac(3)).send(&mut srv, T0);
    assert_eq!(o.drop, Some(DropReason::LeaseLimit));
    assert!(o.reply.is_none());
    assert_eq!(srv.counters().lease_limit, 1);
    // Existing clients still work.
    let o = C::discover(mac(1)).send(&mut srv, T0);
    assert_eq!(reply(&o).yiaddr(), a);
    srv.check_invariants();
}

// ---- REQUEST ------------------------------------------------------------

#[test]
fn selecting_ours_acks_and_reports_binding() {
    let mut srv = server();
    let offered = reply(&C::discover(mac(1)).send(&mut srv, T0)).yiaddr();
    let o = C::select(mac(1), offered).send(&mut srv, T0 + S);
    let r = reply(&o);
    assert_eq!(kind(&r), d::MessageType::Ack);
    assert_eq!(r.yiaddr(), offered);
    assert_eq!(lease_time(&r), Some(3600));
    assert_eq!(
        o.changes,
        vec![LeaseChange::Bound(Lease {
            key: ClientKey::Mac(mac(1)),
            mac: mac(1),
            ip: offered,
            hostname: None,
            expires_at: T0 + S + 3600 * S,
        })]
    );
    assert_eq!(srv.counters().ack, 1);
    assert_eq!(srv.leases(T0)[0].state, LeaseState::Bound);
}

#[test]
fn selecting_other_address_than_offered_is_naked() {
    let mut srv = server();
    let offered = reply(&C::discover(mac(1)).send(&mut srv, T0)).yiaddr();
    assert_eq!(offered, ip(10));
    let o = C::select(mac(1), ip(11)).send(&mut srv, T0);
    let r = reply(&o);
    assert_eq!(kind(&r), d::MessageType::Nak);
    assert!(o.reply.as_ref().unwrap().to.broadcast);
    assert!(o.changes.is_empty());
    assert!(!has(&r, d::OptionCode::AddressLeaseTime));
    assert_eq!(r.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(srv.counters().nak, 1);
}

#[test]
fn selecting_other_server_releases_offer() {
    let mut c = cfg_pool(10, 10);
    c.reservations.clear();
    let mut srv = Server::new(c).unwrap();
    let offered = reply(&C::discover(mac(1)).send(&mut srv, T0)).yiaddr();
    let o = C {
        server_id: Some(Ipv4Addr::new(10, 0, 0, 254)),
        ..C::select(mac(1), offered)
    }
    .send(&mut srv, T0);
    assert!(o.reply.is_none());
    assert_eq!(o.drop, Some(DropReason::OtherServer));
    assert_eq!(srv.binding_count(), 0);
    // The single address is free for someone else right away.
    assert_eq!(bind(&mut srv, T0, mac(2)), offered);
}

#[test]
fn init_reboot_matrix() {
    let mut srv = server();
    let a = bind(&mut srv, T0, mac(1));
    let reboot = |m: Mac, r: Ipv4Addr| C {
        requested: Some(r),
        ..C::new(m, d::MessageType::Request)
    };
    // Right address: ACK, broadcast (no ciaddr, flag unset -> unicast yiaddr).
    let o = reboot(mac(1), a).send(&mut srv, T0 + S);
    assert_eq!(kind(&reply(&o)), d::MessageType::Ack);
    assert!(matches!(o.changes[..], [LeaseChange::Bound(_)]));
    // Wrong address in the subnet: NAK.
    let o = reboot(mac(1), ip(18)).send(&mut srv, T0 + S);
    assert_eq!(kind(&reply(&o)), d::MessageType::Nak);
    assert!(o.reply.as_ref().unwrap().to.broadcast);
    // Wrong network: NAK, even for a client we do not know.
    let o = reboot(mac(9), Ipv4Addr::new(192, 168, 1, 50)).send(&mut srv, T0 + S);
    assert_eq!(kind(&reply(&o)), d::MessageType::Nak);
    // Unknown client, address in our subnet: silence.
    let o = reboot(mac(9), ip(12)).send(&mut srv, T0 + S);
    assert!(o.reply.is_none());
    assert_eq!(o.drop, Some(DropReason::UnknownClient));
    assert_eq!(srv.counters().unknown_client, 1);
    // The binding is still there.
    assert_eq!(srv.binding_count(), 1);
    srv.check_invariants();
}

#[test]
fn init_reboot_after_expiry_reacquires_previous_address() {
    let mut srv = server();
    let a = bind(&mut srv, T0, mac(1));
    let later = T0 + 4000 * S;
    let o = C {
        requested: Some(a),
        ..C::new(mac(1), d::MessageType::Request)
    }
    .send(&mut srv, later);
    assert!(matches!(o.changes[0], LeaseChange::Expired(_)));
    assert_eq!(kind(&reply(&o)), d::MessageType::Ack);
}

#[test]
fn renewing_unicast_extends_lease() {
    let mut srv = server();
    let a = bind(&mut srv, T0, mac(1));
    let t = T0 + 1800 * S;
    let o = C {
        ciaddr: a,
        ..C::new(mac(1), d::MessageType::Request)
    }
    .send(&mut srv, t);
    let r = reply(&o);
    assert_eq!(kind(&r), d::MessageType::Ack);
    assert_eq!(r.ciaddr(), a);
    assert_eq!(r.yiaddr(), a);
    assert_eq!(
        o.reply.as_ref().unwrap().to,
        ReplyTo {
            ip: a,
            mac: mac(1),
            broadcast: false
        }
    );
    match &o.changes[..] {
        [LeaseChange::Bound(l)] => assert_eq!(l.expires_at, t + 3600 * S),
        other => panic!("{other:?}"),
    }
    assert_eq!(srv.poll_timeout(), Some(t + 3600 * S));
}

#[test]
fn rebinding_broadcast_acks_to_ciaddr_and_naks_foreign_address() {
    let mut srv = server();
    let a = bind(&mut srv, T0, mac(1));
    let b = bind(&mut srv, T0, mac(2));
    let rebind = |m: Mac, c: Ipv4Addr| C {
        ciaddr: c,
        broadcast: true,
        ..C::new(m, d::MessageType::Request)
    };
    let o = rebind(mac(1), a).send(&mut srv, T0 + 3200 * S);
    assert_eq!(kind(&reply(&o)), d::MessageType::Ack);
    // ciaddr set: unicast to ciaddr even with the broadcast flag.
    assert_eq!(o.reply.as_ref().unwrap().to.ip, a);
    // Client 1 claiming client 2's address: NAK, broadcast.
    let o = rebind(mac(1), b).send(&mut srv, T0 + 3200 * S);
    assert_eq!(kind(&reply(&o)), d::MessageType::Nak);
    assert_eq!(o.reply.as_ref().unwrap().to.ip, Ipv4Addr::BROADCAST);
    // Unknown client claiming a held address: NAK.
    let o = rebind(mac(3), b).send(&mut srv, T0 + 3200 * S);
    assert_eq!(kind(&reply(&o)), d::MessageType::Nak);
    // Wrong network: NAK.
    let o = rebind(mac(1), Ipv4Addr::new(192, 168, 0, 9)).send(&mut srv, T0 + 3200 * S);
    assert_eq!(kind(&reply(&o)), d::MessageType::Nak);
    srv.check_invariants();
}

#[test]
fn renewing_unknown_client_adopts_free_address() {
    // The store was lost: a renewing client keeps a free pool address.
    let mut srv = server();
    let o = C {
        ciaddr: ip(14),
        ..C::new(mac(1), d::MessageType::Request)
    }
    .send(&mut srv, T0);
    assert_eq!(kind(&reply(&o)), d::MessageType::Ack);
    srv.check_invariants();
}

// ---- DECLINE / RELEASE / INFORM ----------------------------------------

#[test]
fn decline_quarantines_then_reuses() {
    let mut c = cfg_pool(10, 10);
    c.decline_quarantine = 600;
    let mut srv = Server::new(c).unwrap();
    let a = bind(&mut srv, T0, mac(1));
    let o = C {
        requested: Some(a),
        server_id: Some(SERVER),
        ..C::new(mac(1), d::MessageType::Decline)
    }
    .send(&mut srv, T0 + S);
    assert!(o.reply.is_none());
    assert!(o.drop.is_none());
    assert!(matches!(&o.changes[..], [LeaseChange::Declined(l)] if l.ip == a));
    assert_eq!(srv.binding_count(), 0);
    assert_eq!(srv.counters().decline, 1);
    let v = srv.leases(T0 + S);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].state, LeaseState::Declined);
    assert_eq!(v[0].expires_at, T0 + S + 600 * S);
    // Quarantined: nobody gets it, not even the decliner.
    let o = C::discover(mac(1)).send(&mut srv, T0 + 2 * S);
    assert_eq!(o.drop, Some(DropReason::PoolExhausted));
    let o = C::discover(mac(2)).send(&mut srv, T0 + 599 * S);
    assert_eq!(o.drop, Some(DropReason::PoolExhausted));
    assert_eq!(srv.poll_timeout(), Some(T0 + 601 * S));
    assert!(srv.handle_timeout(T0 + 601 * S).is_empty());
    srv.check_invariants();
    assert_eq!(bind(&mut srv, T0 + 602 * S, mac(2)), a);
}

#[test]
fn decline_by_non_owner_is_ignored() {
    let mut srv = server();
    let a = bind(&mut srv, T0, mac(1));
    let o = C {
        requested: Some(a),
        ..C::new(mac(2), d::MessageType::Decline)
    }
    .send(&mut srv, T0);
    assert_eq!(o.drop, Some(DropReason::NotOwner));
    assert_eq!(srv.binding_count(), 1);
}

#[test]
fn release_by_owner_and_non_owner() {
    let mut srv = server();
    let a = bind(&mut srv, T0, mac(1));
    // Another MAC releasing it: ignored and counted.
    let o = release(&mut srv, T0 + S, mac(2), a);
    assert_eq!(o.drop, Some(DropReason::NotOwner));
    assert!(o.changes.is_empty());
    assert_eq!(srv.counters().release_not_owner, 1);
    assert_eq!(srv.binding_count(), 1);
    // The owner: released, reported, no reply.
    let o = release(&mut srv, T0 + 2 * S, mac(1), a);
    assert!(o.reply.is_none());
    assert!(o.drop.is_none());
    assert!(matches!(&o.changes[..], [LeaseChange::Released(l)] if l.ip == a));
    assert_eq!(srv.binding_count(), 0);
    let v = srv.leases(T0 + 2 * S);
    assert_eq!(v[0].state, LeaseState::Expired);
    assert_eq!(srv.counters().release, 2);
    srv.check_invariants();
}

#[test]
fn inform_acks_config_without_lease() {
    let mut srv = server();
    let o = C {
        ciaddr: ip(200),
        ..C::new(mac(1), d::MessageType::Inform)
    }
    .send(&mut srv, T0);
    let r = reply(&o);
    assert_eq!(kind(&r), d::MessageType::Ack);
    assert_eq!(r.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(r.ciaddr(), ip(200));
    assert!(!has(&r, d::OptionCode::AddressLeaseTime));
    assert!(!has(&r, d::OptionCode::Renewal));
    assert!(!has(&r, d::OptionCode::Rebinding));
    assert!(has(&r, d::OptionCode::DomainNameServer));
    assert!(has(&r, d::OptionCode::SubnetMask));
    assert_eq!(
        o.reply.as_ref().unwrap().to,
        ReplyTo {
            ip: ip(200),
            mac: mac(1),
            broadcast: false
        }
    );
    assert!(o.changes.is_empty());
    assert_eq!(srv.binding_count(), 0);
    assert_eq!(srv.counters().inform, 1);
}

// ---- addressing and validation -----------------------------------------

#[test]
fn broadcast_flag_makes_offer_broadcast() {
    let mut srv = server();
    let o = C {
        broadcast: true,
        ..C::discover(mac(1))
    }
    .send(&mut srv, T0);
    assert_eq!(
        o.reply.as_ref().unwrap().to,
        ReplyTo {
            ip: Ipv4Addr::BROADCAST,
            mac: [0xff; 6],
            broadcast: true
        }
    );
    assert!(reply(&o).flags().broadcast(), "flags are echoed");
}

#[test]
fn chaddr_must_match_frame_source() {
    let mut srv = server();
    let o = srv.handle(T0, mac(2), &C::discover(mac(1)).bytes());
    assert_eq!(o.drop, Some(DropReason::ChaddrMismatch));
    assert!(o.reply.is_none());
    assert_eq!(srv.counters().chaddr_mismatch, 1);
    assert_eq!(srv.binding_count(), 0);
}

#[test]
fn bootreply_from_client_is_refused() {
    let mut srv = server();
    let mut b = C::discover(mac(1)).bytes();
    b[0] = 2;
    let o = srv.handle(T0, mac(1), &b);
    assert_eq!(o.drop, Some(DropReason::BootReplyFromClient));
    assert_eq!(srv.counters().bootreply_from_client, 1);
}

#[test]
fn malformed_and_unsupported_are_counted() {
    let mut srv = server();
    assert_eq!(
        srv.handle(T0, mac(1), b"hello").drop,
        Some(DropReason::Malformed)
    );
    let o = C::new(mac(1), d::MessageType::Offer).send(&mut srv, T0);
    assert_eq!(o.drop, Some(DropReason::UnsupportedType));
    let c = srv.counters();
    assert_eq!((c.malformed, c.unsupported_type), (1, 1));
}

// ---- options --------------------------------------------------------------

#[test]
fn parameter_request_list_filters_optional_options() {
    let mut c = cfg_pool(10, 19);
    c.static_routes = vec![StaticRoute {
        dest: "172.16.0.0/12".parse().unwrap(),
        gateway: ip(3),
    }];
    let mut srv = Server::new(c).unwrap();
    let o = C {
        prl: Some(vec![
            d::OptionCode::SubnetMask,
            d::OptionCode::DomainNameServer,
        ]),
        ..C::discover(mac(1))
    }
    .send(&mut srv, T0);
    let r = reply(&o);
    for code in [
        d::OptionCode::MessageType,
        d::OptionCode::ServerIdentifier,
        d::OptionCode::AddressLeaseTime,
        d::OptionCode::SubnetMask,
        d::OptionCode::Router,
        d::OptionCode::DomainNameServer,
    ] {
        assert!(has(&r, code), "{code:?} missing");
    }
    for code in [
        d::OptionCode::DomainName,
        d::OptionCode::InterfaceMtu,
        d::OptionCode::BroadcastAddr,
        d::OptionCode::ClasslessStaticRoute,
        d::OptionCode::Hostname,
    ] {
        assert!(!has(&r, code), "{code:?} not requested");
    }
    // Classless routes when asked: default route first (RFC 3442 §3).
    let o = C {
        prl: Some(vec![d::OptionCode::ClasslessStaticRoute]),
        ..C::discover(mac(2))
    }
    .send(&mut srv, T0);
    assert_eq!(
        reply(&o).opts().get(d::OptionCode::ClasslessStaticRoute),
        Some(&d::DhcpOption::ClasslessStaticRoute(vec![
            ("0.0.0.0/0".parse().unwrap(), SERVER),
            ("172.16.0.0/12".parse().unwrap(), ip(3)),
        ]))
    );
}

#[test]
fn max_message_size_drops_optional_options_that_do_not_fit() {
    let mut c = cfg_pool(10, 19);
    c.dns_servers = (1..=50).map(|n| Ipv4Addr::new(192, 0, 2, n)).collect(); // 200 B
    c.domain_name = Some("d".repeat(200));
    let mut srv = Server::new(c).unwrap();
    // Default 576: DNS (asked first) fits, the long domain does not.
    let o = C {
        prl: Some(vec![
            d::OptionCode::DomainNameServer,
            d::OptionCode::DomainName,
        ]),
        ..C::discover(mac(1))
    }
    .send(&mut srv, T0);
    let bytes = &o.reply.as_ref().unwrap().bytes;
    assert!(bytes.len() <= 548, "{}", bytes.len());
    let r = reply(&o);
    assert!(has(&r, d::OptionCode::DomainNameServer));
    assert!(!has(&r, d::OptionCode::DomainName));
    assert!(has(&r, d::OptionCode::AddressLeaseTime));
    // Client order decides: domain first, then DNS does not fit.
    let o = C {
        prl: Some(vec![
            d::OptionCode::DomainName,
            d::OptionCode::DomainNameServer,
        ]),
        ..C::discover(mac(1))
    }
    .send(&mut srv, T0);
    let r = reply(&o);
    assert!(has(&r, d::OptionCode::DomainName));
    assert!(!has(&r, d::OptionCode::DomainNameServer));
    // A client that takes 1500 bytes gets both.
    let o = C {
        max_size: Some(1500),
        ..C::discover(mac(1))
    }
    .send(&mut srv, T0);
    let bytes = &o.reply.as_ref().unwrap().bytes;
    assert!(bytes.len() > 548 && bytes.len() <= 1472);
    let r = reply(&o);
    assert!(has(&r, d::OptionCode::DomainName));
    assert!(has(&r, d::OptionCode::DomainNameServer));
    // A value below the legal minimum is raised to 576.
    let o = C {
        max_size: Some(100),
        ..C::discover(mac(1))
    }
    .send(&mut srv, T0);
    assert!(o.reply.as_ref().unwrap().bytes.len() <= 548);
}

#[test]
fn option_overload_is_parsed() {
    let mut srv = server();
    // Message type and client id in `file`, overload = 1 in options.
    let mut b = vec![0u8; 236];
    b[0] = 1;
    b[1] = 1;
    b[2] = 6;
    b[28..34].copy_from_slice(&mac(1));
    let file = 108;
    b[file..file + 3].copy_from_slice(&[53, 1, 1]);
    b[file + 3..file + 8].copy_from_slice(&[61, 3, 0, 9, 9]);
    b[file + 8] = 255;
    b.extend_from_slice(&[99, 130, 83, 99, 52, 1, 1, 255]);
    let o = srv.handle(T0, mac(1), &b);
    let r = reply(&o);
    assert_eq!(kind(&r), d::MessageType::Offer);
    assert_eq!(
        r.opts().get(d::OptionCode::ClientIdentifier),
        Some(&d::DhcpOption::ClientIdentifier(vec![0, 9, 9]))
    );
    assert_eq!(srv.leases(T0)[0].client_id, Some(vec![0, 9, 9]));
}

#[test]
fn client_id_keys_bindings() {
    let mut srv = server();
    let with_id = |c: C, id: u8| C {
        client_id: Some(vec![0, id, 1, 2]),
        ..c
    };
    let o = with_id(C::discover(mac(1)), 1).send(&mut srv, T0);
    let a = reply(&o).yiaddr();
    assert_eq!(
        reply(&o).opts().get(d::OptionCode::ClientIdentifier),
        Some(&d::DhcpOption::ClientIdentifier(vec![0, 1, 1, 2]))
    );
    with_id(C::select(mac(1), a), 1).send(&mut srv, T0);
    // Release without the client id is not from the owner.
    let o = release(&mut srv, T0, mac(1), a);
    assert_eq!(o.drop, Some(DropReason::NotOwner));
    // With it, it is.
    let o = with_id(
        C {
            ciaddr: a,
            ..C::new(mac(1), d::MessageType::Release)
        },
        1,
    )
    .send(&mut srv, T0);
    assert!(matches!(&o.changes[..], [LeaseChange::Released(l)]
        if l.key == ClientKey::ClientId(vec![0, 1, 1, 2])));
    srv.check_invariants();
}

// ---- timers ---------------------------------------------------------------

#[test]
fn lease_expires_at_lease_time() {
    let mut srv = server();
    let a = bind(&mut srv, T0, mac(1));
    let end = T0 + 3600 * S;
    assert_eq!(srv.poll_timeout(), Some(end));
    assert!(srv.handle_timeout(end - 1).is_empty());
    assert_eq!(srv.binding_count(), 1);
    let ch = srv.handle_timeout(end);
    assert!(matches!(&ch[..], [LeaseChange::Expired(l)] if l.ip == a));
    assert_eq!(srv.poll_timeout(), None);
    assert_eq!(srv.leases(end)[0].state, LeaseState::Expired);
    assert_eq!(srv.counters().expired, 1);
    srv.check_invariants();
    // Comes back: same address.
    assert_eq!(bind(&mut srv, end + S, mac(1)), a);
}

#[test]
fn expiry_is_also_reported_by_handle() {
    let mut srv = server();
    bind(&mut srv, T0, mac(1));
    let o = C::discover(mac(2)).send(&mut srv, T0 + 3600 * S);
    assert!(matches!(&o.changes[..], [LeaseChange::Expired(_)]));
}

#[test]
fn t1_t2_defaults_and_overrides() {
    let mut c = cfg_pool(10, 19);
    c.lease_time = 1000;
    let mut srv = Server::new(c.clone()).unwrap();
    let r = reply(&C::discover(mac(1)).send(&mut srv, T0));
    assert_eq!(
        r.opts().get(d::OptionCode::Renewal),
        Some(&d::DhcpOption::Renewal(500))
    );
    assert_eq!(
        r.opts().get(d::OptionCode::Rebinding),
        Some(&d::DhcpOption::Rebinding(875))
    );
    c.t1 = Some(100);
    c.t2 = Some(200);
    let mut srv = Server::new(c.clone()).unwrap();
    let r = reply(&C::discover(mac(1)).send(&mut srv, T0));
    assert_eq!(
        r.opts().get(d::OptionCode::Renewal),
        Some(&d::DhcpOption::Renewal(100))
    );
    assert_eq!(
        r.opts().get(d::OptionCode::Rebinding),
        Some(&d::DhcpOption::Rebinding(200))
    );
    c.t1 = Some(300);
    c.t2 = Some(200);
    assert!(matches!(Server::new(c), Err(ConfigError::T1AfterT2 { .. })));
}

#[test]
fn offer_times_out_and_frees_address() {
    let mut c = cfg_pool(10, 10);
    c.reservations.clear();
    let mut srv = Server::new(c).unwrap();
    let a = reply(&C::discover(mac(1)).send(&mut srv, T0)).yiaddr();
    assert_eq!(
        C::discover(mac(2)).send(&mut srv, T0 + 59 * S).drop,
        Some(DropReason::PoolExhausted)
    );
    assert_eq!(srv.poll_timeout(), Some(T0 + 60 * S));
    let ch = srv.handle_timeout(T0 + 60 * S);
    assert!(ch.is_empty(), "offers are not durable");
    assert_eq!(srv.binding_count(), 0);
    assert_eq!(bind(&mut srv, T0 + 61 * S, mac(2)), a);
}

#[test]
fn expiry_does_not_scan_everything() {
    // Many bindings, one due: handle_timeout touches only the due one.
    let mut c = ServerConfig::new("big", "10.0.0.0/16".parse().unwrap(), SERVER);
    c.pools = vec![IpRange {
        start: Ipv4Addr::new(10, 0, 1, 0),
        end: Ipv4Addr::new(10, 0, 255, 254),
    }];
    c.max_leases = 5000;
    let mut srv = Server::new(c).unwrap();
    for n in 0..3000u32 {
        let m = [2, 1, 0, (n >> 16) as u8, (n >> 8) as u8, n as u8];
        let now = T0 + u64::from(n) * S;
        let offered = reply(&C::discover(m).send(&mut srv, now)).yiaddr();
        C::select(m, offered).send(&mut srv, now);
    }
    let first = srv.poll_timeout().unwrap();
    assert_eq!(first, T0 + 3600 * S);
    assert_eq!(srv.handle_timeout(first).len(), 1);
    assert_eq!(srv.binding_count(), 2999);
}

// ---- restore / reload -------------------------------------------------

#[test]
fn restore_loads_valid_and_rejects_conflicting() {
    let mut srv = server();
    let l = |m: Mac, a: Ipv4Addr| Lease {
        key: ClientKey::Mac(m),
        mac: m,
        ip: a,
        hostname: Some("x".into()),
        expires_at: T0 + 100 * S,
    };
    let rep = srv.restore([
        l(mac(1), ip(12)),
        l(mac(2), ip(12)),  // address taken
        l(mac(1), ip(13)),  // client already bound
        l(mac(3), ip(100)), // outside the pool
        l(mac(4), RES_IP),  // reserved for another MAC
        l(RES_MAC, RES_IP), // its reservation
    ]);
    assert_eq!(
        rep,
        RestoreReport {
            restored: 2,
            rejected: 4
        }
    );
    srv.check_invariants();
    // A restored client renews.
    let o = C {
        ciaddr: ip(12),
        ..C::new(mac(1), d::MessageType::Request)
    }
    .send(&mut srv, T0 + 50 * S);
    assert_eq!(kind(&reply(&o)), d::MessageType::Ack);
    // New clients do not get restored addresses.
    assert_ne!(bind(&mut srv, T0, mac(5)), ip(12));
}

#[test]
fn set_config_keeps_valid_bindings_and_drops_others() {
    let mut srv = server();
    let a = bind(&mut srv, T0, mac(1)); // .10
    let b = bind(&mut srv, T0, mac(2)); // .11
    assert_eq!((a, b), (ip(10), ip(11)));
    let mut c = cfg_pool(11, 30);
    c.lease_time = 60;
    let changes = srv.set_config(c).unwrap();
    assert!(matches!(&changes[..], [LeaseChange::Released(l)] if l.ip == a));
    assert_eq!(srv.binding_count(), 1);
    srv.check_invariants();
    assert_eq!(bind(&mut srv, T0, mac(3)), ip(12));
    // Invalid config is refused and the old one stays.
    let mut bad = cfg_pool(11, 30);
    bad.pools[0].end = Ipv4Addr::new(10, 1, 0, 1);
    assert!(matches!(
        srv.set_config(bad),
        Err(ConfigError::BadPool { .. })
    ));
    assert_eq!(srv.config().lease_time, 60);
}

#[test]
fn config_errors_name_the_item() {
    let mut c = cfg_pool(10, 19);
    c.server_ip = Ipv4Addr::new(10, 9, 9, 9);
    let e = Server::new(c).unwrap_err();
    assert!(e.to_string().contains("net1"), "{e}");
    assert!(e.to_string().contains("10.9.9.9"), "{e}");
    let mut c = cfg_pool(10, 19);
    c.reservations.push(Reservation {
        mac: RES_MAC,
        ip: ip(7),
        hostname: None,
        lease_time: None,
    });
    assert!(matches!(
        Server::new(c),
        Err(ConfigError::DuplicateReservation { .. })
    ));
}

// ---- properties -----------------------------------------------------------

fn any_message() -> impl Strategy<Value = (u8, C)> {
    let ty = prop_oneof![
        Just(d::MessageType::Discover),
        Just(d::MessageType::Request),
        Just(d::MessageType::Decline),
        Just(d::MessageType::Release),
        Just(d::MessageType::Inform),
    ];
    let addr = prop_oneof![
        Just(None),
        (3u8..25).prop_map(|n| Some(ip(n))),
        Just(Some(Ipv4Addr::new(192, 168, 0, 1))),
    ];
    (
        0u8..8,
        ty,
        addr.clone(),
        addr,
        any::<bool>(),
        any::<bool>(),
        prop::option::of(0u8..3),
        0u8..30,
    )
        .prop_map(|(who, ty, req, ci, sid, bcast, cid, _)| {
            let m = if who == 7 { RES_MAC } else { mac(who) };
            (
                who,
                C {
                    ciaddr: ci.unwrap_or(Ipv4Addr::UNSPECIFIED),
                    broadcast: bcast,
                    requested: req,
                    server_id: sid.then_some(SERVER),
                    client_id: cid.map(|c| vec![0, c, who]),
                    ..C::new(m, ty)
                },
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn handle_never_panics_on_random_bytes(
        b in prop::collection::vec(any::<u8>(), 0..700),
        src in any::<[u8; 6]>(),
    ) {
        let mut srv = server();
        let _ = srv.handle(T0, src, &b);
        srv.check_invariants();
    }

    #[test]
    fn handle_never_panics_on_mangled_valid_messages(
        (_, c) in any_message(),
        tail in prop::collection::vec(any::<u8>(), 0..300),
        flips in prop::collection::vec((0usize..600, any::<u8>()), 0..6),
    ) {
        let mut srv = server();
        bind(&mut srv, T0, mac(1));
        let mut b = c.bytes();
        // Replace the options after the cookie with random TLVs some of the time.
        if !tail.is_empty() {
            b.truncate(240);
            b.extend_from_slice(&tail);
        }
        let n = b.len();
        for (at, x) in flips {
            b[at % n] ^= x;
        }
        let _ = srv.handle(T0 + S, c.mac, &b);
        srv.check_invariants();
    }

    #[test]
    fn invariants_hold_under_random_sequences(
        steps in prop::collection::vec((any_message(), 0u64..400), 1..120),
        pool_last in 10u8..16,
    ) {
        let mut cfg = cfg_pool(10, pool_last);
        cfg.max_leases = 5;
        cfg.lease_time = 300;
        cfg.offer_timeout = 30;
        cfg.decline_quarantine = 100;
        let mut srv = Server::new(cfg).unwrap();
        let mut now = T0;
        for ((_, c), dt) in steps {
            now += dt * S;
            if let Some(t) = srv.poll_timeout() {
                if t <= now && dt % 2 == 0 {
                    srv.handle_timeout(now);
                }
            }
            let o = c.send(&mut srv, now);
            if let Some(r) = &o.reply {
                let m = d::Message::from_bytes(&r.bytes).unwrap();
                prop_assert!(r.bytes.len() <= 548);
                if kind(&m) == d::MessageType::Nak {
                    prop_assert!(r.to.broadcast);
                }
                // An ACK with a lease is always backed by a Bound change.
                if kind(&m) == d::MessageType::Ack && c.ty == d::MessageType::Request {
                    prop_assert!(o.changes.iter().any(
                        |ch| matches!(ch, LeaseChange::Bound(l) if l.ip == m.yiaddr())
                    ));
                }
            }
            srv.check_invariants();
            // Reservations never go to anyone else.
            for l in srv.leases(now) {
                if l.ip == RES_IP && matches!(l.state, LeaseState::Bound | LeaseState::Offered) {
                    prop_assert_eq!(l.mac, RES_MAC);
                }
            }
        }
    }
}

// ---- one NIC, one address ------------------------------------------------

#[test]
fn same_mac_under_a_new_client_id_keeps_its_address() {
    // udhcpc (no option 61) binds, then dhcpcd on the same NIC asks with a DUID.
    let mut srv = server();
    let first = bind(&mut srv, T0, mac(1));
    let with_id = |ty| C {
        client_id: Some(vec![0xff, 1, 2, 3, 4]),
        ..C::new(mac(1), ty)
    };
    let o = with_id(d::MessageType::Discover).send(&mut srv, T0 + 1);
    assert_eq!(
        reply(&o).yiaddr(),
        first,
        "a second address for the same MAC"
    );
    let o = C {
        requested: Some(first),
        server_id: Some(SERVER),
        ..with_id(d::MessageType::Request)
    }
    .send(&mut srv, T0 + 2);
    assert_eq!(kind(&reply(&o)), d::MessageType::Ack);
    assert_eq!(srv.binding_count(), 1);
    srv.check_invariants();
}

#[test]
fn a_client_id_bound_to_another_mac_is_refused() {
    // Fuzzer finding: the attacker sends the victim's client identifier
    // (01 + MAC is easy to guess) and must neither get, nor release, the
    // victim's lease.
    let mut srv = server();
    let id = vec![1, 2, 0, 0, 0, 0, 1];
    let victim = |c: C| C {
        client_id: Some(id.clone()),
        ..c
    };
    let o = victim(C::discover(mac(1))).send(&mut srv, T0);
    let a = reply(&o).yiaddr();
    let o = victim(C::select(mac(1), a)).send(&mut srv, T0);
    assert_eq!(kind(&reply(&o)), d::MessageType::Ack);

    let attacker = |ty| C {
        client_id: Some(id.clone()),
        ..C::new(mac(2), ty)
    };
    for ty in [
        d::MessageType::Discover,
        d::MessageType::Request,
        d::MessageType::Release,
        d::MessageType::Decline,
    ] {
        let o = C {
            requested: Some(a),
            ciaddr: a,
            ..attacker(ty)
        }
        .send(&mut srv, T0 + 1);
        assert_eq!(o.drop, Some(DropReason::ClientIdInUse), "{ty:?}: {o:?}");
        assert!(o.reply.is_none() && o.changes.is_empty(), "{ty:?}: {o:?}");
    }
    assert_eq!(srv.counters().client_id_in_use, 4);
    let l = srv.leases(T0 + 2);
    assert_eq!(l.len(), 1);
    assert_eq!((l[0].mac, l[0].state), (mac(1), LeaseState::Bound));
    srv.check_invariants();
}
