//! Fixed, documented hashes: every host must compute the same Maglev table
//! and the same backend for the same flow, so nothing here may depend on
//! the process (no `RandomState`), the platform (byte order is fixed) or the
//! Rust release (std's `SipHasher` is deprecated and its output is not
//! promised to stay put).
//!
//! The one primitive is SipHash-2-4 (Aumasson and Bernstein, 2012) with a
//! 128-bit key, checked against the reference test vector. SipHash is a
//! keyed PRF, so outputs under different keys behave as independent hash
//! functions, which is what Maglev needs for its offset and skip.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// SipHash-2-4 of `data` under the key `(k0, k1)` (the key's two
/// little-endian halves, as in the reference implementation).
pub fn siphash24(k0: u64, k1: u64, data: &[u8]) -> u64 {
    let mut v0 = k0 ^ 0x736f_6d65_7073_6575;
    let mut v1 = k1 ^ 0x646f_7261_6e64_6f6d;
    let mut v2 = k0 ^ 0x6c79_6765_6e65_7261;
    let mut v3 = k1 ^ 0x7465_6462_7974_6573;

    #[inline(always)]
    fn round(v0: &mut u64, v1: &mut u64, v2: &mut u64, v3: &mut u64) {
        *v0 = v0.wrapping_add(*v1);
        *v1 = v1.rotate_left(13);
        *v1 ^= *v0;
        *v0 = v0.rotate_left(32);
        *v2 = v2.wrapping_add(*v3);
        *v3 = v3.rotate_left(16);
        *v3 ^= *v2;
        *v0 = v0.wrapping_add(*v3);
        *v3 = v3.rotate_left(21);
        *v3 ^= *v0;
        *v2 = v2.wrapping_add(*v1);
        *v1 = v1.rotate_left(17);
        *v1 ^= *v2;
        *v2 = v2.rotate_left(32);
    }

    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let m = u64::from_le_bytes(word);
        v3 ^= m;
        round(&mut v0, &mut v1, &mut v2, &mut v3);
        round(&mut v0, &mut v1, &mut v2, &mut v3);
        v0 ^= m;
    }
    // Last block: the remaining bytes, zero padded, with the message
    // length (mod 256) in the top byte.
    let rest = chunks.remainder();
    let mut word = [0u8; 8];
    word[..rest.len()].copy_from_slice(rest);
    word[7] = data.len() as u8;
    let m = u64::from_le_bytes(word);
    v3 ^= m;
    round(&mut v0, &mut v1, &mut v2, &mut v3);
    round(&mut v0, &mut v1, &mut v2, &mut v3);
    v0 ^= m;

    v2 ^= 0xff;
    for _ in 0..4 {
        round(&mut v0, &mut v1, &mut v2, &mut v3);
    }
    v0 ^ v1 ^ v2 ^ v3
}

/// Second key half of the flow hash; the caller's seed is the first.
/// ASCII "vsw-flow".
const FLOW_K1: u64 = 0x7673_772d_666c_6f77;

/// The 5-tuple of a connection's first packet, as the load balancer sees
/// it (before DNAT: the destination is the VIP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlowTuple {
    /// Source address (the client).
    pub src: IpAddr,
    /// Destination address (the VIP).
    pub dst: IpAddr,
    /// IP protocol number (6 TCP, 17 UDP, ...).
    pub proto: u8,
    /// Source port (0 for protocols without ports).
    pub src_port: u16,
    /// Destination port (0 for protocols without ports).
    pub dst_port: u16,
}

/// Stable, seeded hash of a 5-tuple for [`crate::Maglev::lookup`].
///
/// SipHash-2-4 keyed with `(seed, FLOW_K1)` over a fixed encoding: a family
/// byte (4 or 6), source and destination addresses in network order,
/// protocol, source and destination ports big-endian. Hosts that share a
/// seed (and a table) send the same flow to the same backend, so a flow
/// that moves between hosts (ECMP rehash, migration of the VIP) keeps its
/// backend as long as the backend set is unchanged. The seed exists so a
/// client cannot predict which backend its tuples land on; take it from
/// the pool's config, not from the process.
///
/// Mixed families (IPv4 source, IPv6 destination) are hashed as given.
pub fn flow_hash(seed: u64, flow: &FlowTuple) -> u64 {
    let mut buf = [0u8; 1 + 16 + 16 + 1 + 2 + 2];
    let mut n = 0;
    let mut put = |bytes: &[u8]| {
        buf[n..n + bytes.len()].copy_from_slice(bytes);
        n += bytes.len();
    };
    let family = match (flow.src, flow.dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => 4u8,
        _ => 6u8,
    };
    put(&[family]);
    for addr in [flow.src, flow.dst] {
        match addr {
            IpAddr::V4(a) => put(&a.octets()),
            IpAddr::V6(a) => put(&a.octets()),
        }
    }
    put(&[flow.proto]);
    put(&flow.src_port.to_be_bytes());
    put(&flow.dst_port.to_be_bytes());
    siphash24(seed, FLOW_K1, &buf[..n])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn siphash_reference_vector() {
        // Appendix A of the SipHash paper: key 00..0f, message 00..0e.
        let key: Vec<u8> = (0u8..16).collect();
        let k0 = u64::from_le_bytes(key[..8].try_into().unwrap());
        let k1 = u64::from_le_bytes(key[8..].try_into().unwrap());
        let msg: Vec<u8> = (0u8..15).collect();
        assert_eq!(siphash24(k0, k1, &msg), 0xa129_ca61_49be_45e5);
        // Empty message, from the reference vectors.h (first entry).
        assert_eq!(siphash24(k0, k1, &[]), 0x726f_db47_dd0e_0e31);
    }

    #[test]
    fn flow_hash_is_stable_and_seeded() {
        let flow = FlowTuple {
            src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            dst: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 100)),
            proto: 6,
            src_port: 40000,
            dst_port: 80,
        };
        // Pinned value: changing it would move every flow on upgrade.
        assert_eq!(flow_hash(0, &flow), 0x8b88_ad3a_5b2c_62f1);
        assert_ne!(flow_hash(0, &flow), flow_hash(1, &flow));
        let mut other = flow;
        other.src_port = 40001;
        assert_ne!(flow_hash(0, &flow), flow_hash(0, &other));
        let v6 = FlowTuple {
            src: IpAddr::V6(Ipv6Addr::LOCALHOST),
            dst: IpAddr::V6(Ipv6Addr::LOCALHOST),
            ..flow
        };
        assert_ne!(flow_hash(0, &flow), flow_hash(0, &v6));
    }
}
