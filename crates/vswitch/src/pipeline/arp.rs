//! The ARP responder: the switch answers ARP requests for the addresses in
//! its table (the gateway and every port's address) itself, so a request for
//! a known address is never flooded.
//!
//! Not answered: requests for the requester's own address (an RFC 5227
//! probe or a gratuitous ARP must meet silence, or the VM would see a
//! conflict), gratuitous requests (sender = target), and unknown addresses
//! (those go on to the bridge and flood within the network).

use packet::{FlowKey, MacAddr, L3};

use super::{Addresses, Ingress};

const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;

/// If `frame` (parsed as `key`) is an ARP request the switch answers,
/// rewrites it in place into the reply and returns true.
pub fn respond(ingress: &Ingress, key: &FlowKey, addrs: &Addresses, frame: &mut [u8]) -> bool {
    let L3::Arp(a) = key.l3 else { return false };
    if a.op != ARP_REQUEST || a.spa == a.tpa {
        return false;
    }
    let Some(owner) = addrs.owner(&a.tpa) else {
        return false;
    };
    if !owner.gateway && owner.mac == ingress.mac {
        return false;
    }
    write_reply(
        frame,
        key.l3_offset as usize,
        owner.mac,
        a.sha,
        a.spa,
        a.tpa,
    )
}

/// Rewrites the ARP request in `frame` (parsed as `key`) into the reply
/// "`key`'s target address is at `mac`"; false if it is not an ARP frame
/// or too short.
pub fn answer_with(key: &FlowKey, mac: MacAddr, frame: &mut [u8]) -> bool {
    let L3::Arp(a) = key.l3 else { return false };
    write_reply(frame, key.l3_offset as usize, mac, a.sha, a.spa, a.tpa)
}

/// Turns the request at `frame[l3..]` into a reply from `mac`/`ip` to the
/// requester; false (frame untouched) if the frame is too short.
fn write_reply(
    frame: &mut [u8],
    l3: usize,
    mac: MacAddr,
    req_mac: MacAddr,
    req_ip: std::net::Ipv4Addr,
    ip: std::net::Ipv4Addr,
) -> bool {
    if frame.len() < l3 + 28 || l3 < 14 {
        return false;
    }
    frame[0..6].copy_from_slice(&req_mac.0);
    frame[6..12].copy_from_slice(&mac.0);
    let arp = &mut frame[l3..l3 + 28];
    arp[6..8].copy_from_slice(&ARP_REPLY.to_be_bytes());
    arp[8..14].copy_from_slice(&mac.0);
    arp[14..18].copy_from_slice(&ip.octets());
    arp[18..24].copy_from_slice(&req_mac.0);
    arp[24..28].copy_from_slice(&req_ip.octets());
    true
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use std::net::Ipv4Addr;

    fn answer(from: PortIdMac, f: &mut [u8]) -> bool {
        let k = key(f);
        respond(&ingress(from.0, from.1, true), &k, &owners(), f)
    }
    type PortIdMac = (crate::fdb::PortId, MacAddr);

    #[test]
    fn answers_for_leased_addresses() {
        let o = owners();
        let leased_ip = Ipv4Addr::new(10, 0, 0, 50);
        let c = MacAddr([2, 0, 0, 0, 0, 0x50]);
        o.leased
            .store(std::sync::Arc::new([(leased_ip, c)].into_iter().collect()));
        let mut f = arp(A, 1, A, IP_A, leased_ip);
        let k = key(&f);
        assert!(respond(&ingress(1, A, true), &k, &o, &mut f));
        let L3::Arp(r) = key(&f).l3 else {
            panic!("not ARP")
        };
        assert_eq!(r.sha, c);
        // The lease holder itself gets silence.
        let mut f = arp(c, 1, c, Ipv4Addr::UNSPECIFIED, leased_ip);
        let k = key(&f);
        assert!(!respond(&ingress(5, c, true), &k, &o, &mut f));
    }

    #[test]
    fn answers_for_other_ports_and_gateway() {
        let mut f = arp(A, 1, A, IP_A, IP_B);
        assert!(answer((1, A), &mut f));
        let k = key(&f);
        assert_eq!(k.dst_mac, A);
        assert_eq!(k.src_mac, B);
        let L3::Arp(r) = k.l3 else { panic!("not ARP") };
        assert_eq!((r.op, r.sha, r.spa, r.tha, r.tpa), (2, B, IP_B, A, IP_A));

        let mut f = arp(A, 1, A, IP_A, IP_GW);
        assert!(answer((1, A), &mut f));
        let L3::Arp(r) = key(&f).l3 else {
            panic!("not ARP")
        };
        assert_eq!((r.sha, r.spa), (GW, IP_GW));
    }

    #[test]
    fn silent_where_an_answer_would_hurt() {
        // Probe or request for the requester's own address: no conflict.
        assert!(!answer(
            (1, A),
            &mut arp(A, 1, A, Ipv4Addr::UNSPECIFIED, IP_A)
        ));
        // Gratuitous ARP, replies, unknown addresses.
        assert!(!answer((1, A), &mut arp(A, 1, A, IP_A, IP_A)));
        assert!(!answer((1, A), &mut arp(A, 2, A, IP_A, IP_B)));
        assert!(!answer(
            (1, A),
            &mut arp(A, 1, A, IP_A, Ipv4Addr::new(10, 0, 0, 77))
        ));
    }

    #[test]
    fn answers_probe_for_an_address_in_use() {
        // RFC 5227: a probe for someone else's address learns it is taken.
        let mut f = arp(A, 1, A, Ipv4Addr::UNSPECIFIED, IP_B);
        assert!(answer((1, A), &mut f));
    }
}
