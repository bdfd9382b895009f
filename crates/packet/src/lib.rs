//! Packets as vswitch sees them.
//!
//! What this crate is:
//!
//! * [`view`]: zero-copy, bounds-checked views over Ethernet frames
//!   (Ethernet with 802.1Q/QinQ, ARP, IPv4, IPv6, ICMP/ICMPv6, TCP, UDP),
//!   built on etherparse's slice types (re-exported there with a guide of
//!   which to use for what), plus what etherparse lacks: an Ethernet+VLAN
//!   view, typed Ethernet/IPv4 ARP, and the headers quoted inside ICMP
//!   errors;
//! * [`buf`]: a packet buffer ([`PacketBuf`]) with headroom for
//!   encapsulation and the frame's offload metadata ([`Offload`], the
//!   virtio-net header's meaning, in [`offload`]);
//! * [`flow`]: a flow key parsed once per frame ([`FlowKey`]) with the L3/L4
//!   offsets later stages use instead of parsing again, and a small `Copy`
//!   reason ([`Malformed`]) when an inner layer is broken;
//! * [`checksum`]: the Internet checksum, pseudo headers and incremental
//!   updates (RFC 1071, RFC 1624);
//! * [`gso`]: the software fallback for egresses that cannot take an
//!   offload: checksum completion and TSO4/TSO6/USO segmentation;
//! * [`gro`]: the inverse on receive: consecutive TCP segments of a flow
//!   merged into one TSO super-frame for a tap with a vnet header.
//!
//! What it is not: it owns no file descriptors, threads or clocks, and it
//! makes no forwarding decisions. Every function here takes untrusted bytes
//! and never panics on them.

#![forbid(unsafe_code)]

pub mod buf;
pub mod checksum;
pub mod flow;
pub mod gro;
pub mod gso;
pub mod mac;
pub mod offload;
pub mod view;

pub use buf::{PacketBuf, HEADROOM, MAX_FRAME};
pub use flow::{ArpKey, FlowKey, Frag, IpKey, Malformed, ParseError, L3, L4};
pub use gro::{Gro, GroStats};
pub use gso::{complete_checksum, segment, GsoError};
pub use mac::MacAddr;
pub use offload::{CsumOffload, GsoType, Offload, OffloadCaps, OffloadError, VNET_HDR_LEN};
pub use view::{EthView, VlanTag};
