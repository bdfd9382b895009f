//! `vswitchctl trace`: a synthetic packet walked through the real pipeline
//! as a dry run, or the next real packets of a port traced live (see
//! [`crate::trace`]).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use packet::MacAddr;
use serde_json::{json, Value};

use super::Daemon;
use crate::clock::Timestamp;
use crate::dataplane::{trace_synthetic, PortKind, PortRt, Snapshot};
use crate::trace::{FlowSpec, LiveSession, Proto, Step, Traced};

/// The source MAC of a synthetic packet arriving on the uplink (a
/// locally administered address no real neighbour is expected to use).
pub const UPLINK_TRACE_MAC: MacAddr = MacAddr([0x02, 0xff, 0xff, 0xff, 0xff, 0xfe]);

/// Why a build without the `observe` feature refuses traces and captures.
pub const NOT_OBSERVABLE: &str =
    "this vswitchd was built without the observe feature (no capture or trace points)";

/// Longest a live trace waits for its packets.
pub const MAX_LIVE_WAIT: Duration = Duration::from_secs(60);

impl Daemon {
    /// Walks the packet `flow` as if port `port`'s VM (or the uplink's
    /// neighbour) had sent it.
    pub fn trace(&self, port: &str, flow: &str) -> Result<Value, String> {
        if !cfg!(feature = "observe") {
            // A dry run would not be one: the stages could not tell.
            return Err(NOT_OBSERVABLE.into());
        }
        let spec = FlowSpec::parse(flow)?;
        let snap = self.shared.load();
        let p = snap.iter_ports().find(|p| p.name == port).ok_or(format!(
            "no port {port:?} on this host (vswitchctl show lists them)"
        ))?;
        let (src_mac, dst_mac) = macs_for(&snap, p, &spec)?;
        let frame = spec.frame(src_mac, dst_mac);
        let t = trace_synthetic(&snap, p, &frame, Timestamp::now());
        Ok(json!({
            "port": port, "mode": "dry_run", "packet": t.packet,
            "src_mac": src_mac.to_string(), "dst_mac": dst_mac.to_string(),
            "steps": t.steps, "verdict": verdict(&t.steps),
        }))
    }

    /// Traces the next `count` packets arriving at `port` that match
    /// `filter`, waiting at most `wait`.
    pub fn trace_live(
        &self,
        port: &str,
        count: u64,
        filter: Option<&str>,
        wait: Duration,
    ) -> Result<Value, String> {
        if !cfg!(feature = "observe") {
            return Err(NOT_OBSERVABLE.into());
        }
        let filter = filter
            .map(crate::filter::Filter::parse)
            .transpose()
            .map_err(|e| format!("filter: {e}"))?;
        let point = self.capture_point(port).ok_or(format!(
            "no port {port:?} on this host (vswitchctl show lists them)"
        ))?;
        let session = Arc::new(LiveSession::new(count, filter));
        let want = count.clamp(1, crate::trace::MAX_LIVE) as usize;
        point.attach_trace(session.clone())?;
        let deadline = Instant::now() + wait.min(MAX_LIVE_WAIT);
        let mut got: Vec<Traced> = Vec::new();
        loop {
            got.extend(session.take().0);
            if got.len() >= want || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        point.detach_trace(&session);
        // A packet claimed just before the detach finishes on its worker.
        std::thread::sleep(Duration::from_millis(20));
        got.extend(session.take().0);
        let packets: Vec<Value> = got
            .iter()
            .map(|t| json!({"packet": t.packet, "steps": t.steps, "verdict": verdict(&t.steps)}))
            .collect();
        Ok(json!({
            "port": port, "mode": "live", "wanted": want,
            "timed_out": got.len() < want, "packets": packets,
        }))
    }
}

/// The MACs the VM behind `p` would put on `spec`: its own, and the owner
/// of the destination in its network (a port, a lease, the gateway) or,
/// off the subnet, the gateway. On the uplink: a neighbour's, and the
/// uplink's.
fn macs_for(snap: &Snapshot, p: &PortRt, spec: &FlowSpec) -> Result<(MacAddr, MacAddr), String> {
    if p.kind == PortKind::Uplink {
        let up = snap
            .uplink
            .as_ref()
            .ok_or("this host's uplink is not running")?;
        return Ok((UPLINK_TRACE_MAC, up.mac));
    }
    if spec.proto == Proto::Arp {
        return Ok((p.mac, MacAddr([0xff; 6])));
    }
    let net = snap
        .networks
        .get(p.net)
        .ok_or("the port's network is not running")?;
    let on_link = match net.cfg.cidr {
        ipnet::IpNet::V4(n) => n.contains(&spec.dst),
        ipnet::IpNet::V6(_) => false,
    };
    let dst_mac = if on_link || spec.dst == Ipv4Addr::BROADCAST {
        if spec.dst == Ipv4Addr::BROADCAST {
            MacAddr([0xff; 6])
        } else {
            net.addrs.owner(&spec.dst).map(|o| o.mac).ok_or(format!(
                "no port, lease or gateway has {} in network {}: the VM's ARP for it would go unanswered",
                spec.dst, net.cfg.name
            ))?
        }
    } else {
        net.gateway.map(|(_, m)| m).ok_or(format!(
            "{} is outside network {} ({}) and the network has no gateway",
            spec.dst, net.cfg.name, net.cfg.cidr
        ))?
    };
    Ok((p.mac, dst_mac))
}

/// The packet's fate in one line: where it was written, or why it was
/// dropped.
pub fn verdict(steps: &[Step]) -> String {
    let outputs: Vec<String> = steps
        .iter()
        .filter_map(|s| match s.stage {
            "output" => s
                .text
                .strip_prefix("output to ")
                .and_then(|t| t.split(" (").next())
                .map(str::to_string),
            "vxlan" => s.text.split(" (").next().map(|t| {
                t.split(" to ")
                    .nth(1)
                    .map_or(t.to_string(), |h| format!("VXLAN to {h}"))
            }),
            _ => None,
        })
        .collect();
    if !outputs.is_empty() {
        return format!("delivered: {}", outputs.join(", "));
    }
    if let Some(d) = steps.iter().rev().find(|s| s.stage == "drop") {
        return d.text.clone();
    }
    if steps
        .iter()
        .any(|s| s.stage == "deliver" || s.stage == "dhcp")
    {
        return "consumed by the switch".into();
    }
    "not delivered anywhere".into()
}
