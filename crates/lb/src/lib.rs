//! The L4 load balancer core for vswitch, as a sans-IO library: weighted
//! Maglev tables, a health-check state machine and TCP/HTTP probes, all
//! driven by the caller's clock (`now`, nanoseconds, passed into every
//! call). No clocks, sockets or threads.
//!
//! # Pieces
//!
//! * [`maglev`]: the lookup table (Maglev, NSDI 2016, section 3.4) with
//!   weights. A prime number of slots (default 65537, at least 100 per
//!   backend), filled from two fixed hashes of each [`BackendId`], so
//!   every host builds the same table from the same config. Equal weights
//!   give every backend `floor(M/N)` or `ceil(M/N)` slots; removing one of
//!   N backends moves about 1/N of the slots (measured: within 1/N + 0.5 %
//!   for N = 5, 10, 50). [`flow_hash`] hashes a 5-tuple for it.
//! * [`health`]: [`HealthChecker`], per-backend rise/fall hysteresis,
//!   probe scheduling on an interval, timeouts, and state for display.
//!   New backends start Down until `rise` probes pass (configurable).
//! * [`probe`]: [`Prober`], a small smoltcp host inside the tenant network
//!   that runs TCP-connect and HTTP-GET probes over Ethernet frames the
//!   caller carries to and from it.
//! * [`pool`]: the facade. [`Pool`] holds weighted backends, their health
//!   and the table over the eligible ones (Up and weight > 0), rebuilt only
//!   when that set changes; [`LoadBalancer`] runs the pools of one tenant
//!   network with one prober.
//!
//! # The data path's contract
//!
//! * **Only new connections pick.** The data path calls
//!   [`Pool::pick`] (or [`LoadBalancer::pick`]) with the [`flow_hash`] of
//!   a connection's first packet to the VIP, DNATs to the backend's
//!   address and port, and commits the connection to conntrack. Every
//!   later packet follows the conntrack entry, so table rebuilds, health
//!   changes and drains never move an established connection; a backend
//!   that goes Down keeps its established connections until they end or
//!   fail on their own.
//! * **No backend: reject.** `pick` returns `None` when no backend is
//!   eligible (all Down, all drained, or none configured). The data path
//!   then rejects the packet instead of dropping it, so clients fail fast:
//!   a TCP SYN gets a RST (ACK set, acknowledging the SYN, so the client
//!   sees "connection refused"); UDP and other protocols get an ICMP
//!   destination unreachable, code 3 (port unreachable), quoting the
//!   packet as RFC 1122 asks (never in answer to an ICMP error, a
//!   broadcast or a fragment other than the first; rate-limited by the
//!   caller). A TCP packet other than a SYN with no conntrack entry is
//!   dropped as invalid, as today. Nothing is committed to conntrack for
//!   a rejected packet.
//! * **Probe frames.** The prober has its own MAC and an IPv4 address in
//!   the tenant network. The switch delivers to it, like to a port, the
//!   frames addressed to its MAC and the broadcasts of its network
//!   ([`LoadBalancer::receive`]), and forwards what
//!   [`LoadBalancer::transmit`] returns like a frame from a port. Frames
//!   handed in must carry finished IPv4 header checksums (TCP checksums
//!   may be partial; see [`probe`]).
//! * **Timers.** The caller calls [`LoadBalancer::poll`] when
//!   [`LoadBalancer::poll_at`] says, and after handing in frames; it
//!   returns health transitions for logs and metrics.
//!
//! ```
//! use lb::{Backend, BackendId, FlowTuple, Pool, PoolConfig, ProbeResult, flow_hash};
//! use std::net::{IpAddr, Ipv4Addr};
//!
//! let mut pool = Pool::new(PoolConfig::default()).unwrap();
//! let now = 1_000_000_000; // the caller's monotonic clock, ns
//! let backends = [1, 2, 3].map(|i| Backend {
//!     id: BackendId(i),
//!     ip: Ipv4Addr::new(10, 0, 0, 10 + i as u8),
//!     port: 8080,
//!     weight: 1,
//! });
//! pool.set_backends(&backends, now).unwrap();
//! // New backends start Down: new connections are rejected.
//! assert!(pool.pick(42).is_none());
//!
//! // Health checking (normally LoadBalancer::poll runs the probes).
//! let interval = pool.config().health.interval_ms * 1_000_000;
//! for round in 0..2 {
//!     let t = now + round * interval;
//!     let (tasks, _) = pool.poll_health(t, usize::MAX);
//!     for task in tasks {
//!         pool.on_probe_result(task.request, ProbeResult::Up, t);
//!     }
//! }
//!
//! // A new connection to the VIP.
//! let flow = FlowTuple {
//!     src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 99)),
//!     dst: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 200)),
//!     proto: 6,
//!     src_port: 40000,
//!     dst_port: 80,
//! };
//! let backend = pool.pick(flow_hash(0x5eed, &flow)).unwrap();
//! assert_eq!(backend.port, 8080); // DNAT there, then commit to conntrack
//! ```
//!
//! # What it is not
//!
//! * Not the data path: no packet rewriting (DNAT and hairpin go through
//!   `conntrack`/`nat`), no VIP ARP, no conntrack of its own.
//! * No IPv6 probing, no TLS/HTTPS checks, no HTTP/1.1 keep-alive, no UDP
//!   checks; probes come from one address per tenant network.
//! * No affinity beyond the hash: source-IP affinity is a caller's choice
//!   of tuple (zero the ports in [`FlowTuple`]).
//! * No shared state between hosts: each host probes on its own; tables
//!   agree across hosts when their health views agree.

pub mod hash;
pub mod health;
pub mod maglev;
pub mod pool;
pub mod probe;
pub mod service;

pub use hash::{flow_hash, FlowTuple};
pub use health::{
    BackendHealth, Failure, HealthChecker, HealthConfig, HealthConfigError, HealthState,
    InitialState, ProbeRequest, ProbeResult, Transition,
};
pub use maglev::{BackendId, Maglev, MaglevError, DEFAULT_TABLE_SIZE};
pub use pool::{
    Backend, BackendStatus, HealthEvent, LbError, LoadBalancer, Pool, PoolConfig, PoolError,
    PoolId, PoolStatus, ProbeTask,
};
pub use probe::{Check, CheckError, ProbeId, Prober, ProberConfig, ProberError, StartError};
pub use service::{Forward, LbConn, LbDrop, Reply, ServiceStats, Services, VipKey, VipRule};
