//! Capture filters and capture sessions: `vswitch::filter::Filter::parse` /
//! `matches`, and `vswitch::capture::{Session, PortCapture,
//! write_pcapng_header, write_pcapng_record}`.
//!
//! Input: `text 0x00 stages snaplen(3, LE) count ops...`. `text` (bytes up to
//! the first NUL, lossily UTF-8) is the filter; `stages` bits 0-2 pick rx,
//! tx, drop (none: rx only), bit 3 attaches the filter to the session (when
//! it parses), bit 4 detaches a second session half-way, bit 5 allows
//! repeated offers (below); `snaplen` is any
//! value (the session clamps it to 64..=262144); `count` 0 is no limit, else
//! `count - 1` frames. Each op is `[op, len(2, LE), frame(len)]`: `op & 3` is
//! the stage (rx, tx, drop; 3: drain the queue now), `(op >> 2) & 31` a drop
//! reason, `op & 0x80` (with stages bit 5) offers the frame 1100 times if
//! it has at most 128 bytes, for the first four such ops (the 4096-frame
//! queue overflows on the fourth; slow, hence opt-in).
//!
//! Asserts: never panics; every error message is non-empty; an accepted
//! filter is at most 256 levels deep (it came from at most 256 words) and
//! its `matches` equals a reference evaluator of the grammar documented in
//! filter.rs on every frame's flow key (the model accepts every filter
//! `parse` accepts; `parse` refuses what the model accepts only with its
//! word-count or nesting limit), and `not ( F )` matches the opposite;
//! sessions: a drained record is a frame offered at a wanted stage (that the
//! filter matches), in order, its first `min(len, snaplen)` bytes with the
//! original length, stage and reason; exactly the first `count` wanted
//! frames are taken (captured + lost), the queue never holds more than 4096
//! frames (the rest is lost, counted), `done` once the count is reached;
//! a fifth session on a port is refused; an unfiltered 64-byte snaplen
//! session on the same port sees every offer at its stages; the pcapng
//! stream (section header, interface with the session's snap length and the
//! port name, one enhanced packet block per record) walks as blocks whose
//! length is a multiple of 4 and repeated at the end, options that end with
//! opt_endofopt inside their block, EPB captured length == the record's,
//! <= snaplen and <= the original length, the data and the
//! `stage=...[ reason=...]` comment and direction flag of the record.
#![no_main]

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use packet::{FlowKey, MacAddr, L3, L4};
use vswitch::capture::{
    write_pcapng_header, write_pcapng_record, PortCapture, Record, Session, Stage, MAX_SESSIONS_PER_PORT,
    MAX_SNAPLEN, QUEUE_FRAMES,
};
use vswitch::filter::Filter;
use vswitch::pipeline::DropReason;

// --- reference filter -------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Dir {
    Src,
    Dst,
    Any,
}

#[derive(Debug)]
enum M {
    Proto(&'static str),
    Host(Dir, IpAddr),
    Net(Dir, IpAddr, u8),
    Port(Dir, u16, u16),
    Ether(Dir, MacAddr),
    Vlan(Option<u16>),
    Not(Box<M>),
    And(Box<M>, Box<M>),
    Or(Box<M>, Box<M>),
}

fn tokens(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in s.split(char::is_whitespace) {
        let mut cur = String::new();
        for c in word.chars() {
            if matches!(c, '(' | ')' | '!') {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                out.push(c.to_string());
            } else {
                cur.push(c);
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
    }
    out
}

struct P<'a> {
    t: &'a [String],
    i: usize,
}

impl P<'_> {
    fn peek(&self) -> Option<&str> {
        self.t.get(self.i).map(String::as_str)
    }
    fn take(&mut self) -> Option<&str> {
        let t = self.t.get(self.i).map(String::as_str);
        self.i += 1;
        t
    }
    // expr := term (or term)*
    fn expr(&mut self) -> Option<M> {
        let mut l = self.term()?;
        while matches!(self.peek(), Some("or" | "||")) {
            self.i += 1;
            l = M::Or(Box::new(l), Box::new(self.term()?));
        }
        Some(l)
    }
    // term := factor (and factor)*
    fn term(&mut self) -> Option<M> {
        let mut l = self.factor()?;
        while matches!(self.peek(), Some("and" | "&&")) {
            self.i += 1;
            l = M::And(Box::new(l), Box::new(self.factor()?));
        }
        Some(l)
    }
    // factor := not factor | ( expr ) | primitive
    fn factor(&mut self) -> Option<M> {
        match self.peek()? {
            "not" | "!" => {
                self.i += 1;
                Some(M::Not(Box::new(self.factor()?)))
            }
            "(" => {
                self.i += 1;
                let e = self.expr()?;
                (self.take()? == ")").then_some(e)
            }
            _ => self.primitive(),
        }
    }
    fn primitive(&mut self) -> Option<M> {
        let w = self.take()?.to_owned();
        Some(match w.as_str() {
            // `(tcp|udp) [src|dst] port N`: the protocol qualifies a port
            // primitive (filter.rs also takes `tcp src host X` here).
            "tcp" | "udp" => {
                let proto = M::Proto(if w == "tcp" { "tcp" } else { "udp" });
                if matches!(self.peek(), Some("port" | "portrange" | "src" | "dst")) {
                    let q = self.qualified()?;
                    M::And(Box::new(proto), Box::new(q))
                } else {
                    proto
                }
            }
            "icmp" => M::Proto("icmp"),
            "icmp6" => M::Proto("icmp6"),
            "arp" => M::Proto("arp"),
            "ip" => M::Proto("ip"),
            "ip6" => M::Proto("ip6"),
            "ether" => {
                let mut w = self.take()?;
                let d = match w {
                    "src" => Dir::Src,
                    "dst" => Dir::Dst,
                    _ => Dir::Any,
                };
                if !matches!(d, Dir::Any) {
                    w = self.take()?;
                }
                if w != "host" {
                    return None;
                }
                M::Ether(d, self.take()?.parse().ok()?)
            }
            "vlan" => match self.peek().and_then(|v| v.parse::<u16>().ok()).filter(|&v| v < 4096) {
                Some(v) => {
                    self.i += 1;
                    M::Vlan(Some(v))
                }
                None => M::Vlan(None),
            },
            _ => {
                self.i -= 1;
                self.qualified()?
            }
        })
    }
    // [src|dst] host|net|port|portrange ARG
    fn qualified(&mut self) -> Option<M> {
        let mut w = self.take()?;
        let d = match w {
            "src" => Dir::Src,
            "dst" => Dir::Dst,
            _ => Dir::Any,
        };
        if !matches!(d, Dir::Any) {
            w = self.take()?;
        }
        let w = w.to_owned();
        let v = self.take()?;
        Some(match w.as_str() {
            "host" => M::Host(d, v.parse().ok()?),
            "net" => {
                let n: ipnet::IpNet = v.parse().ok()?;
                M::Net(d, n.addr(), n.prefix_len())
            }
            "port" => {
                let p: u16 = v.parse().ok()?;
                M::Port(d, p, p)
            }
            "portrange" => {
                let (a, b) = v.split_once('-')?;
                let (a, b): (u16, u16) = (a.parse().ok()?, b.parse().ok()?);
                if a > b {
                    return None;
                }
                M::Port(d, a, b)
            }
            _ => return None,
        })
    }
}

fn model_parse(toks: &[String]) -> Option<M> {
    let mut p = P { t: toks, i: 0 };
    let m = p.expr()?;
    (p.i == toks.len()).then_some(m)
}

fn pick<T: Copy>(d: Dir, s: T, t: T, f: impl Fn(T) -> bool) -> bool {
    match d {
        Dir::Src => f(s),
        Dir::Dst => f(t),
        Dir::Any => f(s) || f(t),
    }
}

/// `addr` within `net/len`, bit by bit (no `ipnet`).
fn in_prefix(addr: IpAddr, net: IpAddr, len: u8) -> bool {
    let (a, n): (Vec<u8>, Vec<u8>) = match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => (a.octets().to_vec(), n.octets().to_vec()),
        (IpAddr::V6(a), IpAddr::V6(n)) => (a.octets().to_vec(), n.octets().to_vec()),
        _ => return false,
    };
    (0..usize::from(len)).all(|bit| (a[bit / 8] ^ n[bit / 8]) & (0x80 >> (bit % 8)) == 0)
}

fn eval(m: &M, k: &FlowKey) -> bool {
    let addrs = match k.l3 {
        L3::Ipv4(ip) | L3::Ipv6(ip) => Some((ip.src, ip.dst)),
        L3::Arp(a) => Some((IpAddr::V4(a.spa), IpAddr::V4(a.tpa))),
        L3::None => None,
    };
    let ports = match k.l4 {
        L4::Tcp { src_port, dst_port, .. } | L4::Udp { src_port, dst_port } => Some((src_port, dst_port)),
        _ => None,
    };
    match m {
        M::Proto(p) => match *p {
            "tcp" => matches!(k.l4, L4::Tcp { .. }),
            "udp" => matches!(k.l4, L4::Udp { .. }),
            "icmp" => matches!(k.l4, L4::Icmpv4 { .. }),
            "icmp6" => matches!(k.l4, L4::Icmpv6 { .. }),
            "arp" => matches!(k.l3, L3::Arp(_)),
            "ip" => matches!(k.l3, L3::Ipv4(_)),
            "ip6" => matches!(k.l3, L3::Ipv6(_)),
            _ => unreachable!(),
        },
        M::Host(d, a) => addrs.is_some_and(|(s, t)| pick(*d, s, t, |x| x == *a)),
        M::Net(d, n, l) => addrs.is_some_and(|(s, t)| pick(*d, s, t, |x| in_prefix(x, *n, *l))),
        M::Port(d, lo, hi) => ports.is_some_and(|(s, t)| pick(*d, s, t, |x| *lo <= x && x <= *hi)),
        M::Ether(d, mac) => pick(*d, k.src_mac, k.dst_mac, |x| x == *mac),
        M::Vlan(v) => match v {
            None => k.vlan.is_some(),
            Some(id) => k.vlan == Some(*id),
        },
        M::Not(a) => !eval(a, k),
        M::And(a, b) => eval(a, k) && eval(b, k),
        M::Or(a, b) => eval(a, k) || eval(b, k),
    }
}

fn depth(f: &Filter) -> usize {
    match f {
        Filter::Prim(_) => 1,
        Filter::Not(a) => 1 + depth(a),
        Filter::And(a, b) | Filter::Or(a, b) => 1 + depth(a).max(depth(b)),
    }
}

/// Compiles `text` with both parsers; returns the filter and its model when
/// `Filter::parse` accepts it.
fn compile(text: &str) -> Option<(Filter, M)> {
    let toks = tokens(text);
    let real = Filter::parse(text);
    if toks.len() > 256 {
        let e = real.expect_err("accepted more than 256 words");
        assert!(e.contains("256 words"), "{e}");
        return None;
    }
    let model = model_parse(&toks);
    match (real, model) {
        (Ok(f), Some(m)) => {
            assert!(depth(&f) <= 256, "filter {} deep from {} words", depth(&f), toks.len());
            Some((f, m))
        }
        (Ok(f), None) => panic!("parse accepted {text:?} (as {f:?}) outside the documented grammar"),
        (Err(e), Some(m)) => {
            assert!(e.contains("nested too deeply"), "refused {text:?}: {e}; the grammar gives {m:?}");
            None
        }
        (Err(e), None) => {
            assert!(!e.is_empty(), "empty error for {text:?}");
            None
        }
    }
}

// --- capture ----------------------------------------------------------------

const STAGES: [Stage; 3] = [Stage::Rx, Stage::Tx, Stage::Drop];

fn stage_name(s: Stage) -> &'static str {
    match s {
        Stage::Rx => "rx",
        Stage::Tx => "tx",
        Stage::Drop => "drop",
    }
}

struct Offer<'a> {
    stage: Stage,
    reason: Option<DropReason>,
    frame: &'a [u8],
}

fn le32(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

fn le16(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes(b[i..i + 2].try_into().expect("2 bytes"))
}

/// Walks the options of a block body from `at`; returns `(code, value)`s up
/// to opt_endofopt, which must end exactly at the body's end.
fn options(body: &[u8], mut at: usize) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        assert!(at + 4 <= body.len(), "option header beyond its block");
        let (code, len) = (le16(body, at), usize::from(le16(body, at + 2)));
        let padded = len.div_ceil(4) * 4;
        assert!(at + 4 + padded <= body.len(), "option {code} value beyond its block");
        assert!(body[at + 4 + len..at + 4 + padded].iter().all(|&b| b == 0), "option padding not zero");
        if code == 0 {
            assert_eq!(len, 0, "opt_endofopt with a value");
            assert_eq!(at + 4, body.len(), "bytes after opt_endofopt");
            return out;
        }
        out.push((code, body[at + 4..at + 4 + len].to_vec()));
        at += 4 + padded;
    }
}

/// Walks the pcapng stream; returns the EPBs as (caplen, orig_len, data,
/// comment, flags).
#[allow(clippy::type_complexity)]
fn walk_pcapng(out: &[u8], port: &str, snaplen: u32) -> Vec<(u32, u32, Vec<u8>, Vec<u8>, u32)> {
    let mut i = 0;
    let mut kinds = Vec::new();
    let mut epbs = Vec::new();
    while i < out.len() {
        assert!(out.len() - i >= 12, "truncated block at {i}");
        let kind = le32(out, i);
        let len = le32(out, i + 4) as usize;
        assert!(len >= 12 && len.is_multiple_of(4), "block length {len}");
        assert!(i + len <= out.len(), "block beyond the stream");
        assert_eq!(le32(out, i + len - 4) as usize, len, "trailing block length");
        let body = &out[i + 8..i + len - 4];
        match kind {
            0x0A0D_0D0A => {
                assert!(kinds.is_empty(), "section header not first");
                assert_eq!(le32(body, 0), 0x1A2B_3C4D, "byte-order magic");
                assert_eq!((le16(body, 4), le16(body, 6)), (1, 0), "version");
                assert_eq!(&body[8..16], &[0xff; 8], "section length");
                options(body, 16);
            }
            1 => {
                assert_eq!(kinds, [0x0A0D_0D0A], "interface block not second");
                assert_eq!(le16(body, 0), 1, "link type");
                assert_eq!(le32(body, 4), snaplen, "interface snaplen");
                let opts = options(body, 8);
                assert!(opts.contains(&(2, port.as_bytes().to_vec())), "if_name");
            }
            6 => {
                assert_eq!(&kinds[..2], [0x0A0D_0D0A, 1], "packet before the interface");
                assert_eq!(le32(body, 0), 0, "interface id");
                let (caplen, orig) = (le32(body, 12), le32(body, 16));
                assert!(caplen <= snaplen, "captured {caplen} > snaplen {snaplen}");
                assert!(caplen <= orig, "captured {caplen} > original {orig}");
                let c = caplen as usize;
                let padded = c.div_ceil(4) * 4;
                assert!(20 + padded <= body.len(), "packet data beyond the block");
                assert!(body[20 + c..20 + padded].iter().all(|&b| b == 0), "packet padding not zero");
                let opts = options(body, 20 + padded);
                let comment = opts.iter().find(|o| o.0 == 1).map(|o| o.1.clone()).unwrap_or_default();
                let flags = opts
                    .iter()
                    .find(|o| o.0 == 2)
                    .map(|o| {
                        assert_eq!(o.1.len(), 4, "epb_flags length");
                        le32(&o.1, 0)
                    })
                    .expect("epb_flags");
                epbs.push((caplen, orig, body[20..20 + c].to_vec(), comment, flags));
            }
            other => panic!("unexpected block type {other:#x}"),
        }
        kinds.push(kind);
        i += len;
    }
    assert!(kinds.len() >= 2, "no header");
    epbs
}

fuzz_target!(|data: &[u8]| {
    let (text, rest) = match data.iter().position(|&b| b == 0) {
        Some(n) => (&data[..n], &data[n + 1..]),
        None => (data, &[][..]),
    };
    let text = String::from_utf8_lossy(text);
    let compiled = compile(&text);

    let [stage_bits, s0, s1, s2, count, ops @ ..] = rest else {
        return;
    };
    let mut ops: &[u8] = ops;
    let mut offers = Vec::new();
    while let &[op, l0, l1, ref tail @ ..] = ops {
        let len = usize::from(u16::from_le_bytes([l0, l1])).min(tail.len());
        let (frame, next) = tail.split_at(len);
        ops = next;
        offers.push((op, frame));
    }

    // The filter on every frame, and `not ( F )`.
    if let Some((f, m)) = &compiled {
        let neg = Filter::parse(&format!("not ( {text} )"));
        for (_, frame) in &offers {
            if let Ok(k) = FlowKey::parse(frame) {
                let got = f.matches(&k);
                assert_eq!(got, eval(m, &k), "{text:?} on {k:?}: filter says {got}, the grammar {m:?} says otherwise");
                match &neg {
                    Ok(n) => assert_eq!(n.matches(&k), !got, "not ( {text} ) on {k:?}"),
                    Err(e) => assert!(e.contains("256 words") || e.contains("nested too deeply"), "{e}"),
                }
            }
        }
    }

    let stages: Vec<Stage> = STAGES.iter().enumerate().filter(|(i, _)| stage_bits & (1 << i) != 0).map(|(_, s)| *s).collect();
    let stages = if stages.is_empty() { vec![Stage::Rx] } else { stages };
    let snap_req = u32::from_le_bytes([*s0, *s1, *s2, 0]);
    let limit = (*count != 0).then(|| u64::from(*count - 1));
    let filter = compiled.as_ref().filter(|_| stage_bits & 8 != 0).map(|(f, _)| f.clone());
    let model = compiled.as_ref().filter(|_| stage_bits & 8 != 0).map(|(_, m)| m);

    let session = Arc::new(Session::new(&stages, snap_req, limit, filter));
    let snaplen = session.snaplen();
    assert_eq!(snaplen, snap_req.clamp(64, MAX_SNAPLEN), "snaplen not clamped");
    let all = Arc::new(Session::new(&STAGES, 0, None, None));
    let pc = PortCapture::default();
    pc.attach(session.clone()).expect("first session");
    pc.attach(all.clone()).expect("second session");
    let extra: Vec<Arc<Session>> =
        (2..MAX_SESSIONS_PER_PORT).map(|_| Arc::new(Session::new(&[Stage::Rx], 64, Some(0), None))).collect();
    for s in &extra {
        pc.attach(s.clone()).expect("session within the limit");
    }
    assert!(pc.attach(Arc::new(Session::new(&[Stage::Rx], 64, None, None))).is_err(), "a fifth session");
    for s in &extra {
        pc.detach(s);
    }

    // Model of the session: which offers it takes, which it loses.
    let mut want: Vec<Offer> = Vec::new();
    let mut drained: Vec<Record> = Vec::new();
    let mut all_drained: Vec<Record> = Vec::new();
    let mut all_want: Vec<Offer> = Vec::new();
    let (mut remaining, mut queued, mut lost) = (limit.unwrap_or(u64::MAX), 0usize, 0u64);
    let (mut all_queued, mut all_lost) = (0usize, 0u64);
    let mut all_attached = true;
    let half = offers.len() / 2;
    let mut repeats = 0;
    for (n, (op, frame)) in offers.iter().enumerate() {
        if stage_bits & 0x10 != 0 && n == half && all_attached {
            pc.detach(&all);
            all_attached = false;
        }
        if op & 3 == 3 {
            drained.extend(session.drain());
            queued = 0;
            continue;
        }
        let stage = STAGES[usize::from(op & 3)];
        let reason = (stage == Stage::Drop).then(|| DropReason::ALL[usize::from((op >> 2) & 31) % DropReason::COUNT]);
        // Cheap enough to keep the fuzzer fast: short frames, four times.
        let times = if stage_bits & 0x20 != 0 && op & 0x80 != 0 && frame.len() <= 128 && repeats < 4 {
            repeats += 1;
            1100
        } else {
            1
        };
        let wanted = stages.contains(&stage)
            && model.is_none_or(|m| FlowKey::parse(frame).is_ok_and(|k| eval(m, &k)));
        for _ in 0..times {
            pc.offer(stage, reason, frame);
            if wanted && remaining > 0 {
                remaining -= 1;
                if queued < QUEUE_FRAMES {
                    queued += 1;
                    want.push(Offer { stage, reason, frame });
                } else {
                    lost += 1;
                }
            }
            if all_attached {
                if all_queued < QUEUE_FRAMES {
                    all_queued += 1;
                    all_want.push(Offer { stage, reason, frame });
                } else {
                    all_lost += 1;
                }
            }
        }
        if all_queued >= QUEUE_FRAMES {
            all_drained.extend(all.drain());
            all_queued = 0;
        }
    }
    drained.extend(session.drain());
    all_drained.extend(all.drain());

    assert_eq!(session.lost.load(Ordering::Relaxed), lost, "lost frames");
    assert_eq!(session.captured.load(Ordering::Relaxed), want.len() as u64, "captured frames");
    assert_eq!(session.done(), remaining == 0, "done() with {remaining} frames to go");
    if let Some(c) = limit {
        assert!(drained.len() as u64 + lost <= c, "count {c} exceeded");
    }
    assert_eq!(drained.len(), want.len(), "records");
    for (r, o) in drained.iter().zip(&want) {
        assert_eq!((r.stage, r.reason), (o.stage, o.reason));
        assert_eq!(r.orig_len as usize, o.frame.len());
        assert_eq!(r.data, &o.frame[..o.frame.len().min(snaplen as usize)]);
    }
    assert_eq!(all.lost.load(Ordering::Relaxed), all_lost);
    assert_eq!(all_drained.len(), all_want.len(), "unfiltered session");
    for (r, o) in all_drained.iter().zip(&all_want) {
        assert_eq!((r.stage, r.reason, r.orig_len as usize), (o.stage, o.reason, o.frame.len()));
        assert_eq!(r.data, &o.frame[..o.frame.len().min(64)]);
    }

    // pcapng of what the session took. The port name: the filter text, cut
    // (the config bounds port names).
    let port: String = text.chars().take(40).collect();
    let mut out = Vec::new();
    write_pcapng_header(&port, snaplen, &mut out);
    // Bounded output: at most the first 64 records.
    for r in drained.iter().take(64) {
        write_pcapng_record(r, &mut out);
    }
    let epbs = walk_pcapng(&out, &port, snaplen);
    assert_eq!(epbs.len(), drained.len().min(64));
    for ((caplen, orig, data, comment, flags), r) in epbs.iter().zip(&drained) {
        assert_eq!(*caplen as usize, r.data.len());
        assert_eq!(*orig, r.orig_len);
        assert_eq!(data, &r.data);
        let want = match r.reason {
            Some(why) => format!("stage={} reason={}", stage_name(r.stage), why.as_str()),
            None => format!("stage={}", stage_name(r.stage)),
        };
        assert_eq!(comment, want.as_bytes(), "comment");
        let dir = if r.stage == Stage::Tx { 2 } else { 1 };
        assert_eq!(*flags & 3, dir, "direction flag");
    }
});
