//! Encapsulation: outer Ethernet + IPv4 + UDP + VXLAN in front of an inner
//! frame, written into the [`PacketBuf`]'s headroom (the inner frame is not
//! copied).
//!
//! Outer headers over IPv4 (RFC 7348 section 5):
//!
//! ```text
//!  0      6      12   14                                34      42      50
//!  | dst  | src  |0800| IPv4: 45 tos len id 4000 ttl 11 | UDP   | VXLAN | inner frame
//!                       csum src dst (DF set)            | sport 4789 len 0000
//!                                                                | 08 00 00 00 VNI(3) 00
//! ```
//!
//! * DF is always set: a VTEP must not fragment VXLAN packets (RFC 7348
//!   section 4.3); frames that do not fit are the caller's decision
//!   ([`crate::mtu::check_mtu`]).
//! * The outer UDP checksum is 0 ("none"), which RFC 7348 section 5 allows
//!   (and recommends) over IPv4. The inner frame keeps its own checksums.
//! * The UDP source port is [`flow_hash`] of the inner flow mapped into
//!   49152-65535 ([`src_port_from_hash`]), as Linux's `udp_flow_src_port`:
//!   one flow always gets the same port (no reordering), different flows
//!   spread over the underlay's ECMP paths and RSS queues.
//! * The outer IPv4 ID comes from a counter per [`Encapsulator`] (one per
//!   worker); with DF set it only has to be unique enough for diagnostics
//!   (RFC 6864).
//!
//! Offloads: a frame with a pending inner checksum gets it completed in
//! software before encapsulation unless [`EncapConfig::inner_csum_partial`]
//! says the egress will complete it; then `offload.csum.start` moves back by
//! the outer header length. Super-frames go either to
//! [`Encapsulator::encap_tunnel_gso`] (kept whole for an egress that does UDP
//! tunnel segmentation) or to [`Encapsulator::encap_segments`] (software
//! segmentation, then one VXLAN packet per segment).

use std::net::{IpAddr, Ipv4Addr};

use packet::checksum::checksum;
use packet::flow::{ethertype, proto, L4};
use packet::{complete_checksum, segment, FlowKey, GsoError, GsoType, MacAddr, Offload, PacketBuf};

use crate::{
    Family, Vni, DEFAULT_PORT, DEFAULT_TTL, ETH_HLEN, FLAG_I, IPV4_HLEN, OUTER_V4_LEN,
    SRC_PORT_MIN, UDP_HLEN, VXLAN_HLEN,
};

/// Per-switch encapsulation settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncapConfig {
    /// Outer UDP destination port (default 4789).
    pub dst_port: u16,
    /// Outer IPv4 TTL (default 64).
    pub ttl: u8,
    /// Outer IPv4 TOS byte (default 0).
    pub tos: u8,
    /// Seed mixed into the flow hash that picks the UDP source port (a
    /// per-host secret makes the spread hard to steer from a VM).
    pub hash_seed: u64,
    /// `true`: a pending inner checksum stays pending (its `csum.start`
    /// shifted past the outer headers) because the egress completes it
    /// (a tap with a vnet header). `false` (default): completed in software
    /// before encapsulation, as needed for a socket or a NIC without
    /// checksum offload.
    pub inner_csum_partial: bool,
}

impl Default for EncapConfig {
    fn default() -> Self {
        EncapConfig {
            dst_port: DEFAULT_PORT,
            ttl: DEFAULT_TTL,
            tos: 0,
            hash_seed: 0,
            inner_csum_partial: false,
        }
    }
}

/// Where an encapsulated packet goes on the underlay: addresses of this
/// VTEP and the remote one, and the MACs of this host's underlay interface
/// and the next hop toward the remote VTEP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Underlay {
    /// Outer Ethernet source (this host's underlay interface).
    pub src_mac: MacAddr,
    /// Outer Ethernet destination (underlay next hop).
    pub dst_mac: MacAddr,
    /// Local VTEP address.
    pub src_ip: IpAddr,
    /// Remote VTEP address.
    pub dst_ip: IpAddr,
}

impl Underlay {
    /// An IPv4 underlay path.
    pub fn v4(src_mac: MacAddr, dst_mac: MacAddr, src_ip: Ipv4Addr, dst_ip: Ipv4Addr) -> Underlay {
        Underlay {
            src_mac,
            dst_mac,
            src_ip: IpAddr::V4(src_ip),
            dst_ip: IpAddr::V4(dst_ip),
        }
    }

    /// The underlay family; `None` when source and destination differ.
    pub fn family(&self) -> Option<Family> {
        match (self.src_ip, self.dst_ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) => Some(Family::V4),
            (IpAddr::V6(_), IpAddr::V6(_)) => Some(Family::V6),
            _ => None,
        }
    }
}

/// Why a frame was not encapsulated. Small and `Copy`: a drop reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncapError {
    /// Fewer than [`packet::HEADROOM`] bytes free in front of the frame.
    #[error("not enough headroom for the outer headers")]
    NoHeadroom,
    /// The outer IP packet would exceed 65535 bytes.
    #[error("encapsulated packet longer than 65535 bytes")]
    TooLong,
    /// Inner frame shorter than an Ethernet header.
    #[error("inner frame shorter than 14 bytes")]
    InnerTooShort,
    /// [`Encapsulator::encap`] got a GSO super-frame: use
    /// [`Encapsulator::encap_tunnel_gso`] or [`Encapsulator::encap_segments`].
    #[error("GSO super-frame given to encap")]
    GsoFrame,
    /// [`Encapsulator::encap_tunnel_gso`] got a frame without GSO.
    #[error("frame without GSO given to encap_tunnel_gso")]
    NotGso,
    /// The underlay is IPv6 (not implemented) or mixes families.
    #[error("IPv6 or mixed-family underlay not supported")]
    Ipv6Underlay,
    /// Software segmentation or checksum completion failed.
    #[error("software offload failed: {0}")]
    Gso(GsoError),
    /// A frame (or a UDP segment, whose size cannot change) does not fit
    /// the underlay MTU.
    #[error("frame does not fit the underlay MTU")]
    ExceedsMtu,
    /// A TCP super-frame's segments do not fit the underlay MTU, and cut to
    /// fit they would carry fewer than 8 payload bytes each.
    #[error("underlay MTU too small for the inner headers")]
    MtuTooSmall,
}

impl EncapError {
    /// Short stable name for counters.
    pub fn name(&self) -> &'static str {
        match self {
            EncapError::NoHeadroom => "vxlan_no_headroom",
            EncapError::TooLong => "vxlan_too_long",
            EncapError::InnerTooShort => "vxlan_inner_too_short",
            EncapError::GsoFrame => "vxlan_gso_frame",
            EncapError::NotGso => "vxlan_not_gso",
            EncapError::Ipv6Underlay => "vxlan_ipv6_underlay",
            EncapError::Gso(_) => "vxlan_offload_failed",
            EncapError::ExceedsMtu => "vxlan_exceeds_mtu",
            EncapError::MtuTooSmall => "vxlan_mtu_too_small",
        }
    }
}

/// What [`Encapsulator::encap`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncapInfo {
    /// Outer UDP source port chosen from the inner flow.
    pub src_port: u16,
    /// Bytes of outer headers prepended.
    pub outer_len: u16,
    /// The inner checksum is still pending (`buf.offload.csum`, shifted):
    /// the egress must accept partial checksums.
    pub inner_csum_partial: bool,
}

/// A super-frame encapsulated whole by [`Encapsulator::encap_tunnel_gso`].
///
/// The egress must do UDP tunnel segmentation (Linux `SKB_GSO_UDP_TUNNEL`,
/// virtio `VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4`): cut the inner frame at
/// `gso_size` bytes of inner L4 payload as for `inner_gso`, complete the
/// inner checksums (`buf.offload.csum` now starts past the outer headers),
/// and give every segment a copy of the outer headers with its own outer
/// IPv4 total length, ID and header checksum and UDP length; the outer UDP
/// checksum stays 0. [`packet::Offload`] has no flag for this, so the caller
/// must carry this value with the buffer to such an egress; any other egress
/// must not get the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelGso {
    /// Outer UDP source port chosen from the inner flow.
    pub src_port: u16,
    /// Bytes of outer headers prepended (the inner frame starts here).
    pub outer_len: u16,
    /// Inner segmentation (TCPv4, TCPv6 or UDP L4).
    pub inner_gso: GsoType,
    /// Inner payload bytes per segment.
    pub gso_size: u16,
}

/// Encapsulates frames for one worker (holds the outer IPv4 ID counter).
#[derive(Debug, Clone)]
pub struct Encapsulator {
    cfg: EncapConfig,
    ip_id: u16,
}

impl Encapsulator {
    /// An encapsulator with these settings.
    pub fn new(cfg: EncapConfig) -> Encapsulator {
        Encapsulator {
            cfg,
            // Start IDs at a seed-dependent place, not at 0 on every host.
            ip_id: (cfg.hash_seed >> 48) as u16,
        }
    }

    /// The settings.
    pub fn config(&self) -> &EncapConfig {
        &self.cfg
    }

    /// The outer UDP source port for a frame with this flow key.
    pub fn src_port(&self, key: &FlowKey) -> u16 {
        src_port_from_hash(flow_hash(key, self.cfg.hash_seed))
    }

    /// Encapsulates one non-GSO frame in place: `buf` then holds the outer
    /// frame. `key` is the inner frame's flow key (parsed once by the
    /// switch), used for the source port only.
    ///
    /// A pending inner checksum is completed here unless
    /// [`EncapConfig::inner_csum_partial`]; then it stays pending with
    /// `csum.start` moved past the outer headers. On error `buf` holds the
    /// inner frame (with its checksum possibly completed).
    pub fn encap(
        &mut self,
        buf: &mut PacketBuf,
        underlay: &Underlay,
        vni: Vni,
        key: &FlowKey,
    ) -> Result<EncapInfo, EncapError> {
        if buf.offload.is_gso() {
            return Err(EncapError::GsoFrame);
        }
        let (src, dst) = v4_addrs(underlay)?;
        outer_total_len(buf.len())?;
        if buf.offload.csum.is_some() && !self.cfg.inner_csum_partial {
            complete_checksum(buf).map_err(EncapError::Gso)?;
        }
        let sport = self.src_port(key);
        self.push_outer_v4(buf, underlay, src, dst, vni, sport)?;
        shift_offload(&mut buf.offload);
        Ok(EncapInfo {
            src_port: sport,
            outer_len: OUTER_V4_LEN as u16,
            inner_csum_partial: buf.offload.csum.is_some(),
        })
    }

    /// Encapsulates a TSO/USO super-frame whole, for an egress that does
    /// UDP tunnel segmentation (see [`TunnelGso`] for what it must do).
    /// `buf.offload` keeps the inner GSO type and size; `csum.start` and
    /// `hdr_len` move past the outer headers. A super-frame too long for
    /// one outer IPv4 packet gives [`EncapError::TooLong`]: use
    /// [`Encapsulator::encap_segments`] then.
    pub fn encap_tunnel_gso(
        &mut self,
        buf: &mut PacketBuf,
        underlay: &Underlay,
        vni: Vni,
        key: &FlowKey,
    ) -> Result<TunnelGso, EncapError> {
        let o = buf.offload;
        match o.gso {
            GsoType::None => return Err(EncapError::NotGso),
            GsoType::Ufo => return Err(EncapError::Gso(GsoError::Unsupported(GsoType::Ufo))),
            GsoType::TcpV4 | GsoType::TcpV6 | GsoType::UdpL4 => {}
        }
        if o.gso_size == 0 {
            return Err(EncapError::Gso(GsoError::ZeroGsoSize));
        }
        let (src, dst) = v4_addrs(underlay)?;
        let sport = self.src_port(key);
        self.push_outer_v4(buf, underlay, src, dst, vni, sport)?;
        shift_offload(&mut buf.offload);
        Ok(TunnelGso {
            src_port: sport,
            outer_len: OUTER_V4_LEN as u16,
            inner_gso: o.gso,
            gso_size: o.gso_size,
        })
    }

    /// Segments `buf` in software ([`packet::gso::segment`]) and hands one
    /// complete VXLAN packet per segment to `emit`, in order; returns how
    /// many. Every inner segment has complete IPv4 header and L4 checksums
    /// (the receiving VTEP has no partial-checksum metadata) and no offload
    /// is left on the emitted buffers.
    ///
    /// Every emitted packet fits `underlay_mtu` (outer IP packet length).
    /// A super-frame whose segments all fit as they are (its longest
    /// segment, headers + `gso_size` or the whole frame when shorter, fits:
    /// exactly when [`crate::mtu::check_mtu`] says
    /// [`MtuDecision::Fits`](crate::MtuDecision::Fits) over IPv4) is cut at
    /// `gso_size`, whatever its size. Otherwise a TCP super-frame is cut at
    /// a smaller MSS, as many payload bytes as fit (TCP allows any segment
    /// size up to the peer's MSS), or refused with
    /// [`EncapError::MtuTooSmall`] when fewer than 8 would; a UDP GSO frame
    /// cannot be cut smaller (datagram boundaries) and, like a non-GSO frame
    /// that does not fit, gives [`EncapError::ExceedsMtu`]. A frame without
    /// GSO is emitted once (checksum completed).
    ///
    /// `buf` is left as it was. One scratch buffer is allocated per call
    /// (slow path).
    #[allow(clippy::too_many_arguments)]
    pub fn encap_segments(
        &mut self,
        buf: &mut PacketBuf,
        underlay: &Underlay,
        vni: Vni,
        key: &FlowKey,
        underlay_mtu: u16,
        mut emit: impl FnMut(&PacketBuf),
    ) -> Result<usize, EncapError> {
        let (src, dst) = v4_addrs(underlay)?;
        let overhead = Family::V4.ip_overhead();
        let room = usize::from(underlay_mtu).saturating_sub(overhead);
        let saved = buf.offload;
        let mss = match saved.gso {
            GsoType::None => {
                if buf.len() > room {
                    return Err(EncapError::ExceedsMtu);
                }
                0
            }
            GsoType::Ufo => return Err(EncapError::Gso(GsoError::Unsupported(GsoType::Ufo))),
            // Every segment fits as it is: exactly when `check_mtu` says
            // `Fits` (same size, `largest_segment`). No clamping then, even
            // for a `gso_size` or a room below `MIN_CLAMPED_MSS`.
            _ if largest_segment(buf.frame(), key, saved.gso_size) <= room => {
                usize::from(saved.gso_size)
            }
            GsoType::UdpL4 => return Err(EncapError::ExceedsMtu),
            GsoType::TcpV4 | GsoType::TcpV6 => {
                // Here headers + gso_size > room, so max < gso_size.
                let max = room.saturating_sub(inner_hdr_len(buf.frame(), key));
                if max < MIN_CLAMPED_MSS {
                    return Err(EncapError::MtuTooSmall);
                }
                max
            }
        };
        if saved.is_gso() {
            // mss <= saved.gso_size, so it fits in u16.
            buf.offload.gso_size = u16::try_from(mss).unwrap_or(saved.gso_size);
        }
        let sport = self.src_port(key);
        let mut scratch = PacketBuf::with_capacity(buf.len().max(64));
        let mut failed = None;
        let r = segment(buf, |seg| {
            if failed.is_some() {
                return;
            }
            if seg.len() > room || !scratch.replace_frame(seg) {
                failed = Some(EncapError::ExceedsMtu);
                return;
            }
            scratch.offload = Offload::NONE;
            match self.push_outer_v4(&mut scratch, underlay, src, dst, vni, sport) {
                Ok(()) => emit(&scratch),
                Err(e) => failed = Some(e),
            }
        });
        buf.offload = saved;
        let n = r.map_err(EncapError::Gso)?;
        match failed {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    fn push_outer_v4(
        &mut self,
        buf: &mut PacketBuf,
        u: &Underlay,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        vni: Vni,
        sport: u16,
    ) -> Result<(), EncapError> {
        let inner = buf.len();
        if inner < ETH_HLEN {
            return Err(EncapError::InnerTooShort);
        }
        let total = outer_total_len(inner)?;
        let hdr = outer_v4(u, src, dst, &self.cfg, self.ip_id, sport, vni, total);
        let front = buf.push_front(OUTER_V4_LEN).ok_or(EncapError::NoHeadroom)?;
        front.copy_from_slice(&hdr);
        self.ip_id = self.ip_id.wrapping_add(1);
        Ok(())
    }
}

/// TCP super-frames are not cut below this many payload bytes per segment.
const MIN_CLAMPED_MSS: usize = 8;

fn v4_addrs(u: &Underlay) -> Result<(Ipv4Addr, Ipv4Addr), EncapError> {
    match (u.src_ip, u.dst_ip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ok((s, d)),
        _ => Err(EncapError::Ipv6Underlay),
    }
}

/// Outer IPv4 total length for an inner frame of `inner` bytes.
fn outer_total_len(inner: usize) -> Result<u16, EncapError> {
    u16::try_from(IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + inner).map_err(|_| EncapError::TooLong)
}

/// Moves checksum start and header length past the outer headers.
fn shift_offload(o: &mut Offload) {
    let n = OUTER_V4_LEN as u16;
    if let Some(c) = o.csum.as_mut() {
        c.start = c.start.saturating_add(n);
    }
    if o.hdr_len != 0 {
        o.hdr_len = o.hdr_len.saturating_add(n);
    }
}

/// The longest inner frame a segment of the super-frame `frame` (flow key
/// `key`) can be: inner headers ([`inner_hdr_len`]) plus `gso_size`, or the
/// whole frame when that is shorter (a last or only segment below
/// `gso_size`); the whole frame when the key has no TCP/UDP header. Both
/// [`crate::mtu::check_mtu`] and [`Encapsulator::encap_segments`] size a
/// super-frame with this, so they agree on what fits.
pub(crate) fn largest_segment(frame: &[u8], key: &FlowKey, gso_size: u16) -> usize {
    (inner_hdr_len(frame, key) + usize::from(gso_size)).min(frame.len())
}

/// Inner Ethernet + IP + L4 header length (TCP data offset read from the
/// frame, at least 20); the whole frame when the key has no TCP/UDP.
fn inner_hdr_len(frame: &[u8], key: &FlowKey) -> usize {
    let l4 = usize::from(key.l4_offset);
    match key.l4 {
        L4::Tcp { .. } => {
            let doff = frame.get(l4 + 12).map_or(20, |b| usize::from(b >> 4) * 4);
            l4 + doff.max(20)
        }
        L4::Udp { .. } => l4 + UDP_HLEN,
        _ => frame.len(),
    }
}

/// The 50 bytes of outer headers.
#[allow(clippy::too_many_arguments)]
fn outer_v4(
    u: &Underlay,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    cfg: &EncapConfig,
    id: u16,
    sport: u16,
    vni: Vni,
    total: u16,
) -> [u8; OUTER_V4_LEN] {
    let mut h = [0u8; OUTER_V4_LEN];
    // Ethernet
    h[0..6].copy_from_slice(&u.dst_mac.octets());
    h[6..12].copy_from_slice(&u.src_mac.octets());
    h[12..14].copy_from_slice(&ethertype::IPV4.to_be_bytes());
    // IPv4
    let ip = ETH_HLEN;
    h[ip] = 0x45;
    h[ip + 1] = cfg.tos;
    h[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
    h[ip + 4..ip + 6].copy_from_slice(&id.to_be_bytes());
    h[ip + 6] = 0x40; // DF, fragment offset 0
    h[ip + 8] = cfg.ttl;
    h[ip + 9] = proto::UDP;
    h[ip + 12..ip + 16].copy_from_slice(&src.octets());
    h[ip + 16..ip + 20].copy_from_slice(&dst.octets());
    let c = checksum(&h[ip..ip + IPV4_HLEN]);
    h[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
    // UDP (checksum 0: none, RFC 7348 section 5)
    let udp = ip + IPV4_HLEN;
    let ulen = total - IPV4_HLEN as u16;
    h[udp..udp + 2].copy_from_slice(&sport.to_be_bytes());
    h[udp + 2..udp + 4].copy_from_slice(&cfg.dst_port.to_be_bytes());
    h[udp + 4..udp + 6].copy_from_slice(&ulen.to_be_bytes());
    // VXLAN: flags (I), 24 reserved bits, VNI, 8 reserved bits
    let vx = udp + UDP_HLEN;
    h[vx] = FLAG_I;
    h[vx + 4..vx + 7].copy_from_slice(&vni.to_bytes());
    h
}

#[inline]
fn mix(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29)
}

#[inline]
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn ip_words(a: IpAddr) -> (u64, u64) {
    match a {
        IpAddr::V4(a) => (u64::from(u32::from(a)), 0),
        IpAddr::V6(a) => {
            let v = u128::from(a);
            ((v >> 64) as u64, v as u64)
        }
    }
}

/// Hash of the inner flow: IP addresses, protocol and ports for IP frames
/// (ports 0 for other protocols and later fragments), MACs, EtherType and
/// VLAN otherwise. Same flow, same hash; `seed` makes it host specific.
pub fn flow_hash(key: &FlowKey, seed: u64) -> u32 {
    let mut h = mix(0x243f_6a88_85a3_08d3, seed);
    match key.ip() {
        Some(ip) => {
            let (s1, s2) = ip_words(ip.src);
            let (d1, d2) = ip_words(ip.dst);
            let (sp, dp) = key.ports().unwrap_or((0, 0));
            h = mix(h, s1);
            h = mix(h, s2);
            h = mix(h, d1);
            h = mix(h, d2);
            h = mix(
                h,
                u64::from(ip.proto) << 32 | u64::from(sp) << 16 | u64::from(dp),
            );
        }
        None => {
            let mac = |m: MacAddr| {
                let o = m.octets();
                u64::from_be_bytes([0, 0, o[0], o[1], o[2], o[3], o[4], o[5]])
            };
            h = mix(h, mac(key.src_mac));
            h = mix(h, mac(key.dst_mac));
            h = mix(
                h,
                u64::from(key.ethertype) << 32 | u64::from(key.vlan.unwrap_or(0xffff)),
            );
        }
    }
    let f = fmix64(h);
    (f >> 32) as u32 ^ f as u32
}

/// Maps a flow hash onto the source ports 49152-65535 (multiply-shift, as
/// Linux's `udp_flow_src_port` scales `hash` into the port range).
pub fn src_port_from_hash(hash: u32) -> u16 {
    let span = u64::from(crate::SRC_PORT_MAX - SRC_PORT_MIN) + 1;
    SRC_PORT_MIN + ((u64::from(hash) * span) >> 32) as u16
}
