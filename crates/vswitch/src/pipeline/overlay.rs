//! Checks on frames that arrive from a peer over VXLAN, before the bridge.
//!
//! A decapsulated frame gets the same scrutiny as a frame from a port with
//! port security off, plus what the directory knows: the peer is not trusted
//! to speak for addresses the directory places elsewhere. The bridge then
//! refuses a source MAC that is configured on a local port or on another
//! host (a static entry), and learning from the peer obeys the table's caps.
//! Which peer may send which VNI was checked by the caller.

use packet::{FlowKey, L3};

use super::{port_security, Addresses, DropReason, Ingress};

/// Checks a parsed frame decapsulated from the peer whose pseudo-port is
/// `ingress.id`. `Err` says why it must be dropped.
pub fn check_remote(ingress: &Ingress, key: &FlowKey, addrs: &Addresses) -> Result<(), DropReason> {
    // No VM anywhere may act as a DHCP server; nothing else of port
    // security applies to a peer with many VMs behind it.
    port_security::check(ingress, key, addrs)?;
    if !key.src_mac.is_unicast() {
        return Err(DropReason::SrcMacInvalid);
    }
    // An address the directory (or a lease) gives to one MAC cannot be used
    // by another: a remote VM cannot take over a local VM's address, nor
    // another remote VM's.
    let foreign = |ip: &std::net::Ipv4Addr| {
        addrs
            .owner(ip)
            .is_some_and(|o| o.gateway || o.mac != key.src_mac)
    };
    match &key.l3 {
        L3::Arp(a) if a.sha != key.src_mac || foreign(&a.spa) => Err(DropReason::ArpSpoofed),
        L3::Ipv4(ip) => match ip.src {
            std::net::IpAddr::V4(src) if foreign(&src) => Err(DropReason::IpSrcSpoofed),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use packet::MacAddr;

    const PEER: Ingress = Ingress {
        id: crate::underlay::VTEP_BASE,
        mac: MacAddr::ZERO,
        port_security: false,
    };
    const R: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x33]);

    #[test]
    fn remote_frames_cannot_use_addresses_placed_elsewhere() {
        let o = owners();
        let chk = |f: &[u8]| check_remote(&PEER, &key(f), &o);
        // A remote VM with an address the directory does not know: fine.
        let free = std::net::Ipv4Addr::new(10, 0, 0, 77);
        assert_eq!(chk(&udp(R, free, IP_A, 1, 2)), Ok(()));
        // B's own address from B's MAC (B lives on that peer): fine.
        assert_eq!(chk(&udp(B, IP_B, IP_A, 1, 2)), Ok(()));
        // A's address from another MAC, the gateway's address: spoofed.
        assert_eq!(
            chk(&udp(R, IP_A, IP_B, 1, 2)),
            Err(DropReason::IpSrcSpoofed)
        );
        assert_eq!(
            chk(&udp(R, IP_GW, IP_B, 1, 2)),
            Err(DropReason::IpSrcSpoofed)
        );
        assert_eq!(chk(&arp(R, 2, R, IP_A, IP_B)), Err(DropReason::ArpSpoofed));
        assert_eq!(chk(&arp(R, 1, B, free, IP_B)), Err(DropReason::ArpSpoofed));
        assert_eq!(chk(&arp(R, 1, R, free, IP_B)), Ok(()));
        // A DHCP server behind a peer.
        assert_eq!(
            chk(&udp(R, free, IP_B, 67, 68)),
            Err(DropReason::DhcpServerFromVm)
        );
        // Multicast source.
        let mut f = udp(R, free, IP_B, 1, 2);
        f[6] |= 1;
        assert_eq!(chk(&f), Err(DropReason::SrcMacInvalid));
    }
}
