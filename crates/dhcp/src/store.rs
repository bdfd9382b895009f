//! Lease store format: an append-only log of self-delimiting records.
//!
//! ```text
//! record = magic (4: ff d5 4c 52) | body length (u32 LE) | CRC-32 of body (u32 LE) | body
//! body   = JSON {"op","net","key","mac","ip","host","exp"}
//! ```
//!
//! The magic starts with `0xff`, a byte that never occurs in UTF-8 and so
//! never inside a JSON body: after a corrupt record, [`replay`] scans for the
//! next magic and goes on from there. A record cut short at the end of the
//! log (a crash mid-append) is reported as `truncated_tail`, not an error.
//! The `vswitch` crate owns the file: it appends [`encode_record`] output
//! (and fsyncs) before sending an ACK, and rewrites the file from
//! [`compact`] through a temporary file and an atomic rename.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::server::Lease;
use crate::{fmt_mac, parse_mac, ClientKey, Mac};

/// Marks the start of every record.
pub const MAGIC: [u8; 4] = [0xff, 0xd5, 0x4c, 0x52];
/// Magic + length + CRC.
pub const HEADER_LEN: usize = 12;
/// Bodies longer than this are treated as corrupt lengths.
pub const MAX_BODY: usize = 16 * 1024;

/// What a record says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordOp {
    /// Lease granted or extended.
    Bound,
    /// Lease released (also declined, or dropped by a reload).
    Released,
    /// Lease ran out.
    Expired,
}

/// One lease store record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// What happened.
    pub op: RecordOp,
    /// Network id.
    pub network: String,
    /// Client identifier or MAC.
    pub key: ClientKey,
    /// Client MAC.
    pub mac: Mac,
    /// Address.
    pub ip: Ipv4Addr,
    /// Host name.
    pub hostname: Option<String>,
    /// Lease end, UNIX seconds (wall clock; the caller converts).
    pub expires_unix: u64,
}

impl LeaseRecord {
    /// A record for a server lease; `expires_unix` is the caller's wall-clock
    /// conversion of `lease.expires_at`.
    pub fn from_lease(op: RecordOp, network: &str, lease: &Lease, expires_unix: u64) -> Self {
        LeaseRecord {
            op,
            network: network.to_owned(),
            key: lease.key.clone(),
            mac: lease.mac,
            ip: lease.ip,
            hostname: lease.hostname.clone(),
            expires_unix,
        }
    }

    /// The server lease, with `expires_at` converted by the caller to its
    /// monotonic clock.
    pub fn to_lease(&self, expires_at: u64) -> Lease {
        Lease {
            key: self.key.clone(),
            mac: self.mac,
            ip: self.ip,
            hostname: self.hostname.clone(),
            expires_at,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    op: RecordOp,
    net: String,
    key: String,
    mac: String,
    ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    exp: u64,
}

fn decode_body(b: &[u8]) -> Option<LeaseRecord> {
    let body: Body = serde_json::from_slice(b).ok()?;
    Some(LeaseRecord {
        op: body.op,
        network: body.net,
        key: body.key.parse().ok()?,
        mac: parse_mac(&body.mac).ok()?,
        ip: body.ip,
        hostname: body.host,
        expires_unix: body.exp,
    })
}

/// Encodes one record (header and body).
pub fn encode_record(r: &LeaseRecord) -> Vec<u8> {
    let body = Body {
        op: r.op,
        net: r.network.clone(),
        key: r.key.to_string(),
        mac: fmt_mac(&r.mac),
        ip: r.ip,
        host: r.hostname.clone(),
        exp: r.expires_unix,
    };
    // Serializing plain strings and numbers into a Vec cannot fail.
    let json = serde_json::to_vec(&body).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + json.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// The live leases in a log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// Bound leases after applying every readable record in order, sorted by
    /// network and address (op is always `Bound`).
    pub leases: Vec<LeaseRecord>,
    /// Corrupt stretches skipped (bad magic, length, CRC or body).
    pub skipped: usize,
    /// The log ends in the middle of a record (a torn append).
    pub truncated_tail: bool,
}

fn find_magic(b: &[u8], from: usize) -> Option<usize> {
    let rest = b.get(from..)?;
    rest.windows(MAGIC.len())
        .position(|w| w == MAGIC)
        .map(|p| p + from)
}

#[derive(Default)]
struct Live {
    by_ip: BTreeMap<(String, Ipv4Addr), LeaseRecord>,
    by_key: HashMap<(String, ClientKey), Ipv4Addr>,
}

impl Live {
    fn apply(&mut self, r: LeaseRecord) {
        let ipk = (r.network.clone(), r.ip);
        match r.op {
            RecordOp::Bound => {
                let kk = (r.network.clone(), r.key.clone());
                if let Some(old_ip) = self.by_key.remove(&kk) {
                    self.by_ip.remove(&(r.network.clone(), old_ip));
                }
                if let Some(old) = self.by_ip.remove(&ipk) {
                    self.by_key.remove(&(old.network, old.key));
                }
                self.by_key.insert(kk, r.ip);
                self.by_ip.insert(ipk, r);
            }
            RecordOp::Released | RecordOp::Expired => {
                if self.by_ip.get(&ipk).is_some_and(|l| l.key == r.key) {
                    self.by_ip.remove(&ipk);
                    self.by_key.remove(&(r.network, r.key));
                }
            }
        }
    }
}

/// Replays a log. Never fails and never panics: corrupt records are
/// skipped, a torn last record is reported.
pub fn replay(b: &[u8]) -> Replay {
    let mut live = Live::default();
    let mut out = Replay::default();
    let mut pos = 0usize;
    let mut in_garbage = false;
    let corrupt = |in_garbage: &mut bool, skipped: &mut usize| {
        if !*in_garbage {
            *skipped += 1;
            *in_garbage = true;
        }
    };
    while pos < b.len() {
        let rest = &b[pos..];
        if !rest.starts_with(&MAGIC) {
            if rest.len() < MAGIC.len() && MAGIC.starts_with(rest) && !in_garbage {
                out.truncated_tail = true;
                break;
            }
            corrupt(&mut in_garbage, &mut out.skipped);
            pos = find_magic(b, pos + 1).unwrap_or(b.len());
            continue;
        }
        if rest.len() < HEADER_LEN {
            out.truncated_tail = true;
            break;
        }
        let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let crc = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]);
        if len > MAX_BODY {
            corrupt(&mut in_garbage, &mut out.skipped);
            pos += 1;
            continue;
        }
        let Some(body) = rest.get(HEADER_LEN..HEADER_LEN + len) else {
            // Cut short: the tail, unless a later record shows the length
            // itself is corrupt.
            if find_magic(b, pos + 1).is_some() {
                corrupt(&mut in_garbage, &mut out.skipped);
                pos += 1;
                continue;
            }
            out.truncated_tail = true;
            break;
        };
        if crc32fast::hash(body) != crc {
            corrupt(&mut in_garbage, &mut out.skipped);
            pos += 1;
            continue;
        }
        match decode_body(body) {
            Some(r) => {
                live.apply(r);
                in_garbage = false;
            }
            None => {
                out.skipped += 1;
                in_garbage = false;
            }
        }
        pos += HEADER_LEN + len;
    }
    out.leases = live.by_ip.into_values().collect();
    out
}

/// A fresh log holding only `leases`, each as a `Bound` record.
pub fn compact<'a>(leases: impl IntoIterator<Item = &'a LeaseRecord>) -> Vec<u8> {
    let mut out = Vec::new();
    for l in leases {
        let mut r = l.clone();
        r.op = RecordOp::Bound;
        out.extend_from_slice(&encode_record(&r));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(op: RecordOp, last: u8, ip: u8) -> LeaseRecord {
        LeaseRecord {
            op,
            network: "net1".into(),
            key: ClientKey::Mac([2, 0, 0, 0, 0, last]),
            mac: [2, 0, 0, 0, 0, last],
            ip: Ipv4Addr::new(10, 0, 0, ip),
            hostname: Some(format!("vm{last}")),
            expires_unix: 1_700_000_000 + u64::from(ip),
        }
    }

    fn log(records: &[LeaseRecord]) -> (Vec<u8>, Vec<usize>) {
        let mut b = Vec::new();
        let mut starts = Vec::new();
        for r in records {
            starts.push(b.len());
            b.extend_from_slice(&encode_record(r));
        }
        (b, starts)
    }

    #[test]
    fn round_trip_with_client_id_and_no_hostname() {
        let mut r = rec(RecordOp::Bound, 1, 10);
        r.key = ClientKey::ClientId(vec![1, 2, 0, 0, 0, 0, 1]);
        r.hostname = None;
        let out = replay(&encode_record(&r));
        assert_eq!(out.leases, vec![r]);
        assert_eq!(out.skipped, 0);
        assert!(!out.truncated_tail);
    }

    #[test]
    fn later_records_replace_and_remove() {
        let (b, _) = log(&[
            rec(RecordOp::Bound, 1, 10),
            rec(RecordOp::Bound, 2, 11),
            rec(RecordOp::Bound, 3, 12),
            // client 1 moves to .20
            rec(RecordOp::Bound, 1, 20),
            rec(RecordOp::Released, 2, 11),
            rec(RecordOp::Expired, 3, 12),
            // a release by someone else of .20 does not remove it
            rec(RecordOp::Released, 9, 20),
        ]);
        let out = replay(&b);
        assert_eq!(out.leases, vec![rec(RecordOp::Bound, 1, 20)]);
    }

    #[test]
    fn corrupt_middle_record_is_skipped_and_following_kept() {
        let recs = [
            rec(RecordOp::Bound, 1, 10),
            rec(RecordOp::Bound, 2, 11),
            rec(RecordOp::Bound, 3, 12),
        ];
        let (mut b, starts) = log(&recs);
        // Flip a byte in the second record's body: CRC mismatch.
        b[starts[1] + HEADER_LEN + 5] ^= 0x55;
        let out = replay(&b);
        assert_eq!(out.skipped, 1);
        assert!(!out.truncated_tail);
        assert_eq!(out.leases, vec![recs[0].clone(), recs[2].clone()]);

        // Corrupt length field (huge, but <= MAX_BODY is not required).
        let (mut b, starts) = log(&recs);
        b[starts[1] + 4..starts[1] + 8].copy_from_slice(&5000u32.to_le_bytes());
        let out = replay(&b);
        assert_eq!(out.skipped, 1);
        assert!(!out.truncated_tail);
        assert_eq!(out.leases, vec![recs[0].clone(), recs[2].clone()]);

        // Garbage inserted between records.
        let (b, starts) = log(&recs);
        let mut g = b[..starts[1]].to_vec();
        g.extend_from_slice(b"garbage\xff\xd5");
        g.extend_from_slice(&b[starts[1]..]);
        let out = replay(&g);
        assert_eq!(out.skipped, 1);
        assert_eq!(out.leases.len(), 3);
    }

    #[test]
    fn bad_body_with_good_crc_is_skipped() {
        let body = b"{\"op\":\"bound\"}";
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&(body.len() as u32).to_le_bytes());
        b.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        b.extend_from_slice(body);
        b.extend_from_slice(&encode_record(&rec(RecordOp::Bound, 1, 10)));
        let out = replay(&b);
        assert_eq!(out.skipped, 1);
        assert_eq!(out.leases.len(), 1);
    }

    #[test]
    fn truncated_tail_is_reported_not_fatal() {
        let recs = [rec(RecordOp::Bound, 1, 10), rec(RecordOp::Bound, 2, 11)];
        let (b, starts) = log(&recs);
        for cut in starts[1] + 1..b.len() {
            let out = replay(&b[..cut]);
            assert!(out.truncated_tail, "cut at {cut}");
            assert_eq!(out.skipped, 0, "cut at {cut}");
            assert_eq!(out.leases, vec![recs[0].clone()]);
        }
        let out = replay(&b);
        assert!(!out.truncated_tail);
        assert_eq!(out.leases.len(), 2);
    }

    #[test]
    fn compaction_keeps_only_live_bindings() {
        let (b, _) = log(&[
            rec(RecordOp::Bound, 1, 10),
            rec(RecordOp::Bound, 2, 11),
            rec(RecordOp::Released, 2, 11),
            rec(RecordOp::Bound, 1, 10),
        ]);
        let out = replay(&b);
        let c = compact(&out.leases);
        assert!(c.len() < b.len());
        assert_eq!(replay(&c), out);
        assert_eq!(replay(&c).leases, vec![rec(RecordOp::Bound, 1, 10)]);
    }

    proptest! {
        #[test]
        fn replay_never_panics(b in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = replay(&b);
        }

        #[test]
        fn replay_never_panics_on_damaged_logs(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in any::<usize>(),
        ) {
            let recs: Vec<_> = (1..6).map(|i| rec(RecordOp::Bound, i, 10 + i)).collect();
            let (mut b, _) = log(&recs);
            for (at, x) in flips {
                let n = b.len();
                b[at % n] ^= x;
            }
            let n = b.len();
            b.truncate(cut % (n + 1));
            let out = replay(&b);
            prop_assert!(out.leases.len() <= recs.len());
            for l in &out.leases {
                prop_assert!(recs.contains(l));
            }
        }
    }
}
