//! `dhcp::store::replay` on arbitrary bytes (a lease log after any crash or
//! corruption).
//!
//! Asserts: never panics; replay is deterministic; the live leases are all
//! `Bound`, sorted by (network, address) with no address twice in a network
//! and no client key twice in a network; `compact(leases)` replays to the
//! same leases with nothing skipped and no torn tail; appending the compacted
//! log to itself changes nothing (replay is idempotent for Bound records).
#![no_main]

use std::collections::HashSet;

use dhcp::store::{compact, replay, RecordOp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let r = replay(data);
    assert_eq!(replay(data), r, "replay is deterministic");
    let mut ips = HashSet::new();
    let mut keys = HashSet::new();
    for l in &r.leases {
        assert_eq!(l.op, RecordOp::Bound);
        assert!(ips.insert((l.network.clone(), l.ip)), "{} twice in {}", l.ip, l.network);
        assert!(keys.insert((l.network.clone(), l.key.clone())), "{} twice in {}", l.key, l.network);
    }
    assert!(
        r.leases.windows(2).all(|w| (&w[0].network, w[0].ip) < (&w[1].network, w[1].ip)),
        "leases not sorted by (network, ip)"
    );

    let log = compact(&r.leases);
    let again = replay(&log);
    assert_eq!(again.leases, r.leases, "compacted log replays differently");
    assert_eq!(again.skipped, 0);
    assert!(!again.truncated_tail);

    let mut twice = log.clone();
    twice.extend_from_slice(&log);
    assert_eq!(replay(&twice).leases, r.leases, "replaying Bound records twice changed the leases");
});
