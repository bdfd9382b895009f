//! Port binding (anti-spoofing): a port speaks only with its own addresses.
//!
//! With port security on (the default), a port's frames must carry its MAC
//! as Ethernet source (checked by the bridge stage), its IPv4 address as IP
//! source (0.0.0.0 only for DHCP client messages, UDP 68 -> 67), and its MAC
//! and IPv4 address (or 0.0.0.0, an RFC 5227 probe) as ARP sender. IPv4 or
//! ARP frames too broken to check are dropped. Whatever the port security
//! setting, a VM never gets to act as a DHCP server (UDP source port 67).
//! IPv6 is not bound yet.

use packet::flow::Malformed;
use packet::{FlowKey, L3, L4};

use super::{Addresses, DropReason, Ingress};

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const DHCP_SERVER_PORT: u16 = 67;
const DHCP_CLIENT_PORT: u16 = 68;

/// Checks a parsed frame from `ingress`; `Err` says why it must be dropped.
pub fn check(ingress: &Ingress, key: &FlowKey, addrs: &Addresses) -> Result<(), DropReason> {
    if let (
        L3::Ipv4(_),
        L4::Udp {
            src_port: DHCP_SERVER_PORT,
            ..
        },
    ) = (&key.l3, &key.l4)
    {
        return Err(DropReason::DhcpServerFromVm);
    }
    if !ingress.port_security {
        return Ok(());
    }
    if key.src_mac != ingress.mac {
        return Err(DropReason::SrcMacSpoofed);
    }
    let owns = |ip: &std::net::Ipv4Addr| addrs.owned_by(ip, &ingress.mac);
    match (&key.l3, &key.l4) {
        (L3::Arp(a), _) if a.sha != ingress.mac || !(a.spa.is_unspecified() || owns(&a.spa)) => {
            return Err(DropReason::ArpSpoofed);
        }
        (L3::Ipv4(ip), l4) => {
            let std::net::IpAddr::V4(src) = ip.src else {
                return Err(DropReason::L3Malformed);
            };
            let dhcp_client = matches!(
                l4,
                L4::Udp {
                    src_port: DHCP_CLIENT_PORT,
                    dst_port: DHCP_SERVER_PORT
                }
            );
            let ok = if src.is_unspecified() {
                dhcp_client
            } else {
                owns(&src)
            };
            if !ok {
                return Err(DropReason::IpSrcSpoofed);
            }
        }
        (L3::None, _) if matches!(key.ethertype, ETHERTYPE_IPV4 | ETHERTYPE_ARP) => {
            return Err(DropReason::L3Malformed);
        }
        _ => {}
    }
    Ok(())
}

/// Checks what the flow key could not parse, on the frame itself: UDP
/// with a broken length field still has its source port (no VM may be a
/// DHCP server, whatever its UDP length says), and a frame with more VLAN
/// tags than the parser follows hides addresses port security cannot
/// check, so a secured port may not send it. Found by the malformed-frame
/// corpus test.
pub fn check_unparsed(ingress: &Ingress, key: &FlowKey, frame: &[u8]) -> Result<(), DropReason> {
    match key.malformed {
        Some(Malformed::UdpBadLength | Malformed::UdpTruncated)
            if matches!(key.l3, L3::Ipv4(_)) =>
        {
            let l3 = usize::from(key.l3_offset);
            let ihl = frame.get(l3).map_or(0, |b| usize::from(b & 0x0f) * 4);
            if frame.get(l3 + ihl..l3 + ihl + 2) == Some(&DHCP_SERVER_PORT.to_be_bytes()[..]) {
                return Err(DropReason::DhcpServerFromVm);
            }
            Ok(())
        }
        Some(Malformed::TooManyVlanTags) if ingress.port_security => Err(DropReason::L3Malformed),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use std::net::Ipv4Addr;

    const ZERO: Ipv4Addr = Ipv4Addr::UNSPECIFIED;

    fn chk(sec: bool, f: &[u8]) -> Result<(), DropReason> {
        check(&ingress(1, A, sec), &key(f), &owners())
    }

    #[test]
    fn ipv4_source_binding() {
        assert_eq!(chk(true, &udp(A, IP_A, IP_B, 5000, 53)), Ok(()));
        assert_eq!(
            chk(true, &udp(A, IP_B, IP_A, 5000, 53)),
            Err(DropReason::IpSrcSpoofed)
        );
        assert_eq!(
            chk(true, &udp(A, IP_GW, IP_B, 5000, 53)),
            Err(DropReason::IpSrcSpoofed)
        );
        assert_eq!(
            chk(true, &udp(A, Ipv4Addr::new(10, 0, 0, 9), IP_B, 1, 2)),
            Err(DropReason::IpSrcSpoofed)
        );
        // 0.0.0.0 only for DHCP client messages.
        assert_eq!(
            chk(true, &udp(A, ZERO, Ipv4Addr::BROADCAST, 68, 67)),
            Ok(())
        );
        assert_eq!(
            chk(true, &udp(A, ZERO, Ipv4Addr::BROADCAST, 68, 69)),
            Err(DropReason::IpSrcSpoofed)
        );
        // Without port security anything goes but a DHCP server.
        assert_eq!(chk(false, &udp(A, IP_B, IP_A, 5000, 53)), Ok(()));
    }

    #[test]
    fn no_dhcp_server_on_any_port() {
        assert_eq!(
            chk(true, &udp(A, IP_A, IP_B, 67, 68)),
            Err(DropReason::DhcpServerFromVm)
        );
        assert_eq!(
            chk(false, &udp(A, IP_A, IP_B, 67, 68)),
            Err(DropReason::DhcpServerFromVm)
        );
    }

    #[test]
    fn mac_binding() {
        assert_eq!(
            chk(true, &udp(B, IP_A, IP_B, 5000, 53)),
            Err(DropReason::SrcMacSpoofed)
        );
        assert_eq!(chk(false, &udp(B, IP_A, IP_B, 5000, 53)), Ok(()));
    }

    #[test]
    fn arp_binding() {
        // Own request, gratuitous ARP for own address, RFC 5227 probe.
        assert_eq!(chk(true, &arp(A, 1, A, IP_A, IP_B)), Ok(()));
        assert_eq!(chk(true, &arp(A, 1, A, IP_A, IP_A)), Ok(()));
        assert_eq!(chk(true, &arp(A, 1, A, ZERO, IP_A)), Ok(()));
        // Answering for another's address, or claiming it gratuitously.
        assert_eq!(
            chk(true, &arp(A, 2, A, IP_B, IP_A)),
            Err(DropReason::ArpSpoofed)
        );
        assert_eq!(
            chk(true, &arp(A, 1, A, IP_B, IP_B)),
            Err(DropReason::ArpSpoofed)
        );
        // Sender MAC that is not the port's.
        assert_eq!(
            chk(true, &arp(A, 1, B, IP_A, IP_B)),
            Err(DropReason::ArpSpoofed)
        );
        assert_eq!(chk(false, &arp(A, 2, A, IP_B, IP_A)), Ok(()));
    }

    #[test]
    fn broken_l3_is_dropped_on_secured_ports() {
        let mut f = udp(A, IP_A, IP_B, 5000, 53);
        f[14] = 0x43; // IHL 3
        assert_eq!(chk(true, &f), Err(DropReason::L3Malformed));
        let f = arp(A, 1, A, IP_A, IP_B);
        assert_eq!(chk(true, &f[..30]), Err(DropReason::L3Malformed));
    }

    #[test]
    fn what_the_parser_could_not_read_is_still_checked() {
        // UDP 67 -> 68 with UDP length 0: no L4 in the key, still a DHCP
        // server, on any port.
        let mut f = udp(A, IP_A, IP_B, 67, 68);
        f[38] = 0;
        f[39] = 0;
        let k = key(&f);
        assert_eq!(k.malformed, Some(Malformed::UdpBadLength));
        for sec in [true, false] {
            assert_eq!(
                check_unparsed(&ingress(1, A, sec), &k, &f),
                Err(DropReason::DhcpServerFromVm)
            );
        }
        // Another source port with a bad length is left alone.
        let mut g = udp(A, IP_A, IP_B, 1000, 68);
        g[38] = 0;
        g[39] = 0;
        assert_eq!(check_unparsed(&ingress(1, A, true), &key(&g), &g), Ok(()));
        // Three VLAN tags: a secured port may not send what it cannot check.
        let mut v = f[..12].to_vec();
        for tpid in [[0x88, 0xa8], [0x81, 0x00], [0x81, 0x00]] {
            v.extend_from_slice(&tpid);
            v.extend_from_slice(&[0, 100]);
        }
        v.extend_from_slice(&udp(A, Ipv4Addr::new(10, 9, 9, 9), IP_B, 1, 2)[12..]);
        let kv = key(&v);
        assert_eq!(kv.malformed, Some(Malformed::TooManyVlanTags));
        assert_eq!(
            check_unparsed(&ingress(1, A, true), &kv, &v),
            Err(DropReason::L3Malformed)
        );
        assert_eq!(check_unparsed(&ingress(1, A, false), &kv, &v), Ok(()));
    }
}
