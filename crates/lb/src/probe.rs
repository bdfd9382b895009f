//! TCP and HTTP health probes as a sans-IO endpoint on smoltcp.
//!
//! A [`Prober`] is a tiny host inside one tenant network: a MAC, an IPv4
//! address with its prefix and an optional gateway. It owns a smoltcp
//! [`Interface`] whose device is two in-memory queues, so it never touches
//! a socket, a clock or a thread: the caller feeds it the Ethernet frames
//! addressed to it ([`Prober::receive`]), sends what it wants sent
//! ([`Prober::transmit`]), and drives its timers with `now`
//! ([`Prober::poll`], [`Prober::poll_at`]). smoltcp resolves neighbours
//! with ARP itself and answers ARP for the prober's address; the switch
//! only has to deliver ARP between it and the backends like for any port.
//!
//! # Probes
//!
//! * **TCP** ([`Check::Tcp`]): connect. A SYN-ACK is [`ProbeResult::Up`];
//!   the connection is then closed politely (FIN, not RST). A RST is
//!   [`Failure::Refused`]; no answer by the deadline is
//!   [`Failure::Timeout`].
//! * **HTTP** ([`Check::Http`]): connect, send
//!   `GET <path> HTTP/1.0` with `Host`, `User-Agent` and
//!   `Connection: close`, read the status line (at most
//!   [`STATUS_LINE_MAX`] bytes), Up iff its code is the expected one
//!   ([`Failure::Status`] otherwise), then close politely. A reset, an
//!   early close, a non-HTTP answer or the deadline are failures.
//!
//! Every probe gives exactly one result, by its deadline at the latest
//! (the caller passes the deadline, normally
//! [`crate::ProbeRequest::deadline_ns`], so the health checker and the
//! prober agree on timeouts).
//!
//! # Bounds
//!
//! At most `max_probes` probes at once ([`StartError::Busy`] beyond), each
//! one smoltcp socket with a 1 KiB receive buffer and a send buffer the
//! size of its request. A finished probe's socket lingers (to finish the
//! FIN exchange) for at most [`LINGER_NS`], and at most `max_probes`
//! sockets linger: beyond that the oldest is aborted (RST). The transmit
//! queue holds at most [`TX_QUEUE_MAX`] frames: beyond that smoltcp
//! keeps its data and retries later. A received frame is processed at
//! once; frames longer than [`MAX_RX_FRAME`] are dropped.
//!
//! # ARP
//!
//! smoltcp's neighbour cache sends at most one ARP request per second for
//! the whole interface, so after a restart 50 backends would take 50 s to
//! resolve and most first probes would time out. The prober therefore
//! also sends its own ARP request for a probe's next hop when it has not
//! heard an ARP packet from it for [`ARP_FRESH_NS`] (at most one per
//! next hop per [`ARP_RETRY_NS`] while the probe is connecting); smoltcp
//! learns from every ARP packet aimed at its address, so the answer fills
//! its cache. The cache holds [`NEIGHBOR_CAPACITY`] entries (a build-time
//! smoltcp feature, see `crates/lb/Cargo.toml`).
//!
//! # Checksums
//!
//! Outgoing frames carry complete checksums. Incoming TCP checksums are
//! not verified: frames reach the prober from the switch's memory, not a
//! wire, and VMs with checksum offload hand the switch TCP segments whose
//! checksum is only partial; verifying them would make every such backend
//! look dead. IPv4 header checksums are verified (offload never leaves
//! them partial).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    HardwareAddress, IpAddress, IpCidr,
};

use crate::health::{Failure, ProbeResult};

/// Neighbour cache entries; must match the `iface-neighbor-cache-count-*`
/// feature enabled in `crates/lb/Cargo.toml`.
pub const NEIGHBOR_CAPACITY: usize = 1024;

/// Largest `max_probes`.
pub const MAX_PROBES_LIMIT: usize = 4096;

/// Default `max_probes`.
pub const DEFAULT_MAX_PROBES: usize = 256;

/// Longest frame accepted by [`Prober::receive`] (jumbo frames included;
/// the prober itself advertises a 1460-byte MSS, so backends send less).
pub const MAX_RX_FRAME: usize = 9216;

/// Frames the transmit queue holds before smoltcp is told to wait.
pub const TX_QUEUE_MAX: usize = 1024;

/// Longest HTTP path accepted.
pub const MAX_PATH_LEN: usize = 1024;

/// Longest HTTP status line read; a longer one is
/// [`Failure::BadResponse`].
pub const STATUS_LINE_MAX: usize = 512;

/// How long a finished probe's socket may take to finish closing before
/// it is aborted.
pub const LINGER_NS: u64 = 2_000_000_000;

/// Minimum time between two of the prober's own ARP requests for one
/// next hop.
pub const ARP_RETRY_NS: u64 = 1_000_000_000;

/// How long an ARP packet heard from a next hop keeps the prober from
/// asking again itself (half of smoltcp's 60 s entry lifetime).
pub const ARP_FRESH_NS: u64 = 30_000_000_000;

/// Interface MTU (Ethernet frame without FCS).
const MTU: usize = 1514;
const RX_BUFFER: usize = 1024;
const EPHEMERAL_FIRST: u16 = 49152;
const EPHEMERAL_COUNT: u32 = 65536 - EPHEMERAL_FIRST as u32;

/// What a probe checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Check {
    /// TCP connect (the default).
    #[default]
    Tcp,
    /// HTTP/1.0 GET.
    Http {
        /// Request path, starting with `/`, visible ASCII only.
        path: String,
        /// Status code that means healthy (default 200).
        #[serde(default = "default_status")]
        expected_status: u16,
    },
}

fn default_status() -> u16 {
    200
}

/// Why a [`Check`] is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// The path does not start with `/`.
    #[error("HTTP health check path {0:?} must start with '/'")]
    PathStart(String),
    /// The path is too long.
    #[error("HTTP health check path is {0} bytes; the limit is {MAX_PATH_LEN}")]
    PathLength(usize),
    /// The path has a space, a control character or non-ASCII.
    #[error(
        "HTTP health check path {0:?} may only contain visible ASCII (percent-encode the rest)"
    )]
    PathChar(String),
    /// The expected status is not a valid HTTP status.
    #[error("HTTP health check expected_status {0} must be between 100 and 599")]
    Status(u16),
}

impl Check {
    /// Checks the HTTP path and status.
    pub fn validate(&self) -> Result<(), CheckError> {
        let Check::Http {
            path,
            expected_status,
        } = self
        else {
            return Ok(());
        };
        if !path.starts_with('/') {
            return Err(CheckError::PathStart(path.clone()));
        }
        if path.len() > MAX_PATH_LEN {
            return Err(CheckError::PathLength(path.len()));
        }
        if !path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(CheckError::PathChar(path.clone()));
        }
        if !(100..=599).contains(expected_status) {
            return Err(CheckError::Status(*expected_status));
        }
        Ok(())
    }
}

/// Where the prober lives in the tenant network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProberConfig {
    /// The prober's MAC (unicast).
    pub mac: [u8; 6],
    /// The prober's address inside the tenant network (the service
    /// address backends see probes come from).
    pub ip: Ipv4Addr,
    /// Prefix length of the tenant subnet.
    pub prefix_len: u8,
    /// Router for backends outside the subnet.
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// Probes at once (default [`DEFAULT_MAX_PROBES`]).
    #[serde(default = "default_max_probes")]
    pub max_probes: usize,
    /// Seed of smoltcp's generator (initial sequence numbers) and of the
    /// first ephemeral port; anything that differs between restarts (the
    /// caller's start time, say) keeps a restarted prober from reusing
    /// the previous run's sequence space.
    #[serde(default)]
    pub seed: u64,
}

fn default_max_probes() -> usize {
    DEFAULT_MAX_PROBES
}

impl ProberConfig {
    /// A config with defaults for everything but the address.
    pub fn new(mac: [u8; 6], ip: Ipv4Addr, prefix_len: u8) -> ProberConfig {
        ProberConfig {
            mac,
            ip,
            prefix_len,
            gateway: None,
            max_probes: DEFAULT_MAX_PROBES,
            seed: 0,
        }
    }

    fn mask(&self) -> u32 {
        match self.prefix_len {
            0 => 0,
            n => u32::MAX << (32 - u32::from(n.min(32))),
        }
    }

    fn on_link(&self, ip: Ipv4Addr) -> bool {
        (u32::from(ip) & self.mask()) == (u32::from(self.ip) & self.mask())
    }

    /// The subnet's network or broadcast address (only for prefixes up to
    /// /30, where those are not hosts).
    fn is_subnet_special(&self, ip: Ipv4Addr) -> bool {
        if self.prefix_len > 30 || !self.on_link(ip) {
            return false;
        }
        let host = u32::from(ip) & !self.mask();
        host == 0 || host == !self.mask()
    }
}

/// A [`ProberConfig`] a user must fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProberError {
    /// The MAC is multicast, broadcast or zero.
    #[error("prober MAC {0:02x?} must be a unicast address")]
    Mac([u8; 6]),
    /// The address is not a usable host address.
    #[error("prober address {0} must be a unicast host address of its subnet")]
    Address(Ipv4Addr),
    /// The prefix length is out of range.
    #[error("prober prefix length /{0} must be between /1 and /32")]
    PrefixLen(u8),
    /// The gateway is not a host of the subnet, or is the prober itself.
    #[error("prober gateway {0} must be another host of the prober's subnet")]
    Gateway(Ipv4Addr),
    /// `max_probes` out of range.
    #[error("prober max_probes = {0} must be between 1 and {MAX_PROBES_LIMIT}")]
    MaxProbes(usize),
}

/// Why a probe could not start. The caller reports `InvalidTarget` and
/// `NoRoute` as a failed probe ([`Failure::NoRoute`]); `Busy` is nobody's
/// fault: retry later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// `max_probes` probes are running.
    #[error("{0} probes are already running")]
    Busy(usize),
    /// Not a unicast host address (or the prober's own).
    #[error("{0} cannot be probed: not a unicast host address")]
    InvalidTarget(Ipv4Addr),
    /// Outside the subnet and no gateway.
    #[error("no route to {0}: outside the prober's subnet and no gateway")]
    NoRoute(Ipv4Addr),
    /// Port 0.
    #[error("port 0 cannot be probed")]
    InvalidPort,
    /// Out of local ports (cannot happen with `max_probes` in range).
    #[error("no free local port")]
    NoPort,
    /// The check is invalid.
    #[error(transparent)]
    Check(#[from] CheckError),
}

/// A running probe's identity, unique per prober.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProbeId(pub u64);

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProberStats {
    /// Frames given to [`Prober::receive`].
    pub frames_received: u64,
    /// Of those, dropped for their size.
    pub frames_dropped: u64,
    /// Frames handed out by [`Prober::transmit`].
    pub frames_sent: u64,
    /// Frames smoltcp produced while the transmit queue was full (replies
    /// to received frames; lost).
    pub tx_overflow: u64,
    /// Probes started.
    pub probes_started: u64,
    /// Probes that ended Up.
    pub probes_up: u64,
    /// Probes that ended Down.
    pub probes_down: u64,
    /// ARP requests the prober sent itself (beyond smoltcp's own).
    pub arp_requests: u64,
    /// Lingering sockets aborted because they did not close in time or
    /// too many lingered.
    pub lingering_aborted: u64,
}

/// The device: two queues in memory.
#[derive(Debug, Default)]
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    overflow: u64,
}

struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

struct TxToken<'a> {
    queues: &'a mut Queues,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        // `transmit` refuses a token when the queue is full, but a token
        // that comes with a received frame (for an ARP reply, say) cannot
        // be refused: drop the frame instead of growing without bound.
        if self.queues.tx.len() < TX_QUEUE_MAX {
            self.queues.tx.push_back(frame);
        } else {
            self.queues.overflow += 1;
        }
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((RxToken(frame), TxToken { queues: self }))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        (self.tx.len() < TX_QUEUE_MAX).then_some(TxToken { queues: self })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut checksum = ChecksumCapabilities::default();
        // See "Checksums" in the module doc.
        checksum.tcp = Checksum::Tx;
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.checksum = checksum;
        caps
    }
}

#[derive(Debug)]
enum Kind {
    Tcp,
    Http {
        request: Vec<u8>,
        sent: usize,
        expected: u16,
        response: Vec<u8>,
    },
}

#[derive(Debug)]
struct Probe {
    handle: SocketHandle,
    port: u16,
    next_hop: Ipv4Addr,
    deadline: u64,
    connected: bool,
    kind: Kind,
}

#[derive(Debug)]
struct Linger {
    handle: SocketHandle,
    port: u16,
    until: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Neighbor {
    heard: Option<u64>,
    asked: Option<u64>,
}

/// The probing endpoint of one tenant network. See the module doc.
pub struct Prober {
    config: ProberConfig,
    iface: Interface,
    device: Queues,
    sockets: SocketSet<'static>,
    probes: BTreeMap<ProbeId, Probe>,
    lingering: VecDeque<Linger>,
    ports: HashSet<u16>,
    neighbors: HashMap<Ipv4Addr, Neighbor>,
    results: VecDeque<(ProbeId, ProbeResult)>,
    next_id: u64,
    next_port: u16,
    /// Latest `now` seen: time never goes backwards for smoltcp.
    now: u64,
    stats: ProberStats,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober")
            .field("config", &self.config)
            .field("probes", &self.probes.len())
            .field("lingering", &self.lingering.len())
            .field("stats", &self.stats)
            .finish()
    }
}

fn instant(now: u64) -> Instant {
    Instant::from_micros(i64::try_from(now / 1000).unwrap_or(i64::MAX))
}

fn is_unicast_host(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback())
}

impl Prober {
    /// A prober with no probes. `now` is the caller's clock (ns).
    pub fn new(config: ProberConfig, now: u64) -> Result<Prober, ProberError> {
        let mac = EthernetAddress(config.mac);
        if !mac.is_unicast() || config.mac == [0; 6] {
            return Err(ProberError::Mac(config.mac));
        }
        if config.prefix_len == 0 || config.prefix_len > 32 {
            return Err(ProberError::PrefixLen(config.prefix_len));
        }
        if !is_unicast_host(config.ip) || config.is_subnet_special(config.ip) {
            return Err(ProberError::Address(config.ip));
        }
        if let Some(gw) = config.gateway {
            if gw == config.ip
                || !is_unicast_host(gw)
                || !config.on_link(gw)
                || config.is_subnet_special(gw)
            {
                return Err(ProberError::Gateway(gw));
            }
        }
        if config.max_probes == 0 || config.max_probes > MAX_PROBES_LIMIT {
            return Err(ProberError::MaxProbes(config.max_probes));
        }

        let mut device = Queues::default();
        let mut iface_config = IfaceConfig::new(HardwareAddress::Ethernet(mac));
        iface_config.random_seed = config.seed;
        let mut iface = Interface::new(iface_config, &mut device, instant(now));
        let mut pushed = false;
        iface.update_ip_addrs(|addrs| {
            pushed = addrs
                .push(IpCidr::new(IpAddress::Ipv4(config.ip), config.prefix_len))
                .is_ok();
        });
        if !pushed {
            // The address list holds two entries and this is the first.
            return Err(ProberError::Address(config.ip));
        }
        if let Some(gw) = config.gateway {
            // The route table holds two entries and this is the first.
            if iface.routes_mut().add_default_ipv4_route(gw).is_err() {
                return Err(ProberError::Gateway(gw));
            }
        }
        Ok(Prober {
            config,
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            probes: BTreeMap::new(),
            lingering: VecDeque::new(),
            ports: HashSet::new(),
            neighbors: HashMap::new(),
            results: VecDeque::new(),
            next_id: 1,
            next_port: EPHEMERAL_FIRST + (config.seed % u64::from(EPHEMERAL_COUNT)) as u16,
            now,
            stats: ProberStats::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ProberConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> ProberStats {
        let mut s = self.stats;
        s.tx_overflow = self.device.overflow;
        s
    }

    /// Probes running.
    pub fn active(&self) -> usize {
        self.probes.len()
    }

    /// Sockets held: running probes plus finished ones still closing
    /// (at most `2 * max_probes`).
    pub fn sockets_in_use(&self) -> usize {
        self.probes.len() + self.lingering.len()
    }

    /// Probes that can still start before [`StartError::Busy`].
    pub fn free_slots(&self) -> usize {
        self.config.max_probes.saturating_sub(self.probes.len())
    }

    fn clock(&mut self, now: u64) -> u64 {
        self.now = self.now.max(now);
        self.now
    }

    /// Starts a probe of `target:port`, to be decided by `deadline_ns`.
    pub fn start(
        &mut self,
        target: Ipv4Addr,
        port: u16,
        check: &Check,
        deadline_ns: u64,
        now: u64,
    ) -> Result<ProbeId, StartError> {
        let now = self.clock(now);
        check.validate()?;
        if self.probes.len() >= self.config.max_probes {
            return Err(StartError::Busy(self.probes.len()));
        }
        if port == 0 {
            return Err(StartError::InvalidPort);
        }
        if !is_unicast_host(target)
            || target == self.config.ip
            || self.config.is_subnet_special(target)
        {
            return Err(StartError::InvalidTarget(target));
        }
        let next_hop = if self.config.on_link(target) {
            target
        } else {
            self.config.gateway.ok_or(StartError::NoRoute(target))?
        };
        let local_port = self.alloc_port().ok_or(StartError::NoPort)?;

        let kind = match check {
            Check::Tcp => Kind::Tcp,
            Check::Http {
                path,
                expected_status,
            } => {
                let host = if port == 80 {
                    target.to_string()
                } else {
                    format!("{target}:{port}")
                };
                let request = format!(
                    "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: vswitch-lb-health\r\n\
                     Accept: */*\r\nConnection: close\r\n\r\n"
                )
                .into_bytes();
                Kind::Http {
                    request,
                    sent: 0,
                    expected: *expected_status,
                    response: Vec::with_capacity(64),
                }
            }
        };
        let tx_len = match &kind {
            Kind::Tcp => 64,
            Kind::Http { request, .. } => request.len(),
        };
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
            tcp::SocketBuffer::new(vec![0; tx_len]),
        );
        // Our deadline decides, not smoltcp's own timers.
        socket.set_timeout(None);
        socket.set_ack_delay(None);
        let remote = (IpAddress::Ipv4(target), port);
        if socket
            .connect(self.iface.context(), remote, local_port)
            .is_err()
        {
            // Only an unroutable address gets here, which the checks
            // above already rule out.
            return Err(StartError::NoRoute(target));
        }
        let handle = self.sockets.add(socket);
        self.ports.insert(local_port);
        let id = ProbeId(self.next_id);
        self.next_id += 1;
        self.probes.insert(
            id,
            Probe {
                handle,
                port: local_port,
                next_hop,
                deadline: deadline_ns,
                connected: false,
                kind,
            },
        );
        self.remember_neighbor(next_hop);
        self.stats.probes_started += 1;
        self.step(now);
        Ok(id)
    }

    /// [`start`](Self::start) with [`Check::Tcp`].
    pub fn start_tcp(
        &mut self,
        target: Ipv4Addr,
        port: u16,
        deadline_ns: u64,
        now: u64,
    ) -> Result<ProbeId, StartError> {
        self.start(target, port, &Check::Tcp, deadline_ns, now)
    }

    /// [`start`](Self::start) with [`Check::Http`].
    pub fn start_http(
        &mut self,
        target: Ipv4Addr,
        port: u16,
        path: &str,
        expected_status: u16,
        deadline_ns: u64,
        now: u64,
    ) -> Result<ProbeId, StartError> {
        let check = Check::Http {
            path: path.to_owned(),
            expected_status,
        };
        self.start(target, port, &check, deadline_ns, now)
    }

    /// Stops a probe without a result (its backend was removed, say).
    /// Returns whether it was running.
    pub fn cancel(&mut self, id: ProbeId, now: u64) -> bool {
        let now = self.clock(now);
        let Some(p) = self.probes.remove(&id) else {
            return false;
        };
        self.sockets.get_mut::<tcp::Socket>(p.handle).abort();
        self.linger(p.handle, p.port, now);
        self.step(now);
        true
    }

    /// Takes one Ethernet frame addressed to the prober (unicast to its
    /// MAC, or broadcast: ARP requests). Frames for others are ignored by
    /// smoltcp; any bytes are safe.
    pub fn receive(&mut self, frame: &[u8], now: u64) {
        let now = self.clock(now);
        self.stats.frames_received += 1;
        if frame.len() < EthernetFrame::<&[u8]>::header_len() || frame.len() > MAX_RX_FRAME {
            self.stats.frames_dropped += 1;
            return;
        }
        self.observe_arp(frame, now);
        self.device.rx.push_back(frame.to_vec());
        self.step(now);
    }

    /// Frames to send, oldest first (drains the queue).
    pub fn transmit(&mut self, now: u64) -> Vec<Vec<u8>> {
        let now = self.clock(now);
        self.step(now);
        let frames: Vec<Vec<u8>> = self.device.tx.drain(..).collect();
        self.stats.frames_sent += frames.len() as u64;
        frames
    }

    /// Advances timers and returns the results of probes that finished
    /// since the last call.
    pub fn poll(&mut self, now: u64) -> Vec<(ProbeId, ProbeResult)> {
        let now = self.clock(now);
        self.step(now);
        self.results.drain(..).collect()
    }

    /// When [`poll`](Self::poll) must be called next (ns); `Some(now)` when
    /// results or frames are waiting; `None` when idle.
    pub fn poll_at(&mut self, now: u64) -> Option<u64> {
        let now = self.clock(now);
        if !self.results.is_empty() || !self.device.tx.is_empty() {
            return Some(now);
        }
        let mut at = self.iface.poll_at(instant(now), &self.sockets).map(|t| {
            u64::try_from(t.total_micros())
                .unwrap_or(0)
                .saturating_mul(1000)
        });
        let mut earliest = |t: u64| at = Some(at.map_or(t, |a| a.min(t)));
        for p in self.probes.values() {
            earliest(p.deadline);
            if !p.connected {
                if let Some(asked) = self.neighbors.get(&p.next_hop).and_then(|n| n.asked) {
                    earliest(asked.saturating_add(ARP_RETRY_NS));
                }
            }
        }
        for l in &self.lingering {
            earliest(l.until);
        }
        at
    }

    /// One round: take in what arrived, move every probe on, send what is
    /// due, forget closed sockets.
    fn step(&mut self, now: u64) {
        let ts = instant(now);
        self.iface.poll(ts, &mut self.device, &mut self.sockets);
        self.advance_probes(now);
        self.expire_lingering(now);
        self.arp_kicks(now);
        self.iface.poll(ts, &mut self.device, &mut self.sockets);
        self.reap_lingering();
    }

    fn advance_probes(&mut self, now: u64) {
        let mut finished = Vec::new();
        for (&id, p) in self.probes.iter_mut() {
            let socket = self.sockets.get_mut::<tcp::Socket>(p.handle);
            if let Some(result) = advance(p, socket, now) {
                finished.push((id, result));
            }
        }
        for (id, result) in finished {
            let Some(p) = self.probes.remove(&id) else {
                continue;
            };
            let socket = self.sockets.get_mut::<tcp::Socket>(p.handle);
            if result == ProbeResult::Down(Failure::Timeout) {
                socket.abort();
            } else {
                // FIN (or nothing, if already closed).
                socket.close();
            }
            self.linger(p.handle, p.port, now.saturating_add(LINGER_NS));
            match result {
                ProbeResult::Up => self.stats.probes_up += 1,
                ProbeResult::Down(_) => self.stats.probes_down += 1,
            }
            self.results.push_back((id, result));
        }
    }

    fn linger(&mut self, handle: SocketHandle, port: u16, until: u64) {
        self.lingering.push_back(Linger {
            handle,
            port,
            until,
        });
    }

    /// Aborts lingering sockets past their time, and the oldest ones
    /// beyond `max_probes` (too many closing at once). They are sent their
    /// RST by the next interface poll and reaped right after it.
    fn expire_lingering(&mut self, now: u64) {
        let excess = self.lingering.len().saturating_sub(self.config.max_probes);
        for (i, l) in self.lingering.iter().enumerate() {
            if l.until <= now || i < excess {
                let socket = self.sockets.get_mut::<tcp::Socket>(l.handle);
                if socket.state() != tcp::State::Closed {
                    socket.abort();
                    self.stats.lingering_aborted += 1;
                }
            }
        }
    }

    fn reap_lingering(&mut self) {
        let sockets = &mut self.sockets;
        let ports = &mut self.ports;
        self.lingering.retain(|l| {
            let state = sockets.get_mut::<tcp::Socket>(l.handle).state();
            if matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
                sockets.remove(l.handle);
                ports.remove(&l.port);
                false
            } else {
                true
            }
        });
    }

    fn alloc_port(&mut self) -> Option<u16> {
        for _ in 0..EPHEMERAL_COUNT {
            let port = self.next_port;
            self.next_port = port.checked_add(1).unwrap_or(EPHEMERAL_FIRST);
            if !self.ports.contains(&port) {
                return Some(port);
            }
        }
        None
    }

    fn remember_neighbor(&mut self, ip: Ipv4Addr) {
        if self.neighbors.contains_key(&ip) {
            return;
        }
        if self.neighbors.len() >= NEIGHBOR_CAPACITY {
            // Forget the one heard from longest ago (never heard first).
            let oldest = self
                .neighbors
                .iter()
                .min_by_key(|(_, n)| (n.heard, n.asked))
                .map(|(&ip, _)| ip);
            if let Some(oldest) = oldest {
                self.neighbors.remove(&oldest);
            }
        }
        self.neighbors.insert(ip, Neighbor::default());
    }

    /// Notes ARP packets from next hops we care about.
    fn observe_arp(&mut self, frame: &[u8], now: u64) {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return;
        };
        if eth.ethertype() != EthernetProtocol::Arp {
            return;
        }
        let Ok(arp) = ArpPacket::new_checked(eth.payload()) else {
            return;
        };
        let Ok(ArpRepr::EthernetIpv4 {
            source_protocol_addr,
            target_protocol_addr,
            ..
        }) = ArpRepr::parse(&arp)
        else {
            return;
        };
        if target_protocol_addr != self.config.ip {
            return;
        }
        if let Some(n) = self.neighbors.get_mut(&source_protocol_addr) {
            n.heard = Some(now);
        }
    }

    /// Our own ARP requests for next hops of probes still connecting.
    fn arp_kicks(&mut self, now: u64) {
        let mut hops: Vec<Ipv4Addr> = self
            .probes
            .values()
            .filter(|p| !p.connected)
            .map(|p| p.next_hop)
            .collect();
        hops.sort_unstable();
        hops.dedup();
        for hop in hops {
            let Some(n) = self.neighbors.get_mut(&hop) else {
                continue;
            };
            let fresh = n
                .heard
                .is_some_and(|h| now.saturating_sub(h) < ARP_FRESH_NS);
            let asked_recently = n
                .asked
                .is_some_and(|a| now.saturating_sub(a) < ARP_RETRY_NS);
            if fresh || asked_recently || self.device.tx.len() >= TX_QUEUE_MAX {
                continue;
            }
            n.asked = Some(now);
            self.device
                .tx
                .push_back(arp_request(self.config.mac, self.config.ip, hop));
            self.stats.arp_requests += 1;
        }
    }
}

fn arp_request(mac: [u8; 6], ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(mac),
        source_protocol_addr: ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let mut buf = vec![0; EthernetFrame::<&[u8]>::header_len() + repr.buffer_len()];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    frame.set_dst_addr(EthernetAddress::BROADCAST);
    frame.set_src_addr(EthernetAddress(mac));
    frame.set_ethertype(EthernetProtocol::Arp);
    repr.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    buf
}

/// Moves one probe on; `Some` when it is decided.
fn advance(p: &mut Probe, socket: &mut tcp::Socket, now: u64) -> Option<ProbeResult> {
    use tcp::State;
    if !p.connected {
        match socket.state() {
            State::SynSent | State::SynReceived => {}
            // Back to Closed before the handshake: the SYN was answered
            // with a RST.
            State::Closed | State::Listen => return Some(ProbeResult::Down(Failure::Refused)),
            // Established, or already past it (the peer may have sent its
            // FIN right behind the SYN-ACK).
            _ => p.connected = true,
        }
    }
    if p.connected {
        match &mut p.kind {
            Kind::Tcp => return Some(ProbeResult::Up),
            Kind::Http {
                request,
                sent,
                expected,
                response,
            } => {
                if let Some(r) = http_step(socket, request, sent, *expected, response) {
                    return Some(r);
                }
            }
        }
    }
    (now >= p.deadline).then_some(ProbeResult::Down(Failure::Timeout))
}

fn http_step(
    socket: &mut tcp::Socket,
    request: &[u8],
    sent: &mut usize,
    expected: u16,
    response: &mut Vec<u8>,
) -> Option<ProbeResult> {
    if *sent < request.len() && socket.can_send() {
        if let Ok(n) = socket.send_slice(request.get(*sent..).unwrap_or_default()) {
            *sent += n;
        }
    }
    let mut chunk = [0u8; 256];
    while socket.can_recv() && response.len() < STATUS_LINE_MAX {
        let room = (STATUS_LINE_MAX - response.len()).min(chunk.len());
        match socket.recv_slice(&mut chunk[..room]) {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
        }
    }
    let judge = |line: &[u8]| match parse_status_line(line) {
        Some(got) if got == expected => ProbeResult::Up,
        Some(got) => ProbeResult::Down(Failure::Status { got, expected }),
        None => ProbeResult::Down(Failure::BadResponse),
    };
    if let Some(end) = response.iter().position(|&b| b == b'\n') {
        return Some(judge(&response[..end]));
    }
    if response.len() >= STATUS_LINE_MAX {
        return Some(ProbeResult::Down(Failure::BadResponse));
    }
    match socket.state() {
        tcp::State::Closed => Some(ProbeResult::Down(Failure::Reset)),
        // The peer finished sending without a line break: judge what came.
        _ if !socket.may_recv() => Some(if response.is_empty() {
            ProbeResult::Down(Failure::Closed)
        } else {
            judge(response)
        }),
        _ => None,
    }
}

/// The status code of `HTTP/<d>.<d> <ddd>[ <reason>][\r]`.
pub fn parse_status_line(line: &[u8]) -> Option<u16> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"HTTP/")?;
    let sp = rest.iter().position(|&b| b == b' ')?;
    let (version, rest) = rest.split_at(sp);
    let mut parts = version.split(|&b| b == b'.');
    let valid_number = |p: Option<&[u8]>| {
        p.is_some_and(|p| !p.is_empty() && p.len() <= 3 && p.iter().all(u8::is_ascii_digit))
    };
    if !valid_number(parts.next()) || !valid_number(parts.next()) || parts.next().is_some() {
        return None;
    }
    let rest = rest.get(1..)?;
    let code = rest.get(..3)?;
    if !code.iter().all(u8::is_ascii_digit) || !matches!(rest.get(3), None | Some(b' ')) {
        return None;
    }
    let code = code
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    (100..=599).contains(&code).then_some(code)
}

#[cfg(test)]
pub(crate) mod tests;
