//! Userspace GRO (generic receive offload): the inverse of [`crate::gso`].
//!
//! What: consecutive in-order TCP segments of one flow, offered one wire
//! frame at a time with [`Gro::push`], are merged into one TSO super-frame
//! (first segment's headers + all payloads, up to 64 KB) carrying
//! [`Offload`] metadata (`gso` TcpV4/TcpV6, `gso_size` = MSS, partial
//! checksum) that a tap opened with `IFF_VNET_HDR` takes as is. Everything
//! else is handed back unchanged with [`Offload::NONE`].
//!
//! Why: frames decapsulated from the VXLAN underlay are wire-sized; writing
//! each to a tap costs about 1.2 µs, while one 64 KB super-frame costs about
//! 3.8 µs. Merging a receive batch of one TCP flow therefore cuts the tap
//! write cost several times over.
//!
//! Rules (Linux `inet_gro_receive` / `ipv6_gro_receive` / `tcp_gro_receive`,
//! adapted to a sans-IO batch):
//!
//! * coalescable: Ethernet, untagged or one 802.1Q tag (TPID 0x8100; QinQ
//!   and 802.1ad frames pass through), IPv4 with IHL 5 and not a fragment or
//!   IPv6 without extension headers, no Ethernet padding after the IP packet,
//!   TCP with flags exactly ACK or ACK|PSH and a non-empty payload;
//! * a segment joins a held super-frame when the L2 header, IP header (but
//!   the lengths, IPv4 ID and checksum), TCP ports, ack number, data offset,
//!   flags (but PSH), window, urgent pointer and options are byte-identical,
//!   its sequence number follows the held data, its payload is no longer
//!   than the first segment's (the MSS), and the result stays within 65535
//!   bytes of IP length and [`MAX_SEGMENTS`] segments. IPv4 IDs must
//!   increase by one per segment, or (DF set) stay fixed; the virtio-net
//!   header cannot say "fixed", so such a super-frame is re-segmented with
//!   incrementing IDs (harmless with DF, RFC 6864);
//! * a segment with PSH, or shorter than the MSS, is appended and then
//!   closes the super-frame (it is emitted at once);
//! * each coalescable segment's TCP checksum (and IPv4 header checksum) is
//!   verified before it is held: the underlay (VXLAN over UDP, checksum 0)
//!   protects nothing, and the emitted super-frame's checksum is recomputed
//!   by whoever segments it, so corruption would otherwise be laundered. A
//!   segment failing verification is passed through unchanged (the guest
//!   drops it) after its flow's held data, and counted.
//!
//! A flow is identified by its MAC addresses, VLAN, IP addresses and TCP
//! ports (direction matters). Order within a flow is preserved: a frame of a
//! flow with held data that cannot join it (non-contiguous, other flags, a
//! failed checksum, ...) is emitted only after the held super-frame. Frames
//! without a TCP flow (UDP, ARP, junk) pass through at once, so they may
//! overtake held TCP data of other flows, as in Linux.
//!
//! The emitted super-frame is what a guest's TSO frame looks like: the IPv4
//! total length / IPv6 payload length and IPv4 header checksum cover the
//! whole frame, the TCP checksum field holds the folded, uncomplemented
//! pseudo-header sum, and its [`Offload`] says where to complete it, so
//! [`crate::gso::segment`] (or the kernel behind a tap) gives back the
//! original segments. Write it to a tap as `(buf.offload, buf.frame())`;
//! an egress that cannot take it ([`crate::OffloadCaps::accepts`]) falls
//! back to [`crate::gso::segment`] as for any TSO frame.
//!
//! Memory is bounded: `max_flows` slots of one [`PacketBuf`] of
//! [`MAX_FRAME`] bytes each, plus one scratch buffer for pass-through
//! frames, all allocated in [`Gro::new`] and reused. Never panics on input.

use std::net::IpAddr;

use crate::buf::{PacketBuf, MAX_FRAME};
use crate::checksum::{add, fold, pseudo_header_v4, pseudo_header_v6, sum, verify};
use crate::flow::{ethertype, proto, tcp_flags, FlowKey, Frag, L3, L4};
use crate::mac::MacAddr;
use crate::offload::{CsumOffload, GsoType, Offload};

/// Most segments merged into one super-frame (Linux's `UDP_MAX_SEGMENTS`;
/// with a 1448-byte MSS the 65535-byte IP limit binds first, at 45).
pub const MAX_SEGMENTS: usize = 64;

/// Largest IPv4 total length / IPv6 payload length of a super-frame.
const MAX_IP_LEN: usize = 65_535;

/// Offset of the TCP checksum field in the TCP header.
const TCP_CSUM_OFFSET: u16 = 16;

/// Counters of a [`Gro`].
///
/// After [`Gro::flush`]:
/// `frames_in == frames_merged + passed_through + dropped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct GroStats {
    /// Frames offered to [`Gro::push`].
    pub frames_in: u64,
    /// Super-frames (two or more segments) emitted.
    pub superframes_out: u64,
    /// Input frames that left inside a super-frame (counted on emission).
    pub frames_merged: u64,
    /// Input frames emitted unchanged: not coalescable, failed checksum,
    /// or held alone and never joined by a second segment.
    pub passed_through: u64,
    /// Coalescable-looking TCP segments whose TCP or IPv4 header checksum
    /// did not verify (also counted in `passed_through`).
    pub csum_failures: u64,
    /// Held super-frames emitted early because every slot was taken.
    pub evictions: u64,
    /// Frames dropped: longer than [`MAX_FRAME`] (a [`PacketBuf`] cannot
    /// hold them; never seen from a 1500-byte underlay).
    pub dropped: u64,
}

/// Identity of a flow for ordering and merging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowId {
    src_mac: MacAddr,
    dst_mac: MacAddr,
    vlan: Option<u16>,
    inner_vlan: Option<u16>,
    src: IpAddr,
    dst: IpAddr,
    src_port: u16,
    dst_port: u16,
}

/// A coalescable TCP segment, its IPv4 header checksum verified. Its TCP
/// checksum is checked where the payload is read anyway: while it is copied
/// into a held super-frame, else on its own ([`Seg::payload_ok`]).
#[derive(Debug, Clone, Copy)]
struct Seg<'a> {
    flow: FlowId,
    v6: bool,
    l3: usize,
    l4: usize,
    hdr_len: usize,
    seq: u32,
    psh: bool,
    df: bool,
    ip_id: u16,
    payload: &'a [u8],
    /// Pseudo-header and TCP header sum (set by [`classify`]).
    hdr_sum: u64,
}

impl Seg<'_> {
    /// Whether the TCP checksum verifies, given the payload's sum.
    fn payload_ok(&self, payload_sum: u64) -> bool {
        fold(add(self.hdr_sum, payload_sum)) == 0xffff
    }
}

/// What a frame is to GRO.
enum Class<'a> {
    /// No TCP flow (not TCP over IP, a later fragment, unparsable).
    Other,
    /// TCP that cannot be merged: flush its flow, then pass it through.
    Tcp(FlowId),
    /// Would be coalescable, but a header checksum does not verify.
    BadCsum(FlowId),
    /// Coalescable, TCP checksum still to verify.
    Seg(Seg<'a>),
}

fn be16(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(i..i + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?))
}

fn put16(b: &mut [u8], i: usize, v: u16) {
    if let Some(s) = b.get_mut(i..i + 2) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// `a[r] == b[r]`, false when either is too short.
fn same(a: &[u8], b: &[u8], r: std::ops::Range<usize>) -> bool {
    match (a.get(r.clone()), b.get(r)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

fn pseudo(src: IpAddr, dst: IpAddr, l4_len: usize) -> Option<u64> {
    Some(match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo_header_v4(s, d, proto::TCP, u16::try_from(l4_len).ok()?)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo_header_v6(&s, &d, proto::TCP, u32::try_from(l4_len).ok()?)
        }
        _ => return None,
    })
}

fn classify(frame: &[u8]) -> Class<'_> {
    let Ok(key) = FlowKey::parse(frame) else {
        return Class::Other;
    };
    let (
        L4::Tcp {
            src_port,
            dst_port,
            flags,
        },
        Some(ip),
    ) = (key.l4, key.ip())
    else {
        return Class::Other;
    };
    let flow = FlowId {
        src_mac: key.src_mac,
        dst_mac: key.dst_mac,
        vlan: key.vlan,
        inner_vlan: key.inner_vlan,
        src: ip.src,
        dst: ip.dst,
        src_port,
        dst_port,
    };
    let Some(seg) = coalescable(frame, &key, flow, flags) else {
        return Class::Tcp(flow);
    };
    match header_sum(frame, &seg) {
        Some(hdr_sum) => Class::Seg(Seg { hdr_sum, ..seg }),
        None => Class::BadCsum(flow),
    }
}

/// The segment, if its headers allow merging (checksums not yet checked).
fn coalescable<'a>(frame: &'a [u8], key: &FlowKey, flow: FlowId, flags: u8) -> Option<Seg<'a>> {
    if flags & !tcp_flags::PSH != tcp_flags::ACK {
        return None;
    }
    let l3 = usize::from(key.l3_offset);
    let l4 = usize::from(key.l4_offset);
    // Untagged, or exactly one 802.1Q tag.
    match l3 {
        14 => {}
        18 if be16(frame, 12)? == ethertype::VLAN && key.inner_vlan.is_none() => {}
        _ => return None,
    }
    let (v6, ip) = match key.l3 {
        L3::Ipv4(ip) => (false, ip),
        L3::Ipv6(ip) => (true, ip),
        _ => return None,
    };
    if ip.frag != Frag::None {
        return None;
    }
    let (ip_end, ip_id, df) = if v6 {
        if l4 != l3 + 40 {
            return None; // extension headers
        }
        (l3 + 40 + usize::from(be16(frame, l3 + 4)?), 0, false)
    } else {
        if *frame.get(l3)? != 0x45 || l4 != l3 + 20 {
            return None; // IPv4 options
        }
        let frag = be16(frame, l3 + 6)?;
        (
            l3 + usize::from(be16(frame, l3 + 2)?),
            be16(frame, l3 + 4)?,
            frag & 0x4000 != 0,
        )
    };
    // Ethernet padding would be lost on merging (Linux does not merge
    // such frames either).
    if ip_end != frame.len() {
        return None;
    }
    let hdr_len = l4 + usize::from(*frame.get(l4 + 12)? >> 4) * 4;
    let payload = frame.get(hdr_len..)?;
    if payload.is_empty() {
        return None;
    }
    Some(Seg {
        flow,
        v6,
        l3,
        l4,
        hdr_len,
        seq: be32(frame, l4 + 4)?,
        psh: flags & tcp_flags::PSH != 0,
        df,
        ip_id,
        payload,
        hdr_sum: 0,
    })
}

/// The sum of the TCP pseudo header and TCP header (a multiple of 4 bytes,
/// so the payload's sum adds to it), or `None` if the IPv4 header checksum
/// does not verify.
fn header_sum(frame: &[u8], seg: &Seg<'_>) -> Option<u64> {
    if !seg.v6 && !frame.get(seg.l3..seg.l4).is_some_and(verify) {
        return None;
    }
    let tcp_len = frame.len().checked_sub(seg.l4)?;
    let hdr = frame.get(seg.l4..seg.hdr_len)?;
    Some(add(pseudo(seg.flow.src, seg.flow.dst, tcp_len)?, sum(hdr)))
}

/// State of a held super-frame (its bytes are in the slot's buffer).
#[derive(Debug, Clone, Copy)]
struct Held {
    flow: FlowId,
    /// Start order, for evicting and flushing oldest first.
    born: u64,
    v6: bool,
    l3: usize,
    l4: usize,
    hdr_len: usize,
    /// First segment's payload length.
    mss: usize,
    /// Largest total payload the limits allow.
    max_payload: usize,
    /// Payload bytes held.
    total: usize,
    segs: usize,
    next_seq: u32,
    first_id: u16,
    /// IPv4 IDs stay fixed (DF set) instead of incrementing; decided by the
    /// second segment.
    fixed_id: bool,
    /// The last segment had PSH.
    psh: bool,
    /// The last segment was shorter than the MSS.
    short: bool,
}

impl Held {
    fn start(seg: &Seg<'_>, born: u64) -> Held {
        let ip_hdrs = seg.hdr_len - seg.l3 - if seg.v6 { 40 } else { 0 };
        let max_payload = MAX_IP_LEN
            .saturating_sub(ip_hdrs)
            .min(MAX_FRAME.saturating_sub(seg.hdr_len));
        Held {
            flow: seg.flow,
            born,
            v6: seg.v6,
            l3: seg.l3,
            l4: seg.l4,
            hdr_len: seg.hdr_len,
            mss: seg.payload.len(),
            max_payload,
            total: seg.payload.len(),
            segs: 1,
            next_seq: seg.seq.wrapping_add(seg.payload.len() as u32),
            first_id: seg.ip_id,
            fixed_id: false,
            psh: seg.psh,
            short: false,
        }
    }

    /// True when nothing more can join: PSH, a short segment, or the limits.
    fn closed(&self) -> bool {
        self.psh
            || self.short
            || self.segs >= MAX_SEGMENTS
            || self.total + self.mss > self.max_payload
    }

    /// Whether `seg` (from `frame`) may be appended to the held bytes `held`;
    /// the IPv4 ID mode it implies.
    fn accepts(&self, held: &[u8], frame: &[u8], seg: &Seg<'_>) -> Option<bool> {
        let (l3, l4, h) = (self.l3, self.l4, self.hdr_len);
        let ok = seg.flow == self.flow
            && (seg.v6, seg.l3, seg.l4, seg.hdr_len) == (self.v6, l3, l4, h)
            && seg.seq == self.next_seq
            && seg.payload.len() <= self.mss
            && self.total + seg.payload.len() <= self.max_payload
            && self.segs < MAX_SEGMENTS
            && !self.closed()
            && same(held, frame, 0..l3)
            && if self.v6 {
                // version, traffic class, flow label; next header, hop
                // limit, addresses
                same(held, frame, l3..l3 + 4) && same(held, frame, l3 + 6..l4)
            } else {
                // version/IHL, TOS; DF/MF/offset, TTL, protocol; addresses
                same(held, frame, l3..l3 + 2)
                    && same(held, frame, l3 + 6..l3 + 10)
                    && same(held, frame, l3 + 12..l4)
            }
            // ports; ack, data offset/reserved; window; urgent pointer and
            // options (flags are ACK or ACK|PSH, checked by `coalescable`)
            && same(held, frame, l4..l4 + 4)
            && same(held, frame, l4 + 8..l4 + 13)
            && same(held, frame, l4 + 14..l4 + 16)
            && same(held, frame, l4 + 18..h);
        if !ok {
            return None;
        }
        if self.v6 {
            return Some(false);
        }
        let n = self.segs as u16; // < MAX_SEGMENTS
        if self.segs == 1 {
            if seg.ip_id == self.first_id.wrapping_add(1) {
                Some(false)
            } else if seg.df && seg.ip_id == self.first_id {
                Some(true)
            } else {
                None
            }
        } else if self.fixed_id {
            (seg.ip_id == self.first_id).then_some(true)
        } else {
            (seg.ip_id == self.first_id.wrapping_add(n)).then_some(false)
        }
    }
}

#[derive(Debug)]
struct Slot {
    buf: PacketBuf,
    held: Option<Held>,
}

/// A bounded set of in-progress TCP super-frames; see the module docs.
///
/// Use one per receive batch consumer (e.g. per worker), call
/// [`Gro::push`] for every frame of the batch and [`Gro::flush`] at its end;
/// the emitted [`PacketBuf`] is only valid during the callback (copy or
/// write it there).
#[derive(Debug)]
pub struct Gro {
    slots: Vec<Slot>,
    scratch: PacketBuf,
    clock: u64,
    stats: GroStats,
}

impl Gro {
    /// `max_flows`: in-progress super-frames held at once (e.g. 8), at least
    /// 1; when a new flow arrives and all slots are taken, the oldest is
    /// emitted. Allocates `max_flows + 1` buffers of [`MAX_FRAME`] bytes
    /// (zeroed lazily by the OS).
    pub fn new(max_flows: usize) -> Gro {
        Gro {
            slots: (0..max_flows.max(1))
                .map(|_| Slot {
                    buf: PacketBuf::new(),
                    held: None,
                })
                .collect(),
            scratch: PacketBuf::new(),
            clock: 0,
            stats: GroStats::default(),
        }
    }

    /// Offers one complete wire frame. If it can be merged into a held
    /// super-frame of the same flow it is appended; otherwise any held
    /// super-frame of the same flow is emitted first (order within a flow is
    /// preserved), and the frame either starts a new held super-frame (if it
    /// is a coalescable TCP segment) or is emitted at once unchanged with
    /// [`Offload::NONE`]. A segment with PSH or shorter than the MSS closes
    /// its super-frame, which is emitted at once.
    pub fn push(&mut self, frame: &[u8], emit: &mut dyn FnMut(&PacketBuf)) {
        self.stats.frames_in += 1;
        match classify(frame) {
            Class::Other => self.pass(frame, emit),
            Class::Tcp(flow) => {
                self.flush_flow(&flow, emit);
                self.pass(frame, emit);
            }
            Class::BadCsum(flow) => self.bad_csum(&flow, frame, emit),
            Class::Seg(seg) => self.offer(frame, &seg, emit),
        }
    }

    /// Emits everything held, oldest first (call at the end of each receive
    /// batch).
    pub fn flush(&mut self, emit: &mut dyn FnMut(&PacketBuf)) {
        while let Some(i) = self.oldest() {
            emit_slot(&mut self.slots[i], &mut self.stats, emit);
        }
    }

    /// Counters: frames in, super-frames out, frames merged, frames passed
    /// through, checksum failures (and evictions, drops).
    pub fn stats(&self) -> GroStats {
        self.stats
    }

    /// Number of input frames currently held (not yet emitted).
    pub fn held_frames(&self) -> usize {
        self.slots
            .iter()
            .filter_map(|s| s.held.as_ref())
            .map(|h| h.segs)
            .sum()
    }

    /// A segment whose TCP or IPv4 header checksum fails: its flow's held
    /// data goes first, then the segment unchanged.
    fn bad_csum(&mut self, flow: &FlowId, frame: &[u8], emit: &mut dyn FnMut(&PacketBuf)) {
        self.stats.csum_failures += 1;
        self.flush_flow(flow, emit);
        self.pass(frame, emit);
    }

    fn offer(&mut self, frame: &[u8], seg: &Seg<'_>, emit: &mut dyn FnMut(&PacketBuf)) {
        let found = self
            .slots
            .iter()
            .position(|s| s.held.as_ref().is_some_and(|h| h.flow == seg.flow));
        if let Some(i) = found {
            let slot = &mut self.slots[i];
            if let Some(h) = slot.held.as_mut() {
                if let Some(fixed_id) = h.accepts(slot.buf.frame(), frame, seg) {
                    // Copy the payload and sum it in one pass; the held
                    // frame only keeps it if the checksum verifies.
                    let held_len = slot.buf.len();
                    if let Some(payload_sum) = slot.buf.append_summed(seg.payload) {
                        if !seg.payload_ok(payload_sum) {
                            slot.buf.truncate(held_len);
                            self.bad_csum(&seg.flow, frame, emit);
                            return;
                        }
                        h.fixed_id = fixed_id;
                        h.segs += 1;
                        h.total += seg.payload.len();
                        h.next_seq = h.next_seq.wrapping_add(seg.payload.len() as u32);
                        h.psh = seg.psh;
                        h.short = seg.payload.len() < h.mss;
                        if h.closed() {
                            emit_slot(slot, &mut self.stats, emit);
                        }
                        return;
                    }
                }
            }
        }
        // Not merged: a failing segment is passed through, never held.
        if !seg.payload_ok(sum(seg.payload)) {
            self.bad_csum(&seg.flow, frame, emit);
            return;
        }
        if let Some(i) = found {
            emit_slot(&mut self.slots[i], &mut self.stats, emit);
        }
        self.clock += 1;
        let held = Held::start(seg, self.clock);
        if held.closed() {
            // Nothing could join it: no need to hold it.
            self.pass(frame, emit);
            return;
        }
        let i = match found.or_else(|| self.slots.iter().position(|s| s.held.is_none())) {
            Some(i) => i,
            None => {
                let Some(i) = self.oldest() else {
                    self.pass(frame, emit);
                    return;
                };
                self.stats.evictions += 1;
                emit_slot(&mut self.slots[i], &mut self.stats, emit);
                i
            }
        };
        let slot = &mut self.slots[i];
        if slot.buf.replace_frame(frame) {
            slot.held = Some(held);
        } else {
            self.pass(frame, emit);
        }
    }

    fn flush_flow(&mut self, flow: &FlowId, emit: &mut dyn FnMut(&PacketBuf)) {
        for slot in &mut self.slots {
            if slot.held.as_ref().is_some_and(|h| h.flow == *flow) {
                emit_slot(slot, &mut self.stats, emit);
            }
        }
    }

    fn oldest(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.held.as_ref().map(|h| (h.born, i)))
            .min()
            .map(|(_, i)| i)
    }

    fn pass(&mut self, frame: &[u8], emit: &mut dyn FnMut(&PacketBuf)) {
        if self.scratch.replace_frame(frame) {
            self.scratch.offload = Offload::NONE;
            self.stats.passed_through += 1;
            emit(&self.scratch);
        } else {
            self.stats.dropped += 1;
        }
    }
}

/// Emits a held slot (if any) and frees it: a lone segment unchanged, two or
/// more as a TSO super-frame.
fn emit_slot(slot: &mut Slot, stats: &mut GroStats, emit: &mut dyn FnMut(&PacketBuf)) {
    let Some(h) = slot.held.take() else {
        return;
    };
    if h.segs == 1 {
        slot.buf.offload = Offload::NONE;
        stats.passed_through += 1;
    } else if finish(&mut slot.buf, &h) {
        stats.superframes_out += 1;
        stats.frames_merged += h.segs as u64;
    } else {
        // Unreachable: `Held::max_payload` bounds every length. Drop rather
        // than emit inconsistent headers.
        stats.dropped += h.segs as u64;
        return;
    }
    emit(&slot.buf);
}

/// Rewrites the held first segment's headers for the merged payload and
/// sets the TSO offload. False, with the frame untouched, if a length does
/// not fit (never, as `Held::max_payload` bounds them).
fn finish(buf: &mut PacketBuf, h: &Held) -> bool {
    let l4_len = h.hdr_len - h.l4 + h.total;
    let Some(partial) = pseudo(h.flow.src, h.flow.dst, l4_len) else {
        return false;
    };
    let (Ok(hdr_len), Ok(gso_size), Ok(start)) = (
        u16::try_from(h.hdr_len),
        u16::try_from(h.mss),
        u16::try_from(h.l4),
    ) else {
        return false;
    };
    let f = buf.frame_mut();
    if h.v6 {
        let Ok(plen) = u16::try_from(h.l4 - h.l3 - 40 + l4_len) else {
            return false;
        };
        put16(f, h.l3 + 4, plen);
    } else {
        let Ok(total) = u16::try_from(h.l4 - h.l3 + l4_len) else {
            return false;
        };
        put16(f, h.l3 + 2, total);
        put16(f, h.l3 + 10, 0);
        let c = !fold(sum(f.get(h.l3..h.l4).unwrap_or_default()));
        put16(f, h.l3 + 10, c);
    }
    if h.psh {
        if let Some(b) = f.get_mut(h.l4 + 13) {
            *b |= tcp_flags::PSH;
        }
    }
    put16(f, h.l4 + usize::from(TCP_CSUM_OFFSET), fold(partial));
    buf.offload = Offload {
        gso: if h.v6 { GsoType::TcpV6 } else { GsoType::TcpV4 },
        ecn: false,
        gso_size,
        hdr_len,
        csum: Some(CsumOffload {
            start,
            offset: TCP_CSUM_OFFSET,
        }),
        data_valid: false,
    };
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::tests::mutated_frame;
    use crate::gso::{complete_checksum, segment};
    use etherparse::{PacketBuilder, VlanId};
    use proptest::prelude::*;
    use std::collections::HashSet;

    /// A flow's header fields.
    #[derive(Debug, Clone)]
    struct P {
        v6: bool,
        vlan: Option<u16>,
        /// Distinguishes flows (MACs, addresses, source port).
        n: u8,
        ack: u32,
        window: u16,
        /// Raw TCP options, a multiple of 4 bytes.
        opts: Vec<u8>,
        ttl: u8,
        tos: u8,
        df: bool,
    }

    impl Default for P {
        fn default() -> P {
            P {
                v6: false,
                vlan: None,
                n: 1,
                ack: 77,
                window: 512,
                // NOP NOP timestamps
                opts: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
                ttl: 64,
                tos: 0,
                df: true,
            }
        }
    }

    const ACK: u8 = tcp_flags::ACK;
    const PSH: u8 = tcp_flags::PSH;

    /// Stream bytes: the same sequence number always carries the same byte.
    fn data(seq: u32, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (seq.wrapping_add(i as u32) % 251) as u8)
            .collect()
    }

    /// Recomputes the IPv4 header and TCP checksums of a frame built here.
    fn fix_checksums(f: &mut [u8]) {
        let k = FlowKey::parse(f).unwrap();
        let (l3, l4) = (usize::from(k.l3_offset), usize::from(k.l4_offset));
        let ip = *k.ip().unwrap();
        if !ip.src.is_ipv6() {
            put16(f, l3 + 10, 0);
            let c = !fold(sum(&f[l3..l4]));
            put16(f, l3 + 10, c);
        }
        put16(f, l4 + 16, 0);
        let p = pseudo(ip.src, ip.dst, f.len() - l4).unwrap();
        let c = !fold(add(p, sum(&f[l4..])));
        put16(f, l4 + 16, c);
    }

    /// One frame of flow `p` (checksums valid) with `payload`, sequence
    /// number `seq`, TCP flags `flags` and IPv4 ID `id`.
    fn frame(p: &P, seq: u32, payload: &[u8], flags: u8, id: u16) -> Vec<u8> {
        let n = p.n;
        let eth = PacketBuilder::ethernet2([0x0a, 0, 0, 0, 1, n], [0x0a, 0, 0, 0, 2, n]);
        let mut f = Vec::new();
        macro_rules! ip {
            ($step:expr) => {
                if p.v6 {
                    let mut a = [0xfd; 16];
                    a[15] = n;
                    let mut b = a;
                    b[14] = 2;
                    $step
                        .ipv6(a, b, p.ttl)
                        .tcp(1000 + u16::from(n), 80, seq, p.window)
                        .ack(p.ack)
                        .options_raw(&p.opts)
                        .unwrap()
                        .write(&mut f, payload)
                } else {
                    $step
                        .ipv4([10, 0, 1, n], [10, 0, 2, n], p.ttl)
                        .tcp(1000 + u16::from(n), 80, seq, p.window)
                        .ack(p.ack)
                        .options_raw(&p.opts)
                        .unwrap()
                        .write(&mut f, payload)
                }
            };
        }
        match p.vlan {
            Some(v) => ip!(eth.single_vlan(VlanId::try_new(v).unwrap())),
            None => ip!(eth),
        }
        .unwrap();
        let l3 = if p.vlan.is_some() { 18 } else { 14 };
        let l4 = l3 + if p.v6 { 40 } else { 20 };
        if p.v6 {
            f[l3] = 0x60 | (p.tos >> 4);
            f[l3 + 1] = (f[l3 + 1] & 0x0f) | (p.tos << 4);
        } else {
            f[l3 + 1] = p.tos;
            put16(&mut f, l3 + 4, id);
            f[l3 + 6] = if p.df { 0x40 } else { 0 };
        }
        f[l4 + 13] = flags;
        fix_checksums(&mut f);
        f
    }

    /// Wire segments of `len` stream bytes from `seq` with payloads of
    /// `mss`, cut by `gso::segment` from one TSO super-frame whose flags are
    /// ACK plus `last_flags` (kept by `segment` on the last segment only).
    fn tso_segments(
        p: &P,
        seq: u32,
        len: usize,
        mss: u16,
        last_flags: u8,
        id: u16,
    ) -> Vec<Vec<u8>> {
        let f = frame(p, seq, &data(seq, len), ACK | last_flags, id);
        let mut b = PacketBuf::from_frame(&f);
        b.offload.gso = if p.v6 { GsoType::TcpV6 } else { GsoType::TcpV4 };
        b.offload.gso_size = mss;
        let mut out = Vec::new();
        segment(&b, |s| out.push(s.to_vec())).unwrap();
        out
    }

    type Out = Vec<(Offload, Vec<u8>)>;

    fn push_all(g: &mut Gro, frames: &[Vec<u8>], out: &mut Out) {
        for f in frames {
            g.push(f, &mut |b| out.push((b.offload, b.frame().to_vec())));
        }
    }

    fn run(g: &mut Gro, frames: &[Vec<u8>]) -> Out {
        let mut out = Vec::new();
        push_all(g, frames, &mut out);
        g.flush(&mut |b| out.push((b.offload, b.frame().to_vec())));
        let s = g.stats();
        assert_eq!(s.frames_in, s.frames_merged + s.passed_through + s.dropped);
        out
    }

    /// Every emitted frame cut back into wire frames by `gso::segment`.
    fn resegment(out: &Out) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        for (o, f) in out {
            let mut b = PacketBuf::from_frame(f);
            b.offload = *o;
            segment(&b, |s| v.push(s.to_vec())).unwrap();
        }
        v
    }

    /// Checks an emitted super-frame's metadata and that its partial
    /// checksum completes to a valid TCP checksum.
    fn check_superframe(o: &Offload, f: &[u8]) {
        let k = FlowKey::parse(f).unwrap();
        let l4 = usize::from(k.l4_offset);
        let v6 = matches!(k.l3, L3::Ipv6(_));
        assert_eq!(o.gso, if v6 { GsoType::TcpV6 } else { GsoType::TcpV4 });
        let hdr = l4 + usize::from(f[l4 + 12] >> 4) * 4;
        assert_eq!(usize::from(o.hdr_len), hdr);
        assert_eq!(
            o.csum,
            Some(CsumOffload {
                start: l4 as u16,
                offset: 16
            })
        );
        assert!(f.len() - hdr > usize::from(o.gso_size));
        let ip_len = be16(f, usize::from(k.l3_offset) + if v6 { 4 } else { 2 }).unwrap();
        assert!(usize::from(ip_len) <= MAX_IP_LEN);
        let mut b = PacketBuf::from_frame(f);
        b.offload = *o;
        b.offload.gso = GsoType::None;
        complete_checksum(&mut b).unwrap();
        let ip = k.ip().unwrap();
        let t = &b.frame()[l4..];
        assert_eq!(
            fold(add(pseudo(ip.src, ip.dst, t.len()).unwrap(), sum(t))),
            0xffff
        );
    }

    #[test]
    fn merges_44_segments_and_resegments_exactly() {
        for v6 in [false, true] {
            for vlan in [None, Some(7)] {
                let p = P {
                    v6,
                    vlan,
                    ..P::default()
                };
                let segs = tso_segments(&p, 0xffff_0000, 44 * 1448, 1448, PSH, 0xfff0);
                assert_eq!(segs.len(), 44);
                let mut g = Gro::new(8);
                let mut out = Vec::new();
                push_all(&mut g, &segs, &mut out);
                // PSH on the last segment closes the super-frame: no flush needed.
                assert_eq!(out.len(), 1);
                assert_eq!(g.held_frames(), 0);
                let (o, f) = &out[0];
                check_superframe(o, f);
                assert_eq!(o.gso_size, 1448);
                assert_eq!(f.len(), segs[0].len() + 43 * 1448);
                // The first segment's headers but lengths, IPv4 header
                // checksum, PSH (from the last) and the partial checksum.
                let l3 = if vlan.is_some() { 18 } else { 14 };
                let l4 = usize::from(o.csum.unwrap().start);
                let hdr = usize::from(o.hdr_len);
                let mut want = segs[0][..hdr].to_vec();
                let l4_len = f.len() - l4;
                if v6 {
                    put16(&mut want, l3 + 4, l4_len as u16);
                } else {
                    put16(&mut want, l3 + 2, (l4_len + 20) as u16);
                    want[l3 + 10..l3 + 12].copy_from_slice(&f[l3 + 10..l3 + 12]);
                    assert!(verify(&f[l3..l4]));
                }
                want[l4 + 13] = ACK | PSH;
                let k = FlowKey::parse(f).unwrap();
                let ip = k.ip().unwrap();
                put16(
                    &mut want,
                    l4 + 16,
                    fold(pseudo(ip.src, ip.dst, l4_len).unwrap()),
                );
                assert_eq!(&f[..hdr], &want[..]);
                assert_eq!(resegment(&out), segs);
                let s = g.stats();
                assert_eq!(
                    (
                        s.frames_in,
                        s.superframes_out,
                        s.frames_merged,
                        s.passed_through
                    ),
                    (44, 1, 44, 0)
                );
            }
        }
    }

    #[test]
    fn single_segment_is_emitted_unchanged() {
        let p = P::default();
        let f = frame(&p, 5, &data(5, 100), ACK, 1);
        let mut g = Gro::new(4);
        let mut out = Vec::new();
        push_all(&mut g, std::slice::from_ref(&f), &mut out);
        assert!(out.is_empty(), "held until flush");
        assert_eq!(g.held_frames(), 1);
        g.flush(&mut |b| out.push((b.offload, b.frame().to_vec())));
        assert_eq!(out, vec![(Offload::NONE, f)]);
        assert_eq!(g.stats().passed_through, 1);
        assert_eq!(g.stats().superframes_out, 0);
    }

    #[test]
    fn non_contiguous_seq_is_not_merged() {
        let p = P::default();
        let a = frame(&p, 1000, &data(1000, 100), ACK, 1);
        let gap = frame(&p, 1200, &data(1200, 100), ACK, 2);
        let dup = frame(&p, 1200, &data(1200, 100), ACK, 3);
        let mut g = Gro::new(4);
        let out = run(&mut g, &[a.clone(), gap.clone(), dup.clone()]);
        // a alone, then gap+dup? dup repeats seq 1200: not contiguous either.
        assert_eq!(
            out,
            vec![
                (Offload::NONE, a),
                (Offload::NONE, gap),
                (Offload::NONE, dup)
            ]
        );
    }

    #[test]
    fn differing_headers_are_not_merged() {
        let base = P::default();
        let variants: Vec<(&str, P)> = vec![
            (
                "options",
                P {
                    opts: vec![1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 2],
                    ..base.clone()
                },
            ),
            (
                "no options",
                P {
                    opts: vec![],
                    ..base.clone()
                },
            ),
            (
                "ack",
                P {
                    ack: 78,
                    ..base.clone()
                },
            ),
            (
                "window",
                P {
                    window: 513,
                    ..base.clone()
                },
            ),
            (
                "ttl",
                P {
                    ttl: 63,
                    ..base.clone()
                },
            ),
            (
                "tos",
                P {
                    tos: 3,
                    ..base.clone()
                },
            ),
            (
                "df",
                P {
                    df: false,
                    ..base.clone()
                },
            ),
        ];
        for (what, q) in variants {
            let a = frame(&base, 0, &data(0, 100), ACK, 1);
            let b = frame(&q, 100, &data(100, 100), ACK, 2);
            let c = frame(&q, 200, &data(200, 100), ACK, 3);
            let mut g = Gro::new(4);
            let out = run(&mut g, &[a.clone(), b.clone(), c.clone()]);
            assert_eq!(out.len(), 2, "{what}");
            assert_eq!(out[0], (Offload::NONE, a), "{what}");
            assert!(out[1].0.is_gso(), "{what}: b and c merge with each other");
            assert_eq!(resegment(&out)[1..], [b, c], "{what}");
        }
    }

    #[test]
    fn ipv4_id_rules() {
        let p = P::default();
        let seg = |seq: u32, id: u16, df: bool| {
            frame(&P { df, ..p.clone() }, seq, &data(seq, 100), ACK, id)
        };
        // Incrementing (wrapping) IDs merge.
        let mut g = Gro::new(2);
        let out = run(
            &mut g,
            &[seg(0, 0xffff, true), seg(100, 0, true), seg(200, 1, true)],
        );
        assert_eq!(out.len(), 1);
        // Fixed IDs merge with DF set, and then must stay fixed.
        let mut g = Gro::new(2);
        let out = run(
            &mut g,
            &[
                seg(0, 9, true),
                seg(100, 9, true),
                seg(200, 9, true),
                seg(300, 12, true),
            ],
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0.gso_size, 100);
        assert_eq!(out[0].1.len(), seg(0, 9, true).len() + 200);
        // Fixed IDs without DF do not merge; nor do jumps.
        let mut g = Gro::new(2);
        assert_eq!(
            run(&mut g, &[seg(0, 9, false), seg(100, 9, false)]).len(),
            2
        );
        let mut g = Gro::new(2);
        assert_eq!(run(&mut g, &[seg(0, 9, true), seg(100, 11, true)]).len(), 2);
        // Mixed mode: incrementing then fixed does not merge the third.
        let mut g = Gro::new(2);
        assert_eq!(
            run(
                &mut g,
                &[seg(0, 9, true), seg(100, 10, true), seg(200, 10, true)]
            )
            .len(),
            2
        );
    }

    #[test]
    fn psh_closes_and_first_psh_passes() {
        let p = P::default();
        let a = frame(&p, 0, &data(0, 100), ACK, 1);
        let b = frame(&p, 100, &data(100, 100), ACK | PSH, 2);
        let c = frame(&p, 200, &data(200, 100), ACK, 3);
        let mut g = Gro::new(4);
        let mut out = Vec::new();
        push_all(&mut g, &[a.clone(), b.clone()], &mut out);
        assert_eq!(out.len(), 1, "emitted without flush");
        assert!(out[0].0.is_gso());
        push_all(&mut g, std::slice::from_ref(&c), &mut out);
        assert_eq!(out.len(), 1, "c starts a new super-frame");
        g.flush(&mut |b| out.push((b.offload, b.frame().to_vec())));
        assert_eq!(resegment(&out), vec![a, b.clone(), c]);
        // A PSH segment with nothing held goes out at once, unchanged.
        let mut g = Gro::new(4);
        let mut out = Vec::new();
        push_all(&mut g, std::slice::from_ref(&b), &mut out);
        assert_eq!(out, vec![(Offload::NONE, b)]);
        assert_eq!(g.held_frames(), 0);
    }

    #[test]
    fn short_segment_closes_and_longer_does_not_join() {
        let p = P::default();
        let a = frame(&p, 0, &data(0, 100), ACK, 1);
        let b = frame(&p, 100, &data(100, 100), ACK, 2);
        let short = frame(&p, 200, &data(200, 40), ACK, 3);
        let mut g = Gro::new(4);
        let mut out = Vec::new();
        push_all(&mut g, &[a.clone(), b.clone(), short.clone()], &mut out);
        assert_eq!(out.len(), 1, "short segment closes");
        assert_eq!(out[0].0.gso_size, 100);
        assert_eq!(resegment(&out), vec![a.clone(), b.clone(), short]);
        // A longer segment cannot join: the held one is emitted first.
        let long = frame(&p, 100, &data(100, 101), ACK, 2);
        let mut g = Gro::new(4);
        let out = run(&mut g, &[a.clone(), long.clone()]);
        assert_eq!(out, vec![(Offload::NONE, a), (Offload::NONE, long)]);
    }

    #[test]
    fn other_flags_flush_and_pass() {
        let p = P::default();
        for fl in [
            tcp_flags::SYN | ACK,
            tcp_flags::FIN | ACK,
            tcp_flags::RST | ACK,
            tcp_flags::URG | ACK,
            tcp_flags::CWR | ACK,
            tcp_flags::ECE | ACK,
            PSH,
            0,
        ] {
            let a = frame(&p, 0, &data(0, 100), ACK, 1);
            let b = frame(&p, 100, &data(100, 100), ACK, 2);
            let x = frame(&p, 200, &data(200, 100), fl, 3);
            let d = frame(&p, 300, &data(300, 100), ACK, 4);
            let mut g = Gro::new(4);
            let mut out = Vec::new();
            push_all(&mut g, &[a.clone(), b.clone(), x.clone()], &mut out);
            assert_eq!(out.len(), 2, "flags {fl:#x}: held data first, then x");
            assert!(out[0].0.is_gso());
            assert_eq!(out[1], (Offload::NONE, x.clone()));
            push_all(&mut g, std::slice::from_ref(&d), &mut out);
            g.flush(&mut |b| out.push((b.offload, b.frame().to_vec())));
            assert_eq!(resegment(&out), vec![a, b, x, d]);
        }
        // Pure ACK (no payload) of the flow flushes it too.
        let a = frame(&p, 0, &data(0, 100), ACK, 1);
        let ack = frame(&p, 100, &[], ACK, 2);
        let mut g = Gro::new(4);
        let mut out = Vec::new();
        push_all(&mut g, &[a.clone(), ack.clone()], &mut out);
        assert_eq!(out, vec![(Offload::NONE, a), (Offload::NONE, ack)]);
    }

    #[test]
    fn checksum_failure_flushes_flow_and_passes_unchanged() {
        for v6 in [false, true] {
            let p = P { v6, ..P::default() };
            let a = frame(&p, 0, &data(0, 100), ACK, 1);
            let b = frame(&p, 100, &data(100, 100), ACK, 2);
            let mut bad = frame(&p, 200, &data(200, 100), ACK, 3);
            let n = bad.len();
            bad[n - 1] ^= 0x20;
            let c = frame(&p, 300, &data(300, 100), ACK, 4);
            let mut g = Gro::new(4);
            let out = run(&mut g, &[a.clone(), b.clone(), bad.clone(), c.clone()]);
            assert_eq!(out.len(), 3);
            assert!(out[0].0.is_gso());
            // The failed segment's payload, copied while it was summed,
            // left no trace in the held super-frame.
            let ab = run(&mut Gro::new(4), &[a.clone(), b.clone()]);
            assert_eq!(out[0], ab[0]);
            assert_eq!(out[1], (Offload::NONE, bad.clone()));
            assert_eq!(out[2], (Offload::NONE, c));
            assert_eq!(g.stats().csum_failures, 1);
            assert_eq!(g.stats().passed_through, 2);
            // A bad first segment is not held.
            let mut g = Gro::new(4);
            let mut out = Vec::new();
            push_all(&mut g, std::slice::from_ref(&bad), &mut out);
            assert_eq!(out, vec![(Offload::NONE, bad)]);
            // A bad TCP checksum field (header, not payload) on a segment
            // that would merge.
            let mut bad_field = frame(&p, 200, &data(200, 100), ACK, 3);
            let l4 = 14 + if v6 { 40 } else { 20 };
            bad_field[l4 + 16] ^= 0x01;
            let mut g = Gro::new(4);
            let out = run(&mut g, &[a.clone(), b.clone(), bad_field.clone()]);
            assert_eq!(out, vec![ab[0].clone(), (Offload::NONE, bad_field)]);
            assert_eq!(g.stats().csum_failures, 1);
        }
        // IPv4 header checksum
        let p = P::default();
        let mut bad = frame(&p, 0, &data(0, 100), ACK, 1);
        bad[14 + 10] ^= 1;
        let mut g = Gro::new(4);
        let mut out = Vec::new();
        push_all(&mut g, std::slice::from_ref(&bad), &mut out);
        assert_eq!(out, vec![(Offload::NONE, bad)]);
        assert_eq!(g.stats().csum_failures, 1);
    }

    #[test]
    fn full_slots_evict_oldest() {
        let flows: Vec<P> = (1..=3).map(|n| P { n, ..P::default() }).collect();
        let seg = |p: &P, i: u32| frame(p, i * 100, &data(i * 100, 100), ACK, i as u16);
        let mut g = Gro::new(2);
        let mut out = Vec::new();
        push_all(
            &mut g,
            &[seg(&flows[0], 0), seg(&flows[1], 0), seg(&flows[0], 1)],
            &mut out,
        );
        assert!(out.is_empty());
        // Third flow: flow 0 (oldest) is evicted, as a super-frame.
        push_all(&mut g, &[seg(&flows[2], 0)], &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].0.is_gso());
        assert_eq!(resegment(&out), vec![seg(&flows[0], 0), seg(&flows[0], 1)]);
        assert_eq!(g.stats().evictions, 1);
        g.flush(&mut |b| out.push((b.offload, b.frame().to_vec())));
        assert_eq!(
            out[1..],
            [
                (Offload::NONE, seg(&flows[1], 0)),
                (Offload::NONE, seg(&flows[2], 0))
            ]
        );
        // max_flows 0 behaves as 1
        let mut g = Gro::new(0);
        let out = run(
            &mut g,
            &[seg(&flows[0], 0), seg(&flows[0], 1), seg(&flows[1], 0)],
        );
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn interleaved_flows_keep_per_flow_order() {
        let a = P {
            n: 1,
            ..P::default()
        };
        let b = P {
            n: 2,
            v6: true,
            ..P::default()
        };
        let sa = tso_segments(&a, 0, 10 * 1000, 1000, 0, 0);
        let sb = tso_segments(&b, 7, 10 * 1000, 1000, 0, 0);
        let mut mixed = Vec::new();
        for i in 0..10 {
            mixed.push(sa[i].clone());
            mixed.push(sb[i].clone());
            if i == 4 {
                // a gap in flow a: its held data goes first
                mixed.push(frame(&a, 999_999, &data(0, 10), ACK, 0));
            }
        }
        let mut g = Gro::new(8);
        let out = run(&mut g, &mixed);
        let re = resegment(&out);
        let only =
            |p: &P| -> Vec<Vec<u8>> { re.iter().filter(|f| f[11] == p.n).cloned().collect() };
        let mut want_a = sa.clone();
        want_a.insert(5, frame(&a, 999_999, &data(0, 10), ACK, 0));
        assert_eq!(only(&a), want_a);
        assert_eq!(only(&b), sb);
        assert_eq!(g.stats().superframes_out, 3);
    }

    #[test]
    fn size_limit_splits() {
        for v6 in [false, true] {
            let p = P { v6, ..P::default() };
            // 90 segments of 1448: 65535 bytes of IP length hold 45 of
            // them (IPv4: 20 + 32 header bytes; IPv6 counts only the 32).
            let mut segs = tso_segments(&p, 1, 30 * 1448, 1448, 0, 0);
            segs.extend(tso_segments(&p, 1 + 30 * 1448, 30 * 1448, 1448, 0, 30));
            segs.extend(tso_segments(&p, 1 + 60 * 1448, 30 * 1448, 1448, 0, 60));
            let mut g = Gro::new(1);
            let out = run(&mut g, &segs);
            for (o, f) in &out {
                check_superframe(o, f);
            }
            assert_eq!(out.len(), 2);
            assert_eq!(resegment(&out), segs);
            // Tiny MSS: bounded by MAX_SEGMENTS.
            let segs = tso_segments(&p, 1, 200, 1, 0, 0);
            let mut g = Gro::new(1);
            let out = run(&mut g, &segs);
            assert_eq!(out.len(), 4);
            assert_eq!(out[0].1.len(), segs[0].len() + MAX_SEGMENTS - 1);
            assert_eq!(resegment(&out), segs);
        }
    }

    #[test]
    fn not_coalescable_passes_at_once() {
        let p = P::default();
        let a = frame(&p, 0, &data(0, 100), ACK, 1);
        // Ethernet padding after the IP packet
        let mut padded = frame(&p, 0, &data(0, 2), ACK, 1);
        padded.resize(padded.len() + 4, 0);
        // QinQ
        let mut qinq = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .double_vlan(VlanId::try_new(1).unwrap(), VlanId::try_new(2).unwrap())
            .ipv4([1; 4], [2; 4], 64)
            .tcp(1, 2, 3, 4)
            .ack(1)
            .write(&mut qinq, &[1; 50])
            .unwrap();
        // UDP
        let mut udp = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([1; 4], [2; 4], 64)
            .udp(1, 2)
            .write(&mut udp, &[1; 50])
            .unwrap();
        // IPv4 options (IHL 6): a NOP option word, checksums fixed.
        let mut opt = a[..34].to_vec();
        opt.extend_from_slice(&[1, 1, 1, 0]);
        opt.extend_from_slice(&a[34..]);
        opt[14] = 0x46;
        let tl = (opt.len() - 14) as u16;
        put16(&mut opt, 16, tl);
        fix_checksums(&mut opt);
        let frames = [padded, qinq, udp.clone(), opt, vec![], vec![0xff; 13]];
        for f in &frames {
            let mut g = Gro::new(4);
            let mut out = Vec::new();
            push_all(&mut g, std::slice::from_ref(f), &mut out);
            assert_eq!(out, vec![(Offload::NONE, f.clone())]);
        }
        // A UDP frame does not flush held TCP data.
        let mut g = Gro::new(4);
        let mut out = Vec::new();
        push_all(&mut g, &[a, udp.clone()], &mut out);
        assert_eq!(out, vec![(Offload::NONE, udp)]);
        assert_eq!(g.held_frames(), 1);
    }

    #[test]
    fn oversized_frames_are_dropped_and_counted() {
        let mut g = Gro::new(1);
        let out = run(&mut g, &[vec![0; MAX_FRAME + 1]]);
        assert!(out.is_empty());
        assert_eq!(g.stats().dropped, 1);
    }

    #[derive(Debug, Clone)]
    struct FlowSpec {
        p: P,
        mss: u16,
        /// (payload length, last-segment flags) of consecutive TSO frames.
        chunks: Vec<(usize, u8)>,
    }

    fn flow_spec(n: u8) -> impl Strategy<Value = FlowSpec> {
        (
            any::<bool>(),
            proptest::option::of(0u16..4096),
            prop_oneof![
                Just(vec![]),
                Just(vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2])
            ],
            any::<bool>(),
            prop_oneof![1u16..8, 400u16..1500],
            proptest::collection::vec(
                (
                    0usize..30_000,
                    prop_oneof![Just(0), Just(PSH), Just(tcp_flags::FIN)],
                ),
                1..4,
            ),
        )
            .prop_map(move |(v6, vlan, opts, df, mss, mut chunks)| {
                if mss < 8 {
                    for c in &mut chunks {
                        c.0 %= 200;
                    }
                }
                FlowSpec {
                    p: P {
                        v6,
                        vlan,
                        n,
                        opts,
                        df,
                        ..P::default()
                    },
                    mss,
                    chunks,
                }
            })
    }

    fn flow_segments(s: &FlowSpec) -> Vec<Vec<u8>> {
        let mut seq = 0xffff_f000u32.wrapping_add(u32::from(s.p.n) << 20);
        let mut id = 0xfff0u16;
        let mut out = Vec::new();
        for &(len, flags) in &s.chunks {
            let segs = tso_segments(&s.p, seq, len, s.mss, flags, id);
            seq = seq.wrapping_add(len as u32);
            id = id.wrapping_add(segs.len() as u16);
            out.extend(segs);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// TSO super-frames cut by `gso::segment`, interleaved with each
        /// other and with junk, some corrupted, come out of GRO so that
        /// `gso::segment` gives back exactly the input frames, in order per
        /// flow.
        #[test]
        fn round_trip(
            specs in (flow_spec(1), flow_spec(2), flow_spec(3), 1usize..4),
            junk in proptest::collection::vec(mutated_frame(), 0..6),
            schedule in proptest::collection::vec(any::<u16>(), 0..400),
            corrupt in proptest::option::of((any::<usize>(), any::<usize>(), 1u8..=255)),
            slots in 1usize..5,
            flush_at in proptest::option::of(any::<usize>()),
        ) {
            let (s1, s2, s3, nflows) = specs;
            let specs = [s1, s2, s3];
            let mut sources: Vec<Vec<Vec<u8>>> = specs[..nflows].iter().map(flow_segments).collect();
            if let Some((fi, si, x)) = corrupt {
                let fl = &mut sources[fi % nflows];
                let at = si % fl.len();
                let seg = &mut fl[at];
                let n = seg.len();
                seg[n - 1] ^= x;
            }
            sources.push(junk);
            // Interleave, keeping each source's order.
            let mut pos = vec![0usize; sources.len()];
            let mut input = Vec::new();
            let mut k = 0;
            loop {
                let live: Vec<usize> = (0..sources.len()).filter(|&i| pos[i] < sources[i].len()).collect();
                if live.is_empty() { break; }
                let pick = live[usize::from(schedule.get(k).copied().unwrap_or(0)) % live.len()];
                k += 1;
                input.push(sources[pick][pos[pick]].clone());
                pos[pick] += 1;
            }

            let mut g = Gro::new(slots);
            let mut out = Vec::new();
            let flush_at = flush_at.map(|f| f % (input.len() + 1));
            for (i, f) in input.iter().enumerate() {
                if flush_at == Some(i) {
                    g.flush(&mut |b| out.push((b.offload, b.frame().to_vec())));
                }
                g.push(f, &mut |b| out.push((b.offload, b.frame().to_vec())));
            }
            g.flush(&mut |b| out.push((b.offload, b.frame().to_vec())));
            let st = g.stats();
            prop_assert_eq!(st.frames_in as usize, input.len());
            prop_assert_eq!(st.frames_in, st.frames_merged + st.passed_through + st.dropped);
            prop_assert_eq!(st.dropped, 0);
            prop_assert_eq!(g.held_frames(), 0);
            for (o, f) in &out {
                if o.is_gso() {
                    check_superframe(o, f);
                } else {
                    prop_assert_eq!(*o, Offload::NONE);
                }
            }
            let re = resegment(&out);
            // Nothing lost, added or altered.
            let mut a = re.clone();
            let mut b = input.clone();
            a.sort();
            b.sort();
            prop_assert_eq!(a, b);
            // Order within each flow.
            for src in &sources[..nflows] {
                let set: HashSet<&Vec<u8>> = src.iter().collect();
                let got: Vec<&Vec<u8>> = re.iter().filter(|f| set.contains(f)).collect();
                let want: Vec<&Vec<u8>> = src.iter().collect();
                prop_assert_eq!(got, want);
            }
        }

        #[test]
        fn never_panics_on_bytes(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20)) {
            let mut g = Gro::new(2);
            let out = run(&mut g, &frames);
            prop_assert_eq!(out.len(), frames.len());
        }

        #[test]
        fn never_panics_on_mutations(frames in proptest::collection::vec(mutated_frame(), 0..20), slots in 1usize..4) {
            let mut g = Gro::new(slots);
            let out = run(&mut g, &frames);
            for (o, f) in &out {
                if o.is_gso() {
                    check_superframe(o, f);
                }
            }
        }
    }
}
