//! The VXLAN underlay: UDP sockets on this host's underlay address, and
//! the peers (remote VTEPs) the data path sends to and accepts from.
//!
//! Why UDP sockets and not a raw socket: the kernel adds the outer IPv4 and
//! UDP headers, routes and resolves the underlay next hop, and gives us UDP
//! GSO (`UDP_SEGMENT`: one `sendmsg` carries a whole TSO super-frame cut
//! into VXLAN packets, segmented once, late, in the kernel) and UDP GRO on
//! receive (one `recvmmsg` slot holds many datagrams of one sender). The
//! socket calls (sendmsg with `UDP_SEGMENT`, recvmmsg with `UDP_GRO`
//! control messages) come from `quinn-udp`, the QUIC stack's well-kept UDP
//! layer, except the gathered train of [`Underlay::send_vectored`]
//! ([`crate::udp_gso`]); sockets are built with `socket2`.
//!
//! Source-port entropy (RFC 7348 section 5): a socket has one source port,
//! so the switch binds `[underlay] src_ports` send sockets to consecutive
//! ports from 49152 and picks one by a hash of the inner flow; the underlay
//! sees up to that many distinct source ports, one per flow. Receive uses
//! one socket per worker on the VXLAN port with `SO_REUSEPORT`, so the
//! kernel spreads senders' flows over the workers.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::AtomicU64;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};

use crate::fdb::PortId;
use crate::pipeline::{DropCounters, DropReason};

/// First VTEP pseudo-port id: FDB entries at or above it point at a peer,
/// below it at a local port.
pub const VTEP_BASE: PortId = 0x8000_0000;
/// First UDP source port of the send sockets (RFC 7348: 49152-65535).
pub const SRC_PORT_BASE: u16 = 49152;
/// Socket buffers (forced past `net.core.[rw]mem_max` when root): a
/// 64 KB super-frame is ~45 datagrams, and a burst of them must not drop.
const SOCKET_BUFFER: usize = 8 << 20;
/// Receive slot size: a UDP GRO batch is at most 64 KB.
pub const RX_SLOT: usize = 65_536;

/// True if `id` names a peer rather than a local port.
#[inline]
pub fn is_vtep(id: PortId) -> bool {
    id >= VTEP_BASE
}

/// Counters of one peer (relaxed atomics; they survive reloads).
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// VXLAN datagrams received from the peer.
    pub rx_packets: AtomicU64,
    /// Their bytes (VXLAN header + inner frame).
    pub rx_bytes: AtomicU64,
    /// VXLAN datagrams sent to the peer (after segmentation).
    pub tx_packets: AtomicU64,
    /// Their bytes.
    pub tx_bytes: AtomicU64,
    drops: DropCounters,
}

impl PeerCounters {
    /// Counts one dropped frame or datagram.
    #[inline]
    pub fn count_drop(&self, r: DropReason) {
        self.drops.count(r);
    }

    /// Drops counted for `r`.
    pub fn drops(&self, r: DropReason) -> u64 {
        self.drops.get(r)
    }
}

/// A remote VTEP as the data path sees it.
#[derive(Debug)]
pub struct PeerRt {
    /// Pseudo-port id (>= [`VTEP_BASE`]).
    pub id: PortId,
    /// Host name.
    pub name: String,
    /// Where its VXLAN goes.
    pub addr: SocketAddrV4,
    /// Counters.
    pub counters: std::sync::Arc<PeerCounters>,
}

/// Underlay-wide counters: what arrives from no peer has no peer to count on.
#[derive(Debug, Default)]
pub struct UnderlayCounters {
    /// Datagrams from an address that is not a configured peer.
    pub rx_not_peer: AtomicU64,
    /// Receive errors.
    pub rx_errors: AtomicU64,
}

struct Sock {
    sock: UdpSocket,
    state: UdpSocketState,
    port: u16,
}

impl std::fmt::Debug for Sock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sock").field("port", &self.port).finish()
    }
}

/// This host's underlay sockets.
#[derive(Debug)]
pub struct Underlay {
    /// Local underlay address.
    pub local: Ipv4Addr,
    /// VXLAN port (destination and listening).
    pub port: u16,
    /// Outer TTL.
    pub ttl: u8,
    /// Underlay IP MTU.
    pub mtu: u16,
    rx: Vec<Sock>,
    tx: Vec<Sock>,
    /// Counters.
    pub counters: UnderlayCounters,
    /// Seed of the flow hash that picks the source port.
    pub hash_seed: u64,
    /// UDP GSO on send (`[underlay] gso`).
    pub gso: bool,
    /// Capture point of the underlay (`vswitchctl capture --stage
    /// underlay`): datagrams sent (tx), received (rx) and dropped, each
    /// shown with the IPv4/UDP headers the kernel adds or removed.
    pub capture: std::sync::Arc<crate::capture::PortCapture>,
}

fn udp_socket(addr: SocketAddrV4, reuse_port: bool, ttl: u8) -> io::Result<Sock> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    s.set_ttl_v4(u32::from(ttl))?;
    s.bind(&addr.into())?;
    let sock: UdpSocket = s.into();
    // Root can go past the sysctl caps; others get what the caps allow.
    if rustix::net::sockopt::set_socket_send_buffer_size_force(&sock, SOCKET_BUFFER).is_err() {
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&sock, SOCKET_BUFFER);
    }
    if rustix::net::sockopt::set_socket_recv_buffer_size_force(&sock, SOCKET_BUFFER).is_err() {
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&sock, SOCKET_BUFFER);
    }
    let state = UdpSocketState::new((&sock).into())?;
    Ok(Sock {
        sock,
        state,
        port: addr.port(),
    })
}

impl Underlay {
    /// Binds `rx_sockets` receive sockets on `local:port` and `src_ports`
    /// send sockets on consecutive free ports from [`SRC_PORT_BASE`].
    pub fn open(
        local: Ipv4Addr,
        port: u16,
        ttl: u8,
        mtu: u16,
        rx_sockets: usize,
        src_ports: u16,
        gso: bool,
    ) -> io::Result<Underlay> {
        let mut rx = Vec::new();
        for _ in 0..rx_sockets.max(1) {
            rx.push(udp_socket(SocketAddrV4::new(local, port), true, ttl)?);
        }
        let mut tx = Vec::new();
        let mut p = SRC_PORT_BASE;
        while tx.len() < usize::from(src_ports.max(1)) {
            if p != port {
                match udp_socket(SocketAddrV4::new(local, p), false, ttl) {
                    Ok(s) => {
                        // Nothing is ever read from a send socket: keep its
                        // receive queue from holding memory.
                        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&s.sock, 4096);
                        tx.push(s);
                    }
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
                    Err(e) => return Err(e),
                }
            }
            p = p.checked_add(1).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "no free UDP source ports in 49152-65535",
                )
            })?;
        }
        Ok(Underlay {
            local,
            port,
            ttl,
            mtu,
            rx,
            tx,
            counters: UnderlayCounters::default(),
            hash_seed: u64::from(u32::from(local)).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            gso,
            capture: Default::default(),
        })
    }

    /// The receive socket of worker `idx`, for its epoll set.
    pub fn rx_socket(&self, idx: usize) -> Option<&UdpSocket> {
        self.rx.get(idx).map(|s| &s.sock)
    }

    /// Source ports of the send sockets.
    pub fn src_ports(&self) -> Vec<u16> {
        self.tx.iter().map(|s| s.port).collect()
    }

    /// Most datagrams one `send` may carry with UDP GSO (1 without GSO).
    pub fn max_segments(&self) -> usize {
        if !self.gso {
            return 1;
        }
        self.tx.first().map_or(1, |s| s.state.max_gso_segments())
    }

    /// Sends `contents` to `dst` from the send socket picked by `hash`: one
    /// datagram, or with `segment_size` a UDP GSO train of datagrams of
    /// that size (the last may be shorter).
    pub fn send(
        &self,
        hash: u32,
        dst: SocketAddrV4,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let n = self.tx.len().max(1);
        let Some(s) = self.tx.get(hash as usize % n) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let t = Transmit {
            destination: SocketAddr::V4(dst),
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        s.state.try_send((&s.sock).into(), &t)?;
        if self.capture.active() {
            let src = SocketAddrV4::new(self.local, s.port);
            for d in contents.chunks(segment_size.unwrap_or(contents.len()).max(1)) {
                self.capture_datagram(crate::capture::Stage::Tx, None, src, dst, d);
            }
        }
        Ok(())
    }

    /// [`Underlay::send`] of contents gathered from `iov` (see
    /// [`crate::udp_gso`]), without the capture point: while a capture is
    /// active the caller sends contiguously.
    pub fn send_vectored(
        &self,
        hash: u32,
        dst: SocketAddrV4,
        iov: &[io::IoSlice<'_>],
        segment_size: Option<u16>,
    ) -> io::Result<()> {
        let n = self.tx.len().max(1);
        let Some(s) = self.tx.get(hash as usize % n) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        crate::udp_gso::send(&s.sock, dst, iov, segment_size).map(|_| ())
    }

    /// Offers one VXLAN datagram to the underlay's captures, as the wire
    /// carries it: Ethernet, IPv4 and UDP headers (rebuilt: the kernel
    /// adds and strips them; the Ethernet addresses are zero) around it.
    /// Filters match the encapsulated frame.
    #[cold]
    pub fn capture_datagram(
        &self,
        stage: crate::capture::Stage,
        reason: Option<DropReason>,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        dgram: &[u8],
    ) {
        let mut h = [0u8; 42];
        h[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip_len = u16::try_from(20 + 8 + dgram.len()).unwrap_or(u16::MAX);
        let ip = &mut h[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = self.ttl;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&src.ip().octets());
        ip[16..20].copy_from_slice(&dst.ip().octets());
        let sum = packet::checksum::checksum(ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let udp = &mut h[34..42];
        udp[0..2].copy_from_slice(&src.port().to_be_bytes());
        udp[2..4].copy_from_slice(&dst.port().to_be_bytes());
        udp[4..6].copy_from_slice(&ip_len.saturating_sub(20).to_be_bytes());
        let inner = dgram.get(vxlan::VXLAN_HLEN..).unwrap_or_default();
        self.capture.offer_parts(stage, reason, &h, dgram, inner);
    }

    /// Receives a batch on worker `idx`'s socket into `slots` (one
    /// datagram or one GRO train each); `meta[i]` says who sent slot `i`,
    /// its length and its stride.
    pub fn recv(
        &self,
        idx: usize,
        slots: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        let Some(s) = self.rx.get(idx) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let n = s.state.recv((&s.sock).into(), slots, meta)?;
        if self.capture.active() {
            let dst = SocketAddrV4::new(self.local, self.port);
            for (slot, m) in slots.iter().zip(meta.iter()).take(n) {
                let src = match m.addr {
                    SocketAddr::V4(a) => a,
                    SocketAddr::V6(a) => SocketAddrV4::new(
                        a.ip().to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
                        a.port(),
                    ),
                };
                let data = slot.get(..m.len).unwrap_or_default();
                for d in data.chunks(m.stride.max(1)) {
                    self.capture_datagram(crate::capture::Stage::Rx, None, src, dst, d);
                }
            }
        }
        Ok(n)
    }
}
