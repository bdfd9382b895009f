//! Internet checksum (RFC 1071) and incremental updates (RFC 1624).
//!
//! Two kinds of value appear here:
//!
//! * a **sum** (`u64`): an unfolded ones' complement accumulator, as returned
//!   by [`sum`] and the pseudo-header functions. Sums are combined with
//!   [`add`] and turned into 16 bits with [`fold`];
//! * a **checksum** (`u16`): what goes into a header field, `!fold(sum)`.
//!
//! Headers that NAT, the load balancer or the firewall rewrite are fixed with
//! [`update16`], [`update32`] or [`update_bytes`] (RFC 1624 eqn. 3), never by
//! re-summing the payload. A frame whose offload state carries a partial
//! checksum ([`crate::CsumOffload`]) holds the *non-complemented* folded
//! pseudo-header sum in its L4 checksum field; when an address in the pseudo
//! header changes, fix that field with [`update_partial_bytes`] instead (ports
//! are not in the pseudo header and need no change there).
//!
//! UDP over IPv4 uses checksum 0 for "none": leave such a field alone on
//! rewrite, and write 0xffff when a computed UDP checksum is 0
//! ([`udp_nonzero`]).

use std::net::{Ipv4Addr, Ipv6Addr};

/// Ones' complement sum of `data` as big-endian 16-bit words (an odd last
/// byte is padded with zero), as a sum to combine with [`add`] and
/// [`fold`] (it comes back folded to 16 bits).
///
/// The hot loop of software segmentation and GRO, so it reads
/// native-endian 32-bit words into four 64-bit lanes: no byte swaps, and
/// the compiler turns the lanes into SIMD adds. The ones' complement sum
/// does not depend on byte order (RFC 1071, 2(B)): the native sum, folded
/// to 16 bits and byte-swapped once, is the big-endian one. Each lane
/// grows by less than 2^32 per 16 bytes, so nothing overflows for any
/// slice shorter than 2^34 bytes.
#[inline]
pub fn sum(data: &[u8]) -> u64 {
    let mut lanes = [0u64; 4];
    let mut blocks = data.chunks_exact(16);
    for b in &mut blocks {
        add_block(&mut lanes, b);
    }
    finish(lanes.iter().sum(), blocks.remainder())
}

/// Copies `src` into `dst` and returns [`sum`]`(src)`, in one pass over the
/// bytes (segmentation and GRO move every payload byte once and must sum it
/// too; a second pass costs about as much again). Bit-identical to
/// `dst.copy_from_slice(src); sum(src)`.
///
/// # Panics
///
/// When the lengths differ (as [`slice::copy_from_slice`]).
#[inline]
pub fn copy_and_sum(dst: &mut [u8], src: &[u8]) -> u64 {
    assert_eq!(dst.len(), src.len(), "copy_and_sum: length mismatch");
    // 64 bytes per iteration as four explicit 16-byte steps into one set
    // of lanes: written as an inner loop, LLVM turns the copies into a
    // memcpy call and sums in a second pass (what this function is meant to
    // avoid); with a lane set per step it runs out of SIMD registers and
    // falls back to scalar adds.
    let mut lanes = [0u64; 4];
    let mut to = dst.chunks_exact_mut(64);
    let mut from = src.chunks_exact(64);
    for (d, s) in (&mut to).zip(&mut from) {
        copy_add_block(&mut lanes, &mut d[..16], &s[..16]);
        copy_add_block(&mut lanes, &mut d[16..32], &s[16..32]);
        copy_add_block(&mut lanes, &mut d[32..48], &s[32..48]);
        copy_add_block(&mut lanes, &mut d[48..], &s[48..]);
    }
    let mut to = to.into_remainder().chunks_exact_mut(16);
    let mut from = from.remainder().chunks_exact(16);
    for (d, s) in (&mut to).zip(&mut from) {
        copy_add_block(&mut lanes, d, s);
    }
    let rest = from.remainder();
    to.into_remainder().copy_from_slice(rest);
    finish(lanes.iter().sum(), rest)
}

/// Adds the four native-endian 32-bit words of a 16-byte block to the lanes.
#[inline(always)]
fn add_block(lanes: &mut [u64; 4], block: &[u8]) {
    for (lane, w) in lanes.iter_mut().zip(block.chunks_exact(4)) {
        *lane += u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]));
    }
}

/// [`add_block`] of `src` that also copies it to `dst` (same length).
#[inline(always)]
fn copy_add_block(lanes: &mut [u64; 4], dst: &mut [u8], src: &[u8]) {
    dst.copy_from_slice(src);
    add_block(lanes, src);
}

/// Adds the last `rest.len() < 16` bytes to the native-endian total `acc`
/// of the blocks before them and turns it into the big-endian sum. Shared
/// by [`sum`] and [`copy_and_sum`] so both treat odd tails alike.
#[inline(always)]
fn finish(mut acc: u64, rest: &[u8]) -> u64 {
    let mut words = rest.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]));
    }
    let mut pairs = words.remainder().chunks_exact(2);
    for p in &mut pairs {
        acc += u64::from(u16::from_ne_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        // The pad byte follows it, in either byte order.
        acc += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    u64::from(u16::from_be_bytes(fold(acc).to_ne_bytes()))
}

/// Adds two sums with end-around carry.
#[inline]
pub fn add(a: u64, b: u64) -> u64 {
    let (s, carry) = a.overflowing_add(b);
    s + u64::from(carry)
}

/// Folds a sum to 16 bits (not complemented). The result is 0 only when the
/// sum is 0.
#[inline]
pub fn fold(sum: u64) -> u16 {
    let mut s = (sum & 0xffff_ffff) + (sum >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The Internet checksum of `data` (RFC 1071): `!fold(sum(data))`.
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data))
}

/// True when `data`, with its checksum field in place, sums to 0xffff.
#[inline]
pub fn verify(data: &[u8]) -> bool {
    fold(sum(data)) == 0xffff
}

/// UDP sends a computed checksum of 0 as 0xffff (0 means "no checksum").
#[inline]
pub fn udp_nonzero(csum: u16) -> u16 {
    if csum == 0 {
        0xffff
    } else {
        csum
    }
}

/// Sum of the IPv4 pseudo header (RFC 793 / 768): addresses, protocol and
/// upper-layer length.
#[inline]
pub fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: u16) -> u64 {
    u64::from(u32::from(src)) + u64::from(u32::from(dst)) + u64::from(proto) + u64::from(l4_len)
}

/// Sum of the IPv6 pseudo header (RFC 8200 section 8.1): addresses,
/// upper-layer length (32 bits) and next header.
#[inline]
pub fn pseudo_header_v6(src: &Ipv6Addr, dst: &Ipv6Addr, proto: u8, l4_len: u32) -> u64 {
    add(
        add(sum(&src.octets()), sum(&dst.octets())),
        u64::from(proto) + u64::from(l4_len),
    )
}

/// RFC 1624 eqn. 3: the checksum after a 16-bit word covered by it changed
/// from `old` to `new`: `HC' = ~(~HC + ~m + m')`.
#[inline]
pub fn update16(csum: u16, old: u16, new: u16) -> u16 {
    !fold(u64::from(!csum) + u64::from(!old) + u64::from(new))
}

/// [`update16`] for a 32-bit field (an IPv4 address, a TCP sequence number),
/// which must start at an even offset within the summed data.
#[inline]
pub fn update32(csum: u16, old: u32, new: u32) -> u16 {
    let words = |v: u32| [(v >> 16) as u16, v as u16];
    let [o1, o2] = words(old);
    let [n1, n2] = words(new);
    !fold(u64::from(!csum) + u64::from(!o1) + u64::from(!o2) + u64::from(n1) + u64::from(n2))
}

/// [`update16`] for a field of any length (an IPv6 address, a MAC, a port
/// pair) that starts at an even offset within the summed data. `old` and
/// `new` should be the same length; an odd trailing byte counts as the high
/// byte of a word, as in [`sum`].
#[inline]
pub fn update_bytes(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    !fold(add(
        add(u64::from(!csum), u64::from(!fold(sum(old)))),
        sum(new),
    ))
}

/// Update for a partial checksum field (offload pending: the field holds
/// `fold(pseudo header)`, not complemented) after pseudo-header bytes
/// changed from `old` to `new` (an address). Ports and payload changes need
/// no update there.
#[inline]
pub fn update_partial_bytes(partial: u16, old: &[u8], new: &[u8]) -> u16 {
    fold(add(
        add(u64::from(partial), u64::from(!fold(sum(old)))),
        sum(new),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Byte-by-byte reference implementation of RFC 1071.
    fn reference(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for (i, b) in data.iter().enumerate() {
            s += if i % 2 == 0 {
                u32::from(*b) << 8
            } else {
                u32::from(*b)
            };
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&d)), 0xddf2);
        assert_eq!(checksum(&d), !0xddf2);
    }

    #[test]
    fn ipv4_header_fixture() {
        // A real IPv4 header (checksum 0xb861 at bytes 10..12).
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert!(verify(&h));
        h[10] = 0;
        h[11] = 0;
        assert_eq!(checksum(&h), 0xb861);
    }

    #[test]
    fn odd_length_and_empty() {
        assert_eq!(checksum(&[]), 0xffff);
        assert_eq!(fold(sum(&[0xab])), 0xab00);
        assert_eq!(checksum(&[1, 2, 3]), reference(&[1, 2, 3]));
    }

    #[test]
    fn pseudo_headers_match_etherparse() {
        use etherparse::PacketBuilder;
        let payload = [7u8; 33];
        let mut v4 = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1000, 53)
            .write(&mut v4, &payload)
            .unwrap();
        let l4 = &v4[20..];
        let ps = pseudo_header_v4(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            17,
            l4.len() as u16,
        );
        assert_eq!(fold(add(ps, sum(l4))), 0xffff, "UDP/IPv4 checksum verifies");

        let mut v6 = Vec::new();
        let (s, d) = (
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0xfe; 16],
        );
        PacketBuilder::ipv6(s, d, 64)
            .tcp(1, 2, 3, 4)
            .write(&mut v6, &payload)
            .unwrap();
        let l4 = &v6[40..];
        let ps = pseudo_header_v6(&Ipv6Addr::from(s), &Ipv6Addr::from(d), 6, l4.len() as u32);
        assert_eq!(fold(add(ps, sum(l4))), 0xffff, "TCP/IPv6 checksum verifies");
    }

    #[test]
    fn rfc1624_edge_case() {
        // RFC 1624 section 3: header sum of the other words is 0xcd7a + m.
        // m = 0x5555 -> m' = 0x3285 makes the data sum 0xffff, so the
        // correct new checksum is 0x0000 (eqn. 2 of RFC 1141 gives 0xffff).
        let old = [0xcd, 0x7a, 0x55, 0x55];
        let new = [0xcd, 0x7a, 0x32, 0x85];
        let hc = checksum(&old);
        assert_eq!(hc, 0xdd2f);
        assert_eq!(checksum(&new), 0x0000);
        assert_eq!(update16(hc, 0x5555, 0x3285), 0x0000);
        assert_eq!(update_bytes(hc, &[0x55, 0x55], &[0x32, 0x85]), 0x0000);
        // and back
        assert_eq!(update16(0x0000, 0x3285, 0x5555), hc);
    }

    #[test]
    fn partial_update_matches_recomputed_pseudo_header() {
        let a = Ipv4Addr::new(10, 0, 0, 5);
        let b = Ipv4Addr::new(203, 0, 113, 9);
        let d = Ipv4Addr::new(8, 8, 8, 8);
        let p = fold(pseudo_header_v4(a, d, 6, 1480));
        let q = update_partial_bytes(p, &a.octets(), &b.octets());
        assert_eq!(q, fold(pseudo_header_v4(b, d, 6, 1480)));
    }

    /// Sets the checksum field (bytes 0..2) of `data` to the full checksum.
    fn with_checksum(mut data: Vec<u8>) -> Vec<u8> {
        data[0] = 0;
        data[1] = 0;
        let c = checksum(&data);
        data[..2].copy_from_slice(&c.to_be_bytes());
        data
    }

    #[test]
    fn copy_and_sum_equals_copy_then_sum() {
        // Every length across the 64- and 16-byte block boundaries and the
        // odd tails, at every source and destination misalignment.
        let src: Vec<u8> = (0..320u32).map(|i| (i * 151 + 7) as u8).collect();
        for len in 0..=300 {
            for s_off in 0..4 {
                for d_off in 0..4 {
                    let from = &src[s_off..s_off + len];
                    let mut dst = vec![0xa5u8; len + 8];
                    let got = copy_and_sum(&mut dst[d_off..d_off + len], from);
                    assert_eq!(got, sum(from), "len {len} src+{s_off} dst+{d_off}");
                    assert_eq!(&dst[d_off..d_off + len], from);
                    // Nothing written outside `dst`.
                    assert!(dst[..d_off].iter().all(|&b| b == 0xa5));
                    assert!(dst[d_off + len..].iter().all(|&b| b == 0xa5));
                }
            }
        }
    }

    #[test]
    fn copy_and_sum_all_ones() {
        // Largest words everywhere: the lanes' carries must all survive.
        let src = vec![0xffu8; 65_536];
        let mut dst = vec![0u8; src.len()];
        let s = copy_and_sum(&mut dst, &src);
        assert_eq!(s, sum(&src));
        assert_eq!(fold(s), 0xffff);
        assert_eq!(dst, src);
    }

    #[test]
    #[should_panic(expected = "length mismatch")]
    fn copy_and_sum_rejects_length_mismatch() {
        copy_and_sum(&mut [0; 3], &[1, 2]);
    }

    proptest! {
        #[test]
        fn copy_and_sum_matches_copy_then_sum(
            data in proptest::collection::vec(any::<u8>(), 0..5000),
            off in 0usize..16,
        ) {
            let src = &data[off.min(data.len())..];
            let mut dst = vec![0u8; src.len()];
            let got = copy_and_sum(&mut dst, src);
            let mut want = vec![0u8; src.len()];
            want.copy_from_slice(src);
            prop_assert_eq!(got, sum(&want));
            prop_assert_eq!(checksum(&dst), reference(src));
            prop_assert_eq!(dst, want);
        }

        #[test]
        fn fast_sum_matches_reference(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            prop_assert_eq!(checksum(&data), reference(&data));
            let c = etherparse::checksum::Sum16BitWords::new().add_slice(&data).ones_complement().to_be();
            prop_assert_eq!(checksum(&data), c);
        }

        #[test]
        fn split_sums_add_up(data in proptest::collection::vec(any::<u8>(), 0..600), cut in 0usize..300) {
            let cut = (cut * 2).min(data.len() & !1);
            prop_assert_eq!(fold(add(sum(&data[..cut]), sum(&data[cut..]))), fold(sum(&data)));
        }

        /// Differential: incremental update == full re-sum after changing a
        /// random 16-bit word, 32-bit word or 16-byte field. The only case in
        /// which the two legitimately differ is data that becomes all zero
        /// (full sum gives 0xffff, eqn. 3 gives 0x0000: both verify as -0).
        #[test]
        fn incremental_equals_full(
            words in proptest::collection::vec(any::<u16>(), 16..40),
            at in 1usize..8,
            new16 in any::<u16>(),
            new32 in any::<u32>(),
            new128 in any::<[u8; 16]>(),
            special in 0u8..4,
        ) {
            let mut data: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
            // Force the RFC 1624 edge cases now and then: the word being
            // replaced, or its replacement, is 0x0000 or 0xffff.
            let new16 = match special { 0 => 0x0000, 1 => 0xffff, _ => new16 };
            if special == 2 { data[2 * at] = 0xff; data[2 * at + 1] = 0xff; }
            if special == 3 { data[2 * at] = 0; data[2 * at + 1] = 0; }
            let data = with_checksum(data);
            let hc = u16::from_be_bytes([data[0], data[1]]);
            let all_zero = |d: &[u8]| d[2..].iter().all(|&b| b == 0);

            // 16-bit field
            let i = 2 * at;
            let old = u16::from_be_bytes([data[i], data[i + 1]]);
            let mut d16 = data.clone();
            d16[i..i + 2].copy_from_slice(&new16.to_be_bytes());
            let full = with_checksum(d16.clone());
            let inc = update16(hc, old, new16);
            if !all_zero(&full) {
                prop_assert_eq!(inc, u16::from_be_bytes([full[0], full[1]]));
            }
            d16[..2].copy_from_slice(&inc.to_be_bytes());
            prop_assert!(verify(&d16) || all_zero(&d16));
            prop_assert_eq!(update_bytes(hc, &data[i..i + 2], &new16.to_be_bytes()), inc);

            // 32-bit field
            let old32 = u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
            let mut d32 = data.clone();
            d32[i..i + 4].copy_from_slice(&new32.to_be_bytes());
            let full = with_checksum(d32);
            if !all_zero(&full) {
                prop_assert_eq!(update32(hc, old32, new32), u16::from_be_bytes([full[0], full[1]]));
            }

            // 16-byte field (IPv6 address)
            let mut d128 = data.clone();
            d128[i..i + 16].copy_from_slice(&new128);
            let full = with_checksum(d128);
            if !all_zero(&full) {
                prop_assert_eq!(
                    update_bytes(hc, &data[i..i + 16], &new128),
                    u16::from_be_bytes([full[0], full[1]])
                );
            }
        }
    }
}
