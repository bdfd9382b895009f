//! The prober against fake backends: smoltcp interfaces of their own, wired
//! to it through an in-memory "switch" that the test drives on its own
//! clock.

use super::*;
use proptest::prelude::*;
use smoltcp::wire::{IpProtocol, Ipv4Packet, TcpPacket};

pub(crate) const MS: u64 = 1_000_000;
pub(crate) const S: u64 = 1000 * MS;

pub(crate) const PROBER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub(crate) const PROBER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Behavior {
    /// Accept, close when the client closes.
    Accept,
    /// Read a request, answer with this, close.
    Http(&'static str),
    /// Accept and never answer.
    Silent,
    /// Accept and close at once, answering nothing.
    CloseAtOnce,
}

pub(crate) struct Server {
    port: u16,
    behavior: Behavior,
    handle: SocketHandle,
    request: Vec<u8>,
    answered: bool,
}

/// A fake backend: a smoltcp host with listeners.
pub(crate) struct Host {
    pub(crate) mac: [u8; 6],
    iface: Interface,
    dev: Queues,
    sockets: SocketSet<'static>,
    servers: Vec<Server>,
    /// Complete requests seen by HTTP servers.
    requests: Vec<Vec<u8>>,
}

fn listener(port: u16) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 4096]),
        tcp::SocketBuffer::new(vec![0; 4096]),
    );
    s.listen(port).unwrap();
    s
}

impl Host {
    pub(crate) fn new(mac: [u8; 6], addrs: &[(Ipv4Addr, u8)], servers: &[(u16, Behavior)]) -> Host {
        let mut dev = Queues::default();
        let config = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        let mut iface = Interface::new(config, &mut dev, instant(0));
        iface.update_ip_addrs(|a| {
            for &(ip, len) in addrs {
                a.push(IpCidr::new(IpAddress::Ipv4(ip), len)).unwrap();
            }
        });
        let mut sockets = SocketSet::new(Vec::new());
        let servers = servers
            .iter()
            .map(|&(port, behavior)| Server {
                port,
                behavior,
                handle: sockets.add(listener(port)),
                request: Vec::new(),
                answered: false,
            })
            .collect();
        Host {
            mac,
            iface,
            dev,
            sockets,
            servers,
            requests: Vec::new(),
        }
    }

    /// Hands the host a frame from the switch.
    pub(crate) fn push(&mut self, frame: Vec<u8>) {
        self.dev.rx.push_back(frame);
    }

    /// Frames the host sent.
    pub(crate) fn take_frames(&mut self) -> Vec<Vec<u8>> {
        self.dev.tx.drain(..).collect()
    }

    pub(crate) fn step(&mut self, now: u64) {
        use tcp::State;
        let ts = instant(now);
        self.iface.poll(ts, &mut self.dev, &mut self.sockets);
        for srv in &mut self.servers {
            let state = self.sockets.get_mut::<tcp::Socket>(srv.handle).state();
            if matches!(state, State::Closed | State::TimeWait) {
                self.sockets.remove(srv.handle);
                srv.handle = self.sockets.add(listener(srv.port));
                srv.request.clear();
                srv.answered = false;
                continue;
            }
            let s = self.sockets.get_mut::<tcp::Socket>(srv.handle);
            while s.can_recv() {
                let mut buf = [0u8; 512];
                let n = s.recv_slice(&mut buf).unwrap();
                srv.request.extend_from_slice(&buf[..n]);
            }
            match srv.behavior {
                Behavior::Accept | Behavior::Silent => {
                    if s.state() == State::CloseWait && srv.behavior == Behavior::Accept {
                        s.close();
                    }
                }
                Behavior::Http(answer) => {
                    let complete = srv.request.windows(4).any(|w| w == b"\r\n\r\n");
                    if complete && !srv.answered {
                        s.send_slice(answer.as_bytes()).unwrap();
                        s.close();
                        srv.answered = true;
                        self.requests.push(srv.request.clone());
                    } else if s.state() == State::CloseWait {
                        s.close();
                    }
                }
                Behavior::CloseAtOnce => {
                    if matches!(s.state(), State::Established | State::CloseWait) {
                        s.close();
                    }
                }
            }
        }
        self.iface.poll(ts, &mut self.dev, &mut self.sockets);
    }
}

type Filter = Box<dyn Fn(&[u8]) -> bool>;

/// The prober, the hosts, and the switch between them.
struct Lab {
    prober: Prober,
    hosts: Vec<Host>,
    now: u64,
    /// Frames from the prober for which this is true are lost.
    drop: Filter,
    /// Every frame the prober sent.
    sent: Vec<Vec<u8>>,
}

pub(crate) fn dst_mac(frame: &[u8]) -> [u8; 6] {
    frame[..6].try_into().unwrap()
}

impl Lab {
    fn new(hosts: Vec<Host>) -> Lab {
        Lab::with_config(ProberConfig::new(PROBER_MAC, PROBER_IP, 24), hosts)
    }

    fn with_config(config: ProberConfig, hosts: Vec<Host>) -> Lab {
        let now = 1000 * S;
        Lab {
            prober: Prober::new(config, now).unwrap(),
            hosts,
            now,
            drop: Box::new(|_| false),
            sent: Vec::new(),
        }
    }

    /// One millisecond of network.
    fn tick(&mut self) -> Vec<(ProbeId, ProbeResult)> {
        for f in self.prober.transmit(self.now) {
            self.sent.push(f.clone());
            if (self.drop)(&f) {
                continue;
            }
            let dst = dst_mac(&f);
            for h in &mut self.hosts {
                if dst == h.mac || dst == [0xff; 6] {
                    h.dev.rx.push_back(f.clone());
                }
            }
        }
        for h in &mut self.hosts {
            h.step(self.now);
            let frames: Vec<_> = h.dev.tx.drain(..).collect();
            for f in frames {
                let dst = dst_mac(&f);
                if dst == PROBER_MAC || dst == [0xff; 6] {
                    self.prober.receive(&f, self.now);
                }
            }
        }
        let results = self.prober.poll(self.now);
        self.now += MS;
        results
    }

    /// Runs until every probe has a result (or `limit` passes); returns
    /// each result with the time it came.
    fn run(&mut self, limit: u64) -> Vec<(ProbeId, ProbeResult, u64)> {
        let end = self.now + limit;
        let mut out = Vec::new();
        while self.now < end {
            let now = self.now;
            out.extend(self.tick().into_iter().map(|(id, r)| (id, r, now)));
            if self.prober.active() == 0 {
                break;
            }
        }
        out
    }

    /// Runs `d` more (lets closes finish).
    fn settle(&mut self, d: u64) {
        let end = self.now + d;
        while self.now < end {
            assert!(self.tick().is_empty());
        }
    }

    fn deadline(&self, d: u64) -> u64 {
        self.now + d
    }
}

fn backend(servers: &[(u16, Behavior)]) -> Host {
    Host::new([0x02, 0, 0, 0, 0, 0x05], &[(BACKEND_IP, 24)], servers)
}

fn standard() -> Lab {
    Lab::new(vec![backend(&[
        (22, Behavior::Accept),
        (
            80,
            Behavior::Http("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        ),
        (
            81,
            Behavior::Http("HTTP/1.1 503 Service Unavailable\r\n\r\n"),
        ),
        (82, Behavior::Silent),
        (83, Behavior::Http("SSH-2.0-OpenSSH_9.6\r\n")),
        (84, Behavior::CloseAtOnce),
        (85, Behavior::Http("HTTP/1.0 200")),
    ])])
}

/// TCP flags of the IPv4/TCP frames in `frames`, as (src port, dst port,
/// rst, fin).
fn tcp_segments(frames: &[Vec<u8>]) -> Vec<(u16, u16, bool, bool)> {
    frames
        .iter()
        .filter_map(|f| {
            let eth = EthernetFrame::new_checked(&f[..]).ok()?;
            if eth.ethertype() != EthernetProtocol::Ipv4 {
                return None;
            }
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
            Some((tcp.src_port(), tcp.dst_port(), tcp.rst(), tcp.fin()))
        })
        .collect()
}

fn one_result(lab: &mut Lab, limit: u64) -> (ProbeResult, u64) {
    let r = lab.run(limit);
    assert_eq!(r.len(), 1, "{r:?}");
    (r[0].1, r[0].2)
}

#[test]
fn tcp_syn_ack_is_up_and_the_close_is_polite() {
    let mut lab = standard();
    let start = lab.now;
    let id = lab
        .prober
        .start_tcp(BACKEND_IP, 22, lab.deadline(2 * S), lab.now)
        .unwrap();
    let r = lab.run(3 * S);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, id);
    assert_eq!(r[0].1, ProbeResult::Up);
    // ARP and the handshake take a few ticks, not a retransmission.
    assert!(
        r[0].2 - start < 20 * MS,
        "took {} ms",
        (r[0].2 - start) / MS
    );
    lab.settle(100 * MS);
    let segs = tcp_segments(&lab.sent);
    assert!(segs.iter().all(|s| !s.2), "the prober sent a RST: {segs:?}");
    assert!(segs.iter().any(|s| s.3), "the prober sent no FIN");
    // Closed on both sides: nothing held.
    assert_eq!(lab.prober.sockets_in_use(), 0);
    let stats = lab.prober.stats();
    assert_eq!((stats.probes_started, stats.probes_up), (1, 1));
}

#[test]
fn tcp_rst_is_refused() {
    let mut lab = standard();
    lab.prober
        .start_tcp(BACKEND_IP, 23, lab.deadline(2 * S), lab.now)
        .unwrap();
    let (r, _) = one_result(&mut lab, 3 * S);
    assert_eq!(r, ProbeResult::Down(Failure::Refused));
    lab.settle(10 * MS);
    assert_eq!(lab.prober.sockets_in_use(), 0);
}

#[test]
fn black_hole_times_out_on_the_injected_clock() {
    let mut lab = standard();
    lab.drop = Box::new(|_| true);
    let deadline = lab.deadline(1500 * MS);
    lab.prober
        .start_tcp(BACKEND_IP, 22, deadline, lab.now)
        .unwrap();
    // poll_at never asks for more than the deadline.
    assert!(lab.prober.poll_at(lab.now).unwrap() <= deadline);
    let (r, at) = one_result(&mut lab, 3 * S);
    assert_eq!(r, ProbeResult::Down(Failure::Timeout));
    // Exactly at the deadline (the lab ticks every millisecond), not before.
    assert_eq!(at, deadline);
    // ARP was retried about once a second by the prober itself.
    assert!(lab.prober.stats().arp_requests >= 2);
    lab.settle(10 * MS);
    assert_eq!(lab.prober.sockets_in_use(), 0);
    assert_eq!(lab.prober.poll_at(lab.now), None);
}

#[test]
fn syn_dropped_after_arp_times_out() {
    let mut lab = standard();
    lab.drop = Box::new(|f| !tcp_segments(&[f.to_vec()]).is_empty());
    let deadline = lab.deadline(2 * S);
    lab.prober
        .start_tcp(BACKEND_IP, 22, deadline, lab.now)
        .unwrap();
    let (r, at) = one_result(&mut lab, 3 * S);
    assert_eq!(r, ProbeResult::Down(Failure::Timeout));
    assert_eq!(at, deadline);
    // smoltcp retransmitted the SYN meanwhile.
    assert!(tcp_segments(&lab.sent).len() >= 2);
}

#[test]
fn http_expected_status_is_up() {
    let mut lab = standard();
    lab.prober
        .start_http(
            BACKEND_IP,
            80,
            "/healthz?full=1",
            200,
            lab.deadline(2 * S),
            lab.now,
        )
        .unwrap();
    let (r, _) = one_result(&mut lab, 3 * S);
    assert_eq!(r, ProbeResult::Up);
    let req = String::from_utf8(lab.hosts[0].requests[0].clone()).unwrap();
    assert!(req.starts_with("GET /healthz?full=1 HTTP/1.0\r\n"), "{req}");
    assert!(req.contains("\r\nHost: 10.0.0.5\r\n"), "{req}");
    assert!(req.contains("\r\nConnection: close\r\n"), "{req}");
    lab.settle(100 * MS);
    assert!(tcp_segments(&lab.sent).iter().all(|s| !s.2));
    assert_eq!(lab.prober.sockets_in_use(), 0);
}

#[test]
fn http_other_status_is_down_and_can_be_expected() {
    let mut lab = standard();
    lab.prober
        .start_http(BACKEND_IP, 81, "/", 200, lab.deadline(2 * S), lab.now)
        .unwrap();
    let (r, _) = one_result(&mut lab, 3 * S);
    assert_eq!(
        r,
        ProbeResult::Down(Failure::Status {
            got: 503,
            expected: 200
        })
    );
    let req = String::from_utf8(lab.hosts[0].requests[0].clone()).unwrap();
    assert!(req.contains("\r\nHost: 10.0.0.5:81\r\n"), "{req}");
    // The fake backend has one socket per port: let it close and listen
    // again.
    lab.settle(100 * MS);

    lab.prober
        .start_http(BACKEND_IP, 81, "/", 503, lab.deadline(2 * S), lab.now)
        .unwrap();
    let (r, _) = one_result(&mut lab, 3 * S);
    assert_eq!(r, ProbeResult::Up);
}

#[test]
fn http_failures() {
    let cases = [
        (82, Failure::Timeout),
        (83, Failure::BadResponse),
        (84, Failure::Closed),
        (23, Failure::Refused),
    ];
    for (port, want) in cases {
        let mut lab = standard();
        lab.prober
            .start_http(BACKEND_IP, port, "/", 200, lab.deadline(S), lab.now)
            .unwrap();
        let (r, _) = one_result(&mut lab, 2 * S);
        assert_eq!(r, ProbeResult::Down(want), "port {port}");
        lab.settle(LINGER_NS + 10 * MS);
        assert_eq!(lab.prober.sockets_in_use(), 0, "port {port}");
    }
    // No line break, but the server closed: judged on what came.
    let mut lab = standard();
    lab.prober
        .start_http(BACKEND_IP, 85, "/", 200, lab.deadline(S), lab.now)
        .unwrap();
    assert_eq!(one_result(&mut lab, 2 * S).0, ProbeResult::Up);
}

#[test]
fn silent_http_server_is_aborted_at_the_deadline() {
    let mut lab = standard();
    lab.prober
        .start_http(BACKEND_IP, 82, "/", 200, lab.deadline(S), lab.now)
        .unwrap();
    let (r, _) = one_result(&mut lab, 2 * S);
    assert_eq!(r, ProbeResult::Down(Failure::Timeout));
    lab.settle(10 * MS);
    assert!(
        tcp_segments(&lab.sent).iter().any(|s| s.2),
        "no RST after the timeout"
    );
    assert_eq!(lab.prober.sockets_in_use(), 0);
}

#[test]
fn many_backends_resolve_at_once() {
    // smoltcp alone sends one ARP request per second for the whole
    // interface; the prober's own requests resolve every backend at once.
    let hosts: Vec<Host> = (0..20u8)
        .map(|i| {
            Host::new(
                [0x02, 0, 0, 0, 1, i],
                &[(Ipv4Addr::new(10, 0, 0, 100 + i), 24)],
                &[(80, Behavior::Http("HTTP/1.0 200 OK\r\n\r\n"))],
            )
        })
        .collect();
    let mut lab = Lab::new(hosts);
    let start = lab.now;
    for i in 0..20u8 {
        lab.prober
            .start_http(
                Ipv4Addr::new(10, 0, 0, 100 + i),
                80,
                "/",
                200,
                lab.deadline(S),
                lab.now,
            )
            .unwrap();
    }
    let r = lab.run(2 * S);
    assert_eq!(r.len(), 20);
    for (_, result, at) in &r {
        assert_eq!(*result, ProbeResult::Up);
        assert!(at - start < 50 * MS);
    }
    // A second round needs no ARP of the prober's own.
    let asked = lab.prober.stats().arp_requests;
    lab.settle(LINGER_NS);
    for i in 0..20u8 {
        lab.prober
            .start_tcp(
                Ipv4Addr::new(10, 0, 0, 100 + i),
                80,
                lab.deadline(S),
                lab.now,
            )
            .unwrap();
    }
    let r = lab.run(2 * S);
    assert!(r.iter().all(|(_, result, _)| *result == ProbeResult::Up));
    assert_eq!(lab.prober.stats().arp_requests, asked);
}

#[test]
fn off_link_backend_through_the_gateway() {
    // The "gateway" host owns both the gateway address and the backend's
    // (smoltcp does not forward), which is all the prober can tell.
    let host = Host::new(
        [0x02, 0, 0, 0, 0, 0x01],
        &[
            (Ipv4Addr::new(10, 0, 0, 1), 24),
            (Ipv4Addr::new(192, 168, 7, 9), 24),
        ],
        &[(443, Behavior::Accept)],
    );
    let config = ProberConfig {
        gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
        ..ProberConfig::new(PROBER_MAC, PROBER_IP, 24)
    };
    let mut lab = Lab::with_config(config, vec![host]);
    lab.prober
        .start_tcp(Ipv4Addr::new(192, 168, 7, 9), 443, lab.deadline(S), lab.now)
        .unwrap();
    assert_eq!(one_result(&mut lab, 2 * S).0, ProbeResult::Up);
    // Without a gateway there is no route.
    let mut lab = standard();
    assert_eq!(
        lab.prober
            .start_tcp(Ipv4Addr::new(192, 168, 7, 9), 443, lab.deadline(S), lab.now),
        Err(StartError::NoRoute(Ipv4Addr::new(192, 168, 7, 9)))
    );
}

#[test]
fn concurrency_is_bounded() {
    let config = ProberConfig {
        max_probes: 2,
        ..ProberConfig::new(PROBER_MAC, PROBER_IP, 24)
    };
    let mut lab = Lab::with_config(config, vec![backend(&[(22, Behavior::Accept)])]);
    let d = lab.deadline(S);
    lab.prober.start_tcp(BACKEND_IP, 22, d, lab.now).unwrap();
    lab.prober.start_tcp(BACKEND_IP, 22, d, lab.now).unwrap();
    assert_eq!(lab.prober.free_slots(), 0);
    assert_eq!(
        lab.prober.start_tcp(BACKEND_IP, 22, d, lab.now),
        Err(StartError::Busy(2))
    );
    assert_eq!(lab.run(2 * S).len(), 2);
    assert_eq!(lab.prober.free_slots(), 2);
    // Lingering sockets do not block new probes, and stay bounded.
    for _ in 0..10 {
        lab.prober
            .start_tcp(BACKEND_IP, 22, lab.deadline(S), lab.now)
            .unwrap();
        lab.prober
            .start_tcp(BACKEND_IP, 22, lab.deadline(S), lab.now)
            .unwrap();
        assert_eq!(lab.run(2 * S).len(), 2);
        assert!(lab.prober.sockets_in_use() <= 4);
    }
}

#[test]
fn lingering_sockets_are_bounded() {
    // Servers that never close: every finished probe's socket lingers in
    // FIN_WAIT_2 until it is cut short.
    let servers: Vec<(u16, Behavior)> = (90..96).map(|p| (p, Behavior::Silent)).collect();
    let config = ProberConfig {
        max_probes: 3,
        ..ProberConfig::new(PROBER_MAC, PROBER_IP, 24)
    };
    let mut lab = Lab::with_config(config, vec![backend(&servers)]);
    for ports in [90..93, 93..96] {
        for port in ports {
            lab.prober
                .start_tcp(BACKEND_IP, port, lab.deadline(S), lab.now)
                .unwrap();
        }
        let r = lab.run(S);
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|(_, result, _)| *result == ProbeResult::Up));
        assert!(lab.prober.sockets_in_use() <= 3);
    }
    assert_eq!(lab.prober.stats().lingering_aborted, 3);
    // The rest are cut at LINGER_NS.
    lab.settle(LINGER_NS);
    assert_eq!(lab.prober.sockets_in_use(), 0);
    assert_eq!(lab.prober.stats().lingering_aborted, 6);
}

#[test]
fn invalid_starts_are_refused() {
    let mut p = Prober::new(ProberConfig::new(PROBER_MAC, PROBER_IP, 24), 0).unwrap();
    for bad in [
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        Ipv4Addr::new(224, 0, 0, 1),
        Ipv4Addr::new(127, 0, 0, 1),
        PROBER_IP,
        Ipv4Addr::new(10, 0, 0, 0),
        Ipv4Addr::new(10, 0, 0, 255),
    ] {
        assert_eq!(
            p.start_tcp(bad, 80, S, 0),
            Err(StartError::InvalidTarget(bad))
        );
    }
    assert_eq!(
        p.start_tcp(BACKEND_IP, 0, S, 0),
        Err(StartError::InvalidPort)
    );
    assert!(matches!(
        p.start_http(BACKEND_IP, 80, "healthz", 200, S, 0),
        Err(StartError::Check(CheckError::PathStart(_)))
    ));
    assert!(matches!(
        p.start_http(BACKEND_IP, 80, "/a b", 200, S, 0),
        Err(StartError::Check(CheckError::PathChar(_)))
    ));
    assert!(matches!(
        p.start_http(BACKEND_IP, 80, "/\r\nX: y", 200, S, 0),
        Err(StartError::Check(CheckError::PathChar(_)))
    ));
    let long = format!("/{}", "a".repeat(MAX_PATH_LEN));
    assert!(matches!(
        p.start_http(BACKEND_IP, 80, &long, 200, S, 0),
        Err(StartError::Check(CheckError::PathLength(_)))
    ));
    assert!(matches!(
        p.start_http(BACKEND_IP, 80, "/", 99, S, 0),
        Err(StartError::Check(CheckError::Status(99)))
    ));
    assert_eq!(p.active(), 0);
}

#[test]
fn config_validation() {
    let ok = ProberConfig::new(PROBER_MAC, PROBER_IP, 24);
    let bad = |c: ProberConfig| Prober::new(c, 0).unwrap_err();
    assert_eq!(
        bad(ProberConfig {
            mac: [0xff; 6],
            ..ok
        }),
        ProberError::Mac([0xff; 6])
    );
    assert!(matches!(
        bad(ProberConfig {
            mac: [1, 0, 0, 0, 0, 1],
            ..ok
        }),
        ProberError::Mac(_)
    ));
    assert!(matches!(
        bad(ProberConfig { mac: [0; 6], ..ok }),
        ProberError::Mac(_)
    ));
    assert_eq!(
        bad(ProberConfig {
            prefix_len: 0,
            ..ok
        }),
        ProberError::PrefixLen(0)
    );
    assert_eq!(
        bad(ProberConfig {
            prefix_len: 33,
            ..ok
        }),
        ProberError::PrefixLen(33)
    );
    for ip in [
        Ipv4Addr::new(10, 0, 0, 0),
        Ipv4Addr::new(10, 0, 0, 255),
        Ipv4Addr::BROADCAST,
    ] {
        assert_eq!(bad(ProberConfig { ip, ..ok }), ProberError::Address(ip));
    }
    for gw in [
        PROBER_IP,
        Ipv4Addr::new(10, 0, 1, 1),
        Ipv4Addr::new(10, 0, 0, 255),
    ] {
        assert_eq!(
            bad(ProberConfig {
                gateway: Some(gw),
                ..ok
            }),
            ProberError::Gateway(gw)
        );
    }
    assert_eq!(
        bad(ProberConfig {
            max_probes: 0,
            ..ok
        }),
        ProberError::MaxProbes(0)
    );
    assert!(Prober::new(
        ProberConfig {
            prefix_len: 32,
            ..ok
        },
        0
    )
    .is_ok());
    let c: ProberConfig =
        serde_json::from_str(r#"{"mac": [2,0,0,0,0,2], "ip": "10.0.0.2", "prefix_len": 24}"#)
            .unwrap();
    assert_eq!(c, ok);
}

#[test]
fn check_serde() {
    let c: Check = serde_json::from_str(r#"{"type": "http", "path": "/h"}"#).unwrap();
    assert_eq!(
        c,
        Check::Http {
            path: "/h".into(),
            expected_status: 200
        }
    );
    let c: Check = serde_json::from_str(r#"{"type": "tcp"}"#).unwrap();
    assert_eq!(c, Check::Tcp);
    assert!(serde_json::from_str::<Check>(r#"{"type": "http", "path": "/", "x": 1}"#).is_err());
    assert!(serde_json::from_str::<Check>(r#"{"type": "udp"}"#).is_err());
}

#[test]
fn cancel_gives_no_result() {
    let mut lab = standard();
    let id = lab
        .prober
        .start_tcp(BACKEND_IP, 82, lab.deadline(S), lab.now)
        .unwrap();
    lab.tick();
    assert!(lab.prober.cancel(id, lab.now));
    assert!(!lab.prober.cancel(id, lab.now));
    assert_eq!(lab.prober.active(), 0);
    for _ in 0..(2 * S / MS) {
        assert!(lab.tick().is_empty());
    }
    assert_eq!(lab.prober.sockets_in_use(), 0);
}

#[test]
fn time_going_backwards_is_harmless() {
    let mut lab = standard();
    let d = lab.deadline(S);
    lab.prober.start_tcp(BACKEND_IP, 22, d, lab.now).unwrap();
    assert!(lab.prober.poll(0).is_empty());
    assert!(lab.prober.poll_at(5).is_some());
    lab.prober.receive(&[0; 60], 7);
    let (r, _) = one_result(&mut lab, 2 * S);
    assert_eq!(r, ProbeResult::Up);
}

#[test]
fn status_lines() {
    let ok = [
        ("HTTP/1.0 200 OK", 200),
        ("HTTP/1.1 503 Service Unavailable\r", 503),
        ("HTTP/1.1 204", 204),
        ("HTTP/2.0 404 ", 404),
    ];
    for (line, code) in ok {
        assert_eq!(parse_status_line(line.as_bytes()), Some(code), "{line}");
    }
    for line in [
        "",
        "HTTP/1.0",
        "HTTP/1.0 ",
        "HTTP/1.0 20",
        "HTTP/1.0 2000",
        "HTTP/1.0 abc",
        "HTTP/1 200 OK",
        "HTTP/1.0.1 200",
        "http/1.0 200",
        "ICY 200 OK",
        "HTTP/1.0 099",
        "HTTP/1.0 600 X",
        "HTTP/1.0  200",
    ] {
        assert_eq!(parse_status_line(line.as_bytes()), None, "{line:?}");
    }
}

/// A SYN-ACK-looking frame from the backend to the prober, to mutate.
fn valid_frame() -> Vec<u8> {
    let mut lab = standard();
    lab.prober
        .start_tcp(BACKEND_IP, 22, lab.deadline(S), lab.now)
        .unwrap();
    // Catch the first TCP frame the backend sends.
    for _ in 0..50 {
        for f in lab.prober.transmit(lab.now) {
            lab.hosts[0].dev.rx.push_back(f);
        }
        lab.hosts[0].step(lab.now);
        let frames: Vec<_> = lab.hosts[0].dev.tx.drain(..).collect();
        for f in frames {
            if !tcp_segments(std::slice::from_ref(&f)).is_empty() {
                return f;
            }
            lab.prober.receive(&f, lab.now);
        }
        lab.now += MS;
    }
    panic!("no SYN-ACK");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_frames_never_panic(frames in proptest::collection::vec(
        (any::<bool>(), prop::sample::select(vec![0x0800u16, 0x0806, 0x86dd, 0x8100]),
         proptest::collection::vec(any::<u8>(), 0..200)), 1..20)) {
        let mut lab = standard();
        lab.prober.start_http(BACKEND_IP, 80, "/", 200, lab.deadline(S), lab.now).unwrap();
        for (addressed, ethertype, bytes) in &frames {
            // Half of them get a header that lets them past the Ethernet
            // layer, so the random bytes reach ARP, IPv4 and TCP parsing.
            let mut f = bytes.clone();
            if *addressed {
                let mut head = PROBER_MAC.to_vec();
                head.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x05]);
                head.extend_from_slice(&ethertype.to_be_bytes());
                head.extend_from_slice(bytes);
                f = head;
            }
            lab.prober.receive(&f, lab.now);
            lab.now += MS;
        }
        lab.prober.poll(lab.now);
        lab.prober.transmit(lab.now);
        prop_assert!(lab.prober.sockets_in_use() <= 2);
    }

    #[test]
    fn mutated_frames_never_panic(
        edits in proptest::collection::vec((0usize..80, any::<u8>()), 1..8),
        truncate in 0usize..100,
        to_prober in any::<bool>(),
    ) {
        let mut frame = valid_frame();
        if to_prober {
            frame[..6].copy_from_slice(&PROBER_MAC);
        }
        for (i, b) in edits {
            if let Some(x) = frame.get_mut(i) {
                *x = b;
            }
        }
        frame.truncate(frame.len().saturating_sub(truncate % 40));
        let mut lab = standard();
        lab.prober.start_tcp(BACKEND_IP, 22, lab.deadline(S), lab.now).unwrap();
        lab.prober.receive(&frame, lab.now);
        // Whatever it did, the probe still ends by its deadline.
        let r = lab.run(2 * S);
        prop_assert_eq!(r.len(), 1);
    }
}
