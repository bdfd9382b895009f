//! Data-plane workers and the snapshot they read.
//!
//! Each worker thread owns an epoll set holding the receive side of some
//! ports: of a single-queue tap, worker `port id % workers` reads it; of a
//! multi-queue tap (the default with several workers), every worker reads
//! and writes its own queue (see [`crate::tap`]). On wake-up it reads the
//! clock once, loads the current [`Snapshot`] once (an `arc-swap` load, no
//! lock), and runs every frame it reads to completion: decide, then write to
//! the egress tap(s). Reads per port per wake-up are bounded by
//! [`RX_BATCH`] so one busy port cannot starve the others (epoll is
//! level-triggered: a port with more to read is reported again).
//!
//! The control plane builds a new snapshot on reload and swaps it in;
//! workers see it on their next wake-up. Ports that survive a reload keep
//! their `Arc`s (tap, counters), so their traffic never notices.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use packet::{FlowKey, MacAddr, Offload, PacketBuf, L3, L4};
use rustix::event::epoll;
use rustix::event::{eventfd, EventfdFlags};

use crate::capture::{PortCapture, Stage};
use crate::clock::Timestamp;
use crate::config::{Config, Network};
use crate::dhcp_service::{DhcpQueue, DhcpRequest, Slot, MAX_MESSAGE};
use crate::fdb::PortId;
use crate::pipeline::external::UplinkRt;
use crate::pipeline::router::{self, Routed};
use crate::pipeline::security::PortSg;
use crate::pipeline::{
    arp, dns_local, port_security, Addresses, Bridge, DropCounters, DropReason, Ingress, Verdict,
};
use crate::tap::Tap;
use crate::trace;
use crate::underlay::{is_vtep, PeerRt, Underlay, VTEP_BASE};

mod balance;
mod external;
mod overlay;

pub use balance::{inject_service, lb_drop_reason, LbGate, ServiceRt, ServiceScratch};

/// Most frames read from one port per wake-up.
pub const RX_BATCH: usize = 64;
/// Most epoll events handled per wake-up.
const MAX_EVENTS: usize = 64;
/// epoll user data of the stop eventfd.
const WAKE_TOKEN: u64 = u64::MAX;
/// epoll user data of the worker's underlay socket.
const UNDERLAY_TOKEN: u64 = u64::MAX - 1;

/// epoll user data of a port's tap queue: the queue in the high 32 bits,
/// the port id in the low 32.
fn port_token(id: PortId, queue: usize) -> u64 {
    ((queue as u64) << 32) | u64::from(id)
}

/// Per-port counters, shared by all workers (relaxed atomics: they are
/// statistics, not synchronisation). They survive reloads.
#[derive(Debug, Default)]
pub struct PortCounters {
    /// Frames received from the port (sent by the VM); a super-frame is one.
    pub rx_packets: AtomicU64,
    /// Bytes received (Ethernet frame bytes).
    pub rx_bytes: AtomicU64,
    /// Frames written to the port.
    pub tx_packets: AtomicU64,
    /// Bytes written.
    pub tx_bytes: AtomicU64,
    /// DHCP messages of this port waiting in the service's queue.
    pub dhcp_inflight: Arc<std::sync::atomic::AtomicU32>,
    drops: DropCounters,
}

impl PortCounters {
    /// Counts one dropped frame.
    #[inline]
    pub fn count_drop(&self, r: DropReason) {
        self.drops.count(r);
    }

    /// Drops counted for `r`.
    pub fn drops(&self, r: DropReason) -> u64 {
        self.drops.get(r)
    }
}

/// A tap as the data plane holds it.
#[derive(Debug)]
pub struct TapHandle {
    /// The device.
    pub tap: Tap,
    /// Set when reads fail for good (the device was destroyed, e.g. its
    /// namespace deleted); a reload re-creates the tap.
    pub detached: AtomicBool,
}

/// What a port connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// A VM's NIC in a tenant network.
    Vm,
    /// The host's link to the external network (routed, with NAT).
    Uplink,
}

impl PortKind {
    /// `"vm"` / `"uplink"`.
    pub fn as_str(self) -> &'static str {
        match self {
            PortKind::Vm => "vm",
            PortKind::Uplink => "uplink",
        }
    }
}

/// A port as the data path sees it, rebuilt on each reload around the
/// long-lived tap and counters.
#[derive(Debug)]
pub struct PortRt {
    /// Index in [`Snapshot::ports`], stable across reloads.
    pub id: PortId,
    /// VM NIC or uplink.
    pub kind: PortKind,
    /// Port name.
    pub name: String,
    /// Tenant name (empty for the uplink).
    pub tenant: String,
    /// Index of its network in [`Snapshot::networks`] (`usize::MAX` for
    /// the uplink).
    pub net: usize,
    /// Configured MAC.
    pub mac: MacAddr,
    /// Configured IP.
    pub ip: Option<IpAddr>,
    /// Port security on.
    pub port_security: bool,
    /// The tap.
    pub tap: Arc<TapHandle>,
    /// Counters.
    pub counters: Arc<PortCounters>,
    /// Capture point (rx, tx, drop); survives reloads like the counters.
    pub capture: Arc<PortCapture>,
    /// Security groups, when the port is filtered.
    pub sg: Option<PortSg>,
}

impl PortRt {
    /// Counts a frame dropped at this port and offers it to captures.
    #[inline]
    pub fn drop_frame(&self, r: DropReason, frame: &[u8]) {
        trace::note("drop", || {
            format!("dropped at port {}: {}", self.name, r.as_str())
        });
        self.counters.count_drop(r);
        if trace::dry_run() {
            return;
        }
        self.capture.offer(Stage::Drop, Some(r), frame);
    }

    fn ingress(&self) -> Ingress {
        Ingress {
            id: self.id,
            mac: self.mac,
            port_security: self.port_security,
        }
    }
}

/// A network as the data path sees it.
#[derive(Debug)]
pub struct NetworkRt {
    /// Its config.
    pub cfg: Network,
    /// Its ports, in config order.
    pub ports: Vec<PortId>,
    /// L2 switching (MAC table), kept across reloads.
    pub bridge: Arc<Bridge>,
    /// IPv4 address owners: gateway and ports from the directory, leases
    /// from DHCP.
    pub addrs: Addresses,
    /// The DHCP service's queue, when the network has a `[dhcp]` section.
    pub dhcp: Option<DhcpQueue>,
    /// The gateway's IPv4 address and MAC, when the network has a gateway.
    pub gateway: Option<(std::net::Ipv4Addr, MacAddr)>,
    /// The tenant's DNS zone (answered at the gateway address).
    pub zone: Arc<ArcSwap<dns::Zone>>,
    /// Peers hosting this network (VTEP pseudo-port ids): head-end
    /// replication targets, and who may send its VNI.
    pub vteps: Vec<PortId>,
    /// Peers whose VXLAN for this network is accepted: those hosting it,
    /// and, for a routed network, those hosting another routed network of
    /// the tenant (their routers send into this one).
    pub accept_from: Vec<PortId>,
    /// The VNI, as the VXLAN header carries it.
    pub vni: vxlan::Vni,
    /// The tenant's router (shared by its networks), when this network has
    /// an IPv4 gateway.
    pub router: Option<Arc<router::Router>>,
    /// What the router learned by ARP in this network; kept across reloads.
    pub neighbours: Arc<router::Neighbours>,
    /// The tenant's conntrack zone.
    pub ct_zone: u32,
    /// This host's load-balancer prober in the network, if any.
    pub service: Option<ServiceRt>,
}

/// Everything the data path reads, swapped whole on reload.
#[derive(Debug)]
pub struct Snapshot {
    /// Ports by id; `None` for free ids.
    pub ports: Vec<Option<Arc<PortRt>>>,
    /// Networks in config order.
    pub networks: Vec<NetworkRt>,
    /// The config this was built from.
    pub config: Arc<Config>,
    /// The underlay, when the config spans hosts.
    pub underlay: Option<Arc<Underlay>>,
    /// Peers by `id - VTEP_BASE`.
    pub peers: Vec<Option<Arc<PeerRt>>>,
    /// Peers by underlay address.
    pub peer_by_ip: std::collections::HashMap<std::net::Ipv4Addr, PortId>,
    /// Networks by VNI.
    pub by_vni: std::collections::HashMap<u32, usize>,
    /// This host's uplink, if it has one.
    pub uplink: Option<UplinkRt>,
    /// NAT and its connection table; kept across reloads.
    pub nat: Arc<crate::nat_tables::NatTables>,
    /// Tenant routers by conntrack zone (where NAT delivers inbound
    /// packets).
    pub routers: std::collections::HashMap<u32, Arc<router::Router>>,
    /// VIPs and balanced connections; kept across reloads.
    pub lb: Arc<crate::lb_tables::LbTables>,
    /// Pools and probers; kept across reloads.
    pub balancers: Arc<crate::balancer::Balancers>,
    /// What may be the balancer's, checked without its lock.
    pub lb_gate: LbGate,
    /// External VIPs this host balances (ARP on the uplink).
    pub lb_external: std::collections::HashSet<std::net::Ipv4Addr>,
}

impl Snapshot {
    /// The port with `id`, if it exists.
    #[inline]
    pub fn port(&self, id: PortId) -> Option<&Arc<PortRt>> {
        self.ports.get(id as usize).and_then(|p| p.as_ref())
    }

    /// The peer with pseudo-port `id`, if it exists.
    #[inline]
    pub fn peer(&self, id: PortId) -> Option<&Arc<PeerRt>> {
        let i = id.checked_sub(VTEP_BASE)?;
        self.peers.get(i as usize).and_then(|p| p.as_ref())
    }

    /// How `vswitchctl` names a port or peer id.
    pub fn location_name(&self, id: PortId) -> Option<String> {
        if is_vtep(id) {
            self.peer(id)
                .map(|p| format!("vtep {} ({})", p.name, p.addr.ip()))
        } else {
            self.port(id).map(|p| p.name.clone())
        }
    }

    /// Live ports.
    pub fn iter_ports(&self) -> impl Iterator<Item = &Arc<PortRt>> {
        self.ports.iter().flatten()
    }

    /// Runs the pipeline for a frame received on `ingress`: parse once, port
    /// security, ARP responder, bridge. On [`Verdict::Reply`] the buffer
    /// holds the answer for the ingress port.
    #[inline]
    pub fn process(&self, ingress: &PortRt, buf: &mut PacketBuf, now: Timestamp) -> Verdict {
        if ingress.kind == PortKind::Uplink {
            return self.process_uplink(ingress, buf, now);
        }
        // Cannot fail for a snapshot built by the daemon; never panic.
        let Some(net) = self.networks.get(ingress.net) else {
            return Verdict::Drop(DropReason::EgressError);
        };
        trace::note("port", || {
            format!(
                "from port {} (tenant {}) into network {} (VNI {})",
                ingress.name,
                ingress.tenant,
                net.cfg.name,
                net.vni.get()
            )
        });
        let Ok(key) = FlowKey::parse(buf.frame()) else {
            return Verdict::Drop(DropReason::RuntFrame);
        };
        let ing = ingress.ingress();
        if let Err(r) = port_security::check(&ing, &key, &net.addrs)
            .and_then(|()| port_security::check_unparsed(&ing, &key, buf.frame()))
        {
            return Verdict::Drop(r);
        }
        trace::note("port_security", || {
            if ingress.port_security {
                format!(
                    "port security: source {} / {} belongs to {}",
                    key.src_mac,
                    key.ip().map_or("-".into(), |ip| ip.src.to_string()),
                    ingress.name
                )
            } else {
                "port security: off for this port".into()
            }
        });
        if let (Some(q), L3::Ipv4(_), L4::Udp { dst_port: 67, .. }) = (&net.dhcp, &key.l3, &key.l4)
        {
            trace::note("dhcp", || {
                format!(
                    "DHCP: to this host's DHCP server for network {}",
                    net.cfg.name
                )
            });
            if trace::dry_run() {
                return Verdict::Consumed;
            }
            return match key
                .udp_payload(buf.frame())
                .filter(|p| !p.is_empty() && p.len() <= MAX_MESSAGE)
            {
                Some(payload) => {
                    let Some(slot) = Slot::take(&ingress.counters.dhcp_inflight) else {
                        return Verdict::Drop(DropReason::LocalServiceBusy);
                    };
                    match q.submit(DhcpRequest {
                        net: net.cfg.key(),
                        port: ingress.id,
                        src_mac: key.src_mac,
                        payload: payload.to_vec(),
                        slot,
                    }) {
                        Ok(()) => Verdict::Consumed,
                        Err(r) => Verdict::Drop(r),
                    }
                }
                None => Verdict::Drop(DropReason::L3Malformed),
            };
        }
        if let Some(leg) = net.router.as_ref().and_then(|r| r.leg_of(ingress.net)) {
            if let Some((ip, mac)) = router::arp_reply_for_gateway(&key, leg) {
                trace::note("router", || {
                    format!("ARP reply to the gateway: router learns {ip} is at {mac}")
                });
                if trace::dry_run() {
                    return Verdict::Consumed;
                }
                net.neighbours.learn(ip, mac, now);
                // The request may have come from another host's router.
                return if net.accept_from.is_empty() {
                    Verdict::Consumed
                } else {
                    Verdict::ToPeers
                };
            }
        }
        if arp::respond(&ing, &key, &net.addrs, buf.frame_mut()) {
            buf.offload = Offload::NONE;
            trace::note("arp", || match key.l3 {
                L3::Arp(a) => format!(
                    "ARP: who-has {} answered by the switch from network {}'s address table",
                    a.tpa, net.cfg.name
                ),
                _ => "ARP: answered by the switch".into(),
            });
            return Verdict::Reply;
        }
        if let Some((gw, gw_mac)) = net.gateway {
            match dns_local::serve(&net.zone, gw, gw_mac, &key, buf) {
                dns_local::Outcome::NotMine => {}
                dns_local::Outcome::Answered => {
                    trace::note("dns", || {
                        format!(
                            "DNS: query to the gateway {gw} answered from tenant {}'s names",
                            ingress.tenant
                        )
                    });
                    return Verdict::Reply;
                }
                dns_local::Outcome::Dropped(r) => return Verdict::Drop(r),
            }
        }
        // Security groups, egress: after the switch's own services (DHCP,
        // ARP, DNS always pass), before any forwarding decision.
        if let Some(sg) = &ingress.sg {
            if let Err(r) = sg.admit(
                ingress.id,
                firewall::Direction::Egress,
                &key,
                buf.frame(),
                now,
            ) {
                return Verdict::Drop(r);
            }
        }
        if !self.lb_gate.is_empty() {
            if let Some(v) = self.lb_stage(ingress, net, &key, buf, now) {
                return v;
            }
        }
        if let Some(svc) = net.service {
            if key.dst_mac == svc.mac {
                return self.to_prober(net, buf.frame());
            }
        }
        if let Some((_, gw_mac)) = net.gateway {
            if key.dst_mac == gw_mac {
                return self.route(ingress, net, &key, buf, now);
            }
        }
        let v = net.bridge.decide(&ing, buf.frame(), now);
        trace::note("bridge", || self.describe_bridged(net, &key, v));
        v
    }

    /// What the bridge decided, in tenant terms.
    fn describe_bridged(&self, net: &NetworkRt, key: &FlowKey, v: Verdict) -> String {
        let where_ = |id: PortId| self.location_name(id).unwrap_or_else(|| format!("#{id}"));
        match v {
            Verdict::Forward(id) => format!(
                "bridge {}: {} is at {}",
                net.cfg.name,
                key.dst_mac,
                where_(id)
            ),
            Verdict::Flood if key.dst_mac.is_multicast() => {
                format!(
                    "bridge {}: {} is broadcast/multicast: flood",
                    net.cfg.name, key.dst_mac
                )
            }
            Verdict::Flood => format!("bridge {}: {} is unknown: flood", net.cfg.name, key.dst_mac),
            other => format!("bridge {}: {other:?}", net.cfg.name),
        }
    }
}

impl Snapshot {
    /// The router stage for a frame to `net`'s gateway MAC (see
    /// [`router`]).
    fn route(
        &self,
        ingress: &PortRt,
        net: &NetworkRt,
        key: &FlowKey,
        buf: &mut PacketBuf,
        now: Timestamp,
    ) -> Verdict {
        let Some(r) = &net.router else {
            return Verdict::Drop(DropReason::ToGatewayUnhandled);
        };
        let routed = router::route(
            r,
            ingress.net,
            key,
            buf,
            now,
            |i| self.networks.get(i).map(|n| &n.addrs),
            |i| self.networks.get(i).map(|n| &*n.neighbours),
        );
        trace::note("router", || {
            let dst = key.ip().map_or("-".into(), |ip| ip.dst.to_string());
            match routed {
                Routed::Outside => format!(
                    "router of tenant {}: {dst} is outside the tenant's networks",
                    ingress.tenant
                ),
                Routed::Forward { net: to, .. } | Routed::Resolve { net: to } => format!(
                    "router of tenant {}: {} -> {} toward {dst}",
                    ingress.tenant,
                    net.cfg.name,
                    self.networks.get(to).map_or("?", |n| n.cfg.name.as_str())
                ),
                Routed::Reply => {
                    "router: answered by the gateway (echo reply or ICMP error)".into()
                }
                Routed::Drop(r) => format!("router: {}", r.as_str()),
            }
        });
        if routed == Routed::Outside {
            return self.to_outside(ingress, net, r, key, buf, now);
        }
        self.routed_verdict(ingress, routed)
    }

    /// The verdict for what the router did.
    fn routed_verdict(&self, ingress: &PortRt, routed: Routed) -> Verdict {
        match routed {
            Routed::Reply => Verdict::Reply,
            Routed::Outside => Verdict::Drop(DropReason::NoRoute),
            Routed::Drop(r) => Verdict::Drop(r),
            Routed::Resolve { net } => {
                trace::note("router", || {
                    "next hop not resolved: the router floods an ARP request, this packet is dropped (route_arp_pending)".into()
                });
                ingress.counters.count_drop(DropReason::RouteArpPending);
                Verdict::FloodIn { net }
            }
            Routed::Forward { net, dst } => {
                let Some(out) = self.networks.get(net) else {
                    return Verdict::Drop(DropReason::NoRoute);
                };
                let v = match out.bridge.fdb().read().lookup(&dst) {
                    Some(port) => Verdict::ForwardIn { net, port },
                    None => Verdict::FloodIn { net },
                };
                trace::note("router", || match v {
                    Verdict::ForwardIn { port, .. } => format!(
                        "network {}: the next hop's MAC {dst} is at {}",
                        out.cfg.name,
                        self.location_name(port).unwrap_or_default()
                    ),
                    _ => format!(
                        "network {}: the next hop's MAC {dst} is unknown to the bridge: flood",
                        out.cfg.name
                    ),
                });
                v
            }
        }
    }
}

/// Writes a frame made by the switch (DHCP reply) to `port`, counting it.
pub fn inject(port: &PortRt, frame: &[u8]) {
    let mut buf = PacketBuf::from_frame(frame);
    buf.offload = Offload::NONE;
    transmit_local(port, &buf);
}

/// One worker's counters (written only by that worker; aligned apart so
/// workers do not share cache lines).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerStats {
    /// Frames read from taps.
    pub tap_rx_packets: AtomicU64,
    /// Bytes of those frames.
    pub tap_rx_bytes: AtomicU64,
    /// Returns from `epoll_wait` with work.
    pub wakeups: AtomicU64,
}

/// The worker threads.
#[derive(Debug)]
pub struct Workers {
    epolls: Vec<Arc<OwnedFd>>,
    stats: Vec<Arc<WorkerStats>>,
    wake: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` workers reading `shared`.
    pub fn start(n: usize, shared: Arc<ArcSwap<Snapshot>>) -> io::Result<Workers> {
        let n = n.max(1);
        let wake = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
        let stop = Arc::new(AtomicBool::new(false));
        let mut epolls = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        let stats: Vec<Arc<WorkerStats>> = (0..n).map(|_| Arc::default()).collect();
        for (i, st) in stats.iter().enumerate() {
            let ep = Arc::new(epoll::create(epoll::CreateFlags::CLOEXEC)?);
            epoll::add(
                &*ep,
                &*wake,
                epoll::EventData::new_u64(WAKE_TOKEN),
                epoll::EventFlags::IN,
            )?;
            let (ep2, shared2, stop2, st2) = (ep.clone(), shared.clone(), stop.clone(), st.clone());
            let h = std::thread::Builder::new()
                .name(format!("vs-worker-{i}"))
                .spawn(move || worker_loop(i, &ep2, &shared2, &stop2, &st2))?;
            epolls.push(ep);
            handles.push(h);
        }
        Ok(Workers {
            epolls,
            stats,
            wake,
            stop,
            handles,
        })
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.epolls.len()
    }

    /// Each worker's counters, by worker index.
    pub fn stats(&self) -> &[Arc<WorkerStats>] {
        &self.stats
    }

    /// Always false (at least one worker runs).
    pub fn is_empty(&self) -> bool {
        self.epolls.is_empty()
    }

    fn epoll_of(&self, id: PortId) -> &OwnedFd {
        &self.epolls[id as usize % self.epolls.len()]
    }

    /// The (worker epoll, tap queue) pairs that poll a port: with one queue,
    /// worker `id % workers` reads it; with several, worker `i` reads queue
    /// `i % queues`.
    fn pollers<'a>(
        &'a self,
        id: PortId,
        tap: &TapHandle,
    ) -> impl Iterator<Item = (&'a OwnedFd, usize)> + 'a {
        let queues = tap.tap.queues();
        let single = (queues == 1).then(|| (self.epoll_of(id), 0));
        let multi = (queues > 1)
            .then(|| self.epolls.iter().enumerate())
            .into_iter()
            .flatten()
            .map(move |(i, ep)| (&**ep, i % queues));
        single.into_iter().chain(multi)
    }

    /// Starts polling port `id`'s tap. The port must already be in the
    /// published snapshot.
    pub fn register(&self, id: PortId, tap: &TapHandle) -> io::Result<()> {
        for (ep, q) in self.pollers(id, tap) {
            epoll::add(
                ep,
                tap.tap.queue_fd(q),
                epoll::EventData::new_u64(port_token(id, q)),
                epoll::EventFlags::IN,
            )?;
        }
        Ok(())
    }

    /// Polls the underlay: worker `i` reads its own `SO_REUSEPORT` socket.
    pub fn register_underlay(&self, ul: &Underlay) -> io::Result<()> {
        for (i, ep) in self.epolls.iter().enumerate() {
            if let Some(sock) = ul.rx_socket(i) {
                epoll::add(
                    &**ep,
                    sock.as_fd(),
                    epoll::EventData::new_u64(UNDERLAY_TOKEN),
                    epoll::EventFlags::IN,
                )?;
            }
        }
        Ok(())
    }

    /// Stops polling port `id`'s tap (before it leaves the snapshot).
    pub fn unregister(&self, id: PortId, tap: &TapHandle) {
        for (ep, q) in self.pollers(id, tap) {
            // ENOENT: a worker already removed it after a fatal read error.
            let _ = epoll::delete(ep, tap.tap.queue_fd(q));
        }
    }

    /// Stops and joins all workers.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Per-worker buffers, allocated once.
pub(crate) struct Scratch {
    /// The frame being processed.
    buf: PacketBuf,
    /// The switch's own replies (ICMP errors).
    aux: PacketBuf,
    /// Underlay I/O (send trains, receive slots, GRO).
    overlay: overlay::OverlayScratch,
    /// Frames and bytes read from taps since the last flush to
    /// [`WorkerStats`].
    tap_rx: (u64, u64),
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            buf: PacketBuf::new(),
            aux: PacketBuf::new(),
            overlay: overlay::OverlayScratch::default(),
            tap_rx: (0, 0),
        }
    }
}

fn worker_loop(
    idx: usize,
    ep: &OwnedFd,
    shared: &ArcSwap<Snapshot>,
    stop: &AtomicBool,
    stats: &WorkerStats,
) {
    tracing::debug!(worker = idx, "worker started");
    crate::tap::set_thread_queue(idx);
    let mut events: Vec<epoll::Event> = Vec::with_capacity(MAX_EVENTS);
    let mut sc = Scratch::new();
    while !stop.load(Ordering::Relaxed) {
        events.clear();
        match epoll::wait(ep, rustix::buffer::spare_capacity(&mut events), None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::error!(worker = idx, error = %e, "epoll_wait failed; worker stops");
                return;
            }
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Timestamp::now();
        let snap = shared.load();
        for ev in &events {
            let token = ev.data.u64();
            if token == WAKE_TOKEN {
                continue;
            }
            if token == UNDERLAY_TOKEN {
                if let Some(ul) = &snap.underlay {
                    overlay::poll_underlay(idx, &snap, ul, &mut sc, now);
                }
                continue;
            }
            // Truncation intended: the low 32 bits are the port id.
            let id = token as PortId;
            let queue = (token >> 32) as usize;
            // A port removed by a reload since the event was queued.
            let Some(port) = snap.port(id) else { continue };
            poll_port(ep, &snap, port, queue, &mut sc, now);
        }
        stats.wakeups.fetch_add(1, Ordering::Relaxed);
        let (pkts, bytes) = std::mem::take(&mut sc.tap_rx);
        stats.tap_rx_packets.fetch_add(pkts, Ordering::Relaxed);
        stats.tap_rx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    tracing::debug!(worker = idx, "worker stopped");
}

/// Reads up to [`RX_BATCH`] frames from `port` and runs each to completion.
fn poll_port(
    ep: &OwnedFd,
    snap: &Snapshot,
    port: &PortRt,
    queue: usize,
    sc: &mut Scratch,
    now: Timestamp,
) {
    for _ in 0..RX_BATCH {
        match port.tap.tap.recv(queue, &mut sc.buf) {
            Ok(Ok(())) => {
                sc.tap_rx.0 += 1;
                sc.tap_rx.1 += sc.buf.len() as u64;
                port.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
                port.counters
                    .rx_bytes
                    .fetch_add(sc.buf.len() as u64, Ordering::Relaxed);
                port.capture.offer(Stage::Rx, None, sc.buf.frame());
                if port.capture.tracing() {
                    if let Some(t) = port.capture.claim_trace(sc.buf.frame()) {
                        trace_live(snap, port, sc, now, &t);
                        continue;
                    }
                }
                let verdict = snap.process(port, &mut sc.buf, now);
                deliver(snap, port, sc, verdict);
            }
            Ok(Err(_bad_hdr)) => {
                port.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
                port.counters.count_drop(DropReason::BadVnetHdr);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EBADFD/EIO: the device is gone (its namespace was deleted).
                // Stop polling it, or level-triggered epoll would spin.
                if !port.tap.detached.swap(true, Ordering::Relaxed) {
                    tracing::warn!(port = %port.name, tap = port.tap.tap.name(), error = %e,
                        "tap read failed; port detached until the next reload");
                }
                let _ = epoll::delete(ep, port.tap.tap.queue_fd(queue));
                return;
            }
        }
    }
}

/// Runs the frame in `sc.buf` from `ingress` as usual, recording its
/// decisions for live trace `t`.
#[cold]
fn trace_live(
    snap: &Snapshot,
    ingress: &PortRt,
    sc: &mut Scratch,
    now: Timestamp,
    t: &trace::LiveSession,
) {
    let packet = trace::describe_frame(sc.buf.frame());
    let ((), steps) = trace::run(false, || {
        let verdict = snap.process(ingress, &mut sc.buf, now);
        deliver(snap, ingress, sc, verdict);
    });
    t.push(trace::Traced { packet, steps });
}

/// Walks `frame` from `ingress` through the pipeline and delivery as a
/// dry run (see [`crate::trace`]): the decisions, nothing written or
/// committed.
pub fn trace_synthetic(
    snap: &Snapshot,
    ingress: &PortRt,
    frame: &[u8],
    now: Timestamp,
) -> trace::Traced {
    let mut sc = Scratch::new();
    sc.buf = PacketBuf::from_frame(frame);
    sc.buf.offload = Offload::NONE;
    let packet = trace::describe_frame(frame);
    let ((), steps) = trace::run(true, || {
        let verdict = snap.process(ingress, &mut sc.buf, now);
        deliver(snap, ingress, &mut sc, verdict);
    });
    trace::Traced { packet, steps }
}

/// Carries out `verdict` for a frame from local port `ingress`.
fn deliver(snap: &Snapshot, ingress: &PortRt, sc: &mut Scratch, verdict: Verdict) {
    match verdict {
        Verdict::Forward(id) if is_vtep(id) => {
            if let Some(net) = snap.networks.get(ingress.net) {
                overlay::forward_to_peer(snap, ingress, net, id, sc);
            }
        }
        Verdict::ForwardIn { net, port } => match snap.networks.get(net) {
            Some(out) if is_vtep(port) => overlay::forward_to_peer(snap, ingress, out, port, sc),
            Some(_) => match snap.port(port) {
                Some(egress) => transmit(egress, &sc.buf),
                None => ingress.counters.count_drop(DropReason::EgressError),
            },
            None => ingress.counters.count_drop(DropReason::EgressError),
        },
        Verdict::ToPeers => {
            if let Some(net) = snap.networks.get(ingress.net) {
                for &id in &net.accept_from {
                    overlay::flood_to_peer(snap, net, id, sc);
                }
            }
        }
        Verdict::FloodIn { net } => {
            let Some(out) = snap.networks.get(net) else {
                return;
            };
            for &id in &out.ports {
                if let Some(egress) = snap.port(id) {
                    transmit(egress, &sc.buf);
                }
            }
            for &id in &out.vteps {
                overlay::flood_to_peer(snap, out, id, sc);
            }
        }
        Verdict::Forward(id) => match snap.port(id) {
            Some(egress) => transmit(egress, &sc.buf),
            None => ingress.counters.count_drop(DropReason::EgressError),
        },
        Verdict::Flood => {
            let Some(net) = snap.networks.get(ingress.net) else {
                return;
            };
            for &id in &net.ports {
                if id != ingress.id {
                    if let Some(egress) = snap.port(id) {
                        transmit(egress, &sc.buf);
                    }
                }
            }
            // Head-end replication to the peers hosting the network.
            for &id in &net.vteps {
                overlay::flood_to_peer(snap, net, id, sc);
            }
        }
        Verdict::Reply => transmit_local(ingress, &sc.buf),
        Verdict::Consumed => trace::note("deliver", || "consumed by the switch".into()),
        Verdict::Drop(r) => ingress.drop_frame(r, sc.buf.frame()),
    }
}

/// Writes `buf` to `egress`, counting success or the drop on the egress port.
#[inline]
pub(crate) fn transmit(egress: &PortRt, buf: &PacketBuf) {
    transmit_with(egress, &buf.offload, buf.frame());
}

/// [`transmit`] of `frame` with offload metadata `offload`: a frame
/// forwarded from elsewhere, so the egress port's security groups judge it
/// first (ingress direction).
#[inline]
pub(crate) fn transmit_with(egress: &PortRt, offload: &Offload, frame: &[u8]) {
    if let Some(sg) = &egress.sg {
        let verdict = match FlowKey::parse(frame) {
            Ok(key) => sg.admit(
                egress.id,
                firewall::Direction::Ingress,
                &key,
                frame,
                Timestamp::now(),
            ),
            Err(_) => Err(DropReason::RuntFrame),
        };
        if let Err(r) = verdict {
            egress.drop_frame(r, frame);
            return;
        }
    }
    write_port(egress, offload, frame);
}

/// Writes a frame the switch made itself (an answer to the port: ARP, DHCP,
/// DNS, ICMP errors): security groups do not judge the switch's own
/// services.
#[inline]
pub(crate) fn transmit_local(egress: &PortRt, buf: &PacketBuf) {
    write_port(egress, &buf.offload, buf.frame());
}

/// Writes to the tap, counting success or the drop on the egress port.
#[inline]
fn write_port(egress: &PortRt, offload: &Offload, frame: &[u8]) {
    if trace::active() {
        trace::note("output", || {
            format!(
                "output to port {} ({} bytes{}){}",
                egress.name,
                frame.len(),
                if offload.gso == packet::GsoType::None {
                    ""
                } else {
                    ", offloaded super-frame"
                },
                if trace::dry_run() {
                    "; trace only, not written"
                } else {
                    ""
                }
            )
        });
        if trace::dry_run() {
            return;
        }
    }
    if egress.tap.detached.load(Ordering::Relaxed) {
        egress.drop_frame(DropReason::EgressDetached, frame);
        return;
    }
    // A tap takes every offload from userspace (`Tap::tx_offloads`), so
    // super-frames and partial checksums pass through untouched here;
    // egress kinds with fewer capabilities (VXLAN without UDP GSO) fall
    // back to `packet::gso` in their own transmit path.
    match egress.tap.tap.send(offload, frame) {
        Ok(()) => {
            egress.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
            egress
                .counters
                .tx_bytes
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
            egress.capture.offer(Stage::Tx, None, frame);
        }
        Err(e) => egress.drop_frame(
            match e.raw_os_error() {
                Some(libc::EIO) => DropReason::EgressDown,
                Some(libc::EAGAIN) => DropReason::EgressBusy,
                Some(libc::EBADFD) | Some(libc::ENODEV) => DropReason::EgressDetached,
                _ => DropReason::EgressError,
            },
            frame,
        ),
    }
}
