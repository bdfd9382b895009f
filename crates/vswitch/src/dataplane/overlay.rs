//! The data path's VXLAN side: sending frames to peers (encapsulation,
//! MTU, segmentation into a UDP GSO train) and receiving from them
//! (peer and VNI checks, decapsulation, the same pipeline checks as a
//! port, delivery to local ports only).

use std::io::{self, IoSliceMut};
use std::sync::atomic::Ordering;

use packet::{FlowKey, GsoType, Offload, PacketBuf};
use quinn_udp::RecvMeta;
use vxlan::{IcmpAction, MtuDecision, VXLAN_HLEN};

use super::{transmit_local, transmit_with, NetworkRt, PortRt, Scratch, Snapshot};
use crate::clock::Timestamp;
use crate::fdb::PortId;
use crate::pipeline::{overlay::check_remote, DropReason, Ingress, Verdict};
use crate::underlay::{is_vtep, PeerRt, Underlay, RX_SLOT};

/// Largest UDP payload one send may carry (IPv4 total length 65535), a
/// UDP GSO train included.
const MAX_UDP_PAYLOAD: usize = 65_535 - 20 - 8;

/// Most datagrams one gathered send carries (the kernel's UDP GSO limit
/// is 64 or 128 segments; a 64 KB train of 1400-byte datagrams is ~46).
const MAX_GATHER: usize = 64;

/// Receive slots per `recvmmsg`: each holds a UDP GRO train of up to
/// 64 KB, so 8 keep a batch (512 KB) near the cache; more measured no
/// faster.
const RX_SLOTS: usize = 8;

/// Receive batches per wake-up: bounded like a port's [`super::RX_BATCH`].
const RX_ROUNDS: usize = 4;

/// Underlay buffers of one worker.
pub(super) struct OverlayScratch {
    /// A VXLAN GSO train being built.
    tx: Vec<u8>,
    /// Segment lengths of the train.
    seg_lens: Vec<usize>,
    /// Per-segment headers of a gathered train.
    hdrs: Vec<u8>,
    /// Payload ranges of a gathered train in the super-frame.
    payloads: Vec<std::ops::Range<usize>>,
    /// Receive slots.
    slots: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    /// TCP coalescing of decapsulated frames.
    gro: packet::gro::Gro,
}

impl Default for OverlayScratch {
    fn default() -> Self {
        OverlayScratch {
            tx: Vec::with_capacity(128 * 1024),
            seg_lens: Vec::with_capacity(128),
            hdrs: Vec::with_capacity(128 * 128),
            payloads: Vec::with_capacity(128),
            slots: Vec::new(),
            meta: Vec::new(),
            gro: packet::gro::Gro::new(8),
        }
    }
}

impl Snapshot {
    /// Runs the pipeline for a frame decapsulated from `peer` into network
    /// `net`: the checks of [`check_remote`], then the bridge (learning the
    /// inner source MAC on the peer, never over a directory entry).
    pub fn process_remote(
        &self,
        peer: &PeerRt,
        net_idx: usize,
        net: &NetworkRt,
        buf: &PacketBuf,
        now: Timestamp,
    ) -> Verdict {
        let Ok(key) = FlowKey::parse(buf.frame()) else {
            return Verdict::Drop(DropReason::RuntFrame);
        };
        let ing = Ingress {
            id: peer.id,
            mac: packet::MacAddr::ZERO,
            port_security: false,
        };
        // This host's prober's answers from a backend on the peer.
        if let Some(svc) = net.service {
            if key.dst_mac == svc.mac {
                return self.to_prober(net, buf.frame());
            }
        }
        if let Some((gw_ip, gw_mac)) = net.gateway {
            // From another host's router (it routed into this network, or
            // asks who has an address): every host's router uses the same
            // gateway MAC and address, so they are not learned and not
            // taken for spoofing. A VM cannot send as the gateway: port
            // security stops it on its own host.
            if key.src_mac == gw_mac {
                let arp_from_gw =
                    matches!(key.l3, packet::L3::Arp(a) if a.sha == gw_mac && a.spa == gw_ip);
                if !(arp_from_gw || matches!(key.l3, packet::L3::Ipv4(_))) {
                    return Verdict::Drop(DropReason::SrcMacHijack);
                }
                return match net.bridge.fdb().read().lookup(&key.dst_mac) {
                    _ if key.dst_mac.is_multicast() => Verdict::Flood,
                    Some(id) if !is_vtep(id) => Verdict::Forward(id),
                    Some(_) => Verdict::Drop(DropReason::UnderlayNoTransit),
                    None => Verdict::Flood,
                };
            }
        }
        if let Err(r) = check_remote(&ing, &key, &net.addrs)
            .and_then(|()| crate::pipeline::port_security::check_unparsed(&ing, &key, buf.frame()))
        {
            return Verdict::Drop(r);
        }
        if let Some((_, gw_mac)) = net.gateway {
            // The answer to an ARP request a router flooded to the peers.
            if let Some(leg) = net.router.as_ref().and_then(|r| r.leg_of(net_idx)) {
                if let Some((ip, mac)) = crate::pipeline::router::arp_reply_for_gateway(&key, leg) {
                    net.neighbours.learn(ip, mac, now);
                    return Verdict::Consumed;
                }
            }
            // Routing happens where a packet enters; a peer never hands us
            // a frame to route.
            if key.dst_mac == gw_mac {
                return Verdict::Drop(DropReason::ToGatewayUnhandled);
            }
        }
        match net.bridge.decide(&ing, buf.frame(), now) {
            Verdict::Forward(id) if is_vtep(id) => Verdict::Drop(DropReason::UnderlayNoTransit),
            v => v,
        }
    }
}

/// Sends the frame in `sc.buf` from `ingress` to peer `id`; a frame too big
/// for the overlay gets its ICMP error back to the sender.
pub(super) fn forward_to_peer(
    snap: &Snapshot,
    ingress: &PortRt,
    net: &NetworkRt,
    id: PortId,
    sc: &mut Scratch,
) {
    let (Some(ul), Some(peer), Some(in_net)) = (
        &snap.underlay,
        snap.peer(id),
        snap.networks.get(ingress.net),
    ) else {
        ingress.counters.count_drop(DropReason::EgressError);
        return;
    };
    let Ok(key) = FlowKey::parse(sc.buf.frame()) else {
        ingress.counters.count_drop(DropReason::RuntFrame);
        return;
    };
    if let MtuDecision::TooBig { mtu, icmp } =
        vxlan::check_mtu(snap.config.underlay.mtu, vxlan::Family::V4, &sc.buf, &key)
    {
        ingress.drop_frame(DropReason::OverlayMtuExceeded, sc.buf.frame());
        // The sender hears it from its own network's gateway.
        if let Some((gw_ip, gw_mac)) = in_net.gateway {
            let built = match icmp {
                IcmpAction::FragNeeded => {
                    vxlan::frag_needed(sc.buf.frame(), &key, mtu, gw_mac, gw_ip, &mut sc.aux)
                        .is_ok()
                }
                IcmpAction::PacketTooBig => {
                    // From the gateway MAC's link-local address (EUI-64).
                    let m = gw_mac.0;
                    let src = std::net::Ipv6Addr::from([
                        0xfe,
                        0x80,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        m[0] ^ 2,
                        m[1],
                        m[2],
                        0xff,
                        0xfe,
                        m[3],
                        m[4],
                        m[5],
                    ]);
                    vxlan::packet_too_big(
                        sc.buf.frame(),
                        &key,
                        u32::from(mtu),
                        gw_mac,
                        src,
                        &mut sc.aux,
                    )
                    .is_ok()
                }
                IcmpAction::Drop => false,
            };
            if built {
                sc.aux.offload = Offload::NONE;
                transmit_local(ingress, &sc.aux);
            }
        }
        return;
    }
    if let Err(r) = send(ul, peer, net.vni, &key, &mut sc.buf, &mut sc.overlay) {
        peer.counters.count_drop(r);
    }
}

/// Head-end replication: a copy of the flooded frame in `sc.buf` to peer
/// `id`. A copy that does not fit the overlay is dropped (no ICMP for
/// floods).
pub(super) fn flood_to_peer(snap: &Snapshot, net: &NetworkRt, id: PortId, sc: &mut Scratch) {
    let (Some(ul), Some(peer)) = (&snap.underlay, snap.peer(id)) else {
        return;
    };
    let Ok(key) = FlowKey::parse(sc.buf.frame()) else {
        return;
    };
    if vxlan::check_mtu(snap.config.underlay.mtu, vxlan::Family::V4, &sc.buf, &key)
        != MtuDecision::Fits
    {
        peer.counters.count_drop(DropReason::OverlayMtuExceeded);
        return;
    }
    if let Err(r) = send(ul, peer, net.vni, &key, &mut sc.buf, &mut sc.overlay) {
        peer.counters.count_drop(r);
    }
}

fn send_error(e: &io::Error) -> DropReason {
    match e.kind() {
        io::ErrorKind::WouldBlock => DropReason::EgressBusy,
        _ => DropReason::EgressError,
    }
}

/// Encapsulates `buf` (VXLAN header; the kernel adds UDP and IPv4) and
/// sends it to `peer`. A super-frame is segmented to its MSS and sent as
/// one UDP GSO train (one `sendmsg`); a partial checksum is completed.
/// `buf` is left as it was (a flood sends it on).
fn send(
    ul: &Underlay,
    peer: &PeerRt,
    vni: vxlan::Vni,
    key: &FlowKey,
    buf: &mut PacketBuf,
    sc: &mut OverlayScratch,
) -> Result<(), DropReason> {
    if crate::trace::active() {
        crate::trace::note("vxlan", || {
            format!(
                "VXLAN VNI {} to host {} (VTEP {}){}",
                vni.get(),
                peer.name,
                peer.addr.ip(),
                if buf.offload.gso == GsoType::None {
                    String::new()
                } else {
                    format!(
                        ", super-frame segmented to {} byte segments in one UDP GSO send",
                        buf.offload.gso_size
                    )
                }
            )
        });
        if crate::trace::dry_run() {
            return Ok(());
        }
    }
    let hash = vxlan::flow_hash(key, ul.hash_seed);
    let header = vxlan::header(vni);
    if buf.offload.gso == GsoType::None {
        if buf.offload.csum.is_some() {
            packet::gso::complete_checksum(buf).map_err(|_| DropReason::OffloadFailed)?;
        }
        let Some(h) = buf.push_front(VXLAN_HLEN) else {
            return Err(DropReason::EgressError);
        };
        h.copy_from_slice(&header);
        let r = ul.send(hash, peer.addr, buf.frame(), None);
        let len = buf.len();
        buf.pull_front(VXLAN_HLEN);
        r.map_err(|e| send_error(&e))?;
        peer.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
        peer.counters
            .tx_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        return Ok(());
    }
    if ul.gso && !ul.capture.active() {
        let (_, stride) =
            packet::gso::segment_headers(buf, &header, &mut sc.hdrs, &mut sc.payloads)
                .map_err(|_| DropReason::OffloadFailed)?;
        match send_gathered(ul, peer, hash, buf.frame(), &sc.hdrs, stride, &sc.payloads) {
            Ok(()) => return Ok(()),
            // Nothing sent, and not for want of room (say, a device
            // without UDP GSO said EIO): the contiguous path, whose socket
            // layer falls back to one datagram per send.
            Err((0, e)) if e.kind() != io::ErrorKind::WouldBlock => {}
            Err((_, e)) => return Err(send_error(&e)),
        }
    }
    sc.tx.clear();
    sc.seg_lens.clear();
    let lens = &mut sc.seg_lens;
    packet::gso::segment_append(buf, &header, &mut sc.tx, |tx, start| {
        lens.push(tx.len() - start);
    })
    .map_err(|_| DropReason::OffloadFailed)?;
    send_train(ul, peer, hash, &sc.tx, &sc.seg_lens)
}

/// Sends the segments of [`packet::gso::segment_headers`] (segment `i`:
/// `hdrs[i * stride..][..stride]` then `frame[payloads[i]]`) as UDP GSO
/// trains gathered from those pieces, cut as [`send_train`] cuts. Stops at
/// the first error, saying how many segments went before it.
fn send_gathered(
    ul: &Underlay,
    peer: &PeerRt,
    hash: u32,
    frame: &[u8],
    hdrs: &[u8],
    stride: usize,
    payloads: &[std::ops::Range<usize>],
) -> Result<(), (usize, io::Error)> {
    let invalid = |i| Err((i, io::Error::from(io::ErrorKind::InvalidInput)));
    let max = ul.max_segments().clamp(1, MAX_GATHER);
    let mut iov: [io::IoSlice<'_>; 2 * MAX_GATHER] = [io::IoSlice::new(&[]); 2 * MAX_GATHER];
    let mut i = 0;
    while i < payloads.len() {
        let size = stride + payloads[i].len();
        let (j, total) = run_end(|k| stride + payloads[k].len(), payloads.len(), i, max);
        for k in i..j {
            let (Some(h), Some(p)) = (
                hdrs.get(k * stride..(k + 1) * stride),
                frame.get(payloads[k].clone()),
            ) else {
                return invalid(i);
            };
            iov[2 * (k - i)] = io::IoSlice::new(h);
            iov[2 * (k - i) + 1] = io::IoSlice::new(p);
        }
        let seg = match u16::try_from(size) {
            _ if j - i == 1 => None,
            Ok(s) => Some(s),
            Err(_) => return invalid(i),
        };
        ul.send_vectored(hash, peer.addr, &iov[..2 * (j - i)], seg)
            .map_err(|e| (i, e))?;
        peer.counters
            .tx_packets
            .fetch_add((j - i) as u64, Ordering::Relaxed);
        peer.counters
            .tx_bytes
            .fetch_add(total as u64, Ordering::Relaxed);
        i = j;
    }
    Ok(())
}

/// Where the run of datagrams that starts at `i` ends (exclusive) and its
/// bytes, for datagram lengths `len(0..n)`: equal sizes, then at most one
/// shorter tail, at most `max` datagrams and [`MAX_UDP_PAYLOAD`] bytes
/// (the first datagram always belongs to it). One UDP GSO send each.
fn run_end(len: impl Fn(usize) -> usize, n: usize, i: usize, max: usize) -> (usize, usize) {
    let size = len(i);
    let (mut j, mut total) = (i + 1, size);
    while j < n && j - i < max {
        let l = len(j);
        if l > size || total + l > MAX_UDP_PAYLOAD {
            break;
        }
        total += l;
        j += 1;
        if l < size {
            break;
        }
    }
    (j, total)
}

/// Sends datagrams laid end to end in `data` (lengths `lens`): runs of
/// equal-sized datagrams (the last of a run may be shorter) go as one UDP
/// GSO `sendmsg` each, at most `Underlay::max_segments` per call.
fn send_train(
    ul: &Underlay,
    peer: &PeerRt,
    hash: u32,
    data: &[u8],
    lens: &[usize],
) -> Result<(), DropReason> {
    let max = ul.max_segments().max(1);
    let (mut i, mut off) = (0, 0);
    let mut result = Ok(());
    while i < lens.len() {
        let size = lens[i];
        let (j, total) = run_end(|k| lens[k], lens.len(), i, max);
        let end = off + total;
        let Some(chunk) = data.get(off..end) else {
            return Err(DropReason::EgressError);
        };
        let seg = (j - i > 1).then_some(size);
        match ul.send(hash, peer.addr, chunk, seg) {
            Ok(()) => {
                peer.counters
                    .tx_packets
                    .fetch_add((j - i) as u64, Ordering::Relaxed);
                peer.counters
                    .tx_bytes
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            Err(e) => result = Err(send_error(&e)),
        }
        i = j;
        off = end;
    }
    result
}

/// Reads VXLAN from worker `idx`'s underlay socket and runs every inner
/// frame to completion. Bounded: [`RX_ROUNDS`] `recvmmsg` calls.
pub(super) fn poll_underlay(
    idx: usize,
    snap: &Snapshot,
    ul: &Underlay,
    sc: &mut Scratch,
    now: Timestamp,
) {
    let o = &mut sc.overlay;
    if o.slots.is_empty() {
        o.slots = (0..RX_SLOTS).map(|_| vec![0u8; RX_SLOT]).collect();
        o.meta = vec![RecvMeta::default(); RX_SLOTS];
    }
    let mut current: Option<(PortId, usize)> = None;
    for _ in 0..RX_ROUNDS {
        let n = {
            // On the stack: no allocation per receive round.
            let mut slots = o.slots.iter_mut();
            let mut slices: [IoSliceMut<'_>; RX_SLOTS] = std::array::from_fn(|_| {
                IoSliceMut::new(slots.next().map_or(&mut [][..], |s| s.as_mut_slice()))
            });
            match ul.recv(idx, &mut slices, &mut o.meta) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    ul.counters.rx_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        };
        for (slot, meta) in o.slots.iter().zip(&o.meta).take(n) {
            let data = slot.get(..meta.len).unwrap_or_default();
            let stride = meta.stride.max(1);
            let src = match meta.addr {
                std::net::SocketAddr::V4(a) => *a.ip(),
                std::net::SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
                    Some(v4) => v4,
                    None => std::net::Ipv4Addr::UNSPECIFIED,
                },
            };
            let Some(peer) = snap.peer_by_ip.get(&src).and_then(|&id| snap.peer(id)) else {
                let count = data.len().div_ceil(stride).max(1);
                ul.counters
                    .rx_not_peer
                    .fetch_add(count as u64, Ordering::Relaxed);
                if ul.capture.active() {
                    for d in data.chunks(stride) {
                        capture_drop(ul, meta, DropReason::UnderlayNotPeer, d);
                    }
                }
                continue;
            };
            for dgram in data.chunks(stride) {
                peer.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
                peer.counters
                    .rx_bytes
                    .fetch_add(dgram.len() as u64, Ordering::Relaxed);
                let net_idx = match classify(snap, peer, dgram) {
                    Ok(i) => i,
                    Err(r) => {
                        peer.counters.count_drop(r);
                        if ul.capture.active() {
                            capture_drop(ul, meta, r, dgram);
                        }
                        continue;
                    }
                };
                // GRO only ever holds frames of one (peer, network): flush
                // when either changes, so overlapping tenants' flows can
                // never merge. Within one, it merges across the batch's
                // slots (a super-frame's train may arrive in two).
                let ctx = (peer.id, net_idx);
                if current.is_some_and(|c| c != ctx) {
                    flush_gro(snap, current, &mut o.gro, now);
                }
                current = Some(ctx);
                let Some(net) = snap.networks.get(net_idx) else {
                    continue;
                };
                let inner = dgram.get(VXLAN_HLEN..).unwrap_or_default();
                o.gro.push(inner, &mut |b: &PacketBuf| {
                    remote_frame(snap, peer, net_idx, net, b, now);
                });
            }
        }
        flush_gro(snap, current.take(), &mut o.gro, now);
    }
}

/// Offers a datagram the underlay dropped to its captures.
#[cold]
fn capture_drop(ul: &Underlay, meta: &RecvMeta, r: DropReason, dgram: &[u8]) {
    let src = match meta.addr {
        std::net::SocketAddr::V4(a) => a,
        std::net::SocketAddr::V6(a) => std::net::SocketAddrV4::new(
            a.ip()
                .to_ipv4_mapped()
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            a.port(),
        ),
    };
    let dst = std::net::SocketAddrV4::new(ul.local, ul.port);
    ul.capture_datagram(crate::capture::Stage::Drop, Some(r), src, dst, dgram);
}

/// Emits what GRO holds for context `(peer id, network index)`.
fn flush_gro(
    snap: &Snapshot,
    ctx: Option<(PortId, usize)>,
    gro: &mut packet::gro::Gro,
    now: Timestamp,
) {
    let Some((peer, net_idx, net)) =
        ctx.and_then(|(p, n)| Some((snap.peer(p)?, n, snap.networks.get(n)?)))
    else {
        return;
    };
    gro.flush(&mut |b: &PacketBuf| {
        remote_frame(snap, peer, net_idx, net, b, now);
    });
}

/// Runs a decapsulated frame through the remote pipeline. Where load
/// balancers run, the reply of a connection balanced here (its backend on
/// the peer) first gets the VIP back, on a copy.
fn remote_frame(
    snap: &Snapshot,
    peer: &PeerRt,
    net_idx: usize,
    net: &NetworkRt,
    b: &PacketBuf,
    now: Timestamp,
) {
    // The checks see the frame as the peer sent it (the backend's
    // address, which its MAC owns); the rewrite comes after.
    let v = snap.process_remote(peer, net_idx, net, b, now);
    if !snap.lb_gate.is_empty() && matches!(v, Verdict::Forward(_) | Verdict::Flood) {
        if let Some(c) = snap.lb_remote_reply(net, b, now) {
            deliver_remote(snap, net, peer, &c, v);
            return;
        }
    }
    deliver_remote(snap, net, peer, b, v);
}

/// The network a VXLAN datagram from `peer` belongs to, or why it is
/// dropped: bad header, unknown VNI, or a peer that does not host it.
fn classify(snap: &Snapshot, peer: &PeerRt, dgram: &[u8]) -> Result<usize, DropReason> {
    let vni = vxlan::decap::parse_header(dgram).map_err(|_| DropReason::UnderlayBadVxlan)?;
    let &idx = snap
        .by_vni
        .get(&vni.get())
        .ok_or(DropReason::UnderlayUnknownVni)?;
    let net = snap
        .networks
        .get(idx)
        .ok_or(DropReason::UnderlayUnknownVni)?;
    if !net.accept_from.contains(&peer.id) {
        return Err(DropReason::UnderlayNotMember);
    }
    Ok(idx)
}

/// Carries out `verdict` for a frame from a peer: local ports only.
fn deliver_remote(
    snap: &Snapshot,
    net: &NetworkRt,
    peer: &PeerRt,
    buf: &PacketBuf,
    verdict: Verdict,
) {
    // A Linux peer over veths leaves TCP/UDP checksums partial (only a
    // real NIC completes them) and a UDP socket cannot say so: let the tap
    // complete such a checksum rather than hand the VM a frame it drops.
    let mut offload = buf.offload;
    if let Some(c) = packet::gso::partial_checksum(buf) {
        offload.csum = Some(c);
    }
    match verdict {
        Verdict::Forward(id) => match snap.port(id) {
            Some(egress) => transmit_with(egress, &offload, buf.frame()),
            None => peer.counters.count_drop(DropReason::EgressError),
        },
        Verdict::Flood => {
            for &id in &net.ports {
                if let Some(egress) = snap.port(id) {
                    transmit_with(egress, &offload, buf.frame());
                }
            }
        }
        // The remote pipeline makes no replies and never routes.
        Verdict::Reply | Verdict::Consumed => {}
        Verdict::ForwardIn { .. } | Verdict::FloodIn { .. } | Verdict::ToPeers => {
            peer.counters.count_drop(DropReason::ToGatewayUnhandled)
        }
        Verdict::Drop(r) => peer.counters.count_drop(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs of a 64 KB super-frame's 47 VXLAN datagrams (1472 bytes, a
    /// 900-byte tail): cut by the 64 KB payload limit, not by where they
    /// lie in the train, and by the shorter tail.
    #[test]
    fn runs_cut_at_the_payload_limit_and_the_tail() {
        let lens: Vec<usize> = (0..47).map(|k| if k == 46 { 900 } else { 1472 }).collect();
        let runs = |max| {
            let mut out = Vec::new();
            let mut i = 0;
            while i < lens.len() {
                let (j, total) = run_end(|k| lens[k], lens.len(), i, max);
                out.push((i, j, total));
                i = j;
            }
            out
        };
        assert_eq!(runs(64), vec![(0, 44, 44 * 1472), (44, 47, 2 * 1472 + 900)]);
        assert_eq!(runs(1).len(), 47);
        // A larger datagram after a smaller one starts a new run.
        assert_eq!(run_end(|k| [100, 200][k], 2, 0, 64), (1, 100));
    }
}
