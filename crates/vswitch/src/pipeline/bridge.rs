//! The L2 stage: one network's MAC table, source learning and destination
//! lookup.

use packet::MacAddr;
use parking_lot::RwLock;

use crate::clock::Timestamp;
use crate::fdb::{Fdb, Learned, PortId, SrcCheck};

use super::{DropReason, Verdict};

/// What the stages need to know about the ingress port.
#[derive(Debug, Clone, Copy)]
pub struct Ingress {
    /// Port index.
    pub id: PortId,
    /// Its configured MAC.
    pub mac: MacAddr,
    /// Whether frames must come from `mac`.
    pub port_security: bool,
}

/// One network's L2 switching: its MAC table behind a read-write lock.
#[derive(Debug)]
pub struct Bridge {
    fdb: RwLock<Fdb>,
}

impl Bridge {
    /// A bridge whose MAC table is `fdb`.
    pub fn new(fdb: Fdb) -> Bridge {
        Bridge {
            fdb: RwLock::new(fdb),
        }
    }

    /// The MAC table, for the control plane (display, aging, statics).
    pub fn fdb(&self) -> &RwLock<Fdb> {
        &self.fdb
    }

    /// Decides where `frame`, received on `ingress` at `now`, goes: source
    /// learning, destination lookup (port security ran before). Floods unknown
    /// unicast, broadcast and multicast within the network only.
    #[inline]
    pub fn decide(&self, ingress: &Ingress, frame: &[u8], now: Timestamp) -> Verdict {
        // Both MACs from the first 14 bytes: a shorter frame is a runt.
        let (Some(dst), Some(src)) = (
            frame.get(..14).and_then(MacAddr::from_slice),
            frame.get(6..14).and_then(MacAddr::from_slice),
        ) else {
            return Verdict::Drop(DropReason::RuntFrame);
        };
        if !src.is_unicast() {
            return Verdict::Drop(DropReason::SrcMacInvalid);
        }
        let dst_port = {
            let fdb = self.fdb.read();
            match fdb.check_src(&src, ingress.id, now) {
                SrcCheck::Known => {}
                SrcCheck::Hijack => {
                    drop(fdb);
                    self.fdb.write().count_hijack();
                    return Verdict::Drop(DropReason::SrcMacHijack);
                }
                SrcCheck::NeedsLearn if crate::trace::dry_run() => {
                    // A packet trace learns nothing.
                    crate::trace::note("bridge", || format!("would learn {src} on this port"));
                }
                SrcCheck::NeedsLearn => {
                    drop(fdb);
                    if self.fdb.write().learn(src, ingress.id, now) == Learned::HijackRefused {
                        return Verdict::Drop(DropReason::SrcMacHijack);
                    }
                    // A full table of statics refuses the MAC but the frame
                    // still goes on: learning is an optimisation.
                    return self.lookup_dst(&dst, ingress.id);
                }
            }
            if dst.is_multicast() {
                return Verdict::Flood;
            }
            fdb.lookup(&dst)
        };
        match dst_port {
            Some(p) if p == ingress.id => Verdict::Drop(DropReason::DstSamePort),
            Some(p) => Verdict::Forward(p),
            None => Verdict::Flood,
        }
    }

    fn lookup_dst(&self, dst: &MacAddr, ingress: PortId) -> Verdict {
        if dst.is_multicast() {
            return Verdict::Flood;
        }
        match self.fdb.read().lookup(dst) {
            Some(p) if p == ingress => Verdict::Drop(DropReason::DstSamePort),
            Some(p) => Verdict::Forward(p),
            None => Verdict::Flood,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn frame(dst: MacAddr, src: MacAddr) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst.0);
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0u8; 46]);
        f
    }

    const A: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const B: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);
    const C: MacAddr = MacAddr([2, 0, 0, 0, 0, 3]);

    fn bridge() -> Bridge {
        let mut fdb = Fdb::new(64, Duration::from_secs(300));
        fdb.add_static(A, 1);
        fdb.add_static(B, 2);
        Bridge::new(fdb)
    }

    fn port(id: PortId, mac: MacAddr, port_security: bool) -> Ingress {
        Ingress {
            id,
            mac,
            port_security,
        }
    }

    #[test]
    fn known_unicast_forwards_unknown_floods() {
        let b = bridge();
        let now = Timestamp::ZERO;
        assert_eq!(
            b.decide(&port(1, A, true), &frame(B, A), now),
            Verdict::Forward(2)
        );
        assert_eq!(
            b.decide(&port(1, A, true), &frame(C, A), now),
            Verdict::Flood
        );
        assert_eq!(
            b.decide(&port(1, A, true), &frame(MacAddr::BROADCAST, A), now),
            Verdict::Flood
        );
        assert_eq!(
            b.decide(
                &port(1, A, true),
                &frame(MacAddr([0x33, 0x33, 0, 0, 0, 1]), A),
                now
            ),
            Verdict::Flood
        );
        assert_eq!(
            b.decide(&port(1, A, true), &frame(A, A), now),
            Verdict::Drop(DropReason::DstSamePort)
        );
    }

    #[test]
    fn port_security_and_bad_sources() {
        let b = bridge();
        let now = Timestamp::ZERO;
        assert_eq!(
            b.decide(&port(1, A, true), &frame(B, MacAddr::BROADCAST), now),
            Verdict::Drop(DropReason::SrcMacInvalid)
        );
        assert_eq!(
            b.decide(&port(1, A, true), &frame(B, A)[..13], now),
            Verdict::Drop(DropReason::RuntFrame)
        );
        assert_eq!(
            b.decide(&port(1, A, true), &[], now),
            Verdict::Drop(DropReason::RuntFrame)
        );
        // Nothing was learned from the spoofed frame.
        assert_eq!(b.fdb().read().lookup(&C), None);
    }

    #[test]
    fn unsecured_port_learns_but_cannot_hijack() {
        let b = bridge();
        let now = Timestamp::ZERO;
        let p3 = port(3, C, false);
        let other = MacAddr([2, 9, 9, 9, 9, 9]);
        assert_eq!(b.decide(&p3, &frame(A, other), now), Verdict::Forward(1));
        assert_eq!(b.fdb().read().lookup(&other), Some(3));
        assert_eq!(
            b.decide(&port(1, A, true), &frame(other, A), now),
            Verdict::Forward(3)
        );
        // Claiming A's configured MAC from port 3 is refused and counted.
        assert_eq!(
            b.decide(&p3, &frame(B, A), now),
            Verdict::Drop(DropReason::SrcMacHijack)
        );
        assert_eq!(b.fdb().read().lookup(&A), Some(1));
        assert_eq!(b.fdb().read().stats().hijack_refused, 1);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..80), sec in proptest::bool::ANY) {
            let b = bridge();
            let _ = b.decide(&port(3, C, sec), &bytes, Timestamp::ZERO);
        }
    }
}
