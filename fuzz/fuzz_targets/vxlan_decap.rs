//! `vxlan::decap::parse`, `vxlan::decap::parse_header` and `vxlan::decap`
//! on arbitrary underlay frames (the input is the frame, UDP port 4789).
//!
//! Asserts: never panics; `parse` agrees exactly (result and error variant)
//! with a small reference model of the checks documented in
//! `crates/vxlan/src/decap.rs`, in their documented order, for ports 4789
//! and 8472 and for the frame's own UDP destination port; an accepted packet's inner frame
//! lies within the input (at Ethernet + IHL + 16, at least 14 bytes, ending at
//! the UDP length), its VNI is <= 2^24-1 and equals the header's bytes, the
//! addresses, MAC and source port are the frame's; `parse_header` accepts
//! exactly 8 + 14 bytes or more with the I flag, and agrees with `parse` on
//! the UDP payload; `decap` returns what `parse` returns, leaves exactly the
//! inner frame, moves offload metadata by the outer length (dropping a
//! checksum that pointed into the outer headers) and leaves the buffer
//! untouched on error; re-encapsulating the inner frame in the same buffer
//! with `Encapsulator` and the returned VNI, addresses and MACs gives a
//! packet that parses to the same VNI/addresses/MAC with the same inner
//! frame, and decapsulates back to it.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use packet::{CsumOffload, FlowKey, MacAddr, Offload, PacketBuf};
use vxlan::decap::{parse, parse_header};
use vxlan::{
    decap, DecapError, EncapConfig, Encapsulator, Underlay, Vni, DEFAULT_PORT, OUTER_V4_LEN,
    SRC_PORT_MAX, SRC_PORT_MIN,
};

fn be16(b: &[u8], i: usize) -> usize {
    usize::from(u16::from_be_bytes([b[i], b[i + 1]]))
}

/// RFC 1071 check of an IPv4 header, written independently of
/// `packet::checksum`.
fn header_sums_to_ffff(h: &[u8]) -> bool {
    let mut s: u32 = 0;
    for w in h.chunks(2) {
        s += u32::from(w[0]) << 8 | u32::from(*w.get(1).unwrap_or(&0));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s == 0xffff
}

/// The checks of `decap::parse` as its module documentation lists them.
/// Returns (inner offset, inner length).
fn reference(f: &[u8], port: u16) -> Result<(usize, usize), DecapError> {
    use DecapError::*;
    if f.len() < 14 {
        return Err(EthTruncated);
    }
    if f[12..14] != [0x08, 0x00] {
        return Err(NotIpv4);
    }
    let ip = &f[14..];
    if ip.len() < 20 {
        return Err(Ipv4Truncated);
    }
    if ip[0] >> 4 != 4 {
        return Err(Ipv4BadVersion);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(Ipv4BadIhl);
    }
    if ip.len() < ihl {
        return Err(Ipv4Truncated);
    }
    let total = be16(ip, 2);
    if total < ihl || total > ip.len() {
        return Err(Ipv4BadTotalLen);
    }
    if !header_sums_to_ffff(&ip[..ihl]) {
        return Err(Ipv4BadChecksum);
    }
    let more_fragments = ip[6] & 0x20 != 0;
    let frag_offset = be16(ip, 6) & 0x1fff;
    if more_fragments || frag_offset != 0 {
        return Err(Ipv4Fragment);
    }
    if ip[9] != 17 {
        return Err(NotUdp);
    }
    let udp = &ip[ihl..total];
    if udp.len() < 8 {
        return Err(UdpTruncated);
    }
    if be16(udp, 2) != usize::from(port) {
        return Err(WrongPort);
    }
    let ulen = be16(udp, 4);
    if ulen < 8 || ulen > udp.len() {
        return Err(UdpBadLength);
    }
    let vx = &udp[8..ulen];
    if vx.len() < 8 {
        return Err(VxlanTruncated);
    }
    if vx[0] & 0x08 == 0 {
        return Err(NoIFlag);
    }
    if vx.len() < 8 + 14 {
        return Err(InnerTooShort);
    }
    Ok((14 + ihl + 8 + 8, ulen - 16))
}

/// The UDP destination port the frame carries, if it is that far.
fn own_port(f: &[u8]) -> Option<u16> {
    let ihl = usize::from(*f.get(14)? & 0x0f) * 4;
    let at = 14 + ihl + 2;
    Some(u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]))
}

fuzz_target!(|frame: &[u8]| {
    // ---- parse_header on the raw bytes -----------------------------------
    let h = parse_header(frame);
    match h {
        Ok(v) => {
            assert!(frame.len() >= 8 + 14 && frame[0] & 0x08 != 0);
            assert!(v.get() <= Vni::MAX);
            assert_eq!(v, Vni::from_bytes([frame[4], frame[5], frame[6]]));
            assert_eq!(v.to_bytes(), [frame[4], frame[5], frame[6]]);
            assert_eq!(Vni::new(v.get()), Some(v));
        }
        Err(DecapError::VxlanTruncated) => assert!(frame.len() < 8),
        Err(DecapError::NoIFlag) => assert!(frame.len() >= 8 && frame[0] & 0x08 == 0),
        Err(DecapError::InnerTooShort) => {
            assert!((8..22).contains(&frame.len()) && frame[0] & 0x08 != 0)
        }
        Err(e) => panic!("parse_header returned {e:?}"),
    }

    // ---- parse against the reference, two ports ------------------------
    let mut ports = vec![DEFAULT_PORT, 8472];
    ports.extend(own_port(frame));
    for &port in &ports {
        let got = parse(frame, port);
        let want = reference(frame, port);
        assert_eq!(
            got.map(|d| (d.inner_offset, d.inner_len)),
            want,
            "port {port}"
        );
        assert_eq!(parse(frame, port), got, "deterministic");
    }

    let parsed = parse(frame, DEFAULT_PORT);
    let mut buf = PacketBuf::from_frame(frame);
    let r = decap(&mut buf, DEFAULT_PORT);
    assert_eq!(r, parsed, "decap returns what parse returns");
    let d = match r {
        Err(_) => {
            assert_eq!(buf.frame(), frame, "decap leaves the buffer alone on error");
            assert_eq!(buf.offload, Offload::NONE);
            return;
        }
        Ok(d) => d,
    };

    // ---- an accepted packet ---------------------------------------------
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let udp = 14 + ihl;
    let (off, len) = (d.inner_offset, d.inner_len);
    assert_eq!(off, udp + 16);
    assert!(len >= 14);
    let end = off.checked_add(len).expect("inner end overflows");
    assert!(
        end <= frame.len(),
        "inner frame {off}+{len} past the input ({})",
        frame.len()
    );
    assert_eq!(
        end,
        udp + be16(frame, udp + 4),
        "inner frame ends at the UDP length"
    );
    assert!(
        end <= 14 + be16(frame, 16),
        "inner frame ends inside the IP packet"
    );
    assert!(d.vni.get() <= Vni::MAX);
    assert_eq!(
        d.vni.to_bytes(),
        [frame[off - 4], frame[off - 3], frame[off - 2]]
    );
    assert_ne!(frame[off - 8] & 0x08, 0, "I flag");
    assert_eq!(parse_header(&frame[off - 8..end]), Ok(d.vni));
    assert_eq!(
        d.outer_src,
        IpAddr::from([frame[26], frame[27], frame[28], frame[29]])
    );
    assert_eq!(
        d.outer_dst,
        IpAddr::from([frame[30], frame[31], frame[32], frame[33]])
    );
    assert_eq!(d.outer_src_mac.octets(), frame[6..12]);
    assert_eq!(usize::from(d.src_port), be16(frame, udp));
    assert_eq!(
        buf.frame(),
        &frame[off..end],
        "decap leaves exactly the inner frame"
    );
    assert_eq!(buf.len(), d.inner_len);
    assert_eq!(buf.offload, Offload::NONE);

    // ---- offload metadata moves with the inner frame ----------------------
    // A checksum start and header length taken from the input's last bytes.
    let n = frame.len();
    let start = u16::from_le_bytes([frame[n - 2], frame[n - 1]]);
    let hdr_len = u16::from_le_bytes([frame[n - 4], frame[n - 3]]);
    let mut ob = PacketBuf::from_frame(frame);
    let o = Offload {
        hdr_len,
        csum: Some(CsumOffload { start, offset: 16 }),
        data_valid: frame[n - 5] & 1 != 0,
        ..Offload::NONE
    };
    ob.offload = o;
    assert_eq!(decap(&mut ob, DEFAULT_PORT), Ok(d));
    assert_eq!(ob.frame(), buf.frame());
    let off16 = u16::try_from(off).expect("outer headers < 64 KB");
    let want = Offload {
        hdr_len: hdr_len.saturating_sub(off16),
        csum: start
            .checked_sub(off16)
            .map(|start| CsumOffload { start, offset: 16 }),
        ..o
    };
    assert_eq!(ob.offload, want, "offload moved by {off}");

    // ---- decap, then re-encap in the same buffer --------------------------
    let inner = buf.frame().to_vec();
    // The flow key only picks the source port; a cut VLAN tag gets the key
    // of an all-zero Ethernet header.
    let key = FlowKey::parse(&inner).or_else(|_| FlowKey::parse(&[0u8; 14]));
    let key = key.expect("14 zero bytes parse");
    let dst_mac = MacAddr::from_slice(&frame[..6]).expect("6 bytes");
    let underlay = Underlay {
        src_mac: d.outer_src_mac,
        dst_mac,
        src_ip: d.outer_src,
        dst_ip: d.outer_dst,
    };
    let mut e = Encapsulator::new(EncapConfig::default());
    let info = e
        .encap(&mut buf, &underlay, d.vni, &key)
        .unwrap_or_else(|err| panic!("re-encap of a decapsulated frame failed: {err:?}"));
    assert_eq!(usize::from(info.outer_len), OUTER_V4_LEN);
    assert!(!info.inner_csum_partial);
    assert!((SRC_PORT_MIN..=SRC_PORT_MAX).contains(&info.src_port));
    let out = buf.frame().to_vec();
    assert_eq!(out.len(), OUTER_V4_LEN + inner.len());
    assert_eq!(out[..14], frame[..14], "same outer Ethernet header");
    let d2 = parse(&out, DEFAULT_PORT).expect("a re-encapsulated packet parses");
    assert_eq!(d2.vni, d.vni);
    assert_eq!((d2.outer_src, d2.outer_dst), (d.outer_src, d.outer_dst));
    assert_eq!(d2.outer_src_mac, d.outer_src_mac);
    assert_eq!(d2.src_port, info.src_port);
    assert_eq!((d2.inner_offset, d2.inner_len), (OUTER_V4_LEN, inner.len()));
    assert_eq!(&out[OUTER_V4_LEN..], &inner[..], "same inner frame");
    assert_eq!(
        reference(&out, DEFAULT_PORT),
        Ok((OUTER_V4_LEN, inner.len()))
    );
    assert_eq!(decap(&mut buf, DEFAULT_PORT), Ok(d2));
    assert_eq!(buf.frame(), &inner[..]);
});
