//! Packet trace: the decisions one packet met, in tenant terms, recorded by
//! the real pipeline as it runs.
//!
//! Stages call [`note`] at each decision ("security group web egress rule
//! 2 allows"); when no trace runs on the thread that is one thread-local
//! load and nothing else. A trace runs one packet through the same
//! functions as every other packet, on the calling thread, in one of two
//! modes:
//!
//! - **live** (`vswitchctl trace --live`): a worker traces a real packet
//!   that matched a session's filter; it is forwarded, counted and
//!   committed as any other, and the notes are handed to the session.
//! - **dry run** (`vswitchctl trace 'tcp A:p > B:q'`): a synthetic packet
//!   from the control thread. The pipeline is the same; the places that
//!   would leave a trace in the world ask [`dry_run`] and instead *say*
//!   what they would do: no frame is written to a tap, the underlay or a
//!   service queue, no connection is committed (security groups, NAT and
//!   the load balancer look their tables up and evaluate their rules
//!   without changing either), no MAC is learned and no rule hit counted.

use std::cell::{Cell, RefCell};

use serde::Serialize;

mod flow;

pub use flow::{FlowSpec, Proto};

/// Most notes one packet's trace keeps (a flood to many ports notes each).
pub const MAX_STEPS: usize = 128;

/// One decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// Which stage decided: `port`, `port_security`, `sg`, `router`, ...
    pub stage: &'static str,
    /// What it decided, in tenant terms.
    pub text: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    Live,
    DryRun,
}

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Off) };
    static STEPS: RefCell<Vec<Step>> = const { RefCell::new(Vec::new()) };
    static OMITTED: Cell<usize> = const { Cell::new(0) };
}

/// Whether a trace runs on this thread.
#[inline]
pub fn active() -> bool {
    cfg!(feature = "observe") && MODE.with(|m| m.get() != Mode::Off)
}

/// Whether this thread runs a synthetic packet: stages must not change
/// state or write frames, only say what they would do.
#[inline]
pub fn dry_run() -> bool {
    cfg!(feature = "observe") && MODE.with(|m| m.get() == Mode::DryRun)
}

/// Records a decision of `stage` when a trace runs; `text` is only built
/// then.
#[inline]
pub fn note(stage: &'static str, text: impl FnOnce() -> String) {
    if active() {
        push(stage, text());
    }
}

#[cold]
fn push(stage: &'static str, text: String) {
    STEPS.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < MAX_STEPS {
            s.push(Step { stage, text });
        } else {
            OMITTED.with(|o| o.set(o.get() + 1));
        }
    });
}

/// Restores the thread's mode when a traced run ends, also by unwinding.
struct Reset;

impl Drop for Reset {
    fn drop(&mut self) {
        MODE.with(|m| m.set(Mode::Off));
    }
}

/// Runs `f` with tracing on (`dry`: a synthetic packet) and returns its
/// result with the notes it recorded.
pub fn run<R>(dry: bool, f: impl FnOnce() -> R) -> (R, Vec<Step>) {
    STEPS.with(|s| s.borrow_mut().clear());
    OMITTED.with(|o| o.set(0));
    MODE.with(|m| m.set(if dry { Mode::DryRun } else { Mode::Live }));
    let reset = Reset;
    let r = f();
    drop(reset);
    let mut steps = STEPS.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let omitted = OMITTED.with(|o| o.replace(0));
    if omitted > 0 {
        steps.push(Step {
            stage: "trace",
            text: format!("... {omitted} more decisions not shown"),
        });
    }
    (r, steps)
}

/// How a trace names a frame: `tcp 10.0.1.10:40000 > 10.0.2.20:80 [S]`.
pub fn describe_frame(frame: &[u8]) -> String {
    use packet::{L3, L4};
    let Ok(k) = packet::FlowKey::parse(frame) else {
        return format!("unparsable frame ({} bytes)", frame.len());
    };
    let (src, dst) = match k.l3 {
        L3::Arp(a) => {
            return match a.op {
                1 => format!("arp who-has {} tell {} ({})", a.tpa, a.spa, k.src_mac),
                _ => format!("arp {} is-at {}", a.spa, a.sha),
            }
        }
        L3::Ipv4(ip) | L3::Ipv6(ip) => (ip.src, ip.dst),
        L3::None => {
            return format!(
                "ethertype {:#06x} {} > {}",
                k.ethertype, k.src_mac, k.dst_mac
            )
        }
    };
    match k.l4 {
        L4::Tcp {
            src_port,
            dst_port,
            flags,
        } => {
            let names: String = [
                (0x02, 'S'),
                (0x10, '.'),
                (0x01, 'F'),
                (0x04, 'R'),
                (0x08, 'P'),
            ]
            .iter()
            .filter(|(b, _)| flags & b != 0)
            .map(|(_, c)| *c)
            .collect();
            format!("tcp {src}:{src_port} > {dst}:{dst_port} [{names}]")
        }
        L4::Udp { src_port, dst_port } => format!("udp {src}:{src_port} > {dst}:{dst_port}"),
        L4::Icmpv4 { ty, code, .. } => format!("icmp {src} > {dst} type {ty} code {code}"),
        L4::Icmpv6 { ty, code, .. } => format!("icmpv6 {src} > {dst} type {ty} code {code}"),
        L4::None => format!("ip {src} > {dst}"),
    }
}

/// One traced real packet.
#[derive(Debug, Clone, Serialize)]
pub struct Traced {
    /// What the packet was, as it arrived.
    pub packet: String,
    /// Its decisions.
    pub steps: Vec<Step>,
}

/// A live trace: the next `count` packets arriving at a port that match
/// a filter are traced (they are forwarded as usual).
#[derive(Debug)]
pub struct LiveSession {
    filter: Option<crate::filter::Filter>,
    remaining: std::sync::atomic::AtomicU64,
    results: parking_lot::Mutex<Vec<Traced>>,
}

impl LiveSession {
    /// Traces the next `count` (at most [`MAX_LIVE`]) matching packets.
    pub fn new(count: u64, filter: Option<crate::filter::Filter>) -> LiveSession {
        LiveSession {
            filter,
            remaining: std::sync::atomic::AtomicU64::new(count.clamp(1, MAX_LIVE)),
            results: parking_lot::Mutex::new(Vec::new()),
        }
    }

    /// Claims a packet for tracing if it matches and the count allows.
    pub fn claim(&self, frame: &[u8]) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.remaining.load(Relaxed) == 0 {
            return false;
        }
        if let Some(f) = &self.filter {
            match packet::FlowKey::parse(frame) {
                Ok(k) if f.matches(&k) => {}
                _ => return false,
            }
        }
        self.remaining
            .fetch_update(Relaxed, Relaxed, |r| r.checked_sub(1))
            .is_ok()
    }

    /// Hands in a traced packet.
    pub fn push(&self, t: Traced) {
        self.results.lock().push(t);
    }

    /// All traced so far, and whether the count is reached.
    pub fn take(&self) -> (Vec<Traced>, bool) {
        let done = self.remaining.load(std::sync::atomic::Ordering::Relaxed) == 0;
        (std::mem::take(&mut *self.results.lock()), done)
    }
}

/// Most packets one live trace follows.
pub const MAX_LIVE: u64 = 100;

#[cfg(all(test, feature = "observe"))]
mod tests {
    use super::*;

    #[test]
    fn notes_are_kept_only_while_tracing_and_bounded() {
        note("port", || unreachable!("not built when off"));
        let ((), steps) = run(true, || {
            assert!(dry_run() && active());
            note("port", || "vm1".into());
        });
        assert_eq!(
            steps,
            [Step {
                stage: "port",
                text: "vm1".into()
            }]
        );
        assert!(!active());
        let ((), steps) = run(false, || {
            assert!(!dry_run() && active());
            for i in 0..MAX_STEPS + 5 {
                note("bridge", || i.to_string());
            }
        });
        assert_eq!(steps.len(), MAX_STEPS + 1);
        assert!(steps[MAX_STEPS].text.contains("5 more"));
    }
}
