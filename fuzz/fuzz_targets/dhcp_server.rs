//! `dhcp::Server::handle` with a sequence of messages split from the input,
//! on a clock the target owns.
//!
//! Input: `[count, step...]`, at most `count % 33` steps. A step is
//! `[dt, kind, ...]`: the clock advances `dt` seconds, then
//! - `kind & 0xc0 == 0x40`: `handle_timeout(now)`;
//! - `kind & 0x80`: a well-formed client message built from 7 more bytes
//!   `[type, mac, flags, requested, server_id, ciaddr, client_id]` (so the
//!   fuzzer explores the state machine, not the codec);
//! - otherwise raw: `[len_lo, len_hi, payload...]`, sent with the frame's
//!   source MAC = chaddr when `kind & 1`, else a fixed MAC.
//!
//! The server's own `check_invariants` is test-only, so this asserts what the
//! public API shows after every step: no address appears twice in
//! `leases(now)` (an address is in exactly one state), no MAC and no client
//! key holds two offered/bound addresses, bindings never exceed
//! `max_leases`, offered/bound/declined entries end in the future and expired
//! ones in the past, every offered/bound address is a usable host address
//! other than the server's and either a pool address not reserved for
//! another MAC or this MAC's reservation; every reply decodes as a BOOTREPLY
//! with the request's xid, the reply's kind in option 53, and OFFER/ACK of a
//! lease naming the lease's address; every `Bound` change is visible as a
//! bound lease.
//!
//! Found this way and fixed: a client identifier bound to another MAC
//! moved that binding to the requesting MAC (lease takeover); such a
//! request is now refused (`ClientIdInUse`).
#![no_main]

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use dhcp::wire::{opt, Message, BOOTREPLY, FIXED_LEN, MAGIC_COOKIE, MIN_REPLY_LEN};
use dhcp::{
    ClientKey, IpRange, LeaseChange, LeaseState, Mac, MessageType, Reservation, Server,
    ServerConfig,
};
use libfuzzer_sys::fuzz_target;

const S: u64 = 1_000_000_000;
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const OTHER_SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 99);
const RES_MAC: Mac = [2, 0, 0, 0, 0, 0xaa];
const RES_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const XID: u32 = 0x1234_5678;
const MACS: [Mac; 8] = [
    [2, 0, 0, 0, 0, 1],
    [2, 0, 0, 0, 0, 2],
    [2, 0, 0, 0, 0, 3],
    [2, 0, 0, 0, 0, 4],
    [2, 0, 0, 0, 0, 5],
    [2, 0, 0, 0, 0, 6],
    [2, 0, 0, 0, 0, 7],
    RES_MAC,
];

fn config() -> ServerConfig {
    let mut c = ServerConfig::new("fuzz", "10.0.0.0/24".parse().expect("subnet"), SERVER);
    c.dns_servers = vec![SERVER];
    c.domain_name = Some("acme.internal".into());
    c.mtu = Some(1450);
    c.lease_time = 120;
    c.offer_timeout = 20;
    c.decline_quarantine = 90;
    c.max_leases = 6;
    // The pool holds the server's own address and a reservation: both must
    // never be handed out dynamically.
    c.pools = vec![IpRange { start: Ipv4Addr::new(10, 0, 0, 1), end: Ipv4Addr::new(10, 0, 0, 8) }];
    c.reservations = vec![Reservation {
        mac: RES_MAC,
        ip: RES_IP,
        hostname: Some("db".into()),
        lease_time: Some(200),
    }];
    c
}

/// A client message from the structured step bytes.
fn build(b: &[u8; 7]) -> (Mac, Vec<u8>) {
    let [ty, mac_i, flags, req, sid, ciaddr, cid] = *b;
    let mac = MACS[usize::from(mac_i) % MACS.len()];
    let ip = |v: u8| match v {
        0..=31 => Ipv4Addr::new(10, 0, 0, v),
        32..=63 => Ipv4Addr::new(10, 0, 0, 255 - (v - 32)),
        _ => Ipv4Addr::new(192, 168, 0, v),
    };
    let mut m = vec![0u8; FIXED_LEN];
    m[0] = 1; // BOOTREQUEST
    m[1] = 1;
    m[2] = 6;
    m[4..8].copy_from_slice(&XID.to_be_bytes());
    if flags & 1 != 0 {
        m[10] = 0x80; // broadcast
    }
    if ciaddr != 0 {
        m[12..16].copy_from_slice(&ip(ciaddr).octets());
    }
    m[28..34].copy_from_slice(&mac);
    m.extend_from_slice(&MAGIC_COOKIE);
    let mut opt = |code: u8, data: &[u8]| {
        m.push(code);
        m.push(data.len() as u8);
        m.extend_from_slice(data);
    };
    opt(opt::MESSAGE_TYPE, &[ty % 10]);
    if req != 0 {
        opt(opt::REQUESTED_IP, &ip(req).octets());
    }
    match sid % 3 {
        1 => opt(opt::SERVER_ID, &SERVER.octets()),
        2 => opt(opt::SERVER_ID, &OTHER_SERVER.octets()),
        _ => {}
    }
    match cid % 4 {
        1 => {
            let mut id = vec![1];
            id.extend_from_slice(&mac);
            opt(opt::CLIENT_ID, &id);
        }
        // Shared across MACs: must be refused, never move a binding.
        2 => opt(opt::CLIENT_ID, &[0, b'c', cid >> 2]),
        3 => opt(opt::CLIENT_ID, &[0xff]), // too short: ignored (RFC 2132 9.14)
        _ => {}
    }
    if flags & 2 != 0 {
        opt(opt::HOST_NAME, b"vm");
    }
    if flags & 4 != 0 {
        opt(opt::PARAMETER_LIST, &[1, 3, 6, 15, 26, 121]);
    }
    if flags & 8 != 0 {
        opt(opt::MAX_MESSAGE_SIZE, &576u16.to_be_bytes());
    }
    m.push(opt::END);
    (mac, m)
}

fuzz_target!(|data: &[u8]| {
    let Some((&count, mut rest)) = data.split_first() else {
        return;
    };
    let cfg = config();
    let mut srv = Server::new(cfg.clone()).expect("fuzz config is valid");
    let mut now = 1_000 * S;
    for _ in 0..count % 33 {
        let [dt, kind, tail @ ..] = rest else { break };
        rest = tail;
        now += u64::from(*dt) * S;
        let changes = if kind & 0xc0 == 0x40 {
            srv.handle_timeout(now)
        } else {
            let (src, payload, xid) = if kind & 0x80 != 0 {
                let Some((b, tail)) = rest.split_first_chunk::<7>() else { break };
                rest = tail;
                let (mac, m) = build(b);
                (mac, m, Some(XID))
            } else {
                let [lo, hi, tail @ ..] = rest else { break };
                let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
                let (p, tail) = tail.split_at(len);
                rest = tail;
                let src = if kind & 1 != 0 {
                    p.get(28..34).and_then(|s| s.try_into().ok()).unwrap_or(MACS[0])
                } else {
                    MACS[0]
                };
                let xid = p.get(4..8).map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]));
                (src, p.to_vec(), xid)
            };
            let out = srv.handle(now, src, &payload);
            if let Some(reply) = &out.reply {
                check_reply(&srv, now, src, reply, xid);
            }
            out.changes
        };
        check_state(&srv, &cfg, now, &changes);
    }
});

fn check_reply(srv: &Server, now: u64, src: Mac, reply: &dhcp::Reply, xid: Option<u32>) {
    assert!(reply.bytes.len() >= MIN_REPLY_LEN, "reply of {} bytes", reply.bytes.len());
    let m = Message::decode(&reply.bytes).expect("reply decodes");
    assert_eq!(m.op, BOOTREPLY);
    assert_eq!(Some(m.xid), xid, "reply xid");
    assert_eq!(m.message_type(), Some(reply.kind));
    assert_eq!(m.mac(), src, "reply chaddr");
    assert!(matches!(reply.kind, MessageType::Offer | MessageType::Ack | MessageType::Nak));
    if reply.kind == MessageType::Nak {
        assert_eq!(m.yiaddr, Ipv4Addr::UNSPECIFIED);
    }
    if reply.kind == MessageType::Offer || (reply.kind == MessageType::Ack && !m.yiaddr.is_unspecified()) {
        let want = if reply.kind == MessageType::Offer {
            [LeaseState::Offered, LeaseState::Bound]
        } else {
            [LeaseState::Bound, LeaseState::Bound]
        };
        let held = srv
            .leases(now)
            .into_iter()
            .any(|l| l.ip == m.yiaddr && l.mac == src && want.contains(&l.state));
        assert!(held, "{:?} of {} without a lease for that client", reply.kind, m.yiaddr);
    }
}

fn check_state(srv: &Server, cfg: &ServerConfig, now: u64, changes: &[LeaseChange]) {
    let leases = srv.leases(now);
    let mut ips = HashSet::new();
    let mut macs = HashSet::new();
    let mut keys = HashSet::new();
    let mut bindings = 0;
    let reserved: HashMap<Ipv4Addr, Mac> = cfg.reservations.iter().map(|r| (r.ip, r.mac)).collect();
    let in_pool = |ip: Ipv4Addr| cfg.pools.iter().any(|r| r.start <= ip && ip <= r.end);
    for l in &leases {
        assert!(ips.insert(l.ip), "address {} listed twice: {leases:#?}", l.ip);
        match l.state {
            LeaseState::Offered | LeaseState::Bound => {
                bindings += 1;
                assert!(
                    macs.insert(l.mac),
                    "MAC {:02x?} holds two addresses: {leases:#?}",
                    l.mac
                );
                let key = match &l.client_id {
                    Some(id) => ClientKey::ClientId(id.clone()),
                    None => ClientKey::Mac(l.mac),
                };
                assert!(keys.insert(key), "client holds two addresses: {leases:#?}");
                assert!(l.expires_at > now, "{:?} lease {} ended at {} <= now {now}", l.state, l.ip, l.expires_at);
                assert!(cfg.usable(l.ip) && l.ip != cfg.server_ip, "handed out {}", l.ip);
                match reserved.get(&l.ip) {
                    Some(m) => assert_eq!(*m, l.mac, "reserved {} given to another MAC", l.ip),
                    None => assert!(in_pool(l.ip), "{} is outside the pools", l.ip),
                }
                if let Some(ip) = cfg.reservations.iter().find(|r| r.mac == l.mac).map(|r| r.ip) {
                    assert_eq!(ip, l.ip, "reserved MAC got a pool address");
                }
            }
            LeaseState::Declined => assert!(l.expires_at > now, "quarantine of {} over", l.ip),
            LeaseState::Expired => assert!(l.expires_at <= now, "expired {} in the future", l.ip),
        }
    }
    assert_eq!(bindings, srv.binding_count());
    assert!(bindings <= cfg.max_leases);

    let mut last: HashMap<Ipv4Addr, &LeaseChange> = HashMap::new();
    for c in changes {
        let l = match c {
            LeaseChange::Bound(l) | LeaseChange::Released(l) | LeaseChange::Declined(l) | LeaseChange::Expired(l) => l,
        };
        last.insert(l.ip, c);
    }
    for c in last.values() {
        if let LeaseChange::Bound(l) = c {
            assert!(
                leases.iter().any(|v| v.ip == l.ip && v.mac == l.mac && v.state == LeaseState::Bound && v.expires_at == l.expires_at),
                "Bound change {l:?} not in leases: {leases:#?}"
            );
        }
    }
}
