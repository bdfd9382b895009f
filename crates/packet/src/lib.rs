//! Packets as vswitch sees them.
//!
//! What this crate is: zero-copy, bounds-checked views over Ethernet frames
//! (Ethernet with 802.1Q, ARP, IPv4, IPv6, ICMP/ICMPv6, TCP, UDP), a packet
//! buffer ([`PacketBuf`]) with headroom for encapsulation and the frame's
//! offload metadata ([`Offload`], the virtio-net header's meaning), a flow key
//! parsed once per frame ([`FlowKey`]), and Internet checksum helpers
//! including incremental updates (RFC 1624).
//!
//! What it is not: it owns no file descriptors, threads or clocks, and it
//! makes no forwarding decisions. Every function here takes untrusted bytes
//! and never panics on them.

#![forbid(unsafe_code)]

pub mod buf;
pub mod mac;
pub mod offload;

pub use buf::{PacketBuf, HEADROOM, MAX_FRAME};
pub use mac::MacAddr;
pub use offload::{CsumOffload, GsoType, Offload, OffloadCaps, OffloadError, VNET_HDR_LEN};
