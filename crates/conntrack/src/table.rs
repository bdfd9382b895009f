//! The connection table: a slab of entries, a hash index from both keys of
//! every entry to its slot, one intrusive expiry list per timeout class, and
//! per-port counts.

use std::collections::HashMap;

use packet::flow::proto;
use packet::{FlowKey, L3, L4};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError, NS};
use crate::index::{Index, Ref};
use crate::key::{icmp_is_request, ConnKey, Dir, NoKey};
use crate::outcome::{CommitError, ConnId, Invalid, Limit, NewConn, Stats, Track, Untracked};
use crate::parse::{ip_len, quoted_key, tcp_seg};
use crate::state::{Class, ConnState, ProtoState, TcpConn, TcpStep, CLASSES};

/// Expired entries reaped (at most) when a cap is hit, before refusing.
pub const REAP_ON_LIMIT: usize = 8;

/// Longest interval between two moves of an active entry to the tail of
/// its expiry list (`min(1 s, timeout / 16)`): the bound on how late
/// [`Conntrack::expire`] may reap an entry. Lookups are exact.
pub const MAX_REFRESH_GRANULARITY_NS: u64 = NS;

const NIL: u32 = u32::MAX;

/// Packets and bytes (IP length) in one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirStats {
    /// Packets.
    pub packets: u64,
    /// Bytes of IP packets (IPv4 total length, IPv6 40 + payload length).
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
}

#[derive(Debug, Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
}

#[derive(Debug)]
pub(crate) struct Entry<E> {
    pub(crate) orig: ConnKey,
    /// Where the reply key is: [`NIL`] when it is `orig.reverse()` (every
    /// untranslated connection: most of a table), else its index in
    /// [`Conntrack`]'s `replies` (NAT, load balancer). Saves a 44-byte
    /// key in most entries.
    reply_at: u32,
    /// Generation of the slot this entry occupies (stale [`ConnId`]s carry
    /// an older one). Here rather than in [`Slot`], where it would cost 8
    /// bytes of padding per entry.
    gen: u32,
    pub(crate) port: u32,
    pub(crate) state: ProtoState,
    class: Class,
    pub(crate) created: u64,
    /// Expires when `now >= deadline`.
    pub(crate) deadline: u64,
    /// When the entry was last moved to its list's tail (list order).
    moved: u64,
    pub(crate) stats: [DirStats; 2],
    pub(crate) ext: E,
}

#[derive(Debug)]
struct Slot<E> {
    entry: Option<Entry<E>>,
}

/// One entry, for display and inspection.
#[derive(Debug)]
pub struct EntryView<'a, E> {
    /// Handle.
    pub id: ConnId,
    /// Key of the original direction (the creating packet's orientation).
    pub orig: ConnKey,
    /// Key a reply carries.
    pub reply: ConnKey,
    /// Port that created the entry (charged against its cap).
    pub port: u32,
    /// Protocol state.
    pub state: ConnState,
    /// Counters: `[original, reply]` (index with [`Dir::index`]).
    pub stats: [DirStats; 2],
    /// Nanoseconds since the entry was committed.
    pub age_ns: u64,
    /// Nanoseconds until it expires unless a packet refreshes it.
    pub remaining_ns: u64,
    /// The user's data.
    pub ext: &'a E,
}

/// An entry taken out of the table: handed to the callback of
/// [`Conntrack::expire_with`], or queued for [`Conntrack::drain_removed`]
/// when the table collects removals ([`Conntrack::set_collect_removed`]).
#[derive(Debug)]
pub struct Removed<E> {
    /// Handle it had.
    pub id: ConnId,
    /// Original key.
    pub orig: ConnKey,
    /// Reply key.
    pub reply: ConnKey,
    /// Creating port.
    pub port: u32,
    /// The user's data.
    pub ext: E,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Expired,
    Removed,
}

/// The connection tracker. `E` is per-entry user data (NAT mapping, LB
/// backend, ...), given to [`Conntrack::commit`]; `()` when unused.
#[derive(Debug)]
pub struct Conntrack<E = ()> {
    cfg: Config,
    timeout_ns: [u64; CLASSES],
    gran_ns: [u64; CLASSES],
    slots: Vec<Slot<E>>,
    links: Vec<Link>,
    /// Free slots, each with the generation its next entry gets.
    free: Vec<(u32, u32)>,
    lists: [List; CLASSES],
    index: Index,
    per_port: HashMap<u32, u32>,
    len: usize,
    stats: Stats,
    /// Whether entries that leave by a path without a hand-back are queued
    /// in `removed` ([`Conntrack::set_collect_removed`]).
    collect: bool,
    /// Removed entries not drained yet; empty unless `collect`.
    removed: Vec<Removed<E>>,
    /// Reply keys that are not the mirror of their original key, by the
    /// entry's `reply_at`; slots of removed ones are reused.
    replies: Vec<ConnKey>,
    /// Free places in `replies`.
    replies_free: Vec<u32>,
}

enum Lookup {
    Conn {
        key: ConnKey,
        seg: Option<crate::state::Seg>,
        ip_len: u32,
    },
    IcmpError,
    Done(Track),
}

impl<E> Conntrack<E> {
    /// An empty table. Nothing is preallocated (see [`Conntrack::reserve`]).
    pub fn new(cfg: Config) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let t = &cfg.timeouts;
        let secs = [
            t.udp_unreplied_secs,
            t.udp_assured_secs,
            t.tcp_transitory_secs,
            t.tcp_established_secs,
            t.tcp_time_wait_secs,
            t.tcp_close_secs,
            t.icmp_secs,
            t.other_secs,
        ];
        let timeout_ns = secs.map(|s| s.saturating_mul(NS));
        let gran_ns = timeout_ns.map(|t| (t / 16).clamp(1, MAX_REFRESH_GRANULARITY_NS));
        Ok(Conntrack {
            cfg,
            timeout_ns,
            gran_ns,
            slots: Vec::new(),
            links: Vec::new(),
            free: Vec::new(),
            lists: [List {
                head: NIL,
                tail: NIL,
            }; CLASSES],
            index: Index::default(),
            per_port: HashMap::new(),
            len: 0,
            stats: Stats::default(),
            collect: false,
            removed: Vec::new(),
            replies: Vec::new(),
            replies_free: Vec::new(),
        })
    }

    /// Makes every entry that leaves the table without handing its data
    /// back queue it for [`Conntrack::drain_removed`]: an expired entry met
    /// by `track`/`commit`/`import` or reaped by [`Conntrack::expire`] (also
    /// the reaping a cap does before refusing), a TCP entry reopened by a
    /// SYN, `flush_*` and `clear`. Only [`Conntrack::remove`] (returns the
    /// data) and [`Conntrack::expire_with`] (hands it to the callback) do
    /// not queue. Off by default; a user whose `E` holds resources (NAT's
    /// ports) turns it on and drains after every call into the table, which
    /// keeps the queue as short as the entries one call removes. Turning it
    /// off keeps what is queued until drained.
    pub fn set_collect_removed(&mut self, on: bool) {
        self.collect = on;
    }

    /// Takes the queued removed entries (see
    /// [`Conntrack::set_collect_removed`]), oldest first.
    pub fn drain_removed(&mut self) -> impl Iterator<Item = Removed<E>> + '_ {
        self.removed.drain(..)
    }

    /// Removed entries queued and not drained.
    pub fn removed_pending(&self) -> usize {
        self.removed.len()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Entries in the table, including expired ones not reaped yet (they
    /// count against the caps until [`Conntrack::expire`] or a lookup
    /// removes them; lookups never return them).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries charged to `port`.
    pub fn port_count(&self, port: u32) -> usize {
        self.per_port.get(&port).map_or(0, |&n| n as usize)
    }

    /// Ports with at least one entry, with their counts (unordered).
    pub fn port_counts(&self) -> impl Iterator<Item = (u32, usize)> + '_ {
        self.per_port.iter().map(|(&p, &n)| (p, n as usize))
    }

    /// Grows the index and slab for `additional` more entries now, so the
    /// packet path does not pay a rehash of a large table later.
    pub fn reserve(&mut self, additional: usize) {
        let n = additional.min(self.cfg.max_entries.saturating_sub(self.len));
        let (slots, replies) = (&self.slots, &self.replies);
        self.index.reserve(2 * n, |r| key_at(slots, replies, r));
        self.slots.reserve(n);
        self.links.reserve(n);
    }

    /// Timeout of an entry's current class, in nanoseconds.
    fn timeout(&self, c: Class) -> u64 {
        self.timeout_ns.get(c.index()).copied().unwrap_or(0)
    }

    fn gran(&self, c: Class) -> u64 {
        self.gran_ns.get(c.index()).copied().unwrap_or(1)
    }

    fn entry(&self, slot: u32) -> Option<&Entry<E>> {
        self.slots.get(slot as usize)?.entry.as_ref()
    }

    fn entry_mut(&mut self, slot: u32) -> Option<&mut Entry<E>> {
        self.slots.get_mut(slot as usize)?.entry.as_mut()
    }

    fn id(&self, slot: u32) -> ConnId {
        ConnId {
            slot,
            gen: self.entry(slot).map_or(0, |e| e.gen),
        }
    }

    // ---- expiry lists -------------------------------------------------

    fn unlink(&mut self, slot: u32, class: Class) {
        let Some(&Link { prev, next }) = self.links.get(slot as usize) else {
            return;
        };
        if let Some(l) = self.links.get_mut(prev as usize) {
            l.next = next;
        }
        if let Some(l) = self.links.get_mut(next as usize) {
            l.prev = prev;
        }
        if let Some(list) = self.lists.get_mut(class.index()) {
            if list.head == slot {
                list.head = next;
            }
            if list.tail == slot {
                list.tail = prev;
            }
        }
        if let Some(l) = self.links.get_mut(slot as usize) {
            *l = Link {
                prev: NIL,
                next: NIL,
            };
        }
    }

    fn push_tail(&mut self, slot: u32, class: Class) {
        let Some(list) = self.lists.get_mut(class.index()) else {
            return;
        };
        let tail = list.tail;
        list.tail = slot;
        if list.head == NIL {
            list.head = slot;
        }
        if let Some(l) = self.links.get_mut(tail as usize) {
            l.next = slot;
        }
        if let Some(l) = self.links.get_mut(slot as usize) {
            *l = Link {
                prev: tail,
                next: NIL,
            };
        }
    }

    /// Restarts an entry's timer after a packet: new deadline; moved to its
    /// (possibly new) class list's tail when the class changed or the last
    /// move is at least one granularity old. Keeps every list in `moved`
    /// order and `deadline < moved + timeout + granularity`.
    fn refresh(&mut self, slot: u32, now: u64) {
        let Some(e) = self.entry(slot) else { return };
        let (old, new) = (e.class, e.state.class());
        let moved = e.moved;
        let deadline = now.saturating_add(self.timeout(new));
        let relink = old != new || now.saturating_sub(moved) >= self.gran(new);
        if let Some(e) = self.entry_mut(slot) {
            e.deadline = deadline;
            if relink {
                e.class = new;
                e.moved = now;
            }
        }
        if relink {
            self.unlink(slot, old);
            self.push_tail(slot, new);
        }
    }

    // ---- insertion and removal ----------------------------------------

    /// A free slot and the generation of the entry that takes it.
    fn alloc(&mut self) -> (u32, u32) {
        if let Some(s) = self.free.pop() {
            return s;
        }
        // len < max_entries <= u32::MAX >> 1, so the slab never reaches NIL
        // and every slot number fits the index's packing.
        let s = u32::try_from(self.slots.len()).unwrap_or(NIL);
        self.slots.push(Slot { entry: None });
        self.links.push(Link {
            prev: NIL,
            next: NIL,
        });
        (s, 0)
    }

    /// Where `reply` goes for an entry whose original key is `orig`
    /// (`NIL`: nowhere, it is the mirror).
    fn store_reply(&mut self, orig: &ConnKey, reply: ConnKey) -> u32 {
        if reply == orig.reverse() {
            return NIL;
        }
        if let Some(i) = self.replies_free.pop() {
            if let Some(k) = self.replies.get_mut(i as usize) {
                *k = reply;
                return i;
            }
        }
        // Never more than one per slot, and slot numbers fit a u32.
        let i = u32::try_from(self.replies.len()).unwrap_or(NIL);
        self.replies.push(reply);
        i
    }

    /// An entry's reply key.
    pub(crate) fn reply_of(&self, e: &Entry<E>) -> ConnKey {
        reply_key(&self.replies, e)
    }

    /// Stores `entry` (its `reply_at` and `gen` are set here) with reply
    /// key `reply`.
    fn insert(&mut self, mut entry: Entry<E>, reply: ConnKey) -> ConnId {
        let orig = entry.orig;
        entry.reply_at = self.store_reply(&orig, reply);
        let (slot, gen) = self.alloc();
        entry.gen = gen;
        let (port, class) = (entry.port, entry.class);
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.entry = Some(entry);
        }
        let (slots, replies) = (&self.slots, &self.replies);
        let original = Ref {
            slot,
            dir: Dir::Original,
        };
        self.index
            .insert(&orig, original, |r| key_at(slots, replies, r));
        if reply != orig {
            let r = Ref {
                slot,
                dir: Dir::Reply,
            };
            self.index.insert(&reply, r, |r| key_at(slots, replies, r));
        }
        self.push_tail(slot, class);
        *self.per_port.entry(port).or_insert(0) += 1;
        self.len += 1;
        self.id(slot)
    }

    fn remove_slot(&mut self, slot: u32, why: Why) -> Option<Removed<E>> {
        let s = self.slots.get_mut(slot as usize)?;
        let e = s.entry.take()?;
        let id = ConnId { slot, gen: e.gen };
        let reply = reply_key(&self.replies, &e);
        if e.reply_at != NIL {
            self.replies_free.push(e.reply_at);
        }
        self.index.remove(
            &e.orig,
            Ref {
                slot,
                dir: Dir::Original,
            },
        );
        if reply != e.orig {
            self.index.remove(
                &reply,
                Ref {
                    slot,
                    dir: Dir::Reply,
                },
            );
        }
        self.unlink(slot, e.class);
        self.free.push((slot, e.gen.wrapping_add(1)));
        if let Some(n) = self.per_port.get_mut(&e.port) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_port.remove(&e.port);
            }
        }
        self.len -= 1;
        match why {
            Why::Expired => self.stats.expired += 1,
            Why::Removed => self.stats.removed += 1,
        }
        Some(Removed {
            id,
            orig: e.orig,
            reply,
            port: e.port,
            ext: e.ext,
        })
    }

    /// Removes an entry whose data nobody asked for: queued when the table
    /// collects removals, dropped otherwise.
    fn discard(&mut self, slot: u32, why: Why) -> bool {
        let Some(r) = self.remove_slot(slot, why) else {
            return false;
        };
        if self.collect {
            self.removed.push(r);
        }
        true
    }

    /// The live entry for `key`; an expired one is removed and ignored.
    fn find_live(&mut self, key: &ConnKey, now: u64) -> Option<Ref> {
        let (slots, replies) = (&self.slots, &self.replies);
        let r = self.index.get(key, |r| key_at(slots, replies, r))?;
        let expired = !matches!(self.entry(r.slot), Some(e) if e.deadline > now);
        if expired {
            self.discard(r.slot, Why::Expired);
            return None;
        }
        Some(r)
    }

    /// Which cap a new connection from `port` would hit now, after reaping
    /// up to [`REAP_ON_LIMIT`] expired entries if one is hit.
    fn cap_hit(&mut self, port: u32, now: u64) -> Option<Limit> {
        let hit = |t: &Self| {
            if t.len >= t.cfg.max_entries {
                Some(Limit::Global)
            } else if t.port_count(port) >= t.cfg.max_per_port {
                Some(Limit::Port)
            } else {
                None
            }
        };
        hit(self)?;
        self.expire(now, REAP_ON_LIMIT);
        hit(self)
    }

    // ---- packet path --------------------------------------------------

    /// Looks a parsed packet up and advances its connection's state.
    ///
    /// `zone` separates tenants; `port` is the port the packet came from
    /// (charged for a new connection when it is committed); `frame` is the
    /// frame `key` was parsed from; `now` is the caller's monotonic clock
    /// in nanoseconds (it must not go backwards; if it does nothing panics
    /// but expiry may come late).
    ///
    /// Nothing is inserted: a connection's first packet gives
    /// [`Track::New`], and [`Conntrack::commit`] inserts it once policy
    /// allows. Costs one hash lookup of the packet's key (plus the
    /// creating port's count for a new connection; the quoted key's lookup
    /// for an ICMP error); nothing is scanned.
    pub fn track(&mut self, zone: u32, port: u32, key: &FlowKey, frame: &[u8], now: u64) -> Track {
        let t = self.track_inner(zone, port, key, frame, now);
        match &t {
            Track::Invalid(r) => self.stats.count_invalid(*r),
            Track::Untracked(r) => self.stats.count_untracked(*r),
            Track::Refused(Limit::Global) => self.stats.refused_global += 1,
            Track::Refused(Limit::Port) => self.stats.refused_port += 1,
            Track::Related { .. } => self.stats.related += 1,
            Track::New(_) | Track::Established { .. } => {}
        }
        t
    }

    fn classify(zone: u32, key: &FlowKey, frame: &[u8]) -> Lookup {
        let ck = match ConnKey::classify(zone, key) {
            Ok(k) => k,
            Err(NoKey::NotIp) => return Lookup::Done(Track::Untracked(Untracked::NotIp)),
            Err(NoKey::Fragment) => return Lookup::Done(Track::Untracked(Untracked::Fragment)),
            Err(NoKey::IcmpOther) => return Lookup::Done(Track::Untracked(Untracked::IcmpOther)),
            Err(NoKey::Malformed) => return Lookup::Done(Track::Invalid(Invalid::Malformed)),
            Err(NoKey::IcmpError) => return Lookup::IcmpError,
        };
        let Some(ip_len) = ip_len(key, frame) else {
            return Lookup::Done(Track::Invalid(Invalid::Malformed));
        };
        let seg = if ck.proto == proto::TCP {
            match tcp_seg(key, frame, ip_len) {
                Some(s) => Some(s),
                None => return Lookup::Done(Track::Invalid(Invalid::Malformed)),
            }
        } else {
            None
        };
        Lookup::Conn {
            key: ck,
            seg,
            ip_len,
        }
    }

    fn track_inner(
        &mut self,
        zone: u32,
        port: u32,
        key: &FlowKey,
        frame: &[u8],
        now: u64,
    ) -> Track {
        let (ck, seg, ip_len) = match Self::classify(zone, key, frame) {
            Lookup::Conn { key, seg, ip_len } => (key, seg, ip_len),
            Lookup::IcmpError => return self.related(zone, key, frame, now),
            Lookup::Done(t) => return t,
        };
        if let Some(Ref { slot, dir }) = self.find_live(&ck, now) {
            let step = match self.entry_mut(slot) {
                Some(e) => {
                    let step = e.state.step(dir, seg.as_ref());
                    if step == TcpStep::Ok {
                        if let Some(s) = e.stats.get_mut(dir.index()) {
                            s.packets += 1;
                            s.bytes += u64::from(ip_len);
                        }
                    }
                    step
                }
                None => TcpStep::Invalid(Invalid::Malformed),
            };
            match step {
                TcpStep::Ok => {
                    self.refresh(slot, now);
                    return Track::Established {
                        id: self.id(slot),
                        dir,
                    };
                }
                TcpStep::Invalid(r) => return Track::Invalid(r),
                TcpStep::Reopen => {
                    self.discard(slot, Why::Removed);
                }
            }
        }
        let state = match first_state(&ck, seg) {
            Ok(s) => s,
            Err(r) => return Track::Invalid(r),
        };
        if let Some(l) = self.cap_hit(port, now) {
            return Track::Refused(l);
        }
        Track::New(NewConn {
            key: ck,
            port,
            state,
            ip_len,
        })
    }

    /// What [`Conntrack::track`] would say of a packet whose connection is
    /// not in the table, without looking at the table: untracked, invalid
    /// as a first packet (a TCP segment without SYN, an ICMP reply), an
    /// ICMP error (related to whatever it quotes), or `None`: it may start
    /// a connection (caps not checked). For a packet trace, which must
    /// change nothing.
    pub fn first_packet(zone: u32, key: &FlowKey, frame: &[u8]) -> Option<Track> {
        match Self::classify(zone, key, frame) {
            Lookup::Done(t) => Some(t),
            Lookup::IcmpError => Some(Track::Invalid(Invalid::IcmpErrorNoMatch)),
            Lookup::Conn { key, seg, .. } => first_state(&key, seg).err().map(Track::Invalid),
        }
    }

    fn related(&mut self, zone: u32, key: &FlowKey, frame: &[u8], now: u64) -> Track {
        let (v6, outer_dst) = match (&key.l3, key.l4) {
            (L3::Ipv4(ip), L4::Icmpv4 { .. }) => (false, ip.dst),
            (L3::Ipv6(ip), L4::Icmpv6 { .. }) => (true, ip.dst),
            _ => return Track::Invalid(Invalid::Malformed),
        };
        let Ok(q) = quoted_key(zone, key.l4_bytes(frame), v6) else {
            return Track::Invalid(Invalid::IcmpErrorBadQuote);
        };
        // Direct: the quote is a key of the entry as the quoted packet
        // carried it when it went direction X, so the error travels back
        // the other way, X.flip(). Reverse: behind an address translation
        // the quote is the *translated* form of a packet that went
        // direction Y.flip(), which is the reverse of the key of direction
        // Y (the packet was rewritten to look like the reverse of the
        // other direction's key); the error travels Y.
        let (r, dir) = match self.find_live(&q, now) {
            Some(r) => (r, r.dir.flip()),
            None => match self.find_live(&q.reverse(), now) {
                Some(r) => (r, r.dir),
                None => return Track::Invalid(Invalid::IcmpErrorNoMatch),
            },
        };
        // The error goes back to whoever sent the quoted packet.
        if q.src != outer_dst {
            return Track::Invalid(Invalid::IcmpErrorAddrMismatch);
        }
        Track::Related {
            id: self.id(r.slot),
            dir,
        }
    }

    /// Inserts a connection [`Conntrack::track`] reported as
    /// [`Track::New`], with the user's data. The first packet is counted in
    /// the original direction; the timer starts at `now`.
    ///
    /// Fails when a cap is reached (counted, after reaping up to
    /// [`REAP_ON_LIMIT`] expired entries) or when one of the connection's
    /// keys already has a live entry.
    pub fn commit(&mut self, new: &NewConn, now: u64, ext: E) -> Result<ConnId, CommitError> {
        self.commit_with_reply(new, new.key.reverse(), now, ext)
    }

    /// [`Conntrack::commit`] with an explicit reply key: what a packet
    /// travelling the other way carries after an address translation (NAT
    /// gives `reply` another zone, addresses and ports). Packets carrying
    /// `reply` are then [`Dir::Reply`] of this entry, and ICMP errors
    /// quoting the reverse of either key are [`Track::Related`].
    ///
    /// `reply` should have the protocol and address family of the original
    /// key (the caller's invariant: an entry mixing them is kept, but its
    /// state machine would see the other direction's packets as another
    /// protocol and snapshots reject it). Fails like `commit`, including
    /// [`CommitError::Exists`] when `reply` is already a live key.
    pub fn commit_with_reply(
        &mut self,
        new: &NewConn,
        reply: ConnKey,
        now: u64,
        ext: E,
    ) -> Result<ConnId, CommitError> {
        let orig = new.key;
        for k in [orig, reply] {
            if let Some(r) = self.find_live(&k, now) {
                self.stats.commit_exists += 1;
                return Err(CommitError::Exists(self.id(r.slot)));
            }
        }
        if let Some(l) = self.cap_hit(new.port, now) {
            match l {
                Limit::Global => self.stats.refused_global += 1,
                Limit::Port => self.stats.refused_port += 1,
            }
            return Err(CommitError::Limit(l));
        }
        let class = new.state.class();
        let id = self.insert(
            Entry {
                orig,
                reply_at: NIL,
                gen: 0,
                port: new.port,
                state: new.state,
                class,
                created: now,
                deadline: now.saturating_add(self.timeout(class)),
                moved: now,
                stats: [
                    DirStats {
                        packets: 1,
                        bytes: u64::from(new.ip_len),
                    },
                    DirStats::default(),
                ],
                ext,
            },
            reply,
        );
        self.stats.created += 1;
        Ok(id)
    }

    // ---- inspection ---------------------------------------------------

    /// The live entry holding `key` and the direction `key` is, without
    /// side effects (an expired entry is absent).
    pub fn lookup(&self, key: &ConnKey, now: u64) -> Option<(ConnId, Dir)> {
        let (slots, replies) = (&self.slots, &self.replies);
        let r = self.index.get(key, |r| key_at(slots, replies, r))?;
        let e = self.entry(r.slot)?;
        (e.deadline > now).then(|| (self.id(r.slot), r.dir))
    }

    /// [`Conntrack::lookup`] for a parsed frame in `zone`.
    pub fn lookup_flow(&self, zone: u32, key: &FlowKey, now: u64) -> Option<(ConnId, Dir)> {
        self.lookup(&ConnKey::from_flow(zone, key)?, now)
    }

    fn view(&self, slot: u32, now: u64) -> Option<EntryView<'_, E>> {
        let e = self.entry(slot)?;
        if e.deadline <= now {
            return None;
        }
        Some(EntryView {
            id: self.id(slot),
            orig: e.orig,
            reply: self.reply_of(e),
            port: e.port,
            state: e.state.view(),
            stats: e.stats,
            age_ns: now.saturating_sub(e.created),
            remaining_ns: e.deadline - now,
            ext: &e.ext,
        })
    }

    fn live_slot(&self, id: ConnId) -> Option<u32> {
        let s = self.slots.get(id.slot as usize)?;
        s.entry
            .as_ref()
            .is_some_and(|e| e.gen == id.gen)
            .then_some(id.slot)
    }

    /// The entry behind a handle, if it is still there and not expired.
    pub fn get(&self, id: ConnId, now: u64) -> Option<EntryView<'_, E>> {
        self.view(self.live_slot(id)?, now)
    }

    /// The user's data of an entry (also of an expired one not reaped).
    pub fn ext_mut(&mut self, id: ConnId) -> Option<&mut E> {
        let slot = self.live_slot(id)?;
        self.entry_mut(slot).map(|e| &mut e.ext)
    }

    /// Live entries, in slot order, for display. O(table).
    pub fn entries(&self, now: u64) -> impl Iterator<Item = EntryView<'_, E>> + '_ {
        (0..self.slots.len()).filter_map(move |i| self.view(u32::try_from(i).ok()?, now))
    }

    /// The earliest deadline at the head of an expiry list: a control plane
    /// that calls [`Conntrack::expire`] then reaps at least one entry. None
    /// when the table is empty.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.lists
            .iter()
            .filter_map(|l| self.entry(l.head).map(|e| e.deadline))
            .min()
    }

    // ---- removal ------------------------------------------------------

    /// Removes an entry; its user data back.
    pub fn remove(&mut self, id: ConnId) -> Option<E> {
        let slot = self.live_slot(id)?;
        self.remove_slot(slot, Why::Removed).map(|r| r.ext)
    }

    /// Removes every entry `f` picks (`f` sees an entry and its reply key).
    fn remove_where(&mut self, f: impl Fn(&Entry<E>, &ConnKey) -> bool) -> usize {
        let victims: Vec<u32> = (0..self.slots.len())
            .filter_map(|i| {
                let slot = u32::try_from(i).ok()?;
                self.entry(slot)
                    .filter(|e| f(e, &self.reply_of(e)))
                    .map(|_| slot)
            })
            .collect();
        victims
            .into_iter()
            .filter(|&s| self.discard(s, Why::Removed))
            .count()
    }

    /// Removes every entry created by `port` (port deleted or reconfigured).
    /// O(table): control plane only.
    pub fn flush_port(&mut self, port: u32) -> usize {
        if self.port_count(port) == 0 {
            return 0;
        }
        self.remove_where(|e, _| e.port == port)
    }

    /// Removes every entry with a key in `zone` (either key: a NAT entry's
    /// reply key may be in another zone than its original key). O(table):
    /// control plane only.
    pub fn flush_zone(&mut self, zone: u32) -> usize {
        self.remove_where(|e, reply| e.orig.zone == zone || reply.zone == zone)
    }

    /// Removes every entry.
    pub fn clear(&mut self) -> usize {
        let n = self.remove_where(|_, _| true);
        // Nothing refers to a stored reply key any more.
        self.replies = Vec::new();
        self.replies_free = Vec::new();
        n
    }

    /// Reaps up to `max` expired entries, earliest deadline first; the
    /// number removed. Work is bounded by `max` (each step looks at the
    /// heads of the eight class lists; nothing is scanned). An entry is
    /// reaped at most [`MAX_REFRESH_GRANULARITY_NS`] after its deadline once
    /// the control plane calls this often enough. Reaped entries are
    /// queued when the table collects removals
    /// ([`Conntrack::set_collect_removed`]).
    pub fn expire(&mut self, now: u64, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some(slot) = self.due(now) else { break };
            self.discard(slot, Why::Expired);
            n += 1;
        }
        n
    }

    /// [`Conntrack::expire`], handing every reaped entry (with its user
    /// data) to `f` instead of the removal queue.
    ///
    /// Entries also leave by other paths: [`Conntrack::remove`] returns the
    /// data; `flush_*`/`clear`, an expired entry met by
    /// `track`/`commit`/`import` (its key is needed again), the reaping a
    /// cap does, and a TCP entry reopened by a SYN drop it, or queue it for
    /// [`Conntrack::drain_removed`] when the table collects removals. A user
    /// whose `E` holds resources turns collection on
    /// ([`Conntrack::set_collect_removed`]).
    pub fn expire_with(&mut self, now: u64, max: usize, mut f: impl FnMut(Removed<E>)) -> usize {
        let mut n = 0;
        while n < max {
            let Some(slot) = self.due(now) else { break };
            if let Some(r) = self.remove_slot(slot, Why::Expired) {
                f(r);
            }
            n += 1;
        }
        n
    }

    /// The slot at a list head with the earliest deadline, if that deadline
    /// has passed.
    fn due(&self, now: u64) -> Option<u32> {
        self.lists
            .iter()
            .filter_map(|l| self.entry(l.head).map(|e| (e.deadline, l.head)))
            .min()
            .and_then(|(deadline, slot)| (deadline <= now).then_some(slot))
    }

    /// Every entry's handle, keys and user data, including expired entries
    /// not reaped yet (which still hold whatever their data accounts for),
    /// in slot order: for rebuilding state derived from the table after an
    /// import. O(table).
    pub fn all_keys(&self) -> impl Iterator<Item = (ConnId, ConnKey, ConnKey, &E)> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            let e = s.entry.as_ref()?;
            let id = ConnId {
                slot: u32::try_from(i).ok()?,
                gen: e.gen,
            };
            Some((id, e.orig, self.reply_of(e), &e.ext))
        })
    }

    // ---- snapshot support ---------------------------------------------

    /// Live entries with their deadline, for export.
    pub(crate) fn live_entries(&self, now: u64) -> impl Iterator<Item = &Entry<E>> + '_ {
        self.slots
            .iter()
            .filter_map(|s| s.entry.as_ref())
            .filter(move |e| e.deadline > now)
    }

    /// Inserts a restored entry. `remaining` is clamped to its class's
    /// timeout; `false` if a key is taken or a cap is hit.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn restore(
        &mut self,
        orig: ConnKey,
        reply: ConnKey,
        port: u32,
        state: ProtoState,
        age_ns: u64,
        remaining_ns: u64,
        stats: [DirStats; 2],
        ext: E,
        now: u64,
    ) -> Result<(), RestoreError> {
        if self.find_live(&orig, now).is_some() || self.find_live(&reply, now).is_some() {
            return Err(RestoreError::Exists);
        }
        if let Some(l) = self.cap_hit(port, now) {
            return Err(RestoreError::Limit(l));
        }
        let class = state.class();
        let timeout = self.timeout(class);
        let deadline = now.saturating_add(remaining_ns.min(timeout));
        // Keep the list ordered: not before its tail.
        let tail_moved = self
            .lists
            .get(class.index())
            .and_then(|l| self.entry(l.tail))
            .map_or(0, |e| e.moved);
        let moved = deadline.saturating_sub(timeout).max(tail_moved).min(now);
        let entry = Entry {
            orig,
            reply_at: NIL,
            gen: 0,
            port,
            state,
            class,
            created: now.saturating_sub(age_ns),
            deadline,
            moved,
            stats,
            ext,
        };
        self.insert(entry, reply);
        self.stats.imported += 1;
        Ok(())
    }

    /// Checks every structural invariant; for tests.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        let live: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|&s| self.entry(s).is_some())
            .collect();
        if live.len() != self.len {
            return Err(format!("len {} but {} live slots", self.len, live.len()));
        }
        let port_sum: usize = self.per_port.values().map(|&n| n as usize).sum();
        if port_sum != self.len {
            return Err(format!("per-port sum {port_sum} != len {}", self.len));
        }
        if self.per_port.values().any(|&n| n == 0) {
            return Err("zero per-port count kept".into());
        }
        if self.len > self.cfg.max_entries {
            return Err("above max_entries".into());
        }
        if self
            .per_port
            .values()
            .any(|&n| n as usize > self.cfg.max_per_port)
        {
            return Err("a port above max_per_port".into());
        }
        let mut keys = 0;
        let mut ports: HashMap<u32, u32> = HashMap::new();
        for &s in &live {
            let e = self.entry(s).ok_or("vanished")?;
            *ports.entry(e.port).or_default() += 1;
            match self
                .index
                .get(&e.orig, |r| key_at(&self.slots, &self.replies, r))
            {
                Some(r) if r.slot == s && r.dir == Dir::Original => {}
                _ => return Err(format!("orig key of slot {s} not indexed")),
            }
            keys += 1;
            let reply = self.reply_of(e);
            if reply != e.orig {
                match self
                    .index
                    .get(&reply, |r| key_at(&self.slots, &self.replies, r))
                {
                    Some(r) if r.slot == s && r.dir == Dir::Reply => {}
                    _ => return Err(format!("reply key of slot {s} not indexed")),
                }
                keys += 1;
            }
            if e.class != e.state.class() {
                return Err(format!("slot {s} in the wrong class list"));
            }
        }
        if ports != self.per_port {
            return Err("per-port counts disagree with entries".into());
        }
        if keys != self.index.len() {
            return Err(format!(
                "{} index keys for {keys} entry keys",
                self.index.len()
            ));
        }
        let mut listed = 0;
        for (ci, l) in self.lists.iter().enumerate() {
            let mut prev = NIL;
            let mut cur = l.head;
            let mut last_moved = 0;
            while cur != NIL {
                let e = self.entry(cur).ok_or("dead slot in a list")?;
                if e.class.index() != ci {
                    return Err("entry in another class's list".into());
                }
                if e.moved < last_moved {
                    return Err("list out of order".into());
                }
                last_moved = e.moved;
                let link = self.links.get(cur as usize).ok_or("no link")?;
                if link.prev != prev {
                    return Err("broken prev link".into());
                }
                prev = cur;
                cur = link.next;
                listed += 1;
                if listed > self.len {
                    return Err("list cycle".into());
                }
            }
            if l.tail != prev {
                return Err("tail mismatch".into());
            }
        }
        if listed != self.len {
            return Err(format!("{listed} listed, {} live", self.len));
        }
        Ok(())
    }
}

/// Why a snapshot entry was not restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RestoreError {
    Exists,
    Limit(Limit),
}

/// The state a connection's first packet starts, or why it cannot start
/// one.
fn first_state(ck: &ConnKey, seg: Option<crate::state::Seg>) -> Result<ProtoState, Invalid> {
    Ok(match (ck.proto, seg) {
        (proto::TCP, Some(seg)) => {
            TcpConn::check_first(&seg)?;
            ProtoState::Tcp(TcpConn::from_syn(&seg))
        }
        (proto::UDP, _) => ProtoState::Udp { assured: false },
        _ if ck.is_icmp() => {
            let ty = u8::try_from(ck.dst_port).unwrap_or(0);
            if !icmp_is_request(ck.is_v6(), ty) {
                return Err(Invalid::IcmpReplyNoRequest);
            }
            ProtoState::Icmp { replied: false }
        }
        _ => ProtoState::Other { replied: false },
    })
}

/// The key `r` points at: the slot's key of that direction.
fn key_at<E>(slots: &[Slot<E>], replies: &[ConnKey], r: Ref) -> Option<ConnKey> {
    let e = slots.get(r.slot as usize)?.entry.as_ref()?;
    Some(match r.dir {
        Dir::Original => e.orig,
        Dir::Reply => reply_key(replies, e),
    })
}

/// `e`'s reply key: the mirror of its original one, or kept in `replies`.
fn reply_key<E>(replies: &[ConnKey], e: &Entry<E>) -> ConnKey {
    if e.reply_at == NIL {
        return e.orig.reverse();
    }
    // A stored index always points at its key; the mirror stands in for
    // a broken one rather than a panic on the packet path.
    replies
        .get(e.reply_at as usize)
        .copied()
        .unwrap_or_else(|| e.orig.reverse())
}
