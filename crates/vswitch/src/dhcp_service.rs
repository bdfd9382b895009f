//! DHCP for tenant networks: the file-and-thread side of the sans-IO `dhcp`
//! crate.
//!
//! Workers hand DHCP client messages (IPv4 UDP to port 67, from a network
//! with a `[dhcp]` section) to this service through a bounded channel and go
//! on; a full queue is a counted drop, never a stall. The service thread runs
//! each network's [`dhcp::Server`], appends every lease change to the
//! network's lease log and `fsync`s it **before** the reply leaves (what was
//! acknowledged survives `kill -9`), publishes the bound addresses to the
//! data path (port binding and the ARP responder read them), and writes the
//! reply to the client's tap.
//!
//! Lease logs live at `STATE_DIR/leases/TENANT/NETWORK.log`: the `dhcp`
//! crate's record format (magic, length, CRC per record). At start the log is
//! replayed (corrupt records skipped, a torn last record ignored) and
//! compacted by writing a fresh file and renaming it over the old one.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use dhcp::store::{LeaseRecord, RecordOp};
use dhcp::{Lease, LeaseChange, LeaseState, Server, ServerConfig};
use ipnet::IpNet;
use packet::MacAddr;
use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::clock::Timestamp;
use crate::config::{Config, NetKey, Network};
use crate::dataplane::Snapshot;
use crate::fdb::PortId;
use crate::pipeline::{DropReason, Leased};

/// Messages queued between the workers and the service.
pub const QUEUE: usize = 1024;
/// Messages one port may have queued at once: a VM flooding DHCP fills at
/// most this share of the queue, never the other tenants' room.
pub const PER_PORT: u32 = 32;

/// One of a port's [`PER_PORT`] queue slots; given back when the message
/// is handled or dropped.
#[derive(Debug)]
pub struct Slot(Arc<std::sync::atomic::AtomicU32>);

impl Slot {
    /// Takes a slot from `inflight`, or `None` when the port has all of
    /// its slots in the queue.
    pub fn take(inflight: &Arc<std::sync::atomic::AtomicU32>) -> Option<Slot> {
        inflight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < PER_PORT).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(inflight.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
/// Largest DHCP message accepted from a VM (a full 1500-byte frame's UDP
/// payload).
pub const MAX_MESSAGE: usize = 1472;

/// A DHCP client message taken off the data path.
#[derive(Debug)]
pub struct DhcpRequest {
    /// The client's network.
    pub net: NetKey,
    /// The port it came from (the reply goes back there).
    pub port: PortId,
    /// The frame's source MAC.
    pub src_mac: MacAddr,
    /// The UDP payload.
    pub payload: Vec<u8>,
    /// The port's queue slot, held until the message is handled.
    pub slot: Slot,
}

/// The workers' end of the queue.
#[derive(Debug, Clone)]
pub struct DhcpQueue(SyncSender<DhcpRequest>);

impl DhcpQueue {
    /// Queues `req`; `Err` is the drop reason when the service cannot take it.
    pub fn submit(&self, req: DhcpRequest) -> Result<(), DropReason> {
        match self.0.try_send(req) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                Err(DropReason::LocalServiceBusy)
            }
        }
    }
}

#[derive(Debug)]
struct LeaseLog {
    path: PathBuf,
    file: File,
}

impl LeaseLog {
    /// Opens (creating) the log at `path`, replays it and compacts it.
    fn open(path: &Path) -> io::Result<(LeaseLog, dhcp::store::Replay)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let replay = dhcp::store::replay(&bytes);
        let tmp = path.with_extension("log.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&dhcp::store::compact(&replay.leases))?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        let file = OpenOptions::new().append(true).open(path)?;
        Ok((
            LeaseLog {
                path: path.to_path_buf(),
                file,
            },
            replay,
        ))
    }

    /// Appends `records` and waits until they are on disk.
    fn append(&mut self, records: &[LeaseRecord]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for r in records {
            buf.extend_from_slice(&dhcp::store::encode_record(r));
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()
    }
}

#[derive(Debug)]
struct NetDhcp {
    key: NetKey,
    server: Server,
    log: LeaseLog,
    leased: Arc<ArcSwap<Leased>>,
    gateway_mac: MacAddr,
    server_ip: Ipv4Addr,
    /// (port name, DHCP host name) by MAC.
    ports: HashMap<MacAddr, (String, String)>,
    /// Replies not sent because the lease could not be made durable.
    persist_failures: u64,
}

/// A tenant's DNS zone and what it is built from.
#[derive(Debug)]
struct TenantZone {
    zone: Arc<ArcSwap<dns::Zone>>,
    domain: Option<String>,
    /// Port names with a fixed IPv4 address.
    fixed: Vec<(String, Ipv4Addr)>,
    nets: Vec<NetKey>,
}

#[derive(Debug, Default)]
struct ServiceState {
    nets: HashMap<NetKey, NetDhcp>,
    tenants: HashMap<String, TenantZone>,
}

impl ServiceState {
    /// Rebuilds `tenant`'s zone: fixed addresses, then bound leases under
    /// their port name and DHCP host name.
    fn rebuild_zone(&self, tenant: &str, now: Timestamp) {
        let Some(t) = self.tenants.get(tenant) else {
            return;
        };
        // The domain was validated with the config; an invalid one (never)
        // would only cost the suffix.
        let mut z = dns::Zone::new(t.domain.as_deref()).unwrap_or_default();
        for (name, ip) in &t.fixed {
            let _ = z.insert(name, *ip);
        }
        for key in &t.nets {
            let Some(nd) = self.nets.get(key) else {
                continue;
            };
            for l in nd.server.leases(now.0) {
                if l.state != LeaseState::Bound {
                    continue;
                }
                if let Some((port, host)) = nd.ports.get(&MacAddr(l.mac)) {
                    let _ = z.insert(port, l.ip);
                    let _ = z.insert(host, l.ip);
                }
                if let Some(h) = &l.hostname {
                    let _ = z.insert(h, l.ip);
                }
            }
        }
        t.zone.store(Arc::new(z));
    }
}

fn tenant_of(key: &NetKey) -> &str {
    key.0.split_once('/').map_or(key.0.as_str(), |(t, _)| t)
}

/// The DHCP service thread and its per-network servers.
#[derive(Debug)]
pub struct DhcpService {
    queue: DhcpQueue,
    state: Arc<Mutex<ServiceState>>,
    state_dir: PathBuf,
    stop: Arc<AtomicBool>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

/// Wall-clock UNIX seconds (lease files outlive the monotonic clock).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn to_unix(expires_mono: u64, now: Timestamp, now_unix: u64) -> u64 {
    now_unix + expires_mono.saturating_sub(now.0) / 1_000_000_000
}

fn record(op: RecordOp, net: &NetKey, l: &Lease, now: Timestamp, now_unix: u64) -> LeaseRecord {
    LeaseRecord {
        op,
        network: net.0.clone(),
        key: l.key.clone(),
        mac: l.mac,
        ip: l.ip,
        hostname: l.hostname.clone(),
        expires_unix: to_unix(l.expires_at, now, now_unix),
    }
}

/// The `dhcp` crate's configuration for `net` of `cfg`, or `None` if the
/// network has no `[dhcp]` section. Ports with a fixed `ip` become
/// reservations for their MAC.
pub fn server_config(cfg: &Config, net: &Network) -> Option<ServerConfig> {
    let d = net.dhcp.as_ref()?;
    let (IpNet::V4(subnet), Some(IpAddr::V4(gw))) = (net.cidr, net.gateway) else {
        return None;
    };
    let mut sc = ServerConfig::new(net.key().0, subnet, gw);
    sc.dns_servers = d.dns.clone();
    sc.domain_name = d.domain.clone();
    // Over VXLAN the VM's MTU must leave room for the outer headers.
    sc.mtu = d.mtu.or(cfg.overlay_mtu());
    sc.lease_time = d.lease_secs;
    sc.max_leases = d.max_leases;
    sc.pools = cfg
        .local_pools(net)
        .iter()
        .map(|&(start, end)| dhcp::IpRange { start, end })
        .collect();
    sc.static_routes = d
        .routes
        .iter()
        .map(|&(dest, gateway)| dhcp::StaticRoute { dest, gateway })
        .collect();
    for p in cfg.ports.iter().filter(|p| p.net_key() == net.key()) {
        if let Some(IpAddr::V4(ip)) = p.ip {
            sc.reservations.push(dhcp::Reservation {
                mac: p.mac.0,
                ip,
                hostname: p.hostname.clone(),
                lease_time: None,
            });
        }
    }
    Some(sc)
}

impl DhcpService {
    /// Starts the service thread. Replies go to ports of `shared`'s current
    /// snapshot.
    pub fn start(state_dir: &Path, shared: Arc<ArcSwap<Snapshot>>) -> io::Result<DhcpService> {
        let (tx, rx) = sync_channel(QUEUE);
        let state = Arc::new(Mutex::new(ServiceState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, stop2) = (state.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("vs-dhcp".into())
            .spawn(move || run(&rx, &st, &shared, &stop2))?;
        Ok(DhcpService {
            queue: DhcpQueue(tx),
            state,
            state_dir: state_dir.to_path_buf(),
            stop,
            handle: Mutex::new(Some(handle)),
        })
    }

    /// The workers' end of the queue.
    pub fn queue(&self) -> DhcpQueue {
        self.queue.clone()
    }

    /// Brings the servers in line with `cfg`: new networks get a server with
    /// the leases of their log, changed ones a new configuration (leases that
    /// no longer fit are released and logged), removed ones stop (their log
    /// stays). `leased` gives each network's shared lease table.
    pub fn apply(
        &self,
        cfg: &Config,
        leased: &HashMap<NetKey, Arc<ArcSwap<Leased>>>,
        zones: &HashMap<String, Arc<ArcSwap<dns::Zone>>>,
    ) -> Result<(), String> {
        let now = Timestamp::now();
        let now_unix = unix_now();
        let mut st = self.state.lock();
        let mut keep: HashMap<NetKey, NetDhcp> = HashMap::new();
        for net in &cfg.networks {
            let key = net.key();
            let Some(sc) = server_config(cfg, net) else {
                continue;
            };
            let server_ip = sc.server_ip;
            let ports: HashMap<MacAddr, (String, String)> = cfg
                .ports
                .iter()
                .filter(|p| p.net_key() == key)
                .map(|p| {
                    let host = p.hostname.clone().unwrap_or_else(|| p.name.clone());
                    (p.mac, (p.name.clone(), host))
                })
                .collect();
            let table = leased.get(&key).cloned().unwrap_or_default();
            let mut nd = match st.nets.remove(&key) {
                Some(mut nd) => {
                    let changes = nd.server.set_config(sc).map_err(|e| {
                        format!("tenant {:?}, network {:?}: {e}", net.tenant, net.name)
                    })?;
                    persist(&mut nd, &changes, now, now_unix)
                        .map_err(|e| format!("lease log {}: {e}", nd.log.path.display()))?;
                    nd
                }
                None => {
                    let mut server = Server::new(sc).map_err(|e| {
                        format!("tenant {:?}, network {:?}: {e}", net.tenant, net.name)
                    })?;
                    let path = self
                        .state_dir
                        .join("leases")
                        .join(&net.tenant)
                        .join(format!("{}.log", net.name));
                    let (log, replay) = LeaseLog::open(&path).map_err(|e| {
                        format!("lease log {}: {e} (check --state-dir)", path.display())
                    })?;
                    if replay.skipped > 0 || replay.truncated_tail {
                        tracing::warn!(log = %path.display(), skipped = replay.skipped,
                            truncated_tail = replay.truncated_tail, "lease log had damaged records; skipped them");
                    }
                    let leases = replay
                        .leases
                        .into_iter()
                        .filter(|r| r.expires_unix > now_unix)
                        .map(|r| Lease {
                            key: r.key,
                            mac: r.mac,
                            ip: r.ip,
                            hostname: r.hostname,
                            expires_at: now.0
                                + (r.expires_unix - now_unix).saturating_mul(1_000_000_000),
                        });
                    let report = server.restore(leases);
                    tracing::info!(network = %key, restored = report.restored, rejected = report.rejected, "DHCP leases restored");
                    NetDhcp {
                        key: key.clone(),
                        server,
                        log,
                        leased: table.clone(),
                        gateway_mac: net.gateway_mac(),
                        server_ip,
                        ports: HashMap::new(),
                        persist_failures: 0,
                    }
                }
            };
            nd.leased = table;
            nd.gateway_mac = net.gateway_mac();
            nd.server_ip = server_ip;
            nd.ports = ports;
            publish(&nd, now);
            keep.insert(key, nd);
        }
        st.nets = keep;
        st.tenants = cfg
            .tenants
            .iter()
            .filter_map(|t| {
                let zone = zones.get(t)?.clone();
                let nets: Vec<&Network> = cfg.networks.iter().filter(|n| &n.tenant == t).collect();
                let domain = nets.iter().find_map(|n| n.dhcp.as_ref()?.domain.clone());
                let fixed = cfg
                    .ports
                    .iter()
                    .filter(|p| &p.tenant == t)
                    .filter_map(|p| match p.ip {
                        Some(IpAddr::V4(ip)) => Some((p.name.clone(), ip)),
                        _ => None,
                    })
                    .collect();
                let nets = nets.iter().map(|n| n.key()).collect();
                Some((
                    t.clone(),
                    TenantZone {
                        zone,
                        domain,
                        fixed,
                        nets,
                    },
                ))
            })
            .collect();
        let tenants: Vec<String> = st.tenants.keys().cloned().collect();
        for t in tenants {
            st.rebuild_zone(&t, now);
        }
        Ok(())
    }

    /// `leases` data: every network's leases, or the one named `filter`.
    pub fn leases(&self, filter: Option<&str>) -> Value {
        let now = Timestamp::now();
        let st = self.state.lock();
        let mut keys: Vec<&NetKey> = st.nets.keys().collect();
        keys.sort();
        let nets: Vec<Value> = keys
            .into_iter()
            .filter(|k| match filter {
                None => true,
                Some(f) => k.0 == f || k.0.split_once('/').is_some_and(|(_, n)| n == f),
            })
            .filter_map(|k| st.nets.get(k))
            .map(|nd| {
                let c = nd.server.counters();
                let rows: Vec<Value> = nd
                    .server
                    .leases(now.0)
                    .into_iter()
                    .map(|l| {
                        let mac = MacAddr(l.mac);
                        json!({
                            "mac": mac.to_string(), "ip": l.ip.to_string(),
                            "hostname": l.hostname,
                            "state": match l.state {
                                LeaseState::Offered => "offered",
                                LeaseState::Bound => "bound",
                                LeaseState::Expired => "expired",
                                LeaseState::Declined => "declined",
                            },
                            "expires_in_secs": i128::from(l.expires_at) / 1_000_000_000 - i128::from(now.0) / 1_000_000_000,
                            "port": nd.ports.get(&mac).map(|(p, _)| p),
                            "reserved": l.reserved,
                        })
                    })
                    .collect();
                let (tenant, network) = nd.key.0.split_once('/').unwrap_or(("", &nd.key.0));
                json!({
                    "tenant": tenant, "network": network, "leases": rows,
                    "stats": {
                        "discover": c.discover, "offer": c.offer, "request": c.request, "ack": c.ack,
                        "nak": c.nak, "decline": c.decline, "release": c.release,
                        "release_not_owner": c.release_not_owner, "inform": c.inform,
                        "chaddr_mismatch": c.chaddr_mismatch, "client_id_in_use": c.client_id_in_use,
                        "malformed": c.malformed,
                        "pool_exhausted": c.pool_exhausted, "lease_limit": c.lease_limit,
                        "expired": c.expired, "persist_failures": nd.persist_failures,
                    },
                })
            })
            .collect();
        json!({ "networks": nets })
    }

    /// Stops the thread.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.lock().take() {
            let _ = h.join();
        }
    }
}

/// Writes the changes to the log (one fsync) and republishes the bound
/// addresses if anything changed.
fn persist(
    nd: &mut NetDhcp,
    changes: &[LeaseChange],
    now: Timestamp,
    now_unix: u64,
) -> io::Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let records: Vec<LeaseRecord> = changes
        .iter()
        .map(|c| match c {
            LeaseChange::Bound(l) => record(RecordOp::Bound, &nd.key, l, now, now_unix),
            LeaseChange::Released(l) | LeaseChange::Declined(l) => {
                record(RecordOp::Released, &nd.key, l, now, now_unix)
            }
            LeaseChange::Expired(l) => record(RecordOp::Expired, &nd.key, l, now, now_unix),
        })
        .collect();
    nd.log.append(&records)?;
    publish(nd, now);
    Ok(())
}

/// Swaps the network's table of bound addresses into the data path.
fn publish(nd: &NetDhcp, now: Timestamp) {
    let table: Leased = nd
        .server
        .leases(now.0)
        .into_iter()
        .filter(|l| l.state == LeaseState::Bound)
        .map(|l| (l.ip, MacAddr(l.mac)))
        .collect();
    nd.leased.store(Arc::new(table));
}

fn run(
    rx: &Receiver<DhcpRequest>,
    state: &Mutex<ServiceState>,
    shared: &ArcSwap<Snapshot>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(req) => handle(state, shared, req),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        tick(state);
    }
}

/// Expires leases and offers whose time has come.
fn tick(state: &Mutex<ServiceState>) {
    let now = Timestamp::now();
    let now_unix = unix_now();
    let mut st = state.lock();
    let mut changed = Vec::new();
    for nd in st.nets.values_mut() {
        if nd.server.poll_timeout().is_some_and(|t| t <= now.0) {
            let changes = nd.server.handle_timeout(now.0);
            if let Err(e) = persist(nd, &changes, now, now_unix) {
                tracing::error!(log = %nd.log.path.display(), error = %e, "cannot write lease log");
            }
            if !changes.is_empty() {
                changed.push(tenant_of(&nd.key).to_string());
            }
        }
    }
    for t in changed {
        st.rebuild_zone(&t, now);
    }
}

fn handle(state: &Mutex<ServiceState>, shared: &ArcSwap<Snapshot>, req: DhcpRequest) {
    let now = Timestamp::now();
    let now_unix = unix_now();
    let (frame, port, drop) = {
        let mut st = state.lock();
        let Some(nd) = st.nets.get_mut(&req.net) else {
            return;
        };
        let hostname = nd.ports.get(&req.src_mac).map(|(_, h)| h.clone());
        let out = nd.server.handle_from(
            now.0,
            dhcp::Ingress {
                src_mac: req.src_mac.0,
                hostname: hostname.as_deref(),
            },
            &req.payload,
        );
        if let Err(e) = persist(nd, &out.changes, now, now_unix) {
            // Never acknowledge what we could not make durable.
            nd.persist_failures += 1;
            tracing::error!(log = %nd.log.path.display(), error = %e, "cannot write lease log; reply withheld");
            return;
        }
        let frame = out.reply.and_then(|r| build_reply(nd, &r));
        if !out.changes.is_empty() {
            st.rebuild_zone(tenant_of(&req.net), now);
        }
        (frame, req.port, out.drop)
    };
    let snap = shared.load();
    let Some(p) = snap.port(port) else { return };
    // Refusals that are the port's fault go into its drop table too.
    if drop == Some(dhcp::DropReason::ChaddrMismatch) {
        p.counters.count_drop(DropReason::DhcpChaddrMismatch);
    }
    if let Some(frame) = frame {
        crate::dataplane::inject(p, &frame);
    }
}

/// Ethernet/IPv4/UDP 67 -> 68 around a DHCP reply, from the gateway.
fn build_reply(nd: &NetDhcp, reply: &dhcp::Reply) -> Option<Vec<u8>> {
    let mut f = Vec::with_capacity(42 + reply.bytes.len());
    etherparse::PacketBuilder::ethernet2(nd.gateway_mac.0, reply.to.mac)
        .ipv4(nd.server_ip.octets(), reply.to.ip.octets(), 64)
        .udp(67, 68)
        .write(&mut f, &reply.bytes)
        .ok()?;
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_holds_at_most_its_share_of_the_queue() {
        let inflight = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let slots: Vec<Slot> = (0..PER_PORT)
            .filter_map(|_| Slot::take(&inflight))
            .collect();
        assert_eq!(slots.len(), PER_PORT as usize);
        assert!(Slot::take(&inflight).is_none());
        drop(slots);
        assert_eq!(inflight.load(Ordering::Relaxed), 0);
        assert!(Slot::take(&inflight).is_some());
    }

    #[test]
    fn overlay_mtu_is_the_dhcp_mtu_default_and_pools_split() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/two-hosts.toml"),
        )
        .unwrap()
        .replace(
            "  gateway = \"10.0.1.1\"\n",
            "  gateway = \"10.0.1.1\"\n  [tenant.network.dhcp]\n  pool = [\"10.0.1.100-10.0.1.199\"]\n",
        );
        let cfg = Config::parse(Path::new("x.toml"), &text)
            .unwrap()
            .for_host(Some("host-a"))
            .unwrap();
        let net = &cfg.networks[0];
        let sc = server_config(&cfg, net).unwrap();
        assert_eq!(sc.mtu, Some(1450));
        assert_eq!(sc.pools.len(), 1);
        assert_eq!(
            (sc.pools[0].start, sc.pools[0].end),
            ("10.0.1.100".parse().unwrap(), "10.0.1.149".parse().unwrap())
        );
    }
}
