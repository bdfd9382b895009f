//! Memory per bound DHCP lease: restores leases into a `Server` (the state
//! the server holds per bound lease: the binding, its client-key and MAC
//! indexes and its expiry entry) and measures the heap growth with a
//! counting global allocator (bytes requested minus bytes freed), and the
//! process RSS growth for comparison. Measured with and without a hostname
//! (a 9-byte `vm-NNNNNN`, heap-allocated). Not counted: the switch's copy
//! of the lease in its address table (`vswitch::pipeline::Leased`) and the
//! lease-store file. The RSS figure of the second run is low: it reuses
//! heap the first run freed; the heap figure is the one to read.
//!
//! Run: `cargo test --release -p dhcp --test memory -- --nocapture`.

// A global allocator is `unsafe impl GlobalAlloc`; it only forwards to
// `System` and counts.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicIsize, Ordering};

use dhcp::{ClientKey, IpRange, Lease, Server, ServerConfig};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const N: u32 = 1_000_000;
const FIRST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);

/// Resident set size in bytes (`VmRSS` of /proc/self/status), if readable.
fn rss() -> Option<i64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A /12 network whose pool holds all `N` leases.
fn server() -> Server {
    let mut cfg = ServerConfig::new(
        "net-1",
        "10.0.0.0/12".parse().expect("net"),
        Ipv4Addr::new(10, 0, 0, 1),
    );
    cfg.max_leases = 2 * N as usize;
    cfg.pools = vec![IpRange {
        start: FIRST,
        end: Ipv4Addr::new(10, 15, 255, 250),
    }];
    Server::new(cfg).expect("config")
}

fn lease(i: u32, hostname: bool) -> Lease {
    let b = i.to_be_bytes();
    let mac = [0x02, 0x42, b[0], b[1], b[2], b[3]];
    Lease {
        key: ClientKey::Mac(mac),
        mac,
        ip: Ipv4Addr::from(FIRST.to_bits() + i),
        hostname: hostname.then(|| format!("vm-{i:06}")),
        expires_at: 3_600_000_000_000 + u64::from(i),
    }
}

/// Heap and RSS bytes per lease after restoring `N` bound leases into a
/// new server.
fn per_lease(hostname: bool) -> (f64, Option<f64>) {
    let (heap0, rss0) = (LIVE.load(Ordering::Relaxed), rss());
    let mut s = server();
    let report = s.restore((0..N).map(|i| lease(i, hostname)));
    assert_eq!(report.restored, N as usize);
    assert_eq!(s.binding_count(), N as usize);
    let heap = (LIVE.load(Ordering::Relaxed) - heap0) as f64 / f64::from(N);
    let rss = rss().zip(rss0).map(|(a, b)| (a - b) as f64 / f64::from(N));
    drop(s);
    (heap, rss)
}

#[test]
fn bytes_per_dhcp_lease() {
    for hostname in [false, true] {
        let (heap, rss) = per_lease(hostname);
        eprintln!(
            "dhcp, {N} bound leases, hostname {}: {heap:.1} heap bytes/lease, \
             RSS growth {} bytes/lease",
            if hostname { "vm-NNNNNN" } else { "none" },
            rss.map_or("n/a".into(), |r| format!("{r:.1}"))
        );
        // Regression bound, above today's ~255-270.
        assert!(heap < 400.0, "{heap:.1} bytes per DHCP lease");
    }
}
