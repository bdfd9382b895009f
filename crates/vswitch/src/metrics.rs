//! Prometheus metrics: the same counters `vswitchctl show|fdb|leases`
//! report, in the text exposition format, served on an opt-in address
//! (`[switch] metrics_listen`) at `GET /metrics`.
//!
//! The HTTP side is deliberately tiny and bounded (one request per
//! connection, 8 KB of request, 5 s to send it, 16 connections): it is an
//! input like any other.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::clock::Timestamp;
use crate::daemon::Daemon;

const MAX_REQUEST: usize = 8 * 1024;
const MAX_CONNECTIONS: usize = 16;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Escapes a label value (backslash, quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn s(v: &Value) -> String {
    esc(v.as_str().unwrap_or(""))
}

/// Metric families, each written once with HELP/TYPE then its samples.
#[derive(Default)]
struct Out {
    text: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(self.text, "{name} {v}");
            } else {
                let _ = writeln!(self.text, "{name}{{{labels}}} {v}");
            }
        }
    }
}

/// The load balancers' families, from `vswitchctl lb`'s data.
fn render_lb(o: &mut Out, lb: &Value) {
    let mut up = Vec::new();
    let mut conns = Vec::new();
    let mut weight = Vec::new();
    for l in lb["load_balancers"].as_array().into_iter().flatten() {
        for b in l["backends"].as_array().into_iter().flatten() {
            let label = format!(
                "tenant=\"{}\",lb=\"{}\",backend=\"{}\",endpoint=\"{}\"",
                s(&l["tenant"]),
                s(&l["name"]),
                s(&b["name"]),
                s(&b["endpoint"])
            );
            up.push((label.clone(), u64::from(b["health"] == "up")));
            conns.push((label.clone(), num(&b["connections"])));
            weight.push((label, num(&b["weight"])));
        }
    }
    o.family(
        "vswitch_lb_backend_up",
        "gauge",
        "1 when the backend passes its health check.",
        &up,
    );
    o.family(
        "vswitch_lb_backend_connections",
        "gauge",
        "Open connections balanced to the backend on this host.",
        &conns,
    );
    o.family(
        "vswitch_lb_backend_weight",
        "gauge",
        "The backend's configured weight (0: drained).",
        &weight,
    );
    let events: Vec<(String, u64)> = lb["stats"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (format!("event=\"{}\"", esc(k)), num(v)))
                .collect()
        })
        .unwrap_or_default();
    o.family(
        "vswitch_lb_events_total",
        "counter",
        "Load-balancer counters (new connections, packets forwarded and replied, rejected, hairpin, dropped).",
        &events,
    );
}

/// Renders the metrics from the daemon's `show`, `fdb`, `leases`, `nat`,
/// `sg` and `lb` data.
pub fn render(
    show: &Value,
    fdb: &Value,
    leases: &Value,
    nat: &Value,
    sg: &Value,
    lb: &Value,
) -> String {
    let mut o = Out::default();
    render_lb(&mut o, lb);
    for (name, field, help) in [
        (
            "vswitch_worker_tap_rx_packets_total",
            "tap_rx_packets",
            "Frames a data-plane worker read from taps.",
        ),
        (
            "vswitch_worker_tap_rx_bytes_total",
            "tap_rx_bytes",
            "Bytes a data-plane worker read from taps.",
        ),
        (
            "vswitch_worker_wakeups_total",
            "wakeups",
            "Times a data-plane worker woke up with work.",
        ),
    ] {
        let v: Vec<(String, u64)> = show["worker_stats"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| (format!("worker=\"{}\"", num(&w["worker"])), num(&w[field])))
            .collect();
        o.family(name, "counter", help, &v);
    }
    let mut hits = Vec::new();
    for t in sg["tenants"].as_array().into_iter().flatten() {
        for g in t["groups"].as_array().into_iter().flatten() {
            for r in g["rules"].as_array().into_iter().flatten() {
                hits.push((
                    format!(
                        "tenant=\"{}\",group=\"{}\",rule=\"{}\",direction=\"{}\"",
                        s(&t["tenant"]),
                        s(&g["name"]),
                        num(&r["number"]),
                        s(&r["direction"])
                    ),
                    num(&r["hits"]),
                ));
            }
        }
    }
    o.family(
        "vswitch_sg_rule_hits_total",
        "counter",
        "New connections each security-group rule allowed.",
        &hits,
    );
    let conns: Vec<(String, u64)> = sg["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                format!("port=\"{}\",tenant=\"{}\"", s(&p["port"]), s(&p["tenant"])),
                num(&p["connections"]),
            )
        })
        .collect();
    o.family(
        "vswitch_sg_port_connections",
        "gauge",
        "Connections tracked for a filtered port (security groups).",
        &conns,
    );
    o.family(
        "vswitch_conntrack_entries",
        "gauge",
        "Connections tracked (NAT's conntrack table).",
        &[(String::new(), num(&nat["connections"]))],
    );
    let events: Vec<(String, u64)> = nat["stats"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (format!("event=\"{}\"", esc(k)), num(v)))
                .collect()
        })
        .unwrap_or_default();
    o.family(
        "vswitch_nat_events_total",
        "counter",
        "NAT counters by event (translated packets, new connections by kind, hairpin, ICMP errors, ports exhausted, ...).",
        &events,
    );
    let pool = |key: &str| -> Vec<(String, u64)> {
        nat["pools"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let proto = match &p["proto"] {
                    Value::String(x) => esc(x),
                    other => esc(&other.to_string()),
                };
                (
                    format!("external=\"{}\",proto=\"{proto}\"", s(&p["external"])),
                    num(&p[key]),
                )
            })
            .collect()
    };
    o.family(
        "vswitch_nat_pool_ports_used",
        "gauge",
        "Ports of a NAT pool (external address, protocol) held by mappings.",
        &pool("used"),
    );
    o.family(
        "vswitch_nat_pool_ports_free",
        "gauge",
        "Ports of a NAT pool still free.",
        &pool("free"),
    );
    o.family(
        "vswitch_uptime_seconds",
        "gauge",
        "Seconds since vswitchd started.",
        &[(String::new(), num(&show["uptime_secs"]))],
    );
    let ports: Vec<&Value> = show["ports"].as_array().into_iter().flatten().collect();
    let plabel = |p: &Value| {
        format!(
            "port=\"{}\",tenant=\"{}\",network=\"{}\"",
            s(&p["name"]),
            s(&p["tenant"]),
            s(&p["network"])
        )
    };
    for (key, name, help) in [
        (
            "rx_packets",
            "vswitch_port_rx_packets_total",
            "Frames received from the VM (a super-frame is one).",
        ),
        (
            "rx_bytes",
            "vswitch_port_rx_bytes_total",
            "Bytes received from the VM.",
        ),
        (
            "tx_packets",
            "vswitch_port_tx_packets_total",
            "Frames written to the VM.",
        ),
        (
            "tx_bytes",
            "vswitch_port_tx_bytes_total",
            "Bytes written to the VM.",
        ),
    ] {
        let samples: Vec<(String, u64)> = ports.iter().map(|p| (plabel(p), num(&p[key]))).collect();
        o.family(name, "counter", help, &samples);
    }
    let mut drops = Vec::new();
    for p in &ports {
        for (reason, v) in p["drops"].as_object().into_iter().flatten() {
            drops.push((format!("{},reason=\"{}\"", plabel(p), esc(reason)), num(v)));
        }
    }
    o.family(
        "vswitch_port_drops_total",
        "counter",
        "Frames dropped at a port, by reason (docs/architecture.md).",
        &drops,
    );
    let nets: Vec<&Value> = fdb["networks"].as_array().into_iter().flatten().collect();
    let nlabel = |n: &Value| {
        format!(
            "tenant=\"{}\",network=\"{}\"",
            s(&n["tenant"]),
            s(&n["network"])
        )
    };
    o.family(
        "vswitch_fdb_entries",
        "gauge",
        "MAC table entries per network.",
        &nets
            .iter()
            .map(|n| (nlabel(n), num(&n["count"])))
            .collect::<Vec<_>>(),
    );
    o.family(
        "vswitch_fdb_capacity",
        "gauge",
        "MAC table cap per network.",
        &nets
            .iter()
            .map(|n| (nlabel(n), num(&n["mac_table_size"])))
            .collect::<Vec<_>>(),
    );
    let mut events = Vec::new();
    for n in &nets {
        for (ev, v) in n["stats"].as_object().into_iter().flatten() {
            events.push((format!("{},event=\"{}\"", nlabel(n), esc(ev)), num(v)));
        }
    }
    o.family(
        "vswitch_fdb_events_total",
        "counter",
        "MAC table events: learned, moved, aged, evicted, hijack_refused, table_full.",
        &events,
    );
    let mut dhcp = Vec::new();
    let mut bound = Vec::new();
    for n in leases["networks"].as_array().into_iter().flatten() {
        for (ev, v) in n["stats"].as_object().into_iter().flatten() {
            if v.is_u64() {
                dhcp.push((format!("{},event=\"{}\"", nlabel(n), esc(ev)), num(v)));
            }
        }
        let count = n["leases"]
            .as_array()
            .map_or(0, |l| l.iter().filter(|x| x["state"] == "bound").count());
        bound.push((nlabel(n), count as u64));
    }
    o.family(
        "vswitch_dhcp_events_total",
        "counter",
        "DHCP server events per network (ack, nak, offer, release, ...).",
        &dhcp,
    );
    o.family(
        "vswitch_dhcp_leases_bound",
        "gauge",
        "Bound DHCP leases per network.",
        &bound,
    );
    let ul = &show["underlay"];
    if ul.is_object() {
        o.family(
            "vswitch_underlay_rx_not_peer_total",
            "counter",
            "VXLAN datagrams from addresses that are not configured peers.",
            &[(String::new(), num(&ul["rx_not_peer"]))],
        );
        let peers: Vec<&Value> = ul["peers"].as_array().into_iter().flatten().collect();
        let plabel =
            |p: &Value| format!("peer=\"{}\",vtep=\"{}\"", s(&p["name"]), s(&p["address"]));
        for (key, name, help) in [
            (
                "rx_packets",
                "vswitch_peer_rx_packets_total",
                "VXLAN datagrams received from the peer.",
            ),
            (
                "rx_bytes",
                "vswitch_peer_rx_bytes_total",
                "VXLAN bytes received from the peer.",
            ),
            (
                "tx_packets",
                "vswitch_peer_tx_packets_total",
                "VXLAN datagrams sent to the peer.",
            ),
            (
                "tx_bytes",
                "vswitch_peer_tx_bytes_total",
                "VXLAN bytes sent to the peer.",
            ),
        ] {
            let samples: Vec<(String, u64)> =
                peers.iter().map(|p| (plabel(p), num(&p[key]))).collect();
            o.family(name, "counter", help, &samples);
        }
        let mut pd = Vec::new();
        for p in &peers {
            for (reason, v) in p["drops"].as_object().into_iter().flatten() {
                pd.push((format!("{},reason=\"{}\"", plabel(p), esc(reason)), num(v)));
            }
        }
        o.family(
            "vswitch_peer_drops_total",
            "counter",
            "Frames or datagrams dropped at a peer, by reason.",
            &pd,
        );
    }
    o.text
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, daemon: Arc<Daemon>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // dropped: too many scrapers at once
        };
        let d = daemon.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &d)).await;
            drop(permit);
        });
    }
}

async fn answer(mut stream: TcpStream, daemon: &Arc<Daemon>) -> std::io::Result<()> {
    let mut req = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
        if req.len() > MAX_REQUEST {
            return stream
                .write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    }
    let line = req.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (status, body) = match (method, path) {
        (b"GET", b"/metrics") => {
            let d = daemon.clone();
            let text = tokio::task::spawn_blocking(move || {
                let fdb = d.fdb(None, Timestamp::now()).unwrap_or(Value::Null);
                let sg = d.sg(None).unwrap_or(Value::Null);
                render(&d.show(), &fdb, &d.leases(None), &d.nat(), &sg, &d.lb())
            })
            .await
            .unwrap_or_default();
            ("200 OK", text)
        }
        (b"GET", _) => (
            "404 Not Found",
            "only /metrics is served here\n".to_string(),
        ),
        _ => ("405 Method Not Allowed", String::new()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exposition_format() {
        let show = json!({
            "uptime_secs": 5,
            "ports": [{"name": "vm1", "tenant": "acme", "network": "web", "rx_packets": 3,
                        "rx_bytes": 300, "tx_packets": 2, "tx_bytes": 200,
                        "drops": {"ip_src_spoofed": 7}}],
            "underlay": {"rx_not_peer": 4, "peers": [{"name": "b", "address": "198.19.0.2",
                        "rx_packets": 1, "rx_bytes": 2, "tx_packets": 3, "tx_bytes": 4,
                        "drops": {"underlay_unknown_vni": 2}}]},
        });
        let fdb = json!({"networks": [{"tenant": "acme", "network": "web", "count": 2,
                        "mac_table_size": 8192, "stats": {"learned": 1}}]});
        let leases = json!({"networks": [{"tenant": "acme", "network": "web",
                        "stats": {"ack": 2}, "leases": [{"state": "bound"}]}]});
        let nat = json!({"connections": 3, "stats": {"hairpin": 2},
                        "pools": [{"external": "203.0.113.2", "proto": "tcp", "used": 3, "free": 10}]});
        let sg = json!({"tenants": [{"tenant": "acme", "groups": [{"name": "web",
                        "rules": [{"number": 1, "direction": "ingress", "hits": 9}]}]}],
                        "ports": [{"port": "vm1", "tenant": "acme", "connections": 4}]});
        let lb = json!({"load_balancers": [{"tenant": "acme", "name": "site", "backends": [
                        {"name": "web1", "endpoint": "10.0.1.11:8000", "health": "up", "weight": 2, "connections": 5}]}],
                        "stats": {"new": 7}});
        let t = render(&show, &fdb, &leases, &nat, &sg, &lb);
        for want in [
            "vswitch_nat_pool_ports_used{external=\"203.0.113.2\",proto=\"tcp\"} 3",
            "vswitch_nat_pool_ports_free{external=\"203.0.113.2\",proto=\"tcp\"} 10",
            "# TYPE vswitch_port_rx_packets_total counter",
            "vswitch_port_rx_packets_total{port=\"vm1\",tenant=\"acme\",network=\"web\"} 3",
            "vswitch_port_drops_total{port=\"vm1\",tenant=\"acme\",network=\"web\",reason=\"ip_src_spoofed\"} 7",
            "vswitch_fdb_entries{tenant=\"acme\",network=\"web\"} 2",
            "vswitch_dhcp_leases_bound{tenant=\"acme\",network=\"web\"} 1",
            "vswitch_underlay_rx_not_peer_total 4",
            "vswitch_conntrack_entries 3",
            "vswitch_sg_rule_hits_total{tenant=\"acme\",group=\"web\",rule=\"1\",direction=\"ingress\"} 9",
            "vswitch_sg_port_connections{port=\"vm1\",tenant=\"acme\"} 4",
            "vswitch_nat_events_total{event=\"hairpin\"} 2",
            "vswitch_lb_backend_up{tenant=\"acme\",lb=\"site\",backend=\"web1\",endpoint=\"10.0.1.11:8000\"} 1",
            "vswitch_lb_backend_connections{tenant=\"acme\",lb=\"site\",backend=\"web1\",endpoint=\"10.0.1.11:8000\"} 5",
            "vswitch_lb_events_total{event=\"new\"} 7",
            "vswitch_peer_drops_total{peer=\"b\",vtep=\"198.19.0.2\",reason=\"underlay_unknown_vni\"} 2",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
