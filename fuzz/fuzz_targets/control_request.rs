//! `serde_json::from_slice::<vswitch::control::Request>` on arbitrary bytes.
//!
//! Asserts: never panics; an accepted request serializes to JSON that
//! parses back to the same request, and that serialization is a fixed point.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vswitch::control::Request;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<Request>(data) else {
        return;
    };
    let json = serde_json::to_vec(&req).expect("a Request serializes");
    let back: Request = serde_json::from_slice(&json)
        .unwrap_or_else(|e| panic!("re-parse of {}: {e}", String::from_utf8_lossy(&json)));
    assert_eq!(back, req);
    assert_eq!(serde_json::to_vec(&back).expect("serializes"), json);
});
