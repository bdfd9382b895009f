//! Packet capture at a port: a layer around the port's receive, transmit
//! and drop points, not code spread through the pipeline.
//!
//! Each port has a [`PortCapture`]: a count of active sessions (the only
//! thing the fast path reads when nobody captures: one relaxed atomic load)
//! and the sessions themselves. A [`Session`] says which stages it wants
//! (rx = frames the VM sent, tx = frames written to the VM, drop = frames
//! dropped at this port, with the reason), a snap length, a count and a
//! filter; workers copy matching frames into its bounded queue and never
//! block: when the reader falls behind, frames are counted as lost.
//! The control socket streams a session as pcapng (`write_pcapng_*`), one
//! Enhanced Packet Block per frame with the direction flag and a comment
//! `stage=rx|tx|drop[ reason=...]`, which tcpdump, tshark and Wireshark read.
//!
//! Offloaded super-frames are recorded as they crossed the port (one 64 KB
//! TCP frame, not its segments), with their real length.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use packet::FlowKey;
use parking_lot::Mutex;

use crate::filter::Filter;
use crate::pipeline::DropReason;

/// Most sessions on one port at once.
pub const MAX_SESSIONS_PER_PORT: usize = 4;
/// Frames a session buffers before it counts losses.
pub const QUEUE_FRAMES: usize = 4096;
/// Bytes a session buffers before it counts losses.
pub const QUEUE_BYTES: usize = 32 << 20;
/// Default and largest snap length (a 64 KB super-frame fits).
pub const MAX_SNAPLEN: u32 = 262_144;

/// Where in a port's life a frame was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Received from the VM.
    Rx,
    /// Written to the VM.
    Tx,
    /// Dropped at this port.
    Drop,
}

impl Stage {
    fn bit(self) -> u8 {
        match self {
            Stage::Rx => 1,
            Stage::Tx => 2,
            Stage::Drop => 4,
        }
    }

    /// Parses `rx`, `tx` or `drop`.
    pub fn parse(s: &str) -> Option<Stage> {
        match s {
            "rx" => Some(Stage::Rx),
            "tx" => Some(Stage::Tx),
            "drop" => Some(Stage::Drop),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Stage::Rx => "rx",
            Stage::Tx => "tx",
            Stage::Drop => "drop",
        }
    }
}

/// One captured frame.
#[derive(Debug)]
pub struct Record {
    /// Wall-clock time, microseconds since the Unix epoch.
    pub ts_us: u64,
    /// Stage.
    pub stage: Stage,
    /// Why it was dropped (stage drop).
    pub reason: Option<DropReason>,
    /// Length of the frame as it crossed the port.
    pub orig_len: u32,
    /// The first `snaplen` bytes.
    pub data: Vec<u8>,
}

/// One capture session.
#[derive(Debug)]
pub struct Session {
    stages: u8,
    snaplen: u32,
    filter: Option<Filter>,
    /// Underlay sessions for one port: only datagrams of the port's VNI
    /// whose inner frame is from or to its MAC.
    inner_port: Option<(packet::MacAddr, u32)>,
    /// Frames still wanted (`u64::MAX`: no limit).
    remaining: AtomicU64,
    queue: Mutex<(VecDeque<Record>, usize)>,
    /// Frames lost because the reader fell behind.
    pub lost: AtomicU64,
    /// Frames delivered into the queue.
    pub captured: AtomicU64,
    closed: AtomicBool,
    /// Wakes the reader.
    pub notify: tokio::sync::Notify,
}

impl Session {
    /// A session for `stages` (rx/tx/drop), `snaplen` bytes per frame, at
    /// most `count` frames, matching `filter`.
    pub fn new(
        stages: &[Stage],
        snaplen: u32,
        count: Option<u64>,
        filter: Option<Filter>,
    ) -> Session {
        Session {
            stages: stages.iter().fold(0, |m, s| m | s.bit()),
            snaplen: snaplen.clamp(64, MAX_SNAPLEN),
            filter,
            inner_port: None,
            remaining: AtomicU64::new(count.unwrap_or(u64::MAX)),
            queue: Mutex::new((VecDeque::new(), 0)),
            lost: AtomicU64::new(0),
            captured: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            notify: tokio::sync::Notify::new(),
        }
    }

    /// Only VXLAN datagrams with `vni` whose inner frame is from or to
    /// `mac` (an underlay capture for one port).
    pub fn for_port_on_underlay(mut self, mac: packet::MacAddr, vni: u32) -> Session {
        self.inner_port = Some((mac, vni));
        self
    }

    /// The snap length.
    pub fn snaplen(&self) -> u32 {
        self.snaplen
    }

    /// True once `count` frames were taken or the session was closed.
    pub fn done(&self) -> bool {
        self.closed.load(Ordering::Relaxed) || self.remaining.load(Ordering::Relaxed) == 0
    }

    /// Ends the session (the reader went away).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    /// Takes everything queued.
    pub fn drain(&self) -> Vec<Record> {
        let mut q = self.queue.lock();
        q.1 = 0;
        q.0.drain(..).collect()
    }

    fn offer(&self, stage: Stage, reason: Option<DropReason>, frame: &[u8]) {
        self.offer_parts(stage, reason, &[], frame, frame);
    }

    /// Offers the frame `head` + `body`, whose filter and port checks look
    /// at `inner` (for an underlay datagram: the encapsulated frame).
    fn offer_parts(
        &self,
        stage: Stage,
        reason: Option<DropReason>,
        head: &[u8],
        body: &[u8],
        inner: &[u8],
    ) {
        if self.stages & stage.bit() == 0 || self.done() {
            return;
        }
        if let Some((mac, vni)) = self.inner_port {
            let is = |r: std::ops::Range<usize>| inner.get(r) == Some(&mac.0[..]);
            let v = body
                .get(4..7)
                .map(|b| u32::from_be_bytes([0, b[0], b[1], b[2]]));
            if v != Some(vni) || (!is(0..6) && !is(6..12)) {
                return;
            }
        }
        if let Some(f) = &self.filter {
            let Ok(key) = FlowKey::parse(inner) else {
                return;
            };
            if !f.matches(&key) {
                return;
            }
        }
        // Claim one of the remaining frames.
        if self
            .remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1))
            .is_err()
        {
            return;
        }
        let len = head.len() + body.len();
        let take = len.min(self.snaplen as usize);
        {
            let mut q = self.queue.lock();
            if q.0.len() >= QUEUE_FRAMES || q.1 + take > QUEUE_BYTES {
                drop(q);
                self.lost.fetch_add(1, Ordering::Relaxed);
                self.notify.notify_one();
                return;
            }
            q.1 += take;
            q.0.push_back(Record {
                ts_us: now_us(),
                stage,
                reason,
                orig_len: u32::try_from(len).unwrap_or(u32::MAX),
                data: {
                    let h = head.len().min(take);
                    let mut d = Vec::with_capacity(take);
                    d.extend_from_slice(&head[..h]);
                    d.extend_from_slice(&body[..take - h]);
                    d
                },
            });
        }
        self.captured.fetch_add(1, Ordering::Relaxed);
        self.notify.notify_one();
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The capture point of one port; lives as long as the port. It also
/// holds the port's live packet traces (`vswitchctl trace --live`).
#[derive(Debug, Default)]
pub struct PortCapture {
    active: AtomicUsize,
    sessions: ArcSwap<Vec<Arc<Session>>>,
    lock: Mutex<()>,
    live: AtomicUsize,
    traces: ArcSwap<Vec<Arc<crate::trace::LiveSession>>>,
}

impl PortCapture {
    /// Offers a frame to the port's sessions. When nobody captures this is
    /// one relaxed load.
    #[inline]
    pub fn offer(&self, stage: Stage, reason: Option<DropReason>, frame: &[u8]) {
        if !cfg!(feature = "observe") || self.active.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.offer_slow(stage, reason, frame);
    }

    #[cold]
    fn offer_slow(&self, stage: Stage, reason: Option<DropReason>, frame: &[u8]) {
        for s in self.sessions.load().iter() {
            s.offer(stage, reason, frame);
        }
    }

    /// Whether any session listens (the caller builds what it offers only
    /// then).
    #[inline]
    pub fn active(&self) -> bool {
        cfg!(feature = "observe") && self.active.load(Ordering::Relaxed) != 0
    }

    /// Offers a frame made of `head` (headers the kernel adds, rebuilt for
    /// the capture) and `body`; filters see `inner`.
    #[cold]
    pub fn offer_parts(
        &self,
        stage: Stage,
        reason: Option<DropReason>,
        head: &[u8],
        body: &[u8],
        inner: &[u8],
    ) {
        for s in self.sessions.load().iter() {
            s.offer_parts(stage, reason, head, body, inner);
        }
    }

    /// Adds a session; `Err` when the port has [`MAX_SESSIONS_PER_PORT`].
    pub fn attach(&self, s: Arc<Session>) -> Result<(), String> {
        let _g = self.lock.lock();
        let cur = self.sessions.load();
        if cur.len() >= MAX_SESSIONS_PER_PORT {
            return Err(format!(
                "the port already has {MAX_SESSIONS_PER_PORT} captures; stop one first"
            ));
        }
        let mut v: Vec<Arc<Session>> = cur.iter().cloned().collect();
        v.push(s);
        self.active.store(v.len(), Ordering::Relaxed);
        self.sessions.store(Arc::new(v));
        Ok(())
    }

    /// Whether a live trace waits for packets of this port: one relaxed
    /// load when none does.
    #[inline]
    pub fn tracing(&self) -> bool {
        cfg!(feature = "observe") && self.live.load(Ordering::Relaxed) != 0
    }

    /// The live trace that claims this frame, if any.
    #[cold]
    pub fn claim_trace(&self, frame: &[u8]) -> Option<Arc<crate::trace::LiveSession>> {
        self.traces.load().iter().find(|t| t.claim(frame)).cloned()
    }

    /// Adds a live trace; `Err` when the port has [`MAX_SESSIONS_PER_PORT`].
    pub fn attach_trace(&self, t: Arc<crate::trace::LiveSession>) -> Result<(), String> {
        let _g = self.lock.lock();
        let cur = self.traces.load();
        if cur.len() >= MAX_SESSIONS_PER_PORT {
            return Err(format!(
                "the port already has {MAX_SESSIONS_PER_PORT} live traces; wait for one to end"
            ));
        }
        let mut v: Vec<_> = cur.iter().cloned().collect();
        v.push(t);
        self.live.store(v.len(), Ordering::Relaxed);
        self.traces.store(Arc::new(v));
        Ok(())
    }

    /// Removes a live trace.
    pub fn detach_trace(&self, t: &Arc<crate::trace::LiveSession>) {
        let _g = self.lock.lock();
        let v: Vec<_> = self
            .traces
            .load()
            .iter()
            .filter(|x| !Arc::ptr_eq(x, t))
            .cloned()
            .collect();
        self.live.store(v.len(), Ordering::Relaxed);
        self.traces.store(Arc::new(v));
    }

    /// Removes a session.
    pub fn detach(&self, s: &Arc<Session>) {
        let _g = self.lock.lock();
        let v: Vec<Arc<Session>> = self
            .sessions
            .load()
            .iter()
            .filter(|x| !Arc::ptr_eq(x, s))
            .cloned()
            .collect();
        self.active.store(v.len(), Ordering::Relaxed);
        self.sessions.store(Arc::new(v));
    }
}

// --- pcapng (https://www.ietf.org/archive/id/draft-ietf-opsawg-pcapng) ---

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

fn block(kind: u32, body: &[u8], out: &mut Vec<u8>) {
    let total = u32::try_from(12 + body.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&total.to_le_bytes());
}

fn option(code: u16, value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(value);
    out.extend(std::iter::repeat_n(0u8, pad4(value.len())));
}

/// Section Header Block + Interface Description Block (Ethernet) for a
/// capture of port `port` with `snaplen`.
pub fn write_pcapng_header(port: &str, snaplen: u32, out: &mut Vec<u8>) {
    let mut b = Vec::new();
    b.extend_from_slice(&0x1A2B_3C4Du32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&(-1i64).to_le_bytes());
    option(4, b"vswitchd", &mut b); // shb_userappl
    option(0, &[], &mut b);
    block(0x0A0D_0D0A, &b, out);
    let mut b = Vec::new();
    b.extend_from_slice(&1u16.to_le_bytes()); // LINKTYPE_ETHERNET
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&snaplen.to_le_bytes());
    option(2, port.as_bytes(), &mut b); // if_name
    option(0, &[], &mut b);
    block(1, &b, out);
}

/// One Enhanced Packet Block: direction flag (inbound = from the VM) and a
/// comment naming the stage and drop reason.
pub fn write_pcapng_record(r: &Record, out: &mut Vec<u8>) {
    let mut b = Vec::new();
    b.extend_from_slice(&0u32.to_le_bytes()); // interface 0
    b.extend_from_slice(&((r.ts_us >> 32) as u32).to_le_bytes());
    b.extend_from_slice(&(r.ts_us as u32).to_le_bytes());
    b.extend_from_slice(
        &u32::try_from(r.data.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    b.extend_from_slice(&r.orig_len.to_le_bytes());
    b.extend_from_slice(&r.data);
    b.extend(std::iter::repeat_n(0u8, pad4(r.data.len())));
    let comment = match r.reason {
        Some(why) => format!("stage={} reason={}", r.stage.as_str(), why.as_str()),
        None => format!("stage={}", r.stage.as_str()),
    };
    option(1, comment.as_bytes(), &mut b); // opt_comment
    let dir: u32 = match r.stage {
        Stage::Rx => 1,
        Stage::Tx => 2,
        Stage::Drop => 1,
    };
    option(2, &dir.to_le_bytes(), &mut b); // epb_flags: direction
    option(0, &[], &mut b);
    block(6, &b, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Vec<u8> {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1000, 53)
            .write(&mut f, &vec![7u8; n])
            .unwrap();
        f
    }

    #[test]
    fn sessions_take_their_stages_count_and_snaplen() {
        let pc = PortCapture::default();
        pc.offer(Stage::Rx, None, &frame(10)); // nobody listens
        let s = Arc::new(Session::new(&[Stage::Rx, Stage::Drop], 64, Some(3), None));
        pc.attach(s.clone()).unwrap();
        pc.offer(Stage::Tx, None, &frame(10)); // not wanted
        pc.offer(Stage::Rx, None, &frame(100));
        pc.offer(Stage::Drop, Some(DropReason::IpSrcSpoofed), &frame(10));
        pc.offer(Stage::Rx, None, &frame(10));
        pc.offer(Stage::Rx, None, &frame(10)); // count reached
        let r = s.drain();
        assert_eq!(r.len(), 3);
        assert!(s.done());
        assert_eq!(r[0].data.len(), 64);
        assert_eq!(r[0].orig_len as usize, frame(100).len());
        assert_eq!(r[1].reason, Some(DropReason::IpSrcSpoofed));
        pc.detach(&s);
        assert_eq!(pc.active.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_slow_reader_loses_frames_and_never_blocks() {
        let pc = PortCapture::default();
        let s = Arc::new(Session::new(&[Stage::Rx], 64, None, None));
        pc.attach(s.clone()).unwrap();
        for _ in 0..QUEUE_FRAMES + 10 {
            pc.offer(Stage::Rx, None, &frame(10));
        }
        assert_eq!(s.lost.load(Ordering::Relaxed), 10);
        assert_eq!(s.drain().len(), QUEUE_FRAMES);
        for _ in 0..MAX_SESSIONS_PER_PORT - 1 {
            pc.attach(Arc::new(Session::new(&[Stage::Rx], 64, None, None)))
                .unwrap();
        }
        assert!(pc
            .attach(Arc::new(Session::new(&[Stage::Rx], 64, None, None)))
            .is_err());
    }

    #[test]
    fn pcapng_blocks_are_well_formed() {
        let mut out = Vec::new();
        write_pcapng_header("vm1", 65535, &mut out);
        let r = Record {
            ts_us: 1_700_000_000_000_000,
            stage: Stage::Drop,
            reason: Some(DropReason::ArpSpoofed),
            orig_len: 61,
            data: vec![1; 61],
        };
        write_pcapng_record(&r, &mut out);
        // Walk the blocks: each length is a multiple of 4 and repeated at
        // its end.
        let mut i = 0;
        let mut kinds = Vec::new();
        while i < out.len() {
            let kind = u32::from_le_bytes(out[i..i + 4].try_into().unwrap());
            let len = u32::from_le_bytes(out[i + 4..i + 8].try_into().unwrap()) as usize;
            assert_eq!(len % 4, 0);
            assert_eq!(&out[i + len - 4..i + len], &out[i + 4..i + 8]);
            kinds.push(kind);
            i += len;
        }
        assert_eq!(kinds, [0x0A0D_0D0A, 1, 6]);
        assert!(out
            .windows(29)
            .any(|w| w == b"stage=drop reason=arp_spoofed"));
    }
}
