//! vswitch: the per-host userspace virtual switch.
//!
//! What this crate is: everything that touches file descriptors. Ports
//! ([`tap`]) and the worker threads that move frames between them
//! ([`dataplane`]), the per-packet [`pipeline`] that calls the sans-IO
//! network functions, the MAC table ([`fdb`]), the tenant [`config`] and the
//! [`directory`] built from it, the control plane ([`daemon`], [`control`])
//! and the binaries `vswitchd`, `vswitchctl` and `vslab` ([`lab`]).
//!
//! What it is not: packet parsing and checksums live in the `packet` crate;
//! protocol logic (DHCP, VXLAN, conntrack, NAT, firewall, LB) lives in
//! sans-IO crates of their own that take `now` and a packet and return a
//! verdict. See docs/architecture.md for the picture.

pub mod balancer;
pub mod capture;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod dhcp_service;
pub mod directory;
pub mod fdb;
pub mod filter;
pub mod lab;
pub mod lb_tables;
pub mod metrics;
pub mod nat_tables;
pub mod pipeline;
pub mod stripes;
pub mod table;
pub mod tap;
pub mod trace;
pub mod udp_gso;
pub mod underlay;
