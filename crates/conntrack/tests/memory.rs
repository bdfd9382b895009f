//! Memory per conntrack entry: fills a table with 1,000,000 UDP entries
//! (distinct source address and port, one packet each, as a flood of new
//! flows leaves it) and measures the heap growth with a counting global
//! allocator (bytes requested minus bytes freed: exact and independent of
//! the malloc's caching), and the process RSS growth for comparison.
//!
//! Target: <= 200 bytes per entry. The slot holds the original key,
//! state, timestamps and counters (160 bytes); the reply key is kept only
//! when it is not the mirror of the original (a translated connection:
//! NAT, the load balancer), aside, 44 bytes more; the index holds a 4-byte
//! slot number per key (two per entry) and grows by doubling, so the
//! figure depends on where the count falls between two capacities; both a
//! table grown packet by packet and one reserved for exactly the count are
//! measured. Today: 197 (grown) and 189 (reserved) bytes; it was 237-248
//! with both keys in every slot and 438-449 with an index that stored
//! every key again. The assertion is the target.
//!
//! Run: `cargo test --release -p conntrack --test memory -- --nocapture`.

// A global allocator is `unsafe impl GlobalAlloc`; it only forwards to
// `System` and counts.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicIsize, Ordering};

use conntrack::{Config, Conntrack, Track};
use packet::{FlowKey, L3, L4};

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

const N: u64 = 1_000_000;
const ZONE: u32 = 1;
const NOW: u64 = 1_000_000_000;

/// Resident set size in bytes (`VmRSS` of /proc/self/status), if readable.
fn rss() -> Option<i64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn udp_frame() -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([172, 16, 0, 1], [192, 0, 2, 1], 64)
        .udp(1, 53)
        .write(&mut f, &[0; 18])
        .expect("build");
    f
}

/// The template's key with a distinct source address and port for `i`.
fn udp_key(base: &FlowKey, i: u64) -> FlowKey {
    let mut k = *base;
    if let L3::Ipv4(ip) = &mut k.l3 {
        ip.src = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (i >> 16) as u32));
    }
    if let L4::Udp { src_port, .. } = &mut k.l4 {
        *src_port = i as u16;
    }
    k
}

/// Bytes of heap and of RSS per entry after filling a new table with `N`
/// entries (`reserve`: sized for them first; `translated`: each committed
/// with a reply key that is not its mirror, as NAT and the load balancer
/// commit theirs).
fn per_entry(reserve: bool, translated: bool) -> (f64, Option<f64>) {
    let f = udp_frame();
    let base = FlowKey::parse(&f).expect("parse");
    let (heap0, rss0) = (LIVE.load(Ordering::Relaxed), rss());
    let mut ct: Conntrack = Conntrack::new(Config {
        max_entries: 2_000_000,
        max_per_port: 2_000_000,
        ..Config::default()
    })
    .expect("config");
    if reserve {
        ct.reserve(N as usize);
    }
    for i in 0..N {
        let k = udp_key(&base, i);
        match ct.track(ZONE, (i % 64) as u32, &k, &f, NOW) {
            Track::New(new) if translated => {
                let mut reply = new.key().reverse();
                reply.zone = ZONE + 1;
                ct.commit_with_reply(&new, reply, NOW, ()).expect("commit");
            }
            Track::New(new) => {
                ct.commit(&new, NOW, ()).expect("commit");
            }
            t => panic!("entry {i}: {t:?}"),
        }
    }
    assert_eq!(ct.len() as u64, N);
    let heap = (LIVE.load(Ordering::Relaxed) - heap0) as f64 / N as f64;
    let rss = rss().zip(rss0).map(|(a, b)| (a - b) as f64 / N as f64);
    drop(ct);
    (heap, rss)
}

#[test]
fn bytes_per_conntrack_entry() {
    eprintln!(
        "conntrack: size_of ConnKey {} bytes (the index holds 2 per entry)",
        size_of::<conntrack::ConnKey>()
    );
    for (name, reserve) in [("grown", false), ("reserved", true)] {
        let (heap, rss) = per_entry(reserve, false);
        eprintln!(
            "conntrack, {N} UDP entries, table {name}: {heap:.1} heap bytes/entry, \
             RSS growth {} bytes/entry (target <= 200)",
            rss.map_or("n/a".into(), |r| format!("{r:.1}"))
        );
        // The allocator count is exact and the growth deterministic.
        assert!(
            heap <= 200.0,
            "{heap:.1} bytes per conntrack entry ({name})"
        );
    }
    // Translated entries keep their reply key aside: 44 bytes more, plus
    // the growth of that vector. No target; a regression bound.
    let (heap, _) = per_entry(true, true);
    eprintln!("conntrack, {N} translated UDP entries, table reserved: {heap:.1} heap bytes/entry");
    assert!(heap < 300.0, "{heap:.1} bytes per translated entry");
}
