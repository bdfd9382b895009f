//! Offload metadata carried with every packet: the virtio-net header's
//! segmentation (GSO) and checksum fields.
//!
//! A tap opened with `IFF_VNET_HDR` prefixes every frame with this header, so
//! a 64 KB TCP super-frame can travel from one VM to another whole: the
//! receiving kernel (or NIC) segments it and completes its checksum only if it
//! must. The switch keeps the header's meaning in [`Offload`] next to the
//! bytes and writes it back on transmit.

/// Size of `struct virtio_net_hdr_mrg_rxbuf` (virtio 1.0 header with
/// `num_buffers`), the vnet header size vswitch configures on taps.
pub const VNET_HDR_LEN: usize = 12;

const F_NEEDS_CSUM: u8 = 1;
const F_DATA_VALID: u8 = 2;

const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_UDP: u8 = 3;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

/// Which segmentation the frame still needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GsoType {
    /// A single frame on the wire.
    #[default]
    None,
    /// TCP over IPv4 super-frame (TSO4).
    TcpV4,
    /// TCP over IPv6 super-frame (TSO6).
    TcpV6,
    /// UDP segmentation offload (USO), IPv4 or IPv6.
    UdpL4,
    /// Legacy UDP fragmentation offload (UFO). Accepted on input, never
    /// advertised.
    Ufo,
}

/// Partial checksum: the L4 checksum field at `start + offset` holds only
/// the pseudo-header sum; whoever transmits must fold in the bytes from
/// `start` to the end of the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CsumOffload {
    /// Offset from the start of the Ethernet frame where summing begins.
    pub start: u16,
    /// Offset of the checksum field from `start`.
    pub offset: u16,
}

/// Offload state of one packet (virtio-net header semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Offload {
    /// Segmentation still to do.
    pub gso: GsoType,
    /// TCP ECN (CWR) must be handled during segmentation.
    pub ecn: bool,
    /// Payload bytes per segment; 0 when `gso` is `None`.
    pub gso_size: u16,
    /// Length of the headers (Ethernet up to and including L4) as the
    /// sender declared it; a hint, never trusted for bounds.
    pub hdr_len: u16,
    /// Checksum still to complete, if any.
    pub csum: Option<CsumOffload>,
    /// The L4 checksum was already verified by the sender's side.
    pub data_valid: bool,
}

/// A virtio-net header that vswitch will not forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// Shorter than [`VNET_HDR_LEN`].
    #[error("virtio-net header truncated")]
    Truncated,
    /// Unknown `gso_type` value.
    #[error("unknown GSO type {0:#x}")]
    UnknownGsoType(u8),
    /// GSO requested with a segment size of zero.
    #[error("GSO frame with gso_size 0")]
    ZeroGsoSize,
}

impl Offload {
    /// A plain frame: no segmentation, checksum already complete.
    pub const NONE: Offload = Offload {
        gso: GsoType::None,
        ecn: false,
        gso_size: 0,
        hdr_len: 0,
        csum: None,
        data_valid: false,
    };

    /// Parses a virtio-net header (little-endian fields, as on every
    /// little-endian host; vswitch does not set `TUNSETVNETBE`).
    pub fn from_vnet_hdr(h: &[u8]) -> Result<Offload, OffloadError> {
        let h: &[u8; VNET_HDR_LEN] = h
            .get(..VNET_HDR_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(OffloadError::Truncated)?;
        let le = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        let flags = h[0];
        let raw_gso = h[1];
        let gso = match raw_gso & !GSO_ECN {
            GSO_NONE => GsoType::None,
            GSO_TCPV4 => GsoType::TcpV4,
            GSO_TCPV6 => GsoType::TcpV6,
            GSO_UDP_L4 => GsoType::UdpL4,
            GSO_UDP => GsoType::Ufo,
            other => return Err(OffloadError::UnknownGsoType(other)),
        };
        let gso_size = le(4);
        if gso != GsoType::None && gso_size == 0 {
            return Err(OffloadError::ZeroGsoSize);
        }
        let csum = (flags & F_NEEDS_CSUM != 0).then(|| CsumOffload {
            start: le(6),
            offset: le(8),
        });
        Ok(Offload {
            gso,
            ecn: raw_gso & GSO_ECN != 0,
            gso_size: if gso == GsoType::None { 0 } else { gso_size },
            hdr_len: le(2),
            csum,
            data_valid: flags & F_DATA_VALID != 0,
        })
    }

    /// Builds the virtio-net header for transmitting this packet.
    pub fn to_vnet_hdr(&self) -> [u8; VNET_HDR_LEN] {
        let mut h = [0u8; VNET_HDR_LEN];
        let mut flags = 0;
        if self.csum.is_some() {
            flags |= F_NEEDS_CSUM;
        } else if self.data_valid {
            flags |= F_DATA_VALID;
        }
        h[0] = flags;
        h[1] = match self.gso {
            GsoType::None => GSO_NONE,
            GsoType::TcpV4 => GSO_TCPV4,
            GsoType::TcpV6 => GSO_TCPV6,
            GsoType::UdpL4 => GSO_UDP_L4,
            GsoType::Ufo => GSO_UDP,
        } | if self.ecn { GSO_ECN } else { 0 };
        h[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        h[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        if let Some(c) = self.csum {
            h[6..8].copy_from_slice(&c.start.to_le_bytes());
            h[8..10].copy_from_slice(&c.offset.to_le_bytes());
        }
        // num_buffers (h[10..12]) is only meaningful for mergeable rx buffers.
        h
    }

    /// True when the frame is a super-frame that still needs segmenting.
    pub fn is_gso(&self) -> bool {
        self.gso != GsoType::None
    }
}

/// What an egress port can take without software help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct OffloadCaps {
    /// Accepts partial checksums (`NEEDS_CSUM`).
    pub csum: bool,
    /// Accepts TCP/IPv4 super-frames.
    pub tso4: bool,
    /// Accepts TCP/IPv6 super-frames.
    pub tso6: bool,
    /// Accepts UDP segmentation offload frames.
    pub uso: bool,
}

impl OffloadCaps {
    /// Everything a tap takes from userspace: the kernel segments and
    /// checksums whatever it is handed with a vnet header.
    pub const ALL: OffloadCaps = OffloadCaps {
        csum: true,
        tso4: true,
        tso6: true,
        uso: true,
    };

    /// Whether a packet with this offload state can be sent as is.
    pub fn accepts(&self, o: &Offload) -> bool {
        let gso_ok = match o.gso {
            GsoType::None => true,
            GsoType::TcpV4 => self.tso4,
            GsoType::TcpV6 => self.tso6,
            GsoType::UdpL4 | GsoType::Ufo => self.uso,
        };
        gso_ok && (o.csum.is_none() || self.csum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tso4_header_round_trip() {
        // flags=NEEDS_CSUM, gso=TCPV4, hdr_len=66, gso_size=1448, csum_start=34, csum_offset=16
        let raw = [1u8, 1, 66, 0, 0xa8, 0x05, 34, 0, 16, 0, 0, 0];
        let o = Offload::from_vnet_hdr(&raw).unwrap();
        assert_eq!(o.gso, GsoType::TcpV4);
        assert_eq!(o.gso_size, 1448);
        assert_eq!(o.hdr_len, 66);
        assert_eq!(
            o.csum,
            Some(CsumOffload {
                start: 34,
                offset: 16
            })
        );
        assert!(!o.ecn);
        assert_eq!(o.to_vnet_hdr(), raw);
    }

    #[test]
    fn plain_frame_is_all_zero() {
        let o = Offload::from_vnet_hdr(&[0; 12]).unwrap();
        assert_eq!(o, Offload::NONE);
        assert_eq!(Offload::NONE.to_vnet_hdr(), [0; 12]);
    }

    #[test]
    fn rejects_bad_headers() {
        assert_eq!(
            Offload::from_vnet_hdr(&[0; 11]),
            Err(OffloadError::Truncated)
        );
        assert_eq!(
            Offload::from_vnet_hdr(&[0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(OffloadError::UnknownGsoType(2))
        );
        assert_eq!(
            Offload::from_vnet_hdr(&[0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(OffloadError::ZeroGsoSize)
        );
    }

    #[test]
    fn caps_accept() {
        let mut o = Offload::NONE;
        assert!(OffloadCaps::default().accepts(&o));
        o.gso = GsoType::TcpV6;
        o.gso_size = 1400;
        assert!(!OffloadCaps {
            tso4: true,
            csum: true,
            ..Default::default()
        }
        .accepts(&o));
        assert!(OffloadCaps::ALL.accepts(&o));
    }
}
