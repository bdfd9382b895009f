//! Unit tests and property tests. A test-owned clock (`H::now`, ns) drives
//! every timeout.

use std::net::IpAddr;

use etherparse::{
    icmpv4::DestUnreachableHeader, IcmpEchoHeader, Icmpv4Type, Icmpv6Type, IpNumber, PacketBuilder,
    TcpOptionElement,
};
use packet::FlowKey;
use proptest::prelude::*;

use crate::config::NS;
use crate::*;

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];
const A4: [u8; 4] = [10, 0, 0, 1];
const B4: [u8; 4] = [10, 0, 0, 2];
const R4: [u8; 4] = [10, 0, 0, 254];
const A6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const B6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const CPORT: u16 = 40000;
const SPORT: u16 = 80;
const ZONE: u32 = 7;
const PORT: u32 = 1;
const T0: u64 = 1_000 * NS;

// ---- frame builders ------------------------------------------------------

/// TCP flags for the builder.
#[derive(Clone, Copy, Default)]
struct F {
    syn: bool,
    ack: Option<u32>,
    fin: bool,
    rst: bool,
    wscale: Option<u8>,
    win: u16,
}

fn syn() -> F {
    F {
        syn: true,
        ..F::default()
    }
}
fn synack(ack: u32) -> F {
    F {
        syn: true,
        ack: Some(ack),
        ..F::default()
    }
}
fn ack(ack: u32) -> F {
    F {
        ack: Some(ack),
        ..F::default()
    }
}
fn finack(ack: u32) -> F {
    F {
        fin: true,
        ack: Some(ack),
        ..F::default()
    }
}
fn rst() -> F {
    F {
        rst: true,
        ..F::default()
    }
}
fn rstack(ack: u32) -> F {
    F {
        rst: true,
        ack: Some(ack),
        ..F::default()
    }
}

/// A TCP frame; `fwd` = client (A:40000) to server (B:80).
fn tcp(v6: bool, fwd: bool, seq: u32, f: F, len: usize) -> Vec<u8> {
    let (e, sp, dp) = if fwd {
        (PacketBuilder::ethernet2(MAC_A, MAC_B), CPORT, SPORT)
    } else {
        (PacketBuilder::ethernet2(MAC_B, MAC_A), SPORT, CPORT)
    };
    let win = if f.win == 0 { 1000 } else { f.win };
    let ip = if v6 {
        let (s, d) = if fwd { (A6, B6) } else { (B6, A6) };
        e.ipv6(s, d, 64)
    } else {
        let (s, d) = if fwd { (A4, B4) } else { (B4, A4) };
        e.ipv4(s, d, 64)
    };
    let mut b = ip.tcp(sp, dp, seq, win);
    if f.syn {
        b = b.syn();
    }
    if let Some(a) = f.ack {
        b = b.ack(a);
    }
    if f.fin {
        b = b.fin();
    }
    if f.rst {
        b = b.rst();
    }
    if let Some(s) = f.wscale {
        b = b
            .options(&[TcpOptionElement::WindowScale(s)])
            .expect("options");
    }
    let mut out = Vec::new();
    b.write(&mut out, &vec![0x61; len]).expect("build");
    out
}

fn tcp4(fwd: bool, seq: u32, f: F, len: usize) -> Vec<u8> {
    tcp(false, fwd, seq, f, len)
}

fn udp(v6: bool, fwd: bool, payload: usize) -> Vec<u8> {
    let (e, sp, dp) = if fwd {
        (PacketBuilder::ethernet2(MAC_A, MAC_B), 5000, 53)
    } else {
        (PacketBuilder::ethernet2(MAC_B, MAC_A), 53, 5000)
    };
    let ip = if v6 {
        let (s, d) = if fwd { (A6, B6) } else { (B6, A6) };
        e.ipv6(s, d, 64)
    } else {
        let (s, d) = if fwd { (A4, B4) } else { (B4, A4) };
        e.ipv4(s, d, 64)
    };
    let mut out = Vec::new();
    ip.udp(sp, dp)
        .write(&mut out, &vec![0; payload])
        .expect("build");
    out
}

fn udp4(fwd: bool) -> Vec<u8> {
    udp(false, fwd, 10)
}

fn echo(v6: bool, fwd: bool, request: bool, id: u16) -> Vec<u8> {
    let e = if fwd {
        PacketBuilder::ethernet2(MAC_A, MAC_B)
    } else {
        PacketBuilder::ethernet2(MAC_B, MAC_A)
    };
    let mut out = Vec::new();
    if v6 {
        let (s, d) = if fwd { (A6, B6) } else { (B6, A6) };
        let ip = e.ipv6(s, d, 64);
        if request {
            ip.icmpv6_echo_request(id, 1).write(&mut out, &[0; 8])
        } else {
            ip.icmpv6_echo_reply(id, 1).write(&mut out, &[0; 8])
        }
    } else {
        let (s, d) = if fwd { (A4, B4) } else { (B4, A4) };
        let ty = if request {
            Icmpv4Type::EchoRequest(IcmpEchoHeader { id, seq: 1 })
        } else {
            Icmpv4Type::EchoReply(IcmpEchoHeader { id, seq: 1 })
        };
        e.ipv4(s, d, 64).icmpv4(ty).write(&mut out, &[0; 8])
    }
    .expect("build");
    out
}

/// An IP packet (no Ethernet) to quote inside an ICMP error.
fn quoted_udp4(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .udp(sp, dp)
        .write(&mut v, &[0; 100])
        .expect("build");
    v.truncate(28); // what RFC 792 guarantees
    v
}

/// ICMPv4 destination unreachable (port) from `src` to `dst` quoting `q`.
fn icmp4_unreach(src: [u8; 4], dst: [u8; 4], q: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ipv4(src, dst, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ))
        .write(&mut out, q)
        .expect("build");
    out
}

fn other4(fwd: bool, proto: u8) -> Vec<u8> {
    let (s, d) = if fwd { (A4, B4) } else { (B4, A4) };
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(s, d, 64)
        .write(&mut out, IpNumber(proto), &[0; 20])
        .expect("build");
    out
}

// ---- harness ---------------------------------------------------------------

struct H {
    ct: Conntrack,
    now: u64,
}

impl H {
    fn new() -> H {
        H::with(Config::default())
    }

    fn with(cfg: Config) -> H {
        H {
            ct: Conntrack::new(cfg).expect("config"),
            now: T0,
        }
    }

    fn send_on(&mut self, zone: u32, port: u32, frame: &[u8]) -> Track {
        let k = FlowKey::parse(frame).expect("parse");
        let t = self.ct.track(zone, port, &k, frame, self.now);
        self.ct.check_invariants().expect("invariants");
        t
    }

    fn send(&mut self, frame: &[u8]) -> Track {
        self.send_on(ZONE, PORT, frame)
    }

    fn open_on(&mut self, zone: u32, port: u32, frame: &[u8]) -> ConnId {
        match self.send_on(zone, port, frame) {
            Track::New(n) => {
                let id = self.ct.commit(&n, self.now, ()).expect("commit");
                self.ct.check_invariants().expect("invariants");
                id
            }
            t => panic!("expected New, got {t:?}"),
        }
    }

    fn open(&mut self, frame: &[u8]) -> ConnId {
        self.open_on(ZONE, PORT, frame)
    }

    /// Sends and expects Established in `dir`, for entry `id`.
    fn est(&mut self, frame: &[u8], id: ConnId, dir: Dir) {
        assert_eq!(self.send(frame), Track::Established { id, dir });
    }

    fn state(&self, id: ConnId) -> ConnState {
        self.ct.get(id, self.now).expect("live").state
    }

    fn tcp_state(&self, id: ConnId) -> TcpState {
        match self.state(id) {
            ConnState::Tcp(s) => s,
            s => panic!("not TCP: {s:?}"),
        }
    }

    fn remaining(&self, id: ConnId) -> u64 {
        self.ct.get(id, self.now).expect("live").remaining_ns
    }

    /// A TCP connection A->B through the handshake: ISNs 100 (client) and
    /// 500 (server).
    fn established(&mut self, v6: bool) -> ConnId {
        let id = self.open(&tcp(v6, true, 100, syn(), 0));
        self.est(&tcp(v6, false, 500, synack(101), 0), id, Dir::Reply);
        self.est(&tcp(v6, true, 101, ack(501), 0), id, Dir::Original);
        assert_eq!(self.tcp_state(id), TcpState::Established);
        id
    }
}

fn secs(s: u64) -> u64 {
    s * NS
}

// ---- TCP -----------------------------------------------------------------------

#[test]
fn tcp_handshake_data_and_orderly_close() {
    let mut h = H::new();
    let to = Timeouts::default();
    let id = h.open(&tcp4(true, 100, syn(), 0));
    assert_eq!(h.tcp_state(id), TcpState::SynSent);
    assert_eq!(h.remaining(id), secs(to.tcp_transitory_secs));

    h.est(&tcp4(false, 500, synack(101), 0), id, Dir::Reply);
    assert_eq!(h.tcp_state(id), TcpState::SynRecv);
    assert_eq!(h.remaining(id), secs(to.tcp_transitory_secs));

    h.est(&tcp4(true, 101, ack(501), 0), id, Dir::Original);
    assert_eq!(h.tcp_state(id), TcpState::Established);
    assert_eq!(h.remaining(id), secs(to.tcp_established_secs));

    h.est(&tcp4(true, 101, ack(501), 10), id, Dir::Original);
    h.est(&tcp4(false, 501, ack(111), 20), id, Dir::Reply);

    // Client closes; server acknowledges (half-close), then closes.
    h.est(&tcp4(true, 111, finack(521), 0), id, Dir::Original);
    assert_eq!(h.tcp_state(id), TcpState::FinWait);
    assert_eq!(h.remaining(id), secs(to.tcp_transitory_secs));
    // Server data before its own ACK of the FIN leaves FIN_WAIT.
    h.est(&tcp4(false, 521, ack(111), 5), id, Dir::Reply);
    assert_eq!(h.tcp_state(id), TcpState::FinWait);
    h.est(&tcp4(false, 526, ack(112), 0), id, Dir::Reply);
    assert_eq!(h.tcp_state(id), TcpState::CloseWait);
    assert_eq!(h.remaining(id), secs(to.tcp_transitory_secs));
    // Half-closed: the server still sends data, the client ACKs it.
    h.est(&tcp4(false, 526, ack(112), 100), id, Dir::Reply);
    h.est(&tcp4(true, 112, ack(626), 0), id, Dir::Original);
    assert_eq!(h.tcp_state(id), TcpState::CloseWait);

    h.est(&tcp4(false, 626, finack(112), 0), id, Dir::Reply);
    assert_eq!(h.tcp_state(id), TcpState::LastAck);
    h.est(&tcp4(true, 112, ack(627), 0), id, Dir::Original);
    assert_eq!(h.tcp_state(id), TcpState::TimeWait);
    assert_eq!(h.remaining(id), secs(to.tcp_time_wait_secs));
    // Retransmitted final ACK stays in TIME_WAIT.
    h.est(&tcp4(true, 112, ack(627), 0), id, Dir::Original);
    assert_eq!(h.tcp_state(id), TcpState::TimeWait);

    let v = h.ct.get(id, h.now).expect("live");
    assert_eq!(v.stats[0].packets, 7);
    assert_eq!(v.stats[1].packets, 6);
    // 40-byte IPv4+TCP headers plus payloads.
    assert_eq!(v.stats[0].bytes, 7 * 40 + 10);
    assert_eq!(v.stats[1].bytes, 6 * 40 + 20 + 5 + 100);
}

#[test]
fn tcp_fin_acked_by_peer_fin() {
    // Server answers the client's FIN with FIN+ACK in one segment.
    let mut h = H::new();
    let id = h.established(false);
    h.est(&tcp4(true, 101, finack(501), 0), id, Dir::Original);
    assert_eq!(h.tcp_state(id), TcpState::FinWait);
    h.est(&tcp4(false, 501, finack(102), 0), id, Dir::Reply);
    assert_eq!(h.tcp_state(id), TcpState::LastAck);
    h.est(&tcp4(true, 102, ack(502), 0), id, Dir::Original);
    assert_eq!(h.tcp_state(id), TcpState::TimeWait);
}

#[test]
fn tcp_simultaneous_close() {
    let mut h = H::new();
    let id = h.established(false);
    // Both FINs cross: neither acknowledges the other's.
    h.est(&tcp4(true, 101, finack(501), 0), id, Dir::Original);
    h.est(&tcp4(false, 501, finack(101), 0), id, Dir::Reply);
    assert_eq!(h.tcp_state(id), TcpState::LastAck);
    h.est(&tcp4(true, 102, ack(502), 0), id, Dir::Original);
    assert_eq!(h.tcp_state(id), TcpState::LastAck);
    h.est(&tcp4(false, 502, ack(102), 0), id, Dir::Reply);
    assert_eq!(h.tcp_state(id), TcpState::TimeWait);
}

#[test]
fn tcp_close_initiated_by_server() {
    let mut h = H::new();
    let id = h.established(true);
    h.est(&tcp(true, false, 501, finack(101), 0), id, Dir::Reply);
    assert_eq!(h.tcp_state(id), TcpState::FinWait);
    h.est(&tcp(true, true, 101, ack(502), 0), id, Dir::Original);
    assert_eq!(h.tcp_state(id), TcpState::CloseWait);
    h.est(&tcp(true, true, 101, finack(502), 0), id, Dir::Original);
    assert_eq!(h.tcp_state(id), TcpState::LastAck);
    h.est(&tcp(true, false, 502, ack(102), 0), id, Dir::Reply);
    assert_eq!(h.tcp_state(id), TcpState::TimeWait);
}

#[test]
fn tcp_simultaneous_open() {
    let mut h = H::new();
    let id = h.open(&tcp4(true, 100, syn(), 0));
    // The peer's own SYN crosses ours.
    h.est(&tcp4(false, 500, syn(), 0), id, Dir::Reply);
    assert_eq!(h.tcp_state(id), TcpState::SynRecv);
    // Each side repeats its SYN with an ACK of the other's.
    h.est(&tcp4(true, 100, synack(501), 0), id, Dir::Original);
    assert_eq!(h.tcp_state(id), TcpState::SynRecv);
    h.est(&tcp4(false, 500, synack(101), 0), id, Dir::Reply);
    assert_eq!(h.tcp_state(id), TcpState::Established);
}

#[test]
fn tcp_rst_closes_in_every_state() {
    let to = Timeouts::default();
    // In ESTABLISHED, from either side, in window.
    for fwd in [true, false] {
        let mut h = H::new();
        let id = h.established(false);
        let (seq, dir) = if fwd {
            (101, Dir::Original)
        } else {
            (501, Dir::Reply)
        };
        h.est(&tcp4(fwd, seq, rst(), 0), id, dir);
        assert_eq!(h.tcp_state(id), TcpState::Close);
        assert_eq!(h.remaining(id), secs(to.tcp_close_secs));
        // Stragglers after the RST still belong to the entry.
        h.est(&tcp4(true, 101, ack(501), 0), id, Dir::Original);
        assert_eq!(h.tcp_state(id), TcpState::Close);
    }
    // "Connection refused": RST+ACK of the SYN while SYN_SENT.
    let mut h = H::new();
    let id = h.open(&tcp4(true, 100, syn(), 0));
    h.est(&tcp4(false, 0, rstack(101), 0), id, Dir::Reply);
    assert_eq!(h.tcp_state(id), TcpState::Close);
    // Client aborts in SYN_RECV.
    let mut h = H::new();
    let id = h.open(&tcp4(true, 100, syn(), 0));
    h.est(&tcp4(false, 500, synack(101), 0), id, Dir::Reply);
    h.est(&tcp4(true, 101, rst(), 0), id, Dir::Original);
    assert_eq!(h.tcp_state(id), TcpState::Close);
    // RST in FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT.
    for steps in 1..=4 {
        let mut h = H::new();
        let id = h.established(false);
        let close = [
            tcp4(true, 101, finack(501), 0),
            tcp4(false, 501, ack(102), 0),
            tcp4(false, 501, finack(102), 0),
            tcp4(true, 102, ack(502), 0),
        ];
        for f in close.iter().take(steps) {
            assert!(matches!(h.send(f), Track::Established { .. }));
        }
        h.est(&tcp4(false, 502, rst(), 0), id, Dir::Reply);
        assert_eq!(h.tcp_state(id), TcpState::Close);
    }
}

#[test]
fn tcp_rst_out_of_window_is_invalid() {
    let mut h = H::new();
    let id = h.established(false);
    // 2^20 past the client's next sequence number: outside a 64 KiB window.
    let t = h.send(&tcp4(true, 101 + (1 << 20), rst(), 0));
    assert_eq!(t, Track::Invalid(Invalid::TcpRstOutOfWindow));
    assert_eq!(h.tcp_state(id), TcpState::Established);
    assert_eq!(h.ct.stats().invalid(Invalid::TcpRstOutOfWindow), 1);
    // Just inside the window (65535 either way) is accepted.
    h.est(
        &tcp4(true, 101u32.wrapping_sub(65535), rst(), 0),
        id,
        Dir::Original,
    );
    assert_eq!(h.tcp_state(id), TcpState::Close);

    // SYN_SENT: a RST without ACK, or acking the wrong number, from the
    // responder is not acceptable (RFC 9293 3.10.7.3).
    let mut h = H::new();
    let id = h.open(&tcp4(true, 100, syn(), 0));
    assert_eq!(
        h.send(&tcp4(false, 0, rst(), 0)),
        Track::Invalid(Invalid::TcpRstOutOfWindow)
    );
    assert_eq!(
        h.send(&tcp4(false, 0, rstack(999), 0)),
        Track::Invalid(Invalid::TcpRstOutOfWindow)
    );
    assert_eq!(h.tcp_state(id), TcpState::SynSent);
}

#[test]
fn tcp_rst_window_uses_window_scale() {
    // Both SYNs carry window scale 7; the server advertises 1000 << 7.
    let scaled = |f: F| F {
        wscale: Some(7),
        ..f
    };
    let mut h = H::new();
    let id = h.open(&tcp4(true, 100, scaled(syn()), 0));
    h.est(&tcp4(false, 500, scaled(synack(101)), 0), id, Dir::Reply);
    h.est(&tcp4(true, 101, ack(501), 0), id, Dir::Original);
    h.est(&tcp4(false, 501, ack(101), 0), id, Dir::Reply);
    // 100,000 ahead: beyond 65535 but within 128,000.
    h.est(&tcp4(true, 101 + 100_000, rst(), 0), id, Dir::Original);
    assert_eq!(h.tcp_state(id), TcpState::Close);

    // Without scaling on one side, the same RST is out of window.
    let mut h = H::new();
    let id = h.open(&tcp4(true, 100, scaled(syn()), 0));
    h.est(&tcp4(false, 500, synack(101), 0), id, Dir::Reply);
    h.est(&tcp4(true, 101, ack(501), 0), id, Dir::Original);
    h.est(&tcp4(false, 501, ack(101), 0), id, Dir::Reply);
    assert_eq!(
        h.send(&tcp4(true, 101 + 100_000, rst(), 0)),
        Track::Invalid(Invalid::TcpRstOutOfWindow)
    );
}

#[test]
fn tcp_without_entry_is_invalid_new() {
    let mut h = H::new();
    for (f, why) in [
        (ack(1), Invalid::TcpNotSyn),
        (synack(1), Invalid::TcpNotSyn),
        (rst(), Invalid::TcpNotSyn),
        (rstack(1), Invalid::TcpNotSyn),
        (finack(1), Invalid::TcpNotSyn),
        (F::default(), Invalid::TcpBadFlags),
        (
            F {
                fin: true,
                ..F::default()
            },
            Invalid::TcpBadFlags,
        ),
        (
            F {
                syn: true,
                fin: true,
                ..F::default()
            },
            Invalid::TcpBadFlags,
        ),
        (
            F {
                syn: true,
                rst: true,
                ..F::default()
            },
            Invalid::TcpBadFlags,
        ),
    ] {
        assert_eq!(h.send(&tcp4(true, 100, f, 0)), Track::Invalid(why));
    }
    assert!(h.ct.is_empty());
    assert_eq!(h.ct.stats().invalid(Invalid::TcpNotSyn), 5);
    assert_eq!(h.ct.stats().invalid(Invalid::TcpBadFlags), 4);
}

#[test]
fn tcp_out_of_state_segments() {
    let mut h = H::new();
    let id = h.open(&tcp4(true, 100, syn(), 0));
    // Retransmitted SYN (even with a new ISN) stays SYN_SENT.
    h.est(&tcp4(true, 100, syn(), 0), id, Dir::Original);
    h.est(&tcp4(true, 200, syn(), 0), id, Dir::Original);
    assert_eq!(h.tcp_state(id), TcpState::SynSent);
    // SYN-ACK for the old ISN.
    assert_eq!(
        h.send(&tcp4(false, 500, synack(101), 0)),
        Track::Invalid(Invalid::TcpSynAckMismatch)
    );
    // ACK/FIN before any SYN-ACK, from either side.
    for fwd in [true, false] {
        assert_eq!(
            h.send(&tcp4(fwd, 201, ack(501), 0)),
            Track::Invalid(Invalid::TcpOutOfState)
        );
    }
    assert_eq!(h.tcp_state(id), TcpState::SynSent);
    h.est(&tcp4(false, 500, synack(201), 0), id, Dir::Reply);
    // Retransmitted SYN-ACK (final ACK lost).
    h.est(&tcp4(false, 500, synack(201), 0), id, Dir::Reply);
    h.est(&tcp4(true, 201, ack(501), 0), id, Dir::Original);
    assert_eq!(h.tcp_state(id), TcpState::Established);
    h.est(&tcp4(false, 500, synack(201), 0), id, Dir::Reply);
    // Retransmitted original SYN in ESTABLISHED: harmless.
    h.est(&tcp4(true, 200, syn(), 0), id, Dir::Original);
    // A different SYN from either side in ESTABLISHED.
    assert_eq!(
        h.send(&tcp4(true, 9999, syn(), 0)),
        Track::Invalid(Invalid::TcpUnexpectedSyn)
    );
    assert_eq!(
        h.send(&tcp4(false, 9999, syn(), 0)),
        Track::Invalid(Invalid::TcpUnexpectedSyn)
    );
    assert_eq!(
        h.send(&tcp4(false, 9999, synack(201), 0)),
        Track::Invalid(Invalid::TcpUnexpectedSyn)
    );
    assert_eq!(
        h.send(&tcp4(true, 300, synack(501), 0)),
        Track::Invalid(Invalid::TcpUnexpectedSyn)
    );
    assert_eq!(h.tcp_state(id), TcpState::Established);
    // Invalid packets are not counted in the entry.
    assert_eq!(h.ct.get(id, h.now).expect("live").stats[0].packets, 5);
}

#[test]
fn tcp_syn_reopens_time_wait_and_close() {
    let mut h = H::new();
    let id = h.established(false);
    h.est(&tcp4(true, 101, rst(), 0), id, Dir::Original);
    // New SYN from the client: the closed entry goes, a new one may start.
    let Track::New(n) = h.send(&tcp4(true, 7000, syn(), 0)) else {
        panic!("expected New");
    };
    assert!(h.ct.get(id, h.now).is_none());
    assert_eq!(h.ct.stats().removed, 1);
    let id2 = h.ct.commit(&n, h.now, ()).expect("commit");
    assert_ne!(id, id2);
    assert_eq!(h.tcp_state(id2), TcpState::SynSent);

    // From TIME_WAIT, a SYN from the former server opens a connection the
    // other way round.
    let mut h = H::new();
    let id = h.established(false);
    for f in [
        tcp4(true, 101, finack(501), 0),
        tcp4(false, 501, finack(102), 0),
        tcp4(true, 102, ack(502), 0),
    ] {
        h.send(&f);
    }
    assert_eq!(h.tcp_state(id), TcpState::TimeWait);
    let id2 = h.open(&tcp4(false, 9000, syn(), 0));
    let v = h.ct.get(id2, h.now).expect("live");
    assert_eq!(v.orig.src, IpAddr::from(B4));
    assert_eq!(v.orig.src_port, SPORT);
    assert_eq!(h.ct.len(), 1);
}

#[test]
fn tcp_ipv6_handshake() {
    let mut h = H::new();
    let id = h.established(true);
    let k = h.ct.get(id, h.now).expect("live").orig;
    assert!(k.is_v6());
    assert_eq!(k.src, IpAddr::from(A6));
}

// ---- both directions, keys, zones ----------------------------------------------

#[test]
fn lookup_both_directions_and_zones() {
    let mut h = H::new();
    let f = udp4(true);
    let id = h.open(&f);
    let k = ConnKey::from_flow(ZONE, &FlowKey::parse(&f).expect("parse")).expect("key");
    assert_eq!(h.ct.lookup(&k, h.now), Some((id, Dir::Original)));
    assert_eq!(h.ct.lookup(&k.reverse(), h.now), Some((id, Dir::Reply)));
    let r = udp4(false);
    assert_eq!(
        h.ct.lookup_flow(ZONE, &FlowKey::parse(&r).expect("parse"), h.now),
        Some((id, Dir::Reply))
    );
    let v = h.ct.get(id, h.now).expect("live");
    assert_eq!(v.orig, k);
    assert_eq!(v.reply, k.reverse());
    // Another zone: same addresses, a different connection.
    let other = ConnKey { zone: 8, ..k };
    assert_eq!(h.ct.lookup(&other, h.now), None);
    let id8 = h.open_on(8, PORT, &f);
    assert_ne!(id8, id);
    assert_eq!(h.ct.len(), 2);
    // Lookup has no side effects.
    let before = h.ct.get(id, h.now).expect("live").stats;
    h.ct.lookup(&k, h.now);
    assert_eq!(h.ct.get(id, h.now).expect("live").stats, before);
}

#[test]
fn key_display_and_reverse() {
    let k = ConnKey {
        zone: 3,
        src: IpAddr::from(A4),
        dst: IpAddr::from(B4),
        proto: 6,
        src_port: 1,
        dst_port: 2,
    };
    assert_eq!(k.to_string(), "zone 3 tcp 10.0.0.1:1 -> 10.0.0.2:2");
    assert_eq!(k.reverse().reverse(), k);
    let i = ConnKey {
        proto: 1,
        src_port: 9,
        dst_port: 8,
        ..k
    };
    assert_eq!(i.reverse().dst_port, 0);
    assert_eq!(i.reverse().src_port, 9);
    assert_eq!(
        i.to_string(),
        "zone 3 icmp 10.0.0.1 -> 10.0.0.2 id 9 type 8"
    );
    let g = ConnKey {
        src: IpAddr::from(A6),
        dst: IpAddr::from(B6),
        proto: 47,
        src_port: 0,
        dst_port: 0,
        ..k
    };
    assert_eq!(g.to_string(), "zone 3 proto 47 [fd00::1] -> [fd00::2]");
}

// ---- UDP, ICMP, other ---------------------------------------------------------

#[test]
fn udp_unreplied_then_assured() {
    for v6 in [false, true] {
        let mut h = H::new();
        let to = Timeouts::default();
        let id = h.open(&udp(v6, true, 10));
        assert_eq!(h.state(id), ConnState::Udp { assured: false });
        assert_eq!(h.remaining(id), secs(to.udp_unreplied_secs));
        h.est(&udp(v6, true, 10), id, Dir::Original);
        assert_eq!(h.state(id), ConnState::Udp { assured: false });
        h.est(&udp(v6, false, 10), id, Dir::Reply);
        assert_eq!(h.state(id), ConnState::Udp { assured: true });
        assert_eq!(h.remaining(id), secs(to.udp_assured_secs));
        assert_eq!(h.state(id).as_str(), "ASSURED");
    }
}

#[test]
fn icmp_echo_v4_and_v6() {
    for v6 in [false, true] {
        let mut h = H::new();
        // A reply with no request.
        assert_eq!(
            h.send(&echo(v6, false, false, 9)),
            Track::Invalid(Invalid::IcmpReplyNoRequest)
        );
        let id = h.open(&echo(v6, true, true, 9));
        assert_eq!(h.state(id), ConnState::Icmp { replied: false });
        assert_eq!(h.remaining(id), secs(60));
        h.est(&echo(v6, false, false, 9), id, Dir::Reply);
        assert_eq!(h.state(id), ConnState::Icmp { replied: true });
        // Same id, other identifier: other connections.
        assert!(matches!(
            h.send(&echo(v6, false, false, 10)),
            Track::Invalid(Invalid::IcmpReplyNoRequest)
        ));
        // A request the other way with the same id is a new connection
        // (types are part of the key).
        assert!(matches!(h.send(&echo(v6, false, true, 9)), Track::New(_)));
        // A reply travelling the request's way matches nothing.
        assert_eq!(
            h.send(&echo(v6, true, false, 9)),
            Track::Invalid(Invalid::IcmpReplyNoRequest)
        );
    }
}

#[test]
fn icmp_other_types_untracked() {
    let mut h = H::new();
    // ICMPv6 neighbour solicitation (135).
    let mut f = echo(true, true, true, 1);
    f[54] = 135;
    assert_eq!(h.send(&f), Track::Untracked(Untracked::IcmpOther));
    // ICMPv4 router solicitation (10).
    let mut f = echo(false, true, true, 1);
    f[34] = 10;
    assert_eq!(h.send(&f), Track::Untracked(Untracked::IcmpOther));
    assert_eq!(h.ct.stats().untracked(Untracked::IcmpOther), 2);
}

#[test]
fn other_protocols_by_address() {
    let mut h = H::new();
    let id = h.open(&other4(true, 47));
    assert_eq!(h.state(id), ConnState::Other { replied: false });
    assert_eq!(h.remaining(id), secs(600));
    h.est(&other4(false, 47), id, Dir::Reply);
    assert_eq!(h.state(id), ConnState::Other { replied: true });
    // Another protocol between the same hosts is another connection.
    assert!(matches!(h.send(&other4(true, 50)), Track::New(_)));
}

#[test]
fn untracked_and_malformed() {
    let mut h = H::new();
    // ARP.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&[10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
    assert_eq!(h.send(&arp), Track::Untracked(Untracked::NotIp));
    // A later IPv4 fragment.
    let mut f = udp4(true);
    f[20] = 0x00;
    f[21] = 0x10;
    assert_eq!(h.send(&f), Track::Untracked(Untracked::Fragment));
    // A first fragment has ports and is tracked.
    let mut f = udp4(true);
    f[20] = 0x20;
    assert!(matches!(h.send(&f), Track::New(_)));
    // TCP data offset 4.
    let mut f = tcp4(true, 1, syn(), 0);
    f[46] = 0x40;
    assert_eq!(h.send(&f), Track::Invalid(Invalid::Malformed));
    // A flow key that does not match the frame it comes with.
    let good = tcp4(true, 1, syn(), 0);
    let k = FlowKey::parse(&good).expect("parse");
    assert_eq!(
        h.ct.track(ZONE, PORT, &k, &good[..40], h.now),
        Track::Invalid(Invalid::Malformed)
    );
    assert_eq!(h.ct.stats().untracked(Untracked::NotIp), 1);
    assert_eq!(h.ct.stats().invalid(Invalid::Malformed), 2);
}

// ---- related ICMP errors --------------------------------------------------------

#[test]
fn related_icmpv4_errors() {
    let mut h = H::new();
    let id = h.open(&udp4(true));
    // The server says port unreachable about A:5000 -> B:53.
    let q = quoted_udp4(A4, B4, 5000, 53);
    assert_eq!(
        h.send(&icmp4_unreach(B4, A4, &q)),
        Track::Related {
            id,
            dir: Dir::Reply
        }
    );
    // A router on the path may send it too.
    assert_eq!(
        h.send(&icmp4_unreach(R4, A4, &q)),
        Track::Related {
            id,
            dir: Dir::Reply
        }
    );
    // About a reply-direction packet, sent to the server.
    let qr = quoted_udp4(B4, A4, 53, 5000);
    assert_eq!(
        h.send(&icmp4_unreach(R4, B4, &qr)),
        Track::Related {
            id,
            dir: Dir::Original
        }
    );
    // Not addressed to the quoted packet's sender.
    assert_eq!(
        h.send(&icmp4_unreach(R4, B4, &q)),
        Track::Invalid(Invalid::IcmpErrorAddrMismatch)
    );
    // About an unknown flow.
    let qx = quoted_udp4(A4, B4, 5001, 53);
    assert_eq!(
        h.send(&icmp4_unreach(B4, A4, &qx)),
        Track::Invalid(Invalid::IcmpErrorNoMatch)
    );
    // Quote too short for ports; a later fragment; an error about an error.
    assert_eq!(
        h.send(&icmp4_unreach(B4, A4, &q[..22])),
        Track::Invalid(Invalid::IcmpErrorBadQuote)
    );
    let mut qf = q.clone();
    qf[7] = 1; // fragment offset 8
    assert_eq!(
        h.send(&icmp4_unreach(B4, A4, &qf)),
        Track::Invalid(Invalid::IcmpErrorBadQuote)
    );
    let inner_err = icmp4_unreach(B4, A4, &q);
    assert_eq!(
        h.send(&icmp4_unreach(A4, B4, &inner_err[14..42])),
        Track::Invalid(Invalid::IcmpErrorBadQuote)
    );
    assert_eq!(h.ct.stats().related, 3);
    // Errors do not refresh or count in the entry.
    assert_eq!(h.ct.get(id, h.now).expect("live").stats[1].packets, 0);

    // About an echo request.
    let id = h.open(&echo(false, true, true, 77));
    let e = echo(false, true, true, 77);
    assert_eq!(
        h.send(&icmp4_unreach(R4, A4, &e[14..])),
        Track::Related {
            id,
            dir: Dir::Reply
        }
    );
    // About a TCP segment (only 8 bytes of TCP quoted).
    let tid = h.established(false);
    let seg = tcp4(true, 101, ack(501), 0);
    assert_eq!(
        h.send(&icmp4_unreach(R4, A4, &seg[14..42])),
        Track::Related {
            id: tid,
            dir: Dir::Reply
        }
    );
}

#[test]
fn related_icmpv6_errors() {
    let mut h = H::new();
    let id = h.established(true);
    let seg = tcp(true, true, 101, ack(501), 1200);
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ipv6(B6, A6, 64)
        .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
        .write(&mut out, &seg[14..14 + 1000])
        .expect("build");
    assert_eq!(
        h.send(&out),
        Track::Related {
            id,
            dir: Dir::Reply
        }
    );
    // About UDP in the reply direction (destination unreachable, port).
    let uid = h.open(&udp(true, true, 10));
    let r = udp(true, false, 10);
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(A6, B6, 64)
        .icmpv6(Icmpv6Type::DestinationUnreachable(
            etherparse::icmpv6::DestUnreachableCode::Port,
        ))
        .write(&mut out, &r[14..])
        .expect("build");
    assert_eq!(
        h.send(&out),
        Track::Related {
            id: uid,
            dir: Dir::Original
        }
    );
    // Unknown flow.
    let mut out2 = Vec::new();
    let mut q = udp(true, true, 10)[14..].to_vec();
    q[40] = 0x99; // another source port
    PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ipv6(B6, A6, 64)
        .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
        .write(&mut out2, &q)
        .expect("build");
    assert_eq!(h.send(&out2), Track::Invalid(Invalid::IcmpErrorNoMatch));
}

// ---- timeouts --------------------------------------------------------------------

/// Brings a fresh table's single entry into some state at `T0` and returns
/// its id.
type Setup = fn(&mut H) -> ConnId;

fn each_class() -> Vec<(&'static str, Setup, u64)> {
    let to = Timeouts::default();
    fn close_steps(h: &mut H, n: usize) -> ConnId {
        let id = h.established(false);
        let steps = [
            tcp4(true, 101, finack(501), 0),
            tcp4(false, 501, ack(102), 0),
            tcp4(false, 501, finack(102), 0),
            tcp4(true, 102, ack(502), 0),
        ];
        for f in steps.iter().take(n) {
            h.send(f);
        }
        id
    }
    vec![
        (
            "udp unreplied",
            (|h: &mut H| h.open(&udp4(true))) as Setup,
            to.udp_unreplied_secs,
        ),
        (
            "udp assured",
            |h| {
                let id = h.open(&udp4(true));
                h.send(&udp4(false));
                id
            },
            to.udp_assured_secs,
        ),
        (
            "syn_sent",
            |h| h.open(&tcp4(true, 100, syn(), 0)),
            to.tcp_transitory_secs,
        ),
        (
            "syn_recv",
            |h| {
                let id = h.open(&tcp4(true, 100, syn(), 0));
                h.send(&tcp4(false, 500, synack(101), 0));
                id
            },
            to.tcp_transitory_secs,
        ),
        (
            "established",
            |h| h.established(false),
            to.tcp_established_secs,
        ),
        ("fin_wait", |h| close_steps(h, 1), to.tcp_transitory_secs),
        ("close_wait", |h| close_steps(h, 2), to.tcp_transitory_secs),
        ("last_ack", |h| close_steps(h, 3), to.tcp_transitory_secs),
        ("time_wait", |h| close_steps(h, 4), to.tcp_time_wait_secs),
        (
            "close",
            |h| {
                let id = h.established(false);
                h.send(&tcp4(true, 101, rst(), 0));
                id
            },
            to.tcp_close_secs,
        ),
        (
            "icmp",
            |h| h.open(&echo(false, true, true, 5)),
            to.icmp_secs,
        ),
        ("other", |h| h.open(&other4(true, 47)), to.other_secs),
    ]
}

#[test]
fn every_timeout_just_below_and_above() {
    for (name, setup, secs_) in each_class() {
        let mut h = H::new();
        let id = setup(&mut h);
        let key = h.ct.get(id, h.now).expect("live").orig;
        let t = secs(secs_);
        // One nanosecond before the deadline: alive for lookup and get.
        let below = T0 + t - 1;
        assert_eq!(
            h.ct.lookup(&key, below).map(|x| x.0),
            Some(id),
            "{name} alive just below"
        );
        assert_eq!(h.ct.get(id, below).expect(name).remaining_ns, 1);
        assert_eq!(h.ct.expire(below, usize::MAX), 0, "{name}");
        // At the deadline: gone for lookups, reaped by expire.
        let at = T0 + t;
        assert_eq!(h.ct.lookup(&key, at), None, "{name} expired at deadline");
        assert!(h.ct.get(id, at).is_none());
        assert_eq!(h.ct.entries(at).count(), 0);
        assert_eq!(h.ct.len(), 1, "{name}: not reaped by lookups");
        assert_eq!(h.ct.expire(at, usize::MAX), 1, "{name} reaped");
        assert!(h.ct.is_empty());
        assert_eq!(h.ct.stats().expired, 1);
        h.ct.check_invariants().expect("invariants");
    }
}

#[test]
fn expired_entry_on_track_is_absent() {
    let mut h = H::new();
    let id = h.open(&udp4(true));
    h.now += secs(120);
    // The same flow is new again; the old entry was removed on the way.
    let Track::New(n) = h.send(&udp4(true)) else {
        panic!("expected New");
    };
    assert_eq!(h.ct.len(), 0);
    assert_eq!(h.ct.stats().expired, 1);
    let id2 = h.ct.commit(&n, h.now, ()).expect("commit");
    assert!(h.ct.get(id, h.now).is_none());
    assert!(h.ct.get(id2, h.now).is_some());
    // An established TCP flow that timed out: its next ACK is invalid new.
    let mut h = H::new();
    h.established(false);
    h.now += secs(7440);
    assert_eq!(
        h.send(&tcp4(true, 101, ack(501), 0)),
        Track::Invalid(Invalid::TcpNotSyn)
    );
}

#[test]
fn packets_refresh_the_timer() {
    let mut h = H::new();
    let id = h.open(&udp4(true));
    for _ in 0..10 {
        h.now += secs(119);
        h.est(&udp4(true), id, Dir::Original);
    }
    assert_eq!(h.remaining(id), secs(120));
    assert_eq!(h.ct.expire(h.now + secs(119), usize::MAX), 0);
    // Reaped at most one granularity (1 s) after the deadline.
    assert_eq!(h.ct.expire(h.now + secs(121), usize::MAX), 1);
}

#[test]
fn reaping_is_late_by_at_most_the_granularity() {
    // Many flows refreshed at different times: expire at deadline + 1 s
    // always finds every expired one.
    let mut h = H::new();
    let mut frames = Vec::new();
    for i in 0..50u16 {
        let mut f = udp4(true);
        f[34..36].copy_from_slice(&(1000 + i).to_be_bytes());
        h.open(&f);
        frames.push(f);
        h.now += NS / 10;
    }
    // Refresh odd flows at various sub-second offsets.
    for (i, f) in frames.iter().enumerate() {
        if i % 2 == 1 {
            h.now += NS / 7;
            h.send(f);
        }
    }
    let last = h.now;
    for step in 0..50u64 {
        let now = last + secs(100) + step * NS / 2;
        h.ct.expire(now, usize::MAX);
        let alive_but_expired =
            h.ct.len()
                .saturating_sub(h.ct.entries(now.saturating_sub(NS)).count());
        assert_eq!(alive_but_expired, 0, "entry reaped more than 1 s late");
        h.ct.check_invariants().expect("invariants");
    }
    assert!(h.ct.is_empty());
}

#[test]
fn timeouts_validate() {
    assert_eq!(Timeouts::default().validate(), Ok(()));
    assert_eq!(Config::default().validate(), Ok(()));
    type Set = fn(&mut Timeouts);
    let cases: [(Set, &str, u64); 5] = [
        (|t| t.udp_unreplied_secs = 30, "udp_unreplied_secs", 120),
        (|t| t.udp_assured_secs = 119, "udp_assured_secs", 120),
        (
            |t| t.tcp_established_secs = 7439,
            "tcp_established_secs",
            7440,
        ),
        (|t| t.tcp_transitory_secs = 60, "tcp_transitory_secs", 240),
        (|t| t.icmp_secs = 59, "icmp_secs", 60),
    ];
    for (set, field, min) in cases {
        let mut t = Timeouts::default();
        set(&mut t);
        match t.validate() {
            Err(e @ ConfigError::TimeoutTooShort { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(field) && msg.contains(&min.to_string()),
                    "{msg}"
                );
                assert!(msg.contains("RFC"), "{msg}");
            }
            other => panic!("{field}: {other:?}"),
        }
    }
    let t = Timeouts {
        tcp_time_wait_secs: 0,
        ..Timeouts::default()
    };
    assert!(t.validate().is_err());
    let t = Timeouts {
        other_secs: MAX_TIMEOUT_SECS + 1,
        ..Timeouts::default()
    };
    assert!(matches!(
        t.validate(),
        Err(ConfigError::TimeoutTooLong { .. })
    ));
    let c = Config {
        max_entries: 0,
        ..Config::default()
    };
    assert!(Conntrack::<()>::new(c).is_err());
    let c = Config {
        max_per_port: 0,
        ..Config::default()
    };
    assert_eq!(c.validate(), Err(ConfigError::MaxPerPortZero));
    // Timeouts parse from TOML-like config with defaults for missing keys.
    let t: Timeouts = serde_json::from_str(r#"{"udp_assured_secs": 600}"#).expect("json");
    assert_eq!(t.udp_assured_secs, 600);
    assert_eq!(t.icmp_secs, 60);
}

// ---- caps ------------------------------------------------------------------------

fn udp_from(sport: u16) -> Vec<u8> {
    let mut f = udp4(true);
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f
}

#[test]
fn global_cap() {
    let mut h = H::with(Config {
        max_entries: 3,
        max_per_port: 3,
        ..Config::default()
    });
    for p in 0..3 {
        h.open_on(ZONE, p, &udp_from(1000 + p as u16));
    }
    // A New seen before the table filled up is refused at commit.
    let mut h2 = H::with(Config {
        max_entries: 1,
        max_per_port: 1,
        ..Config::default()
    });
    let Track::New(a) = h2.send(&udp_from(1)) else {
        panic!()
    };
    let Track::New(b) = h2.send(&udp_from(2)) else {
        panic!()
    };
    h2.ct.commit(&a, h2.now, ()).expect("first");
    assert_eq!(
        h2.ct.commit(&b, h2.now, ()),
        Err(CommitError::Limit(Limit::Global))
    );
    assert_eq!(h2.ct.stats().refused_global, 1);

    assert_eq!(
        h.send_on(ZONE, 9, &udp_from(2000)),
        Track::Refused(Limit::Global)
    );
    assert_eq!(h.ct.stats().refused_global, 1);
    assert_eq!(h.ct.stats().refused(Limit::Global), 1);
    // Packets of existing entries still pass.
    assert!(matches!(
        h.send_on(ZONE, 0, &udp_from(1000)),
        Track::Established { .. }
    ));
    // Removing one makes room.
    let (id, _) =
        h.ct.lookup_flow(ZONE, &FlowKey::parse(&udp_from(1001)).expect("p"), h.now)
            .expect("there");
    assert_eq!(h.ct.remove(id), Some(()));
    assert_eq!(h.ct.remove(id), None);
    h.open_on(ZONE, 9, &udp_from(2000));
    assert_eq!(h.ct.len(), 3);
    // Expired entries are reaped when the cap is hit.
    h.now += secs(120);
    h.open_on(ZONE, 9, &udp_from(3000));
    assert_eq!(h.ct.len(), 1);
}

#[test]
fn per_port_cap_and_flush() {
    let mut h = H::with(Config {
        max_entries: 100,
        max_per_port: 2,
        ..Config::default()
    });
    h.open_on(ZONE, 1, &udp_from(1));
    h.open_on(ZONE, 1, &udp_from(2));
    assert_eq!(
        h.send_on(ZONE, 1, &udp_from(3)),
        Track::Refused(Limit::Port)
    );
    assert_eq!(
        h.send_on(ZONE, 1, &udp_from(4)),
        Track::Refused(Limit::Port)
    );
    assert_eq!(h.ct.stats().refused_port, 2);
    // Another port is not affected.
    h.open_on(ZONE, 2, &udp_from(3));
    assert_eq!(h.ct.port_count(1), 2);
    assert_eq!(h.ct.port_count(2), 1);
    // The reply of port 1's flow does not count against anything.
    assert!(matches!(
        h.send_on(ZONE, 2, &{
            let mut r = udp4(false);
            r[36..38].copy_from_slice(&1u16.to_be_bytes());
            r
        }),
        Track::Established { .. }
    ));
    assert_eq!(h.ct.flush_port(1), 2);
    assert_eq!(h.ct.port_count(1), 0);
    assert_eq!(h.ct.flush_port(1), 0);
    assert_eq!(h.ct.len(), 1);
    h.open_on(ZONE, 1, &udp_from(3000));
    h.open_on(ZONE, 1, &udp_from(3001));
    assert_eq!(h.ct.stats().removed, 2);
    h.ct.check_invariants().expect("invariants");
}

#[test]
fn flush_zone_and_clear() {
    let mut h = H::new();
    h.open_on(1, 1, &udp_from(1));
    h.open_on(1, 2, &udp_from(2));
    h.open_on(2, 1, &udp_from(1));
    assert_eq!(h.ct.flush_zone(1), 2);
    assert_eq!(h.ct.len(), 1);
    assert_eq!(h.ct.port_count(1), 1);
    assert_eq!(h.ct.port_count(2), 0);
    assert_eq!(h.ct.clear(), 1);
    assert!(h.ct.is_empty());
    h.ct.check_invariants().expect("invariants");
}

#[test]
fn commit_twice_and_stale_ids() {
    let mut h = H::new();
    let Track::New(n) = h.send(&udp4(true)) else {
        panic!()
    };
    let id = h.ct.commit(&n, h.now, ()).expect("commit");
    assert_eq!(h.ct.commit(&n, h.now, ()), Err(CommitError::Exists(id)));
    assert_eq!(h.ct.stats().commit_exists, 1);
    h.ct.remove(id);
    // The slot is reused; the old handle does not reach the new entry.
    let id2 = h.ct.commit(&n, h.now, ()).expect("commit");
    assert_eq!(id2.slot(), id.slot());
    assert!(h.ct.get(id, h.now).is_none());
    assert!(h.ct.remove(id).is_none());
    assert!(h.ct.get(id2, h.now).is_some());
}

// ---- expiry work -------------------------------------------------------------

#[test]
fn expire_is_bounded() {
    let mut h = H::new();
    for p in 0..10u16 {
        h.open(&udp_from(1000 + p));
        h.now += 1;
    }
    assert_eq!(h.ct.poll_timeout(), Some(T0 + secs(120)));
    let late = h.now + secs(200);
    assert_eq!(h.ct.expire(late, 1), 1);
    assert_eq!(h.ct.len(), 9);
    assert_eq!(h.ct.expire(late, 0), 0);
    assert_eq!(h.ct.expire(late, 3), 3);
    assert_eq!(h.ct.len(), 6);
    // Earliest first: the oldest flows went.
    let ports: Vec<u16> = h.ct.entries(h.now).map(|e| e.orig.src_port).collect();
    assert!(ports.iter().all(|&p| p >= 1004), "{ports:?}");
    let mut seen = Vec::new();
    assert_eq!(
        h.ct.expire_with(late, 100, |r| seen.push(r.orig.src_port)),
        6
    );
    assert_eq!(seen, vec![1004, 1005, 1006, 1007, 1008, 1009]);
    assert_eq!(h.ct.poll_timeout(), None);
    assert_eq!(h.ct.stats().expired, 10);
}

#[test]
fn expire_takes_earliest_across_classes() {
    let mut h = H::new();
    h.open(&udp4(true)); // 120 s
    h.open(&echo(false, true, true, 1)); // 60 s
    h.open(&other4(true, 47)); // 600 s
    assert_eq!(h.ct.poll_timeout(), Some(T0 + secs(60)));
    assert_eq!(h.ct.expire(T0 + secs(1000), 1), 1);
    assert!(h.ct.entries(T0).all(|e| e.orig.proto != 1));
    assert_eq!(h.ct.poll_timeout(), Some(T0 + secs(120)));
}

// ---- user data, listing, snapshot ------------------------------------------------

#[test]
fn user_data_and_listing() {
    let mut ct: Conntrack<u64> = Conntrack::new(Config::default()).expect("cfg");
    let f = tcp4(true, 100, syn(), 0);
    let k = FlowKey::parse(&f).expect("parse");
    let Track::New(n) = ct.track(ZONE, 4, &k, &f, T0) else {
        panic!()
    };
    assert_eq!(n.port(), 4);
    assert_eq!(n.key().src_port, CPORT);
    let id = ct.commit(&n, T0, 42).expect("commit");
    *ct.ext_mut(id).expect("ext") += 1;
    let now = T0 + secs(5);
    let v: Vec<_> = ct.entries(now).collect();
    assert_eq!(v.len(), 1);
    let e = &v[0];
    assert_eq!(*e.ext, 43);
    assert_eq!(e.port, 4);
    assert_eq!(e.state.as_str(), "SYN_SENT");
    assert_eq!(e.age_ns, secs(5));
    assert_eq!(e.remaining_ns, secs(235));
    assert_eq!(e.stats[0].packets, 1);
    assert_eq!(e.stats[0].bytes, 40);
    assert_eq!(ct.remove(id), Some(43));
}

#[test]
fn export_import_round_trip() {
    let mut h = H::new();
    let tid = h.established(false);
    h.open(&udp4(true));
    h.open(&echo(true, true, true, 3));
    h.now += secs(10);
    let snap = h.ct.export(h.now);
    assert_eq!(snap.entries.len(), 3);
    let json = serde_json::to_string(&snap).expect("ser");
    let back: Snapshot<()> = serde_json::from_str(&json).expect("de");

    // A new process: its clock starts elsewhere (ages are kept when the
    // new clock is past them).
    let mut h2 = H::new();
    h2.now = 50 * NS;
    let rep = h2.ct.import(back.clone(), h2.now).expect("import");
    assert_eq!(rep.imported, 3);
    h2.ct.check_invariants().expect("invariants");
    let before: Vec<_> =
        h.ct.entries(h.now)
            .map(|e| (e.orig, e.state, e.stats, e.remaining_ns, e.age_ns))
            .collect();
    let mut after: Vec<_> = h2
        .ct
        .entries(h2.now)
        .map(|e| (e.orig, e.state, e.stats, e.remaining_ns, e.age_ns))
        .collect();
    after.sort_by_key(|x| before.iter().position(|b| b.0 == x.0));
    assert_eq!(before, after);
    // The TCP state machine goes on (sequence facts were kept).
    assert_eq!(
        h2.send(&tcp4(true, 101 + (1 << 20), rst(), 0)),
        Track::Invalid(Invalid::TcpRstOutOfWindow)
    );
    assert!(matches!(
        h2.send(&tcp4(true, 101, finack(501), 0)),
        Track::Established {
            dir: Dir::Original,
            ..
        }
    ));
    // Remaining times hold: ICMP had 50 s left.
    assert_eq!(h2.ct.expire(h2.now + secs(50) - 1, 10), 0);
    assert_eq!(h2.ct.expire(h2.now + secs(50), 10), 1);
    // Importing again conflicts; another version is refused.
    let rep = h2.ct.import(back.clone(), h2.now).expect("import");
    assert_eq!(rep.conflicts, 2);
    assert_eq!(rep.imported, 1);
    let bad = Snapshot {
        version: 99,
        ..back.clone()
    };
    assert!(h2.ct.import(bad, h2.now).is_err());
    assert_eq!(h2.ct.stats().imported, 4);
    let _ = tid;

    // Into a small table: caps apply.
    let mut h3 = H::with(Config {
        max_entries: 2,
        max_per_port: 1,
        ..Config::default()
    });
    let rep = h3.ct.import(back, 0).expect("import");
    assert_eq!((rep.imported, rep.refused_port), (1, 2));
}

#[test]
fn self_connection_key() {
    // src == dst and equal ports: the reply key is the original key.
    let mut f = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_A)
        .ipv4(A4, A4, 64)
        .udp(7, 7)
        .write(&mut f, &[0; 4])
        .expect("build");
    let mut h = H::new();
    let id = h.open(&f);
    h.est(&f, id, Dir::Original);
    assert_eq!(h.state(id), ConnState::Udp { assured: false });
    h.ct.remove(id);
    h.ct.check_invariants().expect("invariants");
}

// ---- translated reply keys (NAT), removal queue ----------------------------------

const E4: [u8; 4] = [203, 0, 113, 2];
const EXT: u32 = 0;

/// A frame between any two IPv4 endpoints: TCP with flags `f`, UDP, or an
/// ICMP echo request/reply (`sp` is then the identifier).
#[derive(Clone, Copy)]
enum P {
    Tcp(u32, F),
    Udp,
    Echo(bool),
}

fn any4(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16, p: P) -> Vec<u8> {
    let ip = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src, dst, 64);
    let mut out = Vec::new();
    match p {
        P::Tcp(seq, f) => {
            let mut b = ip.tcp(sp, dp, seq, 1000);
            if f.syn {
                b = b.syn();
            }
            if let Some(a) = f.ack {
                b = b.ack(a);
            }
            if f.fin {
                b = b.fin();
            }
            if f.rst {
                b = b.rst();
            }
            b.write(&mut out, &[])
        }
        P::Udp => ip.udp(sp, dp).write(&mut out, &[0; 10]),
        P::Echo(req) => {
            let h = IcmpEchoHeader { id: sp, seq: 1 };
            let ty = if req {
                Icmpv4Type::EchoRequest(h)
            } else {
                Icmpv4Type::EchoReply(h)
            };
            ip.icmpv4(ty).write(&mut out, &[0; 8])
        }
    }
    .expect("build");
    out
}

fn key4(zone: u32, src: [u8; 4], dst: [u8; 4], proto: u8, sp: u16, dp: u16) -> ConnKey {
    ConnKey {
        zone,
        src: IpAddr::from(src),
        dst: IpAddr::from(dst),
        proto,
        src_port: sp,
        dst_port: dp,
    }
}

impl H {
    /// Commits `frame` from `zone` with an explicit reply key.
    fn open_nat(&mut self, zone: u32, frame: &[u8], reply: ConnKey) -> ConnId {
        match self.send_on(zone, PORT, frame) {
            Track::New(n) => {
                let id = self
                    .ct
                    .commit_with_reply(&n, reply, self.now, ())
                    .expect("commit");
                self.ct.check_invariants().expect("invariants");
                id
            }
            t => panic!("expected New, got {t:?}"),
        }
    }
}

#[test]
fn commit_with_reply_tcp_handshake_across_zones() {
    let mut h = H::new();
    // A:40000 -> B:80 in zone 7, answered to E:50000 -> B:80 in zone 0.
    let reply = key4(EXT, B4, E4, 6, 80, 50000);
    let id = h.open_nat(ZONE, &any4(A4, B4, 40000, 80, P::Tcp(100, syn())), reply);
    let e = h.ct.get(id, h.now).expect("live");
    assert_eq!(e.reply, reply);
    assert_eq!(e.orig, key4(ZONE, A4, B4, 6, 40000, 80));
    // The SYN-ACK carries the reply key, in zone 0.
    let sa = any4(B4, E4, 80, 50000, P::Tcp(500, synack(101)));
    assert_eq!(
        h.send_on(EXT, PORT, &sa),
        Track::Established {
            id,
            dir: Dir::Reply
        }
    );
    // The untranslated reverse (zone 7, B -> A) is not a key of the entry.
    let plain = any4(B4, A4, 80, 40000, P::Tcp(500, synack(101)));
    assert_eq!(
        h.send_on(ZONE, PORT, &plain),
        Track::Invalid(Invalid::TcpNotSyn)
    );
    h.est(
        &any4(A4, B4, 40000, 80, P::Tcp(101, ack(501))),
        id,
        Dir::Original,
    );
    assert_eq!(h.tcp_state(id), TcpState::Established);
    // A RST from the far side (in window) closes it.
    let r = any4(B4, E4, 80, 50000, P::Tcp(501, rst()));
    assert_eq!(
        h.send_on(EXT, PORT, &r),
        Track::Established {
            id,
            dir: Dir::Reply
        }
    );
    assert_eq!(h.tcp_state(id), TcpState::Close);
}

#[test]
fn commit_with_reply_checks_both_keys() {
    let mut h = H::new();
    let reply = key4(EXT, B4, E4, 17, 53, 50000);
    let id = h.open_nat(ZONE, &any4(A4, B4, 5000, 53, P::Udp), reply);
    // Another inside flow that would get the same reply key.
    let Track::New(n) = h.send(&any4(B4, A4, 5001, 53, P::Udp)) else {
        panic!()
    };
    assert_eq!(
        h.ct.commit_with_reply(&n, reply, h.now, ()),
        Err(CommitError::Exists(id))
    );
    // A reply key equal to a live original key is taken too.
    let orig_of_first = key4(ZONE, A4, B4, 17, 5000, 53);
    assert_eq!(
        h.ct.commit_with_reply(&n, orig_of_first, h.now, ()),
        Err(CommitError::Exists(id))
    );
    assert_eq!(h.ct.stats().commit_exists, 2);
    // commit() is commit_with_reply(reverse).
    let id2 = h.ct.commit(&n, h.now, ()).expect("commit");
    let e = h.ct.get(id2, h.now).expect("live");
    assert_eq!(e.reply, e.orig.reverse());
    h.ct.check_invariants().expect("invariants");
}

#[test]
fn commit_with_reply_icmp_identifier_mapped() {
    let mut h = H::new();
    // Echo request id 77 leaves as id 9000; the reply key is the reverse of
    // (0, E -> B, id 9000, type 8): (0, B -> E, id 9000, type 0).
    let out = key4(EXT, E4, B4, 1, 9000, 8);
    let reply = out.reverse();
    assert_eq!(reply, key4(EXT, B4, E4, 1, 9000, 0));
    let id = h.open_nat(ZONE, &any4(A4, B4, 77, 0, P::Echo(true)), reply);
    assert_eq!(
        h.send_on(EXT, PORT, &any4(B4, E4, 9000, 0, P::Echo(false))),
        Track::Established {
            id,
            dir: Dir::Reply
        }
    );
    assert_eq!(h.state(id), ConnState::Icmp { replied: true });
    // The old identifier is no reply.
    assert_eq!(
        h.send_on(EXT, PORT, &any4(B4, E4, 77, 0, P::Echo(false))),
        Track::Invalid(Invalid::IcmpReplyNoRequest)
    );
}

#[test]
fn related_by_reversed_quote() {
    let mut h = H::new();
    let reply = key4(EXT, B4, E4, 17, 53, 50000);
    let id = h.open_nat(ZONE, &any4(A4, B4, 5000, 53, P::Udp), reply);
    // Outside, the datagram carried E:50000 -> B:53; the error quotes that
    // and goes to E: the reverse of the quote is the reply key, so the
    // error travels in the reply direction.
    let q = quoted_udp4(E4, B4, 50000, 53);
    let rel = Track::Related {
        id,
        dir: Dir::Reply,
    };
    assert_eq!(h.send_on(EXT, PORT, &icmp4_unreach(B4, E4, &q)), rel);
    assert_eq!(h.send_on(EXT, PORT, &icmp4_unreach(R4, E4, &q)), rel);
    // The address check applies to the reversed case too.
    assert_eq!(
        h.send_on(EXT, PORT, &icmp4_unreach(R4, A4, &q)),
        Track::Invalid(Invalid::IcmpErrorAddrMismatch)
    );
    // Inside, A got B:53 -> A:5000; its error about that goes to B in the
    // original direction.
    let qi = quoted_udp4(B4, A4, 53, 5000);
    assert_eq!(
        h.send_on(ZONE, PORT, &icmp4_unreach(A4, B4, &qi)),
        Track::Related {
            id,
            dir: Dir::Original
        }
    );
    // Another zone sees nothing.
    assert_eq!(
        h.send_on(9, PORT, &icmp4_unreach(B4, E4, &q)),
        Track::Invalid(Invalid::IcmpErrorNoMatch)
    );
    // An echo request quoted after its identifier was mapped.
    let reply = key4(EXT, E4, B4, 1, 9000, 8).reverse();
    let eid = h.open_nat(ZONE, &any4(A4, B4, 77, 0, P::Echo(true)), reply);
    let e = any4(E4, B4, 9000, 0, P::Echo(true));
    assert_eq!(
        h.send_on(EXT, PORT, &icmp4_unreach(R4, E4, &e[14..])),
        Track::Related {
            id: eid,
            dir: Dir::Reply
        }
    );
    assert_eq!(h.ct.stats().related, 4);
}

/// Drains the queue into the source ports of the original keys.
fn drained(h: &mut H) -> Vec<u16> {
    h.ct.drain_removed().map(|r| r.orig.src_port).collect()
}

#[test]
fn removal_queue_covers_every_path_but_remove_and_expire_with() {
    let mut h = H::with(Config {
        max_entries: 4,
        ..Config::default()
    });
    // Off by default.
    h.open(&udp_from(1));
    h.ct.clear();
    assert_eq!(h.ct.removed_pending(), 0);
    h.ct.set_collect_removed(true);

    // Expired entry met by a lookup.
    h.open(&udp_from(2));
    h.now += secs(121);
    assert!(matches!(h.send(&udp_from(2)), Track::New(_)));
    assert_eq!(drained(&mut h), vec![2]);
    assert_eq!(h.ct.stats().expired, 1);

    // expire() queues; expire_with() hands to the callback only.
    h.open(&udp_from(3));
    h.open(&udp_from(4));
    h.now += secs(121);
    assert_eq!(h.ct.expire(h.now, 1), 1);
    let mut seen = Vec::new();
    assert_eq!(
        h.ct.expire_with(h.now, 10, |r| seen.push(r.orig.src_port)),
        1
    );
    assert_eq!(drained(&mut h), vec![3]);
    assert_eq!(seen, vec![4]);

    // remove() returns the data and queues nothing.
    let id = h.open(&udp_from(5));
    assert_eq!(h.ct.remove(id), Some(()));
    assert_eq!(h.ct.removed_pending(), 0);

    // flush_port, flush_zone (by either key), clear.
    h.open_on(ZONE, 2, &udp_from(6));
    h.open_on(ZONE, 3, &udp_from(7));
    assert_eq!(h.ct.flush_port(2), 1);
    assert_eq!(drained(&mut h), vec![6]);
    h.open_nat(ZONE, &udp_from(8), key4(12, B4, E4, 17, 53, 8));
    assert_eq!(h.ct.flush_zone(12), 1);
    assert_eq!(drained(&mut h), vec![8]);
    assert_eq!(h.ct.clear(), 1);
    assert_eq!(drained(&mut h), vec![7]);

    // A TCP entry reopened by a SYN.
    let tid = h.established(false);
    h.est(&tcp4(true, 101, rst(), 0), tid, Dir::Original);
    assert!(matches!(h.send(&tcp4(true, 900, syn(), 0)), Track::New(_)));
    assert_eq!(drained(&mut h), vec![CPORT]);

    // The reaping before a cap refuses.
    for p in 10..14 {
        h.open(&udp_from(p));
    }
    h.now += secs(121);
    assert!(matches!(h.send(&udp_from(20)), Track::New(_)));
    assert_eq!(drained(&mut h).len(), REAP_ON_LIMIT.min(4));

    // Import meeting an expired entry with the same key.
    let mut h2 = H::new();
    h2.ct.set_collect_removed(true);
    h2.open(&udp_from(30));
    let snap = h2.ct.export(h2.now);
    h2.now += secs(121);
    let rep = h2.ct.import(snap, h2.now).expect("import");
    assert_eq!(rep.imported, 1);
    assert_eq!(drained(&mut h2), vec![30]);

    // Off again: nothing more is queued.
    h.ct.set_collect_removed(false);
    h.ct.clear();
    assert_eq!(h.ct.removed_pending(), 0);
    h.ct.check_invariants().expect("invariants");
}

#[test]
fn all_keys_includes_expired_entries() {
    let mut h = H::new();
    let id = h.open_nat(ZONE, &udp_from(1), key4(EXT, B4, E4, 17, 53, 9));
    h.now += secs(1000);
    assert_eq!(h.ct.entries(h.now).count(), 0);
    let all: Vec<_> = h.ct.all_keys().map(|(i, o, r, _)| (i, o, r)).collect();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].0, id);
    assert_eq!(all[0].2, key4(EXT, B4, E4, 17, 53, 9));
}

#[test]
fn snapshot_keeps_translated_entries() {
    let mut h = H::new();
    let reply = key4(EXT, B4, E4, 6, 80, 50000);
    let id = h.open_nat(ZONE, &any4(A4, B4, 40000, 80, P::Tcp(100, syn())), reply);
    let sa = any4(B4, E4, 80, 50000, P::Tcp(500, synack(101)));
    assert!(matches!(
        h.send_on(EXT, PORT, &sa),
        Track::Established { .. }
    ));
    let json = serde_json::to_string(&h.ct.export(h.now)).expect("ser");
    let back: Snapshot<()> = serde_json::from_str(&json).expect("de");
    let mut h2 = H::new();
    let rep = h2.ct.import(back, h2.now).expect("import");
    assert_eq!((rep.imported, rep.rejected), (1, 0));
    let ack = any4(A4, B4, 40000, 80, P::Tcp(101, ack(501)));
    let Track::Established { id: id2, dir } = h2.send_on(ZONE, PORT, &ack) else {
        panic!()
    };
    assert_eq!(dir, Dir::Original);
    assert_eq!(h2.tcp_state(id2), TcpState::Established);
    assert_eq!(h2.ct.get(id2, h2.now).expect("live").reply, reply);
    let _ = id;
}

// ---- property tests ---------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Packet {
        zone: u32,
        port: u32,
        frame: Vec<u8>,
        commit: bool,
    },
    /// The first `steps` packets of a whole TCP conversation (handshake,
    /// data, close), committing the SYN; random packets then hit it in
    /// every state.
    Script {
        zone: u32,
        port: u32,
        v6: bool,
        steps: usize,
    },
    Advance(u64),
    Expire(usize),
    Remove(usize),
    FlushPort(u32),
    FlushZone(u32),
    Snapshot,
}

/// Frames of a small universe of flows, so sequences hit existing entries:
/// two hosts, two ports each, every protocol; TCP mostly with flag
/// combinations and sequence numbers of a real handshake and close (client
/// ISN 100, server ISN 500), sometimes anything.
fn frame() -> impl Strategy<Value = Vec<u8>> {
    let flags = prop_oneof![
        3 => Just(0x02u8), // SYN
        3 => Just(0x12),   // SYN|ACK
        6 => Just(0x10),   // ACK
        3 => Just(0x11),   // FIN|ACK
        1 => Just(0x04),   // RST
        1 => Just(0x14),   // RST|ACK
        1 => any::<u8>(),
    ];
    (
        0u8..6,
        any::<bool>(),
        any::<bool>(),
        0u16..2,
        flags,
        prop_oneof![4 => 0u32..3, 1 => any::<u32>()],
        prop_oneof![4 => 1u32..3, 1 => any::<u32>()],
        prop_oneof![3 => Just(0usize), 1 => 1usize..40],
        proptest::option::weighted(0.2, 0u8..16),
    )
        .prop_map(|(kind, v6, fwd, pi, flags, seq, ackn, len, wscale)| {
            let (isn, peer) = if fwd { (100, 500) } else { (500, 100) };
            let f = F {
                syn: flags & 2 != 0,
                ack: (flags & 0x10 != 0).then_some(if ackn < 3 { peer + ackn } else { ackn }),
                fin: flags & 1 != 0,
                rst: flags & 4 != 0,
                wscale,
                win: 0,
            };
            let seq = if seq < 3 { isn + seq } else { seq };
            let mut fr = match kind {
                0 | 1 => tcp(v6, fwd, seq, f, len),
                2 => udp(v6, fwd, len),
                3 => echo(v6, fwd, flags & 1 == 0, 9),
                4 => {
                    // An ICMP error about a UDP flow.
                    let (s, d) = if fwd { (A4, B4) } else { (B4, A4) };
                    icmp4_unreach(R4, s, &quoted_udp4(s, d, 5000, 53))
                }
                _ => other4(fwd, 47),
            };
            // Vary a port so several flows exist.
            if pi == 1 && fr.len() > 36 && kind < 3 && !v6 {
                fr[35] ^= 1;
            }
            fr
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u32..2, 0u32..3, frame(), any::<bool>()).prop_map(|(zone, port, frame, commit)| Op::Packet { zone, port, frame, commit }),
        2 => (0u32..2, 0u32..3, any::<bool>(), 1usize..9).prop_map(|(zone, port, v6, steps)| Op::Script { zone, port, v6, steps }),
        2 => prop_oneof![Just(1u64), Just(NS), Just(secs(59)), Just(secs(121)), Just(secs(300)), Just(secs(7440))].prop_map(Op::Advance),
        1 => (0usize..4).prop_map(Op::Expire),
        1 => any::<usize>().prop_map(Op::Remove),
        1 => (0u32..3).prop_map(Op::FlushPort),
        1 => (0u32..2).prop_map(Op::FlushZone),
        1 => Just(Op::Snapshot),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn invariants_hold_on_random_sequences(ops in proptest::collection::vec(op(), 1..120), max in 1usize..8, per in 1usize..4) {
        let mut ct: Conntrack = Conntrack::new(Config { max_entries: max, max_per_port: per, ..Config::default() }).expect("cfg");
        let mut now = T0;
        let mut ids: Vec<ConnId> = Vec::new();
        for op in ops {
            match op {
                Op::Packet { zone, port, frame, commit } => {
                    let k = FlowKey::parse(&frame).expect("valid frame");
                    let t = ct.track(zone, port, &k, &frame, now);
                    match t {
                        Track::New(n) => {
                            prop_assert_eq!(n.port(), port);
                            if commit {
                                match ct.commit(&n, now, ()) {
                                    Ok(id) => {
                                        prop_assert!(ct.get(id, now).is_some());
                                        ids.push(id);
                                    }
                                    Err(CommitError::Limit(_)) => {}
                                    Err(e) => prop_assert!(false, "commit after New: {:?}", e),
                                }
                            }
                        }
                        Track::Established { id, dir } => {
                            let e = ct.get(id, now);
                            prop_assert!(e.is_some());
                            let key = ConnKey::from_flow(zone, &k).expect("key");
                            prop_assert_eq!(ct.lookup(&key, now), Some((id, dir)));
                        }
                        Track::Related { id, .. } => prop_assert!(ct.get(id, now).is_some()),
                        Track::Refused(l) => {
                            let full = match l {
                                Limit::Global => ct.len() >= max,
                                Limit::Port => ct.port_count(port) >= per,
                            };
                            prop_assert!(full);
                        }
                        Track::Invalid(_) | Track::Untracked(_) => {}
                    }
                }
                Op::Script { zone, port, v6, steps } => {
                    let script = [
                        tcp(v6, true, 100, syn(), 0),
                        tcp(v6, false, 500, synack(101), 0),
                        tcp(v6, true, 101, ack(501), 0),
                        tcp(v6, true, 101, ack(501), 1),
                        tcp(v6, true, 102, finack(501), 0),
                        tcp(v6, false, 501, ack(103), 0),
                        tcp(v6, false, 501, finack(103), 0),
                        tcp(v6, true, 103, ack(502), 0),
                    ];
                    for f in script.iter().take(steps) {
                        let k = FlowKey::parse(f).expect("valid frame");
                        if let Track::New(n) = ct.track(zone, port, &k, f, now) {
                            if let Ok(id) = ct.commit(&n, now, ()) {
                                ids.push(id);
                            }
                        }
                    }
                }
                Op::Advance(d) => now += d,
                Op::Expire(n) => {
                    let before = ct.len();
                    let got = ct.expire(now, n);
                    prop_assert!(got <= n);
                    prop_assert_eq!(ct.len(), before - got);
                }
                Op::Remove(i) => {
                    if !ids.is_empty() {
                        let id = ids[i % ids.len()];
                        ct.remove(id);
                        prop_assert!(ct.get(id, now).is_none());
                    }
                }
                Op::FlushPort(p) => {
                    ct.flush_port(p);
                    prop_assert_eq!(ct.port_count(p), 0);
                }
                Op::FlushZone(z) => {
                    ct.flush_zone(z);
                    prop_assert!(ct.entries(now).all(|e| e.orig.zone != z));
                }
                Op::Snapshot => {
                    let snap = ct.export(now);
                    let live = ct.entries(now).count();
                    prop_assert_eq!(snap.entries.len(), live);
                    let mut ct2: Conntrack = Conntrack::new(*ct.config()).expect("cfg");
                    let rep = ct2.import(snap, now + 77).expect("import");
                    prop_assert_eq!(rep.imported, live);
                    if let Err(e) = ct2.check_invariants() { prop_assert!(false, "{}", e); }
                }
            }
            if let Err(e) = ct.check_invariants() {
                prop_assert!(false, "{}", e);
            }
            let sum: usize = ct.port_counts().map(|(_, n)| n).sum();
            prop_assert_eq!(sum, ct.len());
            prop_assert!(ct.len() <= max);
            prop_assert!(ct.port_counts().all(|(_, n)| n <= per));
        }
        // Everything expires eventually.
        now += secs(8000);
        ct.expire(now, usize::MAX);
        prop_assert!(ct.is_empty());
    }

    #[test]
    fn never_panics_on_arbitrary_frames(data in proptest::collection::vec(any::<u8>(), 0..300), zone in 0u32..3, commit in any::<bool>()) {
        let mut ct: Conntrack = Conntrack::new(Config { max_entries: 16, max_per_port: 8, ..Config::default() }).expect("cfg");
        if let Ok(k) = FlowKey::parse(&data) {
            if let Track::New(n) = ct.track(zone, 1, &k, &data, T0) {
                if commit {
                    let _ = ct.commit(&n, T0, ());
                }
            }
            let _ = ct.track(zone, 1, &k, &data, T0 + 1);
            // A key with a frame it was not parsed from.
            for cut in [0, 14, 20, 34, 40, 54] {
                let _ = ct.track(zone, 1, &k, data.get(..cut).unwrap_or(&data), T0 + 2);
            }
        }
        if let Err(e) = ct.check_invariants() { prop_assert!(false, "{}", e); }
    }

    #[test]
    fn never_panics_on_mutated_frames(f in frame(), at in any::<usize>(), b in any::<u8>(), cut in any::<usize>()) {
        let mut ct: Conntrack = Conntrack::new(Config { max_entries: 16, max_per_port: 8, ..Config::default() }).expect("cfg");
        // Commit the intact frame, then feed the mutated one.
        if let Ok(k) = FlowKey::parse(&f) {
            if let Track::New(n) = ct.track(0, 1, &k, &f, T0) {
                let _ = ct.commit(&n, T0, ());
            }
        }
        let mut g = f.clone();
        let n = g.len();
        g[at % n] = b;
        g.truncate(cut % (n + 1));
        if let Ok(k) = FlowKey::parse(&g) {
            let _ = ct.track(0, 1, &k, &g, T0 + 1);
            let _ = ct.track(0, 1, &k, &f, T0 + 2);
        }
        if let Err(e) = ct.check_invariants() { prop_assert!(false, "{}", e); }
    }
}
