//! The VTEP table: remote hosts (peers) by name and underlay address, and
//! which peers host which VNI, for head-end replication of broadcast,
//! multicast and unknown-unicast frames.
//!
//! Built by the control plane from the directory (static config today) and
//! read by the data path: [`VtepTable::flood_list`] gives the remote VTEPs a
//! flooded frame of a VNI is copied to, [`VtepTable::is_member`] tells
//! whether a decapsulated packet's outer source may speak for that VNI.
//! The local host is not in the table. Bounded: at most [`MAX_PEERS`] peers.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use crate::Vni;

/// Most peers a table holds.
pub const MAX_PEERS: usize = 4096;

/// A table change that was refused (control plane: the message says what
/// to fix).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VtepError {
    /// A peer with this name exists already.
    #[error("VTEP peer {0:?} is defined twice; give each host one entry")]
    DuplicateName(String),
    /// Another peer has this underlay address.
    #[error("VTEP address {ip} of {name:?} is already used by {other:?}; each host needs its own underlay address")]
    DuplicateIp {
        /// The peer being added.
        name: String,
        /// Its address.
        ip: IpAddr,
        /// The peer that has the address.
        other: String,
    },
    /// No peer with this name.
    #[error("unknown VTEP peer {0:?}; add it to the hosts list first")]
    UnknownPeer(String),
    /// [`MAX_PEERS`] reached.
    #[error("more than {MAX_PEERS} VTEP peers")]
    TooManyPeers,
}

/// Peers and per-VNI flood lists.
#[derive(Debug, Clone, Default)]
pub struct VtepTable {
    peers: BTreeMap<String, IpAddr>,
    by_ip: HashMap<IpAddr, String>,
    /// Per VNI: member addresses, sorted, no duplicates.
    flood: HashMap<Vni, Vec<IpAddr>>,
}

impl VtepTable {
    /// An empty table.
    pub fn new() -> VtepTable {
        VtepTable::default()
    }

    /// Adds a remote host.
    pub fn add_peer(&mut self, name: &str, ip: IpAddr) -> Result<(), VtepError> {
        if self.peers.contains_key(name) {
            return Err(VtepError::DuplicateName(name.to_string()));
        }
        if let Some(other) = self.by_ip.get(&ip) {
            return Err(VtepError::DuplicateIp {
                name: name.to_string(),
                ip,
                other: other.clone(),
            });
        }
        if self.peers.len() >= MAX_PEERS {
            return Err(VtepError::TooManyPeers);
        }
        self.peers.insert(name.to_string(), ip);
        self.by_ip.insert(ip, name.to_string());
        Ok(())
    }

    /// Removes a host and takes it out of every flood list; `false` if it
    /// was not there.
    pub fn remove_peer(&mut self, name: &str) -> bool {
        let Some(ip) = self.peers.remove(name) else {
            return false;
        };
        self.by_ip.remove(&ip);
        self.flood.retain(|_, l| {
            l.retain(|a| *a != ip);
            !l.is_empty()
        });
        true
    }

    /// Records that peer `name` hosts `vni` (idempotent).
    pub fn add_member(&mut self, vni: Vni, name: &str) -> Result<(), VtepError> {
        let ip = *self
            .peers
            .get(name)
            .ok_or_else(|| VtepError::UnknownPeer(name.to_string()))?;
        let l = self.flood.entry(vni).or_default();
        if let Err(i) = l.binary_search(&ip) {
            l.insert(i, ip);
        }
        Ok(())
    }

    /// Records that peer `name` no longer hosts `vni`; `false` if it did not.
    pub fn remove_member(&mut self, vni: Vni, name: &str) -> bool {
        let Some(ip) = self.peers.get(name) else {
            return false;
        };
        let Some(l) = self.flood.get_mut(&vni) else {
            return false;
        };
        let Ok(i) = l.binary_search(ip) else {
            return false;
        };
        l.remove(i);
        if l.is_empty() {
            self.flood.remove(&vni);
        }
        true
    }

    /// Remote VTEPs hosting `vni`, sorted (empty if none).
    pub fn flood_list(&self, vni: Vni) -> &[IpAddr] {
        self.flood.get(&vni).map_or(&[], Vec::as_slice)
    }

    /// True if `ip` is a known peer's underlay address.
    pub fn is_peer(&self, ip: IpAddr) -> bool {
        self.by_ip.contains_key(&ip)
    }

    /// True if `ip` is a peer hosting `vni`.
    pub fn is_member(&self, vni: Vni, ip: IpAddr) -> bool {
        self.flood_list(vni).binary_search(&ip).is_ok()
    }

    /// The name of the peer at `ip`.
    pub fn peer_name(&self, ip: IpAddr) -> Option<&str> {
        self.by_ip.get(&ip).map(String::as_str)
    }

    /// The address of peer `name`.
    pub fn peer_ip(&self, name: &str) -> Option<IpAddr> {
        self.peers.get(name).copied()
    }

    /// Peers by name.
    pub fn peers(&self) -> impl Iterator<Item = (&str, IpAddr)> {
        self.peers.iter().map(|(n, ip)| (n.as_str(), *ip))
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True with no peers.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn vni(v: u32) -> Vni {
        Vni::new(v).unwrap()
    }

    #[test]
    fn peers_and_flood_lists() {
        let mut t = VtepTable::new();
        t.add_peer("b", ip("192.0.2.2")).unwrap();
        t.add_peer("c", ip("192.0.2.3")).unwrap();
        t.add_peer("d", ip("192.0.2.4")).unwrap();
        assert_eq!(t.len(), 3);
        t.add_member(vni(100), "c").unwrap();
        t.add_member(vni(100), "b").unwrap();
        t.add_member(vni(100), "b").unwrap(); // idempotent
        t.add_member(vni(200), "d").unwrap();
        assert_eq!(t.flood_list(vni(100)), &[ip("192.0.2.2"), ip("192.0.2.3")]);
        assert_eq!(t.flood_list(vni(200)), &[ip("192.0.2.4")]);
        assert!(t.flood_list(vni(300)).is_empty());
        assert!(t.is_peer(ip("192.0.2.4")));
        assert!(!t.is_peer(ip("192.0.2.9")));
        assert!(t.is_member(vni(100), ip("192.0.2.2")));
        assert!(!t.is_member(vni(200), ip("192.0.2.2")));
        assert_eq!(t.peer_name(ip("192.0.2.3")), Some("c"));
        assert_eq!(t.peer_ip("d"), Some(ip("192.0.2.4")));

        assert!(t.remove_member(vni(100), "b"));
        assert!(!t.remove_member(vni(100), "b"));
        assert_eq!(t.flood_list(vni(100)), &[ip("192.0.2.3")]);
        assert!(t.remove_peer("c"));
        assert!(t.flood_list(vni(100)).is_empty());
        assert!(!t.is_peer(ip("192.0.2.3")));
        assert!(!t.remove_peer("c"));
        assert_eq!(t.peers().count(), 2);
    }

    #[test]
    fn refusals() {
        let mut t = VtepTable::new();
        t.add_peer("b", ip("192.0.2.2")).unwrap();
        assert_eq!(
            t.add_peer("b", ip("192.0.2.5")),
            Err(VtepError::DuplicateName("b".into()))
        );
        let e = t.add_peer("x", ip("192.0.2.2")).unwrap_err();
        assert!(e.to_string().contains("already used by \"b\""), "{e}");
        assert_eq!(
            t.add_member(vni(1), "nope"),
            Err(VtepError::UnknownPeer("nope".into()))
        );
        for i in 1..MAX_PEERS {
            t.add_peer(
                &format!("h{i}"),
                IpAddr::from([10, 0, (i >> 8) as u8, i as u8]),
            )
            .unwrap();
        }
        assert_eq!(
            t.add_peer("last", ip("198.51.100.1")),
            Err(VtepError::TooManyPeers)
        );
    }
}
