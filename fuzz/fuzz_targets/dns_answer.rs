//! `dns::answer` with a small fixed zone on arbitrary datagrams.
//!
//! Input: `[limit_sel, query...]`; `limit_sel` picks the caller's `max_len`
//! (1232, 512, 1500, 100, 12, 11, 0 or 65535).
//!
//! Asserts: never panics; deterministic; a reply is at least 12 bytes, at
//! most 1232, at most `max_len` and at most 512 for a query without an OPT
//! record; it echoes the query ID, has QR set and the query's opcode; no
//! reply to a response (QR set) or to anything shorter than a header, and
//! `NoRoom` only when `max_len` < 12.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use dns::{answer, Answer, IgnoreReason, Zone, CLASSIC_UDP_LEN, EDNS_UDP_LEN};
use libfuzzer_sys::fuzz_target;

const LIMITS: [usize; 8] = [EDNS_UDP_LEN, CLASSIC_UDP_LEN, 1500, 100, 12, 11, 0, 65535];

fn zone() -> &'static Zone {
    static Z: OnceLock<Zone> = OnceLock::new();
    Z.get_or_init(|| {
        let mut z = Zone::new(Some("acme.internal")).expect("zone");
        z.insert("vm1", Ipv4Addr::new(10, 0, 0, 1)).expect("insert");
        z.insert("vm2", Ipv4Addr::new(10, 0, 0, 2)).expect("insert");
        z.insert("db", Ipv4Addr::new(10, 0, 0, 1)).expect("insert");
        z.insert("web.1", Ipv4Addr::new(10, 0, 0, 3)).expect("insert");
        // A name with more addresses than fit in 512 bytes: truncation.
        for i in 0..120u8 {
            z.insert("many", Ipv4Addr::new(10, 0, 1, i)).expect("insert");
        }
        z
    })
}

/// Whether a query's additional section holds an OPT record (type 41),
/// walked like the responder does; None if the walk fails.
fn has_opt(q: &[u8]) -> Option<bool> {
    let be16 = |i: usize| q.get(i..i + 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    let skip_name = |mut at: usize| -> Option<usize> {
        loop {
            let l = *q.get(at)?;
            if l & 0xc0 == 0xc0 {
                return Some(at + 2);
            }
            if l == 0 {
                return Some(at + 1);
            }
            at += 1 + usize::from(l);
        }
    };
    let (an, ns, ar) = (be16(6)?, be16(8)?, be16(10)?);
    let mut at = skip_name(12)? + 4;
    let mut opt = false;
    for i in 0..an + ns + ar {
        at = skip_name(at)?;
        let ty = be16(at)?;
        let rdlen = be16(at + 8)?;
        if i >= an + ns && ty == 41 {
            opt = true;
        }
        at += 10 + rdlen;
    }
    Some(opt)
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, query)) = data.split_first() else {
        return;
    };
    let max_len = LIMITS[usize::from(sel) % LIMITS.len()];
    let a = answer(zone(), query, max_len);
    assert_eq!(answer(zone(), query, max_len), a, "answer is deterministic");
    let r = match a {
        Answer::Reply(r) => r,
        Answer::Ignore(IgnoreReason::TooShort) => {
            assert!(query.len() < 12);
            return;
        }
        Answer::Ignore(IgnoreReason::NoRoom) => {
            assert!(max_len < 12);
            return;
        }
        Answer::Ignore(IgnoreReason::Unencodable) => panic!("reply could not be encoded"),
        Answer::Ignore(_) => return,
    };
    assert!(query.len() >= 12);
    assert_eq!(query[2] & 0x80, 0, "replied to a response");
    assert!(r.len() >= 12, "reply of {} bytes", r.len());
    assert!(r.len() <= EDNS_UDP_LEN, "reply of {} bytes > {EDNS_UDP_LEN}", r.len());
    assert!(r.len() <= max_len, "reply of {} bytes > max_len {max_len}", r.len());
    assert_eq!(r[..2], query[..2], "reply does not echo the ID");
    assert_ne!(r[2] & 0x80, 0, "reply without QR");
    assert_eq!(r[2] & 0x78, query[2] & 0x78, "reply changed the opcode");
    if has_opt(query) == Some(false) {
        assert!(r.len() <= CLASSIC_UDP_LEN, "reply of {} bytes to a query without EDNS", r.len());
    }
});
