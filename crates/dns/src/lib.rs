//! Sans-IO DNS responder for the names of one tenant network.
//!
//! The switch answers DNS queries (UDP 53) that VMs send to their network's
//! gateway address: A and PTR records for the port names and DHCP host names
//! of the same tenant. This crate is the part without I/O: a [`Zone`] (one
//! tenant's `name -> IPv4` table and its reverse) and [`answer`], which turns
//! one UDP payload into [`Answer::Reply`] (bytes to send back) or
//! [`Answer::Ignore`] (with a reason to count). No sockets, threads or clock;
//! the caller (vswitch's local-services stage) does the Ethernet/IP/UDP
//! framing.
//!
//! # Isolation
//!
//! [`answer`] reads the one [`Zone`] it is given and nothing else, so the
//! caller passing the zone of the packet's own network is the whole of the
//! tenant boundary: a name of another tenant is never in that zone and is
//! refused like any outside name.
//!
//! # What it answers
//!
//! | query | reply |
//! |---|---|
//! | `vm1`, `vm1.`, `vm1.<domain>` (any case), type A or ANY | NOERROR, AA, the A records, TTL [`TTL`] |
//! | `d.c.b.a.in-addr.arpa` of a known address, PTR or ANY | NOERROR, AA, PTR to `vm1.<domain>.` (or `vm1.`) |
//! | a known name or reverse name, another type (AAAA, MX, ...) | NOERROR, AA, no answers (NODATA) |
//! | the domain itself, or an empty non-terminal (`1.<domain>` when `web.1` exists) | NODATA |
//! | an unknown name under the zone's domain | NXDOMAIN, AA |
//! | anything else (other names, unknown addresses, AXFR/IXFR, classes other than IN/ANY) | REFUSED (no upstream resolver here) |
//! | opcode other than QUERY | NOTIMP, header only, opcode echoed |
//! | QDCOUNT other than 1 | FORMERR, header only |
//! | EDNS version other than 0 / two OPT records | BADVERS / FORMERR |
//! | QR set (a response), shorter than a header, anything that does not parse | nothing: [`Answer::Ignore`] |
//!
//! Every reply echoes the ID and the question byte for byte (so 0x20 case
//! randomisation works), copies RD, and leaves RA clear. Its size is capped
//! by the caller's `max_len` and by 512 bytes, or by the client's EDNS0 UDP
//! size (at most [`EDNS_UDP_LEN`], 1232) when the query has an OPT record, in
//! which case the reply carries one too. What does not fit is dropped and TC
//! set. A reply holds at most the question, the records of one name and an
//! OPT, so amplification is bounded by what the zone holds for one name;
//! responses are never answered (no reflection loops).
//!
//! # Hostile input
//!
//! Nothing here panics on any bytes (proptest checks random datagrams and
//! mutations of valid queries). Compression pointers must point strictly
//! backwards (simple-dns checks this), so they cannot loop; names are capped
//! at 255 octets; section counts that cannot fit in the datagram are refused
//! before the parser sizes vectors from them; a zone holds at most
//! [`Zone::MAX_ENTRIES`] pairs and an answer at most [`MAX_ANSWERS`] records.
//!
//! # Message crate
//!
//! Messages are parsed and built with `simple-dns`, whose only dependency is
//! `bitflags`: it parses with bounds checks, rejects looping compression
//! pointers, handles EDNS0 OPT (including the extended RCODE) and compresses
//! names on output. `hickory-proto` was the other candidate, but even with
//! default features off it pulls `idna` with ICU data, `url`, `rand`,
//! `tracing` and more, for a responder that needs two record types. A few
//! things are done by hand, each a few lines, with the reason next to them:
//! - the 12-byte header is read first, so responses are dropped and
//!   NOTIMP/FORMERR answered without parsing the rest; NOTIMP/FORMERR replies
//!   are written directly, because simple-dns maps unknown opcodes to one
//!   `Reserved` value and could not echo them;
//! - the OPT record's TTL field (EDNS version, extended RCODE, DO bit) is read
//!   from and written to the wire directly: simple-dns 0.13 uses the wrong bit
//!   layout there, so a query with the DO bit set (as sent by DNSSEC-aware
//!   resolvers) would look like EDNS version 128 and get BADVERS, and its
//!   BADVERS would not reach the client. The OPT's UDP size and the rest of
//!   the message go through simple-dns.
//!
//! # Not here
//!
//! - TCP (a truncated reply sends the client to TCP 53, which the switch does
//!   not serve; with one address per name, replies fit in 512 bytes).
//! - IPv6 (AAAA, `ip6.arpa`): names exist, so AAAA gets NODATA.
//! - Forwarding to an upstream resolver, SOA/NS records (negative answers
//!   carry no SOA, so resolvers do not cache them: names change with DHCP),
//!   DNSSEC, EDNS options (our OPT carries none).
//! - A message with the reserved Z header bit set is ignored as malformed
//!   (simple-dns rejects it).
//!
//! # Example
//!
//! ```
//! use std::net::Ipv4Addr;
//! use dns::{answer, Answer, Zone};
//!
//! let mut zone = Zone::new(Some("acme.internal")).unwrap();
//! zone.insert("vm1", Ipv4Addr::new(10, 0, 0, 5)).unwrap();
//!
//! // ID 0x1234, RD, one question: vm1.acme.internal A IN.
//! let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
//! query.extend_from_slice(b"\x03vm1\x04acme\x08internal\x00\x00\x01\x00\x01");
//! let Answer::Reply(reply) = answer(&zone, &query, 1500) else { panic!() };
//! assert_eq!(&reply[reply.len() - 4..], &[10, 0, 0, 5]);
//!
//! // A response is never answered.
//! query[2] |= 0x80;
//! assert!(matches!(answer(&zone, &query, 1500), Answer::Ignore(_)));
//! ```

#![forbid(unsafe_code)]

mod answer;
mod zone;

pub use answer::{answer, Answer, IgnoreReason, CLASSIC_UDP_LEN, EDNS_UDP_LEN, MAX_ANSWERS, TTL};
pub use zone::{NameError, Zone, MAX_LABEL_LEN, MAX_NAME_LEN};
