//! From one UDP payload to a reply or a reason to stay silent.

use std::net::Ipv4Addr;

use simple_dns::rdata::{RData, A, OPT, PTR};
use simple_dns::{
    Name, Packet, PacketFlag, Question, ResourceRecord, CLASS, QCLASS, QTYPE, RCODE, TYPE,
};

use crate::zone::{Lookup, Zone};

/// TTL of every record we answer: names follow ports and DHCP leases, so
/// caches must not keep them long.
pub const TTL: u32 = 30;
/// Reply size limit for a query without EDNS (RFC 1035).
pub const CLASSIC_UDP_LEN: usize = 512;
/// Largest reply we send to an EDNS client, and the size we advertise in our
/// OPT record (the DNS Flag Day 2020 value: fits any path MTU of 1280+).
pub const EDNS_UDP_LEN: usize = 1232;
/// Most records put in one answer section; more than this cannot fit in
/// [`EDNS_UDP_LEN`] anyway, so the cap never hides a needed TC bit.
pub const MAX_ANSWERS: usize = 100;

const HEADER_LEN: usize = 12;
/// Smallest resource record: root owner (1) + type, class, TTL, rdlength (10).
const MIN_RR_LEN: usize = 11;
/// Smallest question: root name (1) + type, class (4).
const MIN_QUESTION_LEN: usize = 5;

const FLAG_QR: u16 = 0x8000;
const FLAG_RD: u16 = 0x0100;
const OPCODE_MASK: u16 = 0x7800;

/// What to do with a datagram sent to the gateway's port 53.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Send this UDP payload back to the query's source.
    Reply(Vec<u8>),
    /// Send nothing; count the reason.
    Ignore(IgnoreReason),
}

/// Why a datagram gets no reply. Never replying to these keeps the responder
/// from being a reflector (responses, junk) or answering what it cannot read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IgnoreReason {
    /// Shorter than a DNS header.
    TooShort,
    /// QR is set: a response, never answered (no reflection loops).
    Response,
    /// The message does not parse (bad name, section counts past the end,
    /// reserved header bit set, ...).
    Malformed,
    /// The caller's `max_len` cannot hold even a DNS header.
    NoRoom,
    /// The reply could not be encoded (a bug; should not happen).
    Unencodable,
}

impl IgnoreReason {
    /// A short stable name for counters and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            IgnoreReason::TooShort => "dns_too_short",
            IgnoreReason::Response => "dns_response",
            IgnoreReason::Malformed => "dns_malformed",
            IgnoreReason::NoRoom => "dns_no_room",
            IgnoreReason::Unencodable => "dns_unencodable",
        }
    }
}

impl std::fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Answer `query`, the UDP payload of a datagram sent to the gateway's port
/// 53, from `zone` and nothing else. The reply is at most `max_len` bytes,
/// and at most 512 (no EDNS) or the client's EDNS size capped at 1232; what
/// does not fit is dropped and TC set.
pub fn answer(zone: &Zone, query: &[u8], max_len: usize) -> Answer {
    let Some(&[id0, id1, f0, f1, qd0, qd1, an0, an1, ns0, ns1, ar0, ar1]) = query.get(..HEADER_LEN)
    else {
        return Answer::Ignore(IgnoreReason::TooShort);
    };
    let id = u16::from_be_bytes([id0, id1]);
    let flags = u16::from_be_bytes([f0, f1]);
    if flags & FLAG_QR != 0 {
        return Answer::Ignore(IgnoreReason::Response);
    }
    if max_len < HEADER_LEN {
        return Answer::Ignore(IgnoreReason::NoRoom);
    }
    if flags & OPCODE_MASK != 0 {
        return Answer::Reply(bare_reply(id, flags, RCODE::NotImplemented));
    }
    if u16::from_be_bytes([qd0, qd1]) != 1 {
        return Answer::Reply(bare_reply(id, flags, RCODE::FormatError));
    }
    // Refuse absurd record counts before the parser sizes vectors from them.
    let records = [[an0, an1], [ns0, ns1], [ar0, ar1]]
        .iter()
        .map(|c| usize::from(u16::from_be_bytes(*c)))
        .sum::<usize>();
    if HEADER_LEN + MIN_QUESTION_LEN + records * MIN_RR_LEN > query.len() {
        return Answer::Ignore(IgnoreReason::Malformed);
    }
    let Ok(packet) = Packet::parse(query) else {
        return Answer::Ignore(IgnoreReason::Malformed);
    };
    let Some(question) = packet.questions.first() else {
        return Answer::Ignore(IgnoreReason::Malformed);
    };

    let Some(edns) = scan_edns(query) else {
        return Answer::Ignore(IgnoreReason::Malformed);
    };
    let client_len = edns.first.map_or(CLASSIC_UDP_LEN, |o| {
        usize::from(o.udp_len).clamp(CLASSIC_UDP_LEN, EDNS_UDP_LEN)
    });
    let limit = client_len.min(max_len);

    // Targets of PTR answers; they outlive `reply`, whose records borrow them.
    let mut ptr_targets: Vec<String> = Vec::new();
    let mut reply = Packet::new_reply(id);
    if flags & FLAG_RD != 0 {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    if edns.first.is_some() {
        *reply.opt_mut() = Some(OPT {
            opt_codes: Vec::new(),
            udp_packet_size: EDNS_UDP_LEN as u16,
            version: 0,
        });
    }
    reply.questions.push(question.clone());

    // Upper 8 bits of the 12-bit RCODE, carried in our OPT record.
    let mut ext_rcode = 0;
    if edns.count > 1 {
        // RFC 6891 6.1.1: more than one OPT is a format error.
        *reply.rcode_mut() = RCODE::FormatError;
    } else if edns.first.is_some_and(|o| o.version != 0) {
        // RFC 6891 6.1.3: we speak EDNS version 0 only. BADVERS is 16:
        // extended RCODE 1, header RCODE 0.
        ext_rcode = 1;
    } else {
        resolve(zone, question, &mut reply, &mut ptr_targets);
    }
    add_ptr_answers(question, &ptr_targets, &mut reply);

    encode_within(reply, limit, ext_rcode)
}

/// The first OPT record of a query's additional section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Opt {
    /// Requestor's UDP payload size (the OPT's CLASS field).
    udp_len: u16,
    /// EDNS version (bits 16-23 of the OPT's TTL field).
    version: u8,
}

/// What the additional section says about EDNS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Edns {
    first: Option<Opt>,
    /// How many OPT records the additional section has.
    count: usize,
}

/// Find the OPT records by walking the wire format of a query with exactly
/// one question; None if the walk runs off the end.
///
/// Done by hand because simple-dns 0.13 reads the OPT TTL field with the
/// wrong layout: it takes the version from bits 8-15 and the extended RCODE
/// from bits 0-7, where RFC 6891 6.1.3 puts them at bits 16-23 and 24-31.
/// A query with the DO bit set (bit 15), as DNSSEC-aware resolvers send,
/// would read as EDNS version 128 and get BADVERS. Bounded: every step
/// advances through the datagram or stops.
fn scan_edns(msg: &[u8]) -> Option<Edns> {
    let count = |i: usize| be16(msg, 6 + 2 * i).map(usize::from);
    let (an, ns, ar) = (count(0)?, count(1)?, count(2)?);
    let mut at = skip_name(msg, HEADER_LEN)? + 4;
    let mut edns = Edns {
        first: None,
        count: 0,
    };
    for i in 0..an + ns + ar {
        at = skip_name(msg, at)?;
        let rtype = be16(msg, at)?;
        let class = be16(msg, at + 2)?;
        let ttl = msg.get(at + 4..at + 8)?;
        let rdlen = usize::from(be16(msg, at + 8)?);
        at += 10 + rdlen;
        if at > msg.len() {
            return None;
        }
        if rtype == 41 && i >= an + ns {
            edns.count += 1;
            if edns.first.is_none() {
                edns.first = Some(Opt {
                    udp_len: class,
                    version: *ttl.get(1)?,
                });
            }
        }
    }
    Some(edns)
}

/// The offset just past the name that starts at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    // A name has at most 127 labels before its end or a pointer.
    for _ in 0..=128 {
        let len = *msg.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => return msg.get(at + 1).map(|_| at + 2),
            l if l & 0xc0 != 0 => return None,
            l => at += 1 + usize::from(l),
        }
    }
    None
}

fn be16(msg: &[u8], at: usize) -> Option<u16> {
    let b = msg.get(at..at + 2)?;
    Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
}

/// Fill `reply` for one question: rcode, AA, A answers. PTR targets are only
/// collected into `targets`; [`add_ptr_answers`] turns them into records.
fn resolve<'a>(zone: &Zone, q: &Question<'a>, reply: &mut Packet<'a>, targets: &mut Vec<String>) {
    let class_ok =
        !q.unicast_response && matches!(q.qclass, QCLASS::CLASS(CLASS::IN) | QCLASS::ANY);
    // Zone transfers and mail pseudo-types are not served.
    let qtype_ok = matches!(q.qtype, QTYPE::TYPE(_) | QTYPE::ANY);
    if !class_ok || !qtype_ok {
        *reply.rcode_mut() = RCODE::Refused;
        return;
    }
    let labels: Vec<&[u8]> = q.qname.as_bytes().collect();
    let wants = |t: TYPE| matches!(q.qtype, QTYPE::ANY) || q.qtype == QTYPE::TYPE(t);
    match zone.lookup(&labels) {
        Lookup::Host(addrs) => {
            reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
            if wants(TYPE::A) {
                for ip in addrs.iter().take(MAX_ANSWERS) {
                    reply.answers.push(a_record(q.qname.clone(), *ip));
                }
            }
        }
        Lookup::Reverse(names) => {
            reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
            if wants(TYPE::PTR) {
                targets.extend(names.iter().take(MAX_ANSWERS).map(|n| zone.fqdn(n)));
            }
        }
        Lookup::NoData => reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER),
        Lookup::NxDomain => {
            reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
            *reply.rcode_mut() = RCODE::NameError;
        }
        Lookup::Refused => *reply.rcode_mut() = RCODE::Refused,
    }
}

fn add_ptr_answers<'a>(q: &Question<'a>, targets: &'a [String], reply: &mut Packet<'a>) {
    for t in targets {
        reply.answers.push(ResourceRecord::new(
            q.qname.clone(),
            CLASS::IN,
            TTL,
            // Zone names are checked on insert, so no escapes to interpret.
            RData::PTR(PTR(Name::new_unchecked(t))),
        ));
    }
}

fn a_record(owner: Name<'_>, ip: Ipv4Addr) -> ResourceRecord<'_> {
    ResourceRecord::new(owner, CLASS::IN, TTL, RData::A(A::from(ip)))
}

/// Encode `reply`; if it is over `limit`, drop the answers and set TC, then
/// the question, then the OPT record, until it fits. `limit` >= 12.
/// `ext_rcode` goes into the OPT record, if there is one.
fn encode_within(mut reply: Packet<'_>, limit: usize, ext_rcode: u8) -> Answer {
    for stage in 0..4 {
        match stage {
            0 => {}
            1 => {
                reply.answers.clear();
                reply.name_servers.clear();
                reply.set_flags(PacketFlag::TRUNCATION);
            }
            2 => reply.questions.clear(),
            _ => *reply.opt_mut() = None,
        }
        let Ok(mut bytes) = reply.build_bytes_vec_compressed() else {
            return Answer::Ignore(IgnoreReason::Unencodable);
        };
        if reply.opt().is_some() && !set_opt_ttl(&mut bytes, ext_rcode) {
            return Answer::Ignore(IgnoreReason::Unencodable);
        }
        if bytes.len() <= limit {
            return Answer::Reply(bytes);
        }
    }
    Answer::Ignore(IgnoreReason::NoRoom)
}

/// Write the TTL field of the OPT record that ends `msg` (our replies have
/// no other additional record and our OPT no options): extended RCODE in
/// bits 24-31, version 0, DO clear. simple-dns would put the extended RCODE
/// in bits 0-7 (see [`scan_edns`]). False if `msg` does not end with an OPT.
fn set_opt_ttl(msg: &mut [u8], ext_rcode: u8) -> bool {
    let Some(start) = msg.len().checked_sub(MIN_RR_LEN) else {
        return false;
    };
    match msg.get_mut(start..) {
        // Root owner, TYPE 41, CLASS (UDP size), TTL, RDLENGTH 0.
        Some([0, 0, 41, _, _, ttl @ .., 0, 0]) => {
            ttl.copy_from_slice(&(u32::from(ext_rcode) << 24).to_be_bytes());
            true
        }
        _ => false,
    }
}

/// A header-only reply echoing ID, opcode and RD. Written by hand because
/// simple-dns maps unknown opcodes to one `Reserved` value, so it could not
/// echo them.
fn bare_reply(id: u16, query_flags: u16, rcode: RCODE) -> Vec<u8> {
    let flags = FLAG_QR | (query_flags & (OPCODE_MASK | FLAG_RD)) | (rcode as u16 & 0x000f);
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: u16 = 0xbeef;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    fn acme() -> Zone {
        let mut z = Zone::new(Some("acme.internal")).expect("domain");
        z.insert("vm1", ip("10.0.0.5")).expect("insert");
        z.insert("db", ip("10.0.0.6")).expect("insert");
        z
    }

    fn query_packet<'a>(name: &'a str, qtype: QTYPE) -> Packet<'a> {
        let mut p = Packet::new_query(ID);
        p.set_flags(PacketFlag::RECURSION_DESIRED);
        let qname = Name::new(name).expect("test name");
        p.questions
            .push(Question::new(qname, qtype, QCLASS::CLASS(CLASS::IN), false));
        p
    }

    fn query(name: &str, qtype: TYPE) -> Vec<u8> {
        query_packet(name, qtype.into())
            .build_bytes_vec()
            .expect("encode query")
    }

    fn query_edns(name: &str, qtype: TYPE, size: u16, version: u8) -> Vec<u8> {
        query_edns_ttl(name, qtype, size, u32::from(version) << 16)
    }

    /// A query whose OPT record has this TTL field (written by hand: see
    /// `scan_edns` for why simple-dns cannot).
    fn query_edns_ttl(name: &str, qtype: TYPE, size: u16, ttl: u32) -> Vec<u8> {
        let mut p = query_packet(name, qtype.into());
        *p.opt_mut() = Some(OPT {
            opt_codes: Vec::new(),
            udp_packet_size: size,
            version: 0,
        });
        let mut q = p.build_bytes_vec().expect("encode query");
        assert!(set_opt_ttl(&mut q, 0), "query ends with its OPT");
        let n = q.len();
        q[n - 6..n - 2].copy_from_slice(&ttl.to_be_bytes());
        q
    }

    fn reply_bytes(zone: &Zone, q: &[u8], max_len: usize) -> Vec<u8> {
        match answer(zone, q, max_len) {
            Answer::Reply(r) => r,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// Answer `q` and check what holds for every reply to a parsed query.
    /// The reply bytes are leaked so the parsed packet can outlive this call.
    fn ask(zone: &Zone, q: &[u8]) -> Packet<'static> {
        let r: &'static [u8] = Box::leak(reply_bytes(zone, q, 1500).into_boxed_slice());
        let p = Packet::parse(r).expect("reply parses");
        assert_eq!(p.id(), ID);
        assert!(p.has_flags(PacketFlag::RESPONSE));
        assert!(p.has_flags(PacketFlag::RECURSION_DESIRED), "RD copied");
        assert!(!p.has_flags(PacketFlag::RECURSION_AVAILABLE));
        let asked = Packet::parse(q).expect("query parses");
        assert_eq!(p.questions.len(), 1);
        assert_eq!(
            p.questions[0].qname.as_bytes().collect::<Vec<_>>(),
            asked.questions[0].qname.as_bytes().collect::<Vec<_>>(),
            "question echoed byte for byte"
        );
        assert_eq!(p.questions[0].qtype, asked.questions[0].qtype);
        p
    }

    fn a_answers(p: &Packet<'_>) -> Vec<Ipv4Addr> {
        p.answers
            .iter()
            .map(|rr| match &rr.rdata {
                RData::A(a) => {
                    assert_eq!(rr.ttl, TTL);
                    Ipv4Addr::from(a.clone())
                }
                other => panic!("not an A record: {other:?}"),
            })
            .collect()
    }

    fn ptr_answers(p: &Packet<'_>) -> Vec<String> {
        p.answers
            .iter()
            .map(|rr| match &rr.rdata {
                RData::PTR(PTR(n)) => n.to_string(),
                other => panic!("not a PTR record: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_hit_any_case_with_and_without_domain() {
        let z = acme();
        for name in [
            "vm1",
            "VM1",
            "vm1.",
            "vm1.acme.internal",
            "Vm1.AcMe.InTeRnAl.",
        ] {
            let p = ask(&z, &query(name, TYPE::A));
            assert_eq!(p.rcode(), RCODE::NoError, "{name}");
            assert!(p.has_flags(PacketFlag::AUTHORITATIVE_ANSWER), "{name}");
            assert_eq!(a_answers(&p), [ip("10.0.0.5")], "{name}");
            assert_eq!(
                p.answers[0].name.as_bytes().collect::<Vec<_>>(),
                p.questions[0].qname.as_bytes().collect::<Vec<_>>(),
                "owner is the name as asked"
            );
            assert!(p.opt().is_none(), "no OPT without EDNS in the query");
        }
    }

    #[test]
    fn a_hit_from_raw_bytes() {
        // ID 0x1234, RD, one question: VM1.acme.internal A IN.
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x03VM1\x04acme\x08internal\x00\x00\x01\x00\x01");
        let r = reply_bytes(&acme(), &q, 512);
        // QR AA RD, NOERROR; 1 question, 1 answer.
        assert_eq!(&r[..12], &[0x12, 0x34, 0x85, 0x00, 0, 1, 0, 1, 0, 0, 0, 0]);
        assert_eq!(&r[12..q.len()], &q[12..], "question echoed");
        // Owner: pointer to the question name; A IN TTL 30 len 4 10.0.0.5.
        assert_eq!(
            &r[q.len()..],
            &[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, 5]
        );
    }

    #[test]
    fn ptr_hit_gives_fqdn() {
        let p = ask(&acme(), &query("5.0.0.10.in-addr.arpa", TYPE::PTR));
        assert_eq!(p.rcode(), RCODE::NoError);
        assert!(p.has_flags(PacketFlag::AUTHORITATIVE_ANSWER));
        assert_eq!(ptr_answers(&p), ["vm1.acme.internal"]);
        assert_eq!(p.answers[0].ttl, TTL);

        let mut bare = Zone::new(None).expect("zone");
        bare.insert("vm1", ip("10.0.0.5")).expect("insert");
        let p = ask(&bare, &query("5.0.0.10.IN-ADDR.ARPA", TYPE::PTR));
        assert_eq!(ptr_answers(&p), ["vm1"]);
        // A for a reverse name: it exists, no data of that type.
        let p = ask(&bare, &query("5.0.0.10.in-addr.arpa", TYPE::A));
        assert_eq!(p.rcode(), RCODE::NoError);
        assert!(p.answers.is_empty());
    }

    #[test]
    fn aaaa_for_known_name_is_nodata() {
        for name in ["vm1", "vm1.acme.internal"] {
            let p = ask(&acme(), &query(name, TYPE::AAAA));
            assert_eq!(p.rcode(), RCODE::NoError);
            assert!(p.has_flags(PacketFlag::AUTHORITATIVE_ANSWER));
            assert!(p.answers.is_empty());
        }
        let p = ask(&acme(), &query("vm1", TYPE::MX));
        assert_eq!(p.rcode(), RCODE::NoError);
        assert!(p.answers.is_empty());
        // The apex exists too.
        let p = ask(&acme(), &query("acme.internal", TYPE::SOA));
        assert_eq!(p.rcode(), RCODE::NoError);
        assert!(p.answers.is_empty());
    }

    #[test]
    fn any_returns_the_a_records() {
        let p = ask(
            &acme(),
            &query_packet("vm1", QTYPE::ANY)
                .build_bytes_vec()
                .expect("q"),
        );
        assert_eq!(a_answers(&p), [ip("10.0.0.5")]);
    }

    #[test]
    fn unknown_name_in_domain_is_nxdomain() {
        let p = ask(&acme(), &query("vm9.acme.internal", TYPE::A));
        assert_eq!(p.rcode(), RCODE::NameError);
        assert!(p.has_flags(PacketFlag::AUTHORITATIVE_ANSWER));
        assert!(p.answers.is_empty());
    }

    #[test]
    fn names_outside_are_refused() {
        let z = acme();
        for (name, t) in [
            ("example.com", TYPE::A),
            ("vm9", TYPE::A),
            ("internal", TYPE::A),
            ("7.0.0.10.in-addr.arpa", TYPE::PTR),
            ("5.0.0.10.in-addr.arpa.example", TYPE::PTR),
            ("0.0.10.in-addr.arpa", TYPE::PTR),
        ] {
            let p = ask(&z, &query(name, t));
            assert_eq!(p.rcode(), RCODE::Refused, "{name}");
            assert!(!p.has_flags(PacketFlag::AUTHORITATIVE_ANSWER), "{name}");
            assert!(p.answers.is_empty(), "{name}");
        }
    }

    #[test]
    fn zone_transfer_and_other_classes_are_refused() {
        let z = acme();
        let axfr = query_packet("acme.internal", QTYPE::AXFR)
            .build_bytes_vec()
            .expect("q");
        assert_eq!(ask(&z, &axfr).rcode(), RCODE::Refused);
        let mut chaos = query_packet("vm1", TYPE::A.into());
        chaos.questions[0].qclass = QCLASS::CLASS(CLASS::CH);
        let chaos = chaos.build_bytes_vec().expect("q");
        assert_eq!(ask(&z, &chaos).rcode(), RCODE::Refused);
        let mut qu = query_packet("vm1", TYPE::A.into());
        qu.questions[0].unicast_response = true; // QCLASS 0x8001: not IN
        let qu = qu.build_bytes_vec().expect("q");
        assert_eq!(ask(&z, &qu).rcode(), RCODE::Refused);
    }

    #[test]
    fn tenants_only_see_their_own_names() {
        let mut red = Zone::new(Some("red.internal")).expect("zone");
        red.insert("vm1", ip("10.0.0.5")).expect("insert");
        red.insert("secret", ip("10.0.0.9")).expect("insert");
        let mut blue = Zone::new(Some("blue.internal")).expect("zone");
        blue.insert("vm1", ip("10.0.0.7")).expect("insert");

        assert_eq!(
            a_answers(&ask(&red, &query("vm1", TYPE::A))),
            [ip("10.0.0.5")]
        );
        assert_eq!(
            a_answers(&ask(&blue, &query("vm1", TYPE::A))),
            [ip("10.0.0.7")]
        );
        for name in ["secret", "secret.red.internal", "vm1.red.internal"] {
            let p = ask(&blue, &query(name, TYPE::A));
            assert_eq!(p.rcode(), RCODE::Refused, "{name}");
            assert!(p.answers.is_empty());
        }
        assert_eq!(
            ask(&blue, &query("secret.blue.internal", TYPE::A)).rcode(),
            RCODE::NameError
        );
        let p = ask(&blue, &query("9.0.0.10.in-addr.arpa", TYPE::PTR));
        assert_eq!(p.rcode(), RCODE::Refused);
        let p = ask(&blue, &query("7.0.0.10.in-addr.arpa", TYPE::PTR));
        assert_eq!(ptr_answers(&p), ["vm1.blue.internal"]);
    }

    #[test]
    fn question_count_other_than_one_is_formerr() {
        let z = acme();
        for qdcount in [0u8, 2] {
            let mut q = query("vm1", TYPE::A);
            q[5] = qdcount;
            let r = reply_bytes(&z, &q, 512);
            assert_eq!(r, [0xbe, 0xef, 0x81, 0x01, 0, 0, 0, 0, 0, 0, 0, 0]);
        }
        // Two real questions.
        let mut p = query_packet("vm1", TYPE::A.into());
        p.questions.push(p.questions[0].clone());
        let r = reply_bytes(&z, &p.build_bytes_vec().expect("q"), 512);
        assert_eq!(r[3] & 0x0f, 1);
    }

    #[test]
    fn other_opcodes_are_notimp_with_opcode_echoed() {
        for opcode in [1u8, 2, 4, 5, 15] {
            let mut q = query("vm1", TYPE::A);
            q[2] |= opcode << 3;
            let r = reply_bytes(&acme(), &q, 512);
            assert_eq!(r.len(), 12);
            assert_eq!(&r[..2], &[0xbe, 0xef]);
            assert_eq!(r[2], 0x80 | (opcode << 3) | 0x01, "QR, opcode, RD");
            assert_eq!(r[3], 4, "NOTIMP");
        }
    }

    #[test]
    fn responses_and_junk_are_ignored() {
        let z = acme();
        let mut q = query("vm1", TYPE::A);
        q[2] |= 0x80;
        assert_eq!(answer(&z, &q, 512), Answer::Ignore(IgnoreReason::Response));
        // Even a response with a bad opcode or question count.
        assert_eq!(
            answer(&z, &[0, 0, 0xf8, 0, 0, 9, 0, 0, 0, 0, 0, 0], 512),
            Answer::Ignore(IgnoreReason::Response)
        );
        assert_eq!(answer(&z, &[], 512), Answer::Ignore(IgnoreReason::TooShort));
        assert_eq!(
            answer(&z, &q[..11], 512),
            Answer::Ignore(IgnoreReason::TooShort)
        );
        let q = query("vm1", TYPE::A);
        assert_eq!(
            answer(&z, &q[..q.len() - 1], 512),
            Answer::Ignore(IgnoreReason::Malformed)
        );
        // A compression pointer to itself.
        let looped = [0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1];
        assert_eq!(
            answer(&z, &looped, 512),
            Answer::Ignore(IgnoreReason::Malformed)
        );
        // 65535 additional records claimed in a tiny datagram.
        let mut many = query("vm1", TYPE::A);
        many[10] = 0xff;
        many[11] = 0xff;
        assert_eq!(
            answer(&z, &many, 512),
            Answer::Ignore(IgnoreReason::Malformed)
        );
        assert_eq!(
            answer(&z, &query("vm1", TYPE::A), 11),
            Answer::Ignore(IgnoreReason::NoRoom)
        );
    }

    fn big_zone() -> Zone {
        let mut z = Zone::new(Some("acme.internal")).expect("zone");
        for i in 0..40 {
            z.insert("web", Ipv4Addr::new(10, 0, 1, i)).expect("insert");
        }
        z
    }

    #[test]
    fn oversize_reply_is_truncated() {
        let z = big_zone();
        let q = query("web", TYPE::A);
        // 40 A records need 12 + 9 + 40 * 16 = 661 bytes: over 512.
        let r = reply_bytes(&z, &q, 1500);
        assert!(r.len() <= 512);
        let p = Packet::parse(&r).expect("parse");
        assert!(p.has_flags(PacketFlag::TRUNCATION));
        assert!(p.answers.is_empty());
        assert_eq!(p.questions.len(), 1, "question kept");
        assert_eq!(p.rcode(), RCODE::NoError);
        // The caller's limit applies too.
        let r = reply_bytes(&acme(), &query("vm1", TYPE::A), 30);
        let p = Packet::parse(&r).expect("parse");
        assert!(r.len() <= 30 && p.has_flags(PacketFlag::TRUNCATION));
        assert_eq!(p.questions.len(), 1);
        // Too small for the question: header only, still TC.
        let r = reply_bytes(&acme(), &query("vm1.acme.internal", TYPE::A), 20);
        assert_eq!(r.len(), 12);
        assert_eq!(r[2] & 0x02, 0x02);
    }

    #[test]
    fn edns_size_is_honoured_and_opt_echoed() {
        let z = big_zone();
        let r = reply_bytes(&z, &query_edns("web", TYPE::A, 4096, 0), 1500);
        let p = Packet::parse(&r).expect("parse");
        assert!(!p.has_flags(PacketFlag::TRUNCATION));
        assert_eq!(p.answers.len(), 40);
        let opt = p.opt().expect("OPT echoed");
        assert_eq!(usize::from(opt.udp_packet_size), EDNS_UDP_LEN);
        assert_eq!(opt.version, 0);
        // A client size under 512 counts as 512; 600 is honoured.
        let r = reply_bytes(&z, &query_edns("web", TYPE::A, 100, 0), 1500);
        assert!(r.len() <= 512);
        let p = Packet::parse(&r).expect("parse");
        assert!(p.has_flags(PacketFlag::TRUNCATION));
        assert!(p.opt().is_some(), "OPT kept on a truncated reply");
        let r = reply_bytes(&z, &query_edns("web", TYPE::A, 700, 0), 1500);
        assert!(!Packet::parse(&r)
            .expect("parse")
            .has_flags(PacketFlag::TRUNCATION));
        // The caller's max_len caps the EDNS size.
        let r = reply_bytes(&z, &query_edns("web", TYPE::A, 4096, 0), 600);
        assert!(r.len() <= 600);
        assert!(Packet::parse(&r)
            .expect("parse")
            .has_flags(PacketFlag::TRUNCATION));
        // Small answers get the OPT too.
        let r = reply_bytes(&acme(), &query_edns("vm1", TYPE::A, 1232, 0), 1500);
        let p = Packet::parse(&r).expect("parse");
        assert!(p.opt().is_some());
        assert_eq!(a_answers(&p), [ip("10.0.0.5")]);
    }

    #[test]
    fn edns_do_bit_and_options_are_fine() {
        let z = acme();
        // DO set (as DNSSEC-aware resolvers send): still version 0.
        let r = reply_bytes(&z, &query_edns_ttl("vm1", TYPE::A, 1232, 0x8000), 1500);
        let p = Packet::parse(&r).expect("parse");
        assert_eq!(p.rcode(), RCODE::NoError);
        assert_eq!(a_answers(&p), [ip("10.0.0.5")]);
        let n = r.len();
        assert_eq!(
            &r[n - 6..],
            &[0; 6],
            "our OPT: TTL 0 (DO clear), no options"
        );
        // An option (a cookie) in the query's OPT.
        let mut q = query_packet("vm1", TYPE::A.into());
        *q.opt_mut() = Some(OPT {
            opt_codes: vec![simple_dns::rdata::OPTCode {
                code: 10,
                data: vec![1, 2, 3, 4, 5, 6, 7, 8].into(),
            }],
            udp_packet_size: 1232,
            version: 0,
        });
        let r = reply_bytes(&z, &q.build_bytes_vec().expect("q"), 1500);
        let p = Packet::parse(&r).expect("parse");
        assert_eq!(a_answers(&p), [ip("10.0.0.5")]);
        assert!(p.opt().is_some_and(|o| o.opt_codes.is_empty()));
    }

    #[test]
    fn scan_edns_reads_the_rfc_layout() {
        let q = query_edns_ttl("vm1", TYPE::A, 4096, 0x0102_8000);
        let e = scan_edns(&q).expect("walk");
        assert_eq!(e.count, 1);
        assert_eq!(
            e.first,
            Some(Opt {
                udp_len: 4096,
                version: 2
            })
        );
        assert_eq!(scan_edns(&query("vm1", TYPE::A)).map(|e| e.count), Some(0));
        let q = query_edns("vm1", TYPE::A, 4096, 0);
        assert_eq!(scan_edns(&q[..q.len() - 1]), None);
    }

    #[test]
    fn edns_errors() {
        let z = acme();
        let r = reply_bytes(&z, &query_edns("vm1", TYPE::A, 1232, 1), 1500);
        let p = Packet::parse(&r).expect("parse");
        assert!(p.answers.is_empty());
        assert_eq!(r[3] & 0x0f, 0, "BADVERS: header RCODE 0 ...");
        let n = r.len();
        assert_eq!(&r[n - 11..n - 6], &[0, 0, 41, 0x04, 0xd0], "OPT, 1232");
        assert_eq!(&r[n - 6..], &[1, 0, 0, 0, 0, 0], "... extended RCODE 1");

        let mut two = query_packet("vm1", TYPE::A.into());
        let opt = OPT {
            opt_codes: Vec::new(),
            udp_packet_size: 1232,
            version: 0,
        };
        *two.opt_mut() = Some(opt.clone());
        two.additional_records.push(ResourceRecord::new(
            Name::new_unchecked(""),
            CLASS::IN,
            0,
            RData::OPT(opt),
        ));
        let r = reply_bytes(&z, &two.build_bytes_vec().expect("q"), 1500);
        let p = Packet::parse(&r).expect("parse");
        assert_eq!(p.rcode(), RCODE::FormatError);
        assert!(p.answers.is_empty());
    }

    fn fixtures() -> Vec<Vec<u8>> {
        vec![
            query("vm1", TYPE::A),
            query("Vm1.acme.internal", TYPE::A),
            query("5.0.0.10.in-addr.arpa", TYPE::PTR),
            query_edns("web", TYPE::A, 1232, 0),
            query("nope.acme.internal", TYPE::AAAA),
        ]
    }

    /// What every answer must satisfy, whatever the input.
    fn check(zone: &Zone, q: &[u8], max_len: usize) -> Result<(), TestCaseError> {
        if let Answer::Reply(r) = answer(zone, q, max_len) {
            prop_assert!(r.len() >= HEADER_LEN);
            prop_assert!(r.len() <= max_len.min(EDNS_UDP_LEN));
            prop_assert_eq!(&r[..2], &q[..2], "ID echoed");
            prop_assert!(r[2] & 0x80 != 0, "QR set");
            prop_assert!(q[2] & 0x80 == 0, "never answer a response");
            prop_assert!(Packet::parse(&r).is_ok(), "reply parses");
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn random_bytes_never_panic(
            q in proptest::collection::vec(any::<u8>(), 0..600),
            max_len in 0usize..2000,
        ) {
            let mut z = big_zone();
            z.insert("vm1", ip("10.0.0.5")).expect("insert");
            check(&z, &q, max_len)?;
        }

        #[test]
        fn mutated_queries_never_panic(
            which in 0usize..5,
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in proptest::option::of(any::<usize>()),
            extra in proptest::collection::vec(any::<u8>(), 0..40),
            max_len in 0usize..2000,
        ) {
            let mut z = big_zone();
            z.insert("vm1", ip("10.0.0.5")).expect("insert");
            let mut q = fixtures().swap_remove(which);
            for (at, b) in edits {
                let i = at % q.len();
                q[i] = b;
            }
            if let Some(c) = cut {
                q.truncate(c % (q.len() + 1));
            }
            q.extend_from_slice(&extra);
            check(&z, &q, max_len)?;
        }
    }
}
