//! DNS at the gateway: a VM's query to its network's gateway address (UDP
//! 53) is answered from its tenant's zone (the `dns` crate), in the worker:
//! the answer is pure computation and bounded in size, so it needs no queue.

use std::net::{IpAddr, Ipv4Addr};

use packet::{FlowKey, MacAddr, PacketBuf, L3, L4};

use super::DropReason;

/// What the DNS stage did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not a DNS query to the gateway: go on.
    NotMine,
    /// `buf` now holds the answer for the ingress port.
    Answered,
    /// A DNS message to the gateway that gets no answer.
    Dropped(DropReason),
}

/// Answers `buf` (parsed as `key`) if it is a DNS query to `gateway`. The
/// zone is loaded only for such queries: every other frame pays two
/// comparisons here.
pub fn serve(
    zone: &arc_swap::ArcSwap<dns::Zone>,
    gateway: Ipv4Addr,
    gateway_mac: MacAddr,
    key: &FlowKey,
    buf: &mut PacketBuf,
) -> Outcome {
    let (
        L3::Ipv4(ip),
        L4::Udp {
            src_port,
            dst_port: 53,
        },
    ) = (&key.l3, &key.l4)
    else {
        return Outcome::NotMine;
    };
    let (IpAddr::V4(client), IpAddr::V4(dst)) = (ip.src, ip.dst) else {
        return Outcome::NotMine;
    };
    if dst != gateway {
        return Outcome::NotMine;
    }
    let Some(query) = key.udp_payload(buf.frame()) else {
        return Outcome::Dropped(DropReason::DnsIgnored);
    };
    let answer = match dns::answer(&zone.load(), query, dns::EDNS_UDP_LEN) {
        dns::Answer::Reply(a) => a,
        dns::Answer::Ignore(why) => {
            tracing::trace!(reason = why.as_str(), "DNS query ignored");
            return Outcome::Dropped(DropReason::DnsIgnored);
        }
    };
    let mut out = Vec::with_capacity(42 + answer.len());
    let built = etherparse::PacketBuilder::ethernet2(gateway_mac.0, key.src_mac.0)
        .ipv4(gateway.octets(), client.octets(), 64)
        .udp(53, *src_port)
        .write(&mut out, &answer);
    if built.is_err() || !buf.replace_frame(&out) {
        return Outcome::Dropped(DropReason::DnsIgnored);
    }
    buf.offload = packet::Offload::NONE;
    Outcome::Answered
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn query(name: &str) -> Vec<u8> {
        // Header: id 0x4242, RD, one question.
        let mut q = vec![0x42, 0x42, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    }

    fn frame(dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(A.0, GW.0)
            .ipv4(IP_A.octets(), dst.octets(), 64)
            .udp(40000, 53)
            .write(&mut f, payload)
            .unwrap();
        f
    }

    #[test]
    fn answers_a_query_to_the_gateway() {
        let mut z = dns::Zone::new(None).unwrap();
        z.insert("vm2", IP_B).unwrap();
        let zone = arc_swap::ArcSwap::from_pointee(z);
        let f = frame(IP_GW, &query("vm2"));
        let k = key(&f);
        // A worker's receive buffer: full size, so the answer fits.
        let mut buf = PacketBuf::new();
        assert!(buf.replace_frame(&f));
        assert_eq!(serve(&zone, IP_GW, GW, &k, &mut buf), Outcome::Answered);
        let r = key(buf.frame());
        assert_eq!((r.src_mac, r.dst_mac), (GW, A));
        let L3::Ipv4(ip) = r.l3 else {
            panic!("not IPv4")
        };
        assert_eq!((ip.src, ip.dst), (IpAddr::V4(IP_GW), IpAddr::V4(IP_A)));
        assert_eq!(
            r.l4,
            L4::Udp {
                src_port: 53,
                dst_port: 40000
            }
        );
        // The answer carries vm2's address.
        assert!(buf.frame().windows(4).any(|w| w == IP_B.octets()));
    }

    #[test]
    fn other_destinations_and_garbage() {
        let zone = arc_swap::ArcSwap::from_pointee(dns::Zone::new(None).unwrap());
        let f = frame(IP_B, &query("vm2"));
        let mut buf = PacketBuf::from_frame(&f);
        assert_eq!(
            serve(&zone, IP_GW, GW, &key(&f), &mut buf),
            Outcome::NotMine
        );
        let f = frame(IP_GW, &[1, 2, 3]);
        let mut buf = PacketBuf::from_frame(&f);
        assert_eq!(
            serve(&zone, IP_GW, GW, &key(&f), &mut buf),
            Outcome::Dropped(DropReason::DnsIgnored)
        );
    }
}
