//! Per-protocol connection state: the TCP state machine with its loose
//! sequence tracking, UDP/ICMP/other "replied" flags, and the timeout class
//! each state maps to.
//!
//! The TCP rules are documented on [`TcpState`].

use serde::{Deserialize, Serialize};

use crate::key::Dir;
use crate::outcome::Invalid;

/// TCP flag bits (as in [`packet::flow::tcp_flags`]).
pub(crate) mod flags {
    pub use packet::flow::tcp_flags::{ACK, FIN, RST, SYN};
}
use flags::{ACK, FIN, RST, SYN};

/// TCP connection state.
///
/// Each direction (side) records its initial sequence number, the highest
/// sequence number it has sent (`end`: seq + payload + SYN + FIN), the
/// largest window it advertised (scaled when both SYNs carried the window
/// scale option, RFC 7323), and whether its SYN and FIN were acknowledged
/// by the other side (an ACK covering ISN + 1 / the FIN's sequence + 1).
/// The state follows from those facts:
///
/// | state | meaning |
/// |---|---|
/// | `SynSent` | only the original SYN seen |
/// | `SynRecv` | both SYNs seen (SYN-ACK, or a simultaneous open), not both acknowledged |
/// | `Established` | both SYNs acknowledged, no FIN |
/// | `FinWait` | a FIN from one side, not yet acknowledged |
/// | `CloseWait` | one side's FIN acknowledged, the other side still open (half-close) |
/// | `LastAck` | FINs from both sides, not both acknowledged (also simultaneous close) |
/// | `TimeWait` | both FINs acknowledged |
/// | `Close` | an accepted RST |
///
/// Flag combinations no stack sends (none, FIN without ACK, SYN+FIN,
/// SYN+RST, RST+FIN) are invalid, as in Linux's `tcp_valid_flags`; PSH,
/// URG, ECE and CWR are ignored.
///
/// A plain SYN (either direction) on an entry in `TimeWait` or `Close`
/// reopens: the old entry goes and the packet is a new connection (port
/// reuse). A SYN in other states is accepted only as a retransmission (same
/// ISN) or as the second SYN of a simultaneous open; otherwise it is
/// invalid (a client that lost its state gets a challenge ACK from the
/// server, answers with an in-window RST, which closes the entry, and its
/// next SYN reopens).
///
/// **RST check (loose).** A RST is accepted when its sequence number is
/// within one receive window of the sender's `end`, in either direction:
/// `|seq - end| <= max(peer's largest window, 65535)`. From a side that has
/// not sent a SYN yet (the responder in SYN_SENT: "connection refused") it
/// is accepted only with an ACK of the SYN (ISN + 1), as RFC 9293 section
/// 3.10.7.3 requires. An out-of-window RST is `Invalid` and changes nothing.
/// This is much looser than RFC 5961's exact match (conntrack cannot send
/// challenge ACKs) but stops blind RSTs with random sequence numbers.
/// No other segment is checked against the window.
///
/// Timeouts ([`crate::Timeouts`]): `Established` uses
/// `tcp_established_secs`; `SynSent`, `SynRecv`, `FinWait`, `CloseWait` and
/// `LastAck` use `tcp_transitory_secs`; `TimeWait` and `Close` their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TcpState {
    /// Only the original SYN seen.
    SynSent,
    /// Both SYNs seen, handshake not complete.
    SynRecv,
    /// Handshake complete, no FIN.
    Established,
    /// A FIN not yet acknowledged.
    FinWait,
    /// One side closed (FIN acknowledged), the other still open.
    CloseWait,
    /// Both sides sent FIN, not both acknowledged.
    LastAck,
    /// Both FINs acknowledged.
    TimeWait,
    /// Reset.
    Close,
}

impl TcpState {
    /// Name as in `conntrack -L`.
    pub fn as_str(self) -> &'static str {
        match self {
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
        }
    }
}

/// A connection's state for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConnState {
    /// TCP.
    Tcp(TcpState),
    /// UDP; `assured` once a reply was seen.
    Udp {
        /// A packet in the reply direction was seen.
        assured: bool,
    },
    /// ICMP/ICMPv6 query.
    Icmp {
        /// The reply was seen.
        replied: bool,
    },
    /// Another IP protocol.
    Other {
        /// A packet in the reply direction was seen.
        replied: bool,
    },
}

impl ConnState {
    /// `SYN_SENT` ... `CLOSE`, `UNREPLIED`, `ASSURED` (UDP), `REPLIED`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Tcp(t) => t.as_str(),
            ConnState::Udp { assured: true } => "ASSURED",
            ConnState::Icmp { replied: true } | ConnState::Other { replied: true } => "REPLIED",
            ConnState::Udp { assured: false }
            | ConnState::Icmp { replied: false }
            | ConnState::Other { replied: false } => "UNREPLIED",
        }
    }
}

/// Timeout classes: each has one fixed timeout, so entries refreshed in
/// time order stay in deadline order within their class's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Class {
    UdpUnreplied = 0,
    UdpAssured,
    TcpTransitory,
    TcpEstablished,
    TcpTimeWait,
    TcpClose,
    Icmp,
    Other,
}

/// Number of timeout classes.
pub(crate) const CLASSES: usize = 8;

impl Class {
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// The TCP header fields the state machine reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seg {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub win: u16,
    /// Window scale option (SYN only), clamped to 14.
    pub wscale: Option<u8>,
    /// Payload length.
    pub len: u32,
}

impl Seg {
    /// Sequence space the segment occupies (payload + SYN + FIN).
    fn span(&self) -> u32 {
        self.len
            .wrapping_add(u32::from(self.flags & SYN != 0))
            .wrapping_add(u32::from(self.flags & FIN != 0))
    }
}

/// `a` is at or after `b` in sequence space (RFC 1982 style).
fn after_eq(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) >= 0
}

fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Flag combinations real stacks send (masked to SYN/ACK/FIN/RST).
pub(crate) fn valid_flags(f: u8) -> bool {
    matches!(
        f & (SYN | ACK | FIN | RST),
        x if x == SYN || x == SYN | ACK || x == RST || x == RST | ACK || x == ACK || x == FIN | ACK
    )
}

const SYN_SEEN: u8 = 1;
const SYN_ACKED: u8 = 2;
const FIN_SEEN: u8 = 4;
const FIN_ACKED: u8 = 8;
const WSCALE: u8 = 16;

/// One direction of a TCP connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Side {
    isn: u32,
    /// Highest sequence number sent + 1.
    end: u32,
    /// Sequence number that acknowledges this side's FIN.
    fin_end: u32,
    /// Largest window this side advertised (scaled).
    maxwin: u32,
    wscale: u8,
    flags: u8,
}

impl Side {
    fn from_syn(seg: &Seg) -> Side {
        Side {
            isn: seg.seq,
            end: seg.seq.wrapping_add(seg.span()),
            fin_end: 0,
            maxwin: u32::from(seg.win),
            wscale: seg.wscale.unwrap_or(0),
            flags: SYN_SEEN | if seg.wscale.is_some() { WSCALE } else { 0 },
        }
    }

    fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
}

/// What a segment did to an existing TCP entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TcpStep {
    /// Accepted (state possibly changed).
    Ok,
    /// Rejected; nothing changed.
    Invalid(Invalid),
    /// A SYN on a closed entry: replace it with a new connection.
    Reopen,
}

/// A TCP connection's state and per-direction sequence facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TcpConn {
    pub(crate) state: TcpState,
    sides: [Side; 2],
}

impl TcpConn {
    /// Whether `seg` may start a connection: a plain SYN.
    pub(crate) fn check_first(seg: &Seg) -> Result<(), Invalid> {
        if !valid_flags(seg.flags) {
            return Err(Invalid::TcpBadFlags);
        }
        if seg.flags & (SYN | ACK | FIN | RST) != SYN {
            return Err(Invalid::TcpNotSyn);
        }
        Ok(())
    }

    /// A new connection from its first SYN (checked by [`Self::check_first`]).
    pub(crate) fn from_syn(seg: &Seg) -> TcpConn {
        TcpConn {
            state: TcpState::SynSent,
            sides: [Side::from_syn(seg), Side::default()],
        }
    }

    /// Applies one segment travelling in `dir`. On anything but `Ok` the
    /// connection is unchanged.
    pub(crate) fn step(&mut self, dir: Dir, seg: &Seg) -> TcpStep {
        let f = seg.flags & (SYN | ACK | FIN | RST);
        if !valid_flags(f) {
            return TcpStep::Invalid(Invalid::TcpBadFlags);
        }
        let d = dir.index();
        let mut t = *self;
        if f & RST != 0 {
            if !t.rst_ok(d, seg) {
                return TcpStep::Invalid(Invalid::TcpRstOutOfWindow);
            }
            t.state = TcpState::Close;
            *self = t;
            return TcpStep::Ok;
        }
        if f & SYN != 0 {
            if f & ACK == 0 && matches!(t.state, TcpState::TimeWait | TcpState::Close) {
                return TcpStep::Reopen;
            }
            let r = if f & ACK == 0 {
                t.on_syn(dir, seg)
            } else {
                t.on_synack(dir, seg)
            };
            if let Err(r) = r {
                return TcpStep::Invalid(r);
            }
        } else {
            if t.state == TcpState::SynSent {
                return TcpStep::Invalid(Invalid::TcpOutOfState);
            }
            t.on_ack_fin(d, seg);
        }
        t.track_window(d, seg);
        t.state = t.derive();
        *self = t;
        TcpStep::Ok
    }

    fn side(&self, i: usize) -> Side {
        self.sides.get(i).copied().unwrap_or_default()
    }

    fn side_mut(&mut self, i: usize) -> &mut Side {
        // `i` is `Dir::index()` (0 or 1) or its complement.
        let [a, b] = &mut self.sides;
        if i == 0 {
            a
        } else {
            b
        }
    }

    fn on_syn(&mut self, dir: Dir, seg: &Seg) -> Result<(), Invalid> {
        let (o, r) = (self.side(0), self.side(1));
        match (dir, self.state) {
            // Retransmission, possibly with a new ISN (as Linux allows).
            (Dir::Original, TcpState::SynSent) => *self.side_mut(0) = Side::from_syn(seg),
            (Dir::Original, _) if seg.seq == o.isn => {}
            // Simultaneous open: the responder's own SYN.
            (Dir::Reply, TcpState::SynSent) => {
                *self.side_mut(1) = Side::from_syn(seg);
                self.state = TcpState::SynRecv;
            }
            (Dir::Reply, _) if r.has(SYN_SEEN) && seg.seq == r.isn => {}
            _ => return Err(Invalid::TcpUnexpectedSyn),
        }
        Ok(())
    }

    fn on_synack(&mut self, dir: Dir, seg: &Seg) -> Result<(), Invalid> {
        let (o, r) = (self.side(0), self.side(1));
        match dir {
            Dir::Reply => {
                if seg.ack != o.isn.wrapping_add(1) {
                    return Err(Invalid::TcpSynAckMismatch);
                }
                if self.state == TcpState::SynSent {
                    *self.side_mut(1) = Side::from_syn(seg);
                    self.state = TcpState::SynRecv;
                } else if !(r.has(SYN_SEEN) && seg.seq == r.isn) {
                    return Err(Invalid::TcpUnexpectedSyn);
                }
                self.side_mut(0).flags |= SYN_ACKED;
            }
            Dir::Original => {
                // Only in a simultaneous open: the initiator acknowledges
                // the responder's SYN with its own SYN repeated.
                if !(r.has(SYN_SEEN) && seg.seq == o.isn) {
                    return Err(Invalid::TcpUnexpectedSyn);
                }
                if seg.ack != r.isn.wrapping_add(1) {
                    return Err(Invalid::TcpSynAckMismatch);
                }
                self.side_mut(1).flags |= SYN_ACKED;
            }
        }
        Ok(())
    }

    fn on_ack_fin(&mut self, d: usize, seg: &Seg) {
        if seg.flags & ACK != 0 {
            let o = self.side_mut(1 - d);
            if o.has(SYN_SEEN) && !o.has(SYN_ACKED) && after_eq(seg.ack, o.isn.wrapping_add(1)) {
                o.flags |= SYN_ACKED;
            }
            if o.has(FIN_SEEN) && !o.has(FIN_ACKED) && after_eq(seg.ack, o.fin_end) {
                o.flags |= FIN_ACKED;
            }
        }
        if seg.flags & FIN != 0 {
            let s = self.side_mut(d);
            if !s.has(FIN_SEEN) {
                s.flags |= FIN_SEEN;
                s.fin_end = seg.seq.wrapping_add(seg.len).wrapping_add(1);
            }
        }
    }

    fn track_window(&mut self, d: usize, seg: &Seg) {
        let both_scale = self.side(0).has(WSCALE) && self.side(1).has(WSCALE);
        let s = self.side_mut(d);
        let end = seg.seq.wrapping_add(seg.span());
        if after(end, s.end) {
            s.end = end;
        }
        let shift = if seg.flags & SYN == 0 && both_scale {
            u32::from(s.wscale.min(14))
        } else {
            0
        };
        s.maxwin = s.maxwin.max(u32::from(seg.win) << shift);
    }

    fn rst_ok(&self, d: usize, seg: &Seg) -> bool {
        let (s, o) = (self.side(d), self.side(1 - d));
        if !s.has(SYN_SEEN) {
            return seg.flags & ACK != 0 && seg.ack == o.isn.wrapping_add(1);
        }
        let win = o.maxwin.max(65535);
        (seg.seq.wrapping_sub(s.end) as i32).unsigned_abs() <= win
    }

    fn derive(&self) -> TcpState {
        let (a, b) = (self.side(0), self.side(1));
        match self.state {
            TcpState::TimeWait | TcpState::Close => self.state,
            _ if a.has(FIN_SEEN) && b.has(FIN_SEEN) => {
                if a.has(FIN_ACKED) && b.has(FIN_ACKED) {
                    TcpState::TimeWait
                } else {
                    TcpState::LastAck
                }
            }
            _ if a.has(FIN_SEEN) || b.has(FIN_SEEN) => {
                if a.has(FIN_ACKED) || b.has(FIN_ACKED) {
                    TcpState::CloseWait
                } else {
                    TcpState::FinWait
                }
            }
            TcpState::SynRecv if a.has(SYN_ACKED) && b.has(SYN_ACKED) => TcpState::Established,
            s => s,
        }
    }
}

/// Protocol state stored in an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ProtoState {
    Tcp(TcpConn),
    Udp { assured: bool },
    Icmp { replied: bool },
    Other { replied: bool },
}

impl ProtoState {
    pub(crate) fn class(&self) -> Class {
        match self {
            ProtoState::Tcp(t) => match t.state {
                TcpState::Established => Class::TcpEstablished,
                TcpState::TimeWait => Class::TcpTimeWait,
                TcpState::Close => Class::TcpClose,
                TcpState::SynSent
                | TcpState::SynRecv
                | TcpState::FinWait
                | TcpState::CloseWait
                | TcpState::LastAck => Class::TcpTransitory,
            },
            ProtoState::Udp { assured: false } => Class::UdpUnreplied,
            ProtoState::Udp { assured: true } => Class::UdpAssured,
            ProtoState::Icmp { .. } => Class::Icmp,
            ProtoState::Other { .. } => Class::Other,
        }
    }

    pub(crate) fn view(&self) -> ConnState {
        match *self {
            ProtoState::Tcp(t) => ConnState::Tcp(t.state),
            ProtoState::Udp { assured } => ConnState::Udp { assured },
            ProtoState::Icmp { replied } => ConnState::Icmp { replied },
            ProtoState::Other { replied } => ConnState::Other { replied },
        }
    }

    /// Applies a packet of an existing entry (`seg` for TCP).
    pub(crate) fn step(&mut self, dir: Dir, seg: Option<&Seg>) -> TcpStep {
        let reply = dir == Dir::Reply;
        match self {
            ProtoState::Tcp(t) => match seg {
                Some(s) => t.step(dir, s),
                None => TcpStep::Invalid(Invalid::Malformed),
            },
            ProtoState::Udp { assured } => {
                *assured |= reply;
                TcpStep::Ok
            }
            ProtoState::Icmp { replied } | ProtoState::Other { replied } => {
                *replied |= reply;
                TcpStep::Ok
            }
        }
    }
}
