//! `packet::Offload::from_vnet_hdr` on arbitrary headers.
//!
//! Asserts: only inputs shorter than 12 bytes are `Truncated`; bytes after
//! the header are ignored; for an accepted header, `to_vnet_hdr` followed by
//! `from_vnet_hdr` gives the same `Offload` back (with one documented
//! exception: `to_vnet_hdr` writes `DATA_VALID` only when no checksum is
//! pending, so a header with both `NEEDS_CSUM` and `DATA_VALID` comes back
//! without `data_valid`), and re-encoding that is a fixed point; `gso_size`
//! is 0 exactly when there is no GSO.
#![no_main]

use libfuzzer_sys::fuzz_target;
use packet::{GsoType, Offload, OffloadError, VNET_HDR_LEN};

fuzz_target!(|data: &[u8]| {
    let o = match Offload::from_vnet_hdr(data) {
        Ok(o) => o,
        Err(OffloadError::Truncated) => {
            assert!(data.len() < VNET_HDR_LEN);
            return;
        }
        Err(e) => {
            assert!(data.len() >= VNET_HDR_LEN);
            assert_eq!(Offload::from_vnet_hdr(&data[..VNET_HDR_LEN]), Err(e));
            return;
        }
    };
    assert!(data.len() >= VNET_HDR_LEN);
    assert_eq!(Offload::from_vnet_hdr(&data[..VNET_HDR_LEN]), Ok(o), "trailing bytes ignored");
    assert_eq!(o.gso == GsoType::None, o.gso_size == 0);
    assert_eq!(o.is_gso(), o.gso != GsoType::None);

    let h = o.to_vnet_hdr();
    let back = Offload::from_vnet_hdr(&h).expect("an encoded Offload parses");
    let mut want = o;
    if want.csum.is_some() {
        // NEEDS_CSUM wins over DATA_VALID on encode (virtio: DATA_VALID is
        // for completed checksums only).
        want.data_valid = false;
    }
    assert_eq!(back, want, "round trip of {:02x?}", &data[..VNET_HDR_LEN]);
    assert_eq!(back.to_vnet_hdr(), h, "encoding is a fixed point");
});
